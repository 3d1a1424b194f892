"""The sm_90a (H100/H200) static report of the Triton kernels, perf/results/static_sm90.json: no
shipped configuration spills registers or needs more shared memory than one SM has, the report
covers every configuration the launchers and their autotune spaces can select, it was made from
the current kernel code, and a sample recompiled here still gives its figures."""

import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PERF = REPO / "perf"
REPORT = PERF / "results" / "static_sm90.json"
# The report of the installed triton, and of triton 3.6, which the GPU image runs.
REPORTS = (REPORT, PERF / "results" / "static_sm90_triton3.6.json")
REGENERATE = "regenerate it: python perf/static_sm90.py --update (see perf/NOTES.md), also for triton 3.6"


@pytest.fixture(scope="module")
def static():
    pytest.importorskip("triton")
    sys.path.insert(0, str(PERF))
    try:
        yield importlib.import_module("static_sm90")
    finally:
        sys.path.remove(str(PERF))


@pytest.fixture(scope="module", params=REPORTS, ids=lambda path: path.name)
def each_report(request):
    return json.loads(request.param.read_text())


def describe(entry: dict) -> str:
    return f"{entry['kernel']} {entry['dtype']} {entry['constexprs']} w{entry['num_warps']} s{entry['num_stages']}"


def test_no_shipped_configuration_spills_or_overflows_shared_memory(each_report):
    report = each_report
    limits = report["limits"]
    bad = [
        describe(e) + f": {e.get('error') or (e['registers'], e['spill_stores'], e['spill_loads'], e['shared_bytes'])}"
        for e in report["configs"]
        if "error" in e
        or e["spills"]
        or e["spill_stores"]
        or e["spill_loads"]
        or e["local_bytes"]
        or e["registers"] > limits["max_registers_per_thread"]
        or e["shared_bytes"] + e["static_shared_bytes"] > limits["max_shared_bytes_per_block"]
        or e["blocks_per_sm"] < 1
    ]
    assert not bad, f"{len(bad)} shipped configurations spill or do not fit on an sm_90 SM:\n" + "\n".join(bad[:20])
    assert report["target"].startswith("GPUTarget('cuda', 90, 32)")


def test_report_covers_every_selectable_configuration(static, each_report):
    report = each_report
    reported = {static.identity_key(e) for e in report["configs"]}
    selectable = static.shipped_identities()
    missing = [describe(e) for e in selectable if static.identity_key(e) not in reported]
    assert not missing, (
        f"the triton {report['triton']} report misses {len(missing)} configurations ({REGENERATE}):\n"
        + "\n".join(missing[:20])
    )
    # Every Triton kernel of the package is launched by the enumeration.
    from tokdrop.kernels import rows, subset_attention

    kernels = {tiled.name for tiled in (*subset_attention.KERNELS, *rows.KERNELS)}
    assert kernels == {e["kernel"] for e in selectable}
    assert len(reported) == len(report["configs"])  # one entry per configuration


def test_report_was_made_from_the_current_kernels(static, each_report):
    report = each_report
    assert report["kernel_source_sha256"] == static.kernel_source_hash(), (
        f"the kernels changed since the triton {report['triton']} report was written: {REGENERATE}"
    )


def _ptxas_or_skip(static):
    try:
        path = pathlib.Path(static._tool("ptxas"))
    except ImportError as err:
        pytest.skip(f"triton's NVIDIA backend is missing: {err}")
    if not path.is_file():
        pytest.skip(f"ptxas is missing ({path}): cannot compile for sm_90a here")


def test_a_recompiled_sample_matches_the_report(static, tmp_path):
    """The forward kernel's shipped tiles at head dim 64 in bf16 (the BERT-base training case),
    compiled again here for sm_90a: no spills, and the figures of the report of this triton."""
    import triton

    _ptxas_or_skip(static)
    out = tmp_path / "sample.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(PERF / "static_sm90.py"), "--quiet", "--out", str(out)]
    command += ["--kernels", "_attn_fwd_kernel", "--dtypes", "bfloat16", "--head-dims", "64", "--limit", "2"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sample = json.loads(out.read_text())["configs"]
    assert len(sample) == 2
    same_triton = [r for r in map(json.loads, (p.read_text() for p in REPORTS)) if r["triton"] == triton.__version__]
    reported = {static.identity_key(e): e for r in same_triton for e in r["configs"]}
    for entry in sample:
        assert "error" not in entry and not entry["spills"] and entry["fits"], describe(entry)
        if reported:
            committed = reported[static.identity_key(entry)]
            for key in ("registers", "spill_stores", "spill_loads", "shared_bytes"):
                assert entry[key] == committed[key], f"{describe(entry)}: {key} {entry[key]} != {committed[key]}"


def test_occupancy_arithmetic(static):
    # 128 registers x 32 threads = 4096 per warp: 16 warps, 4 blocks of 4 warps by registers.
    assert static.occupancy(128, 0, 4)["blocks_per_sm"] == 4
    # 255 registers round up to 8192 per warp (granularity 256): 8 warps, one 8-warp block.
    assert static.occupancy(255, 16 * 1024, 8) == {
        "blocks_per_sm": 1, "warps_per_sm": 8, "occupancy": 0.125, "limited_by": "registers",
    }  # fmt: skip
    # 100 KiB of shared memory: 2 blocks in 228 KiB (1 KiB reserved per block); 228 KiB: none.
    assert static.occupancy(32, 100 * 1024, 4)["blocks_per_sm"] == 2
    assert static.occupancy(32, 228 * 1024, 4)["blocks_per_sm"] == 0


def test_every_space_builds_its_autotuner():
    """triton.autotune accepts each space and its key (names of kernel arguments; triton >= 3.7
    checks them), and the interpreter's tiles sit outside the GPU spaces' concerns."""
    pytest.importorskip("triton")
    from tokdrop.kernels import rows, subset_attention

    for tiled in (*subset_attention.KERNELS, *rows.KERNELS):
        arg_names = list(inspect.signature(getattr(tiled.kernel, "fn", tiled.kernel)).parameters)
        assert set(tiled.key) <= set(arg_names), tiled.name
        for space_key, space in tiled.spaces.items():
            assert space and all({"num_warps", "num_stages"} <= set(cfg) for cfg in space)
            tuner = tiled._tuner(space_key)
            assert len(tuner.configs) == len(space)
