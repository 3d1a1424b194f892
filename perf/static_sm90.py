"""Compile every shipped Triton kernel configuration for sm_90a (H100/H200) without a GPU, and report
registers, spills, shared memory and occupancy per configuration.

    python perf/static_sm90.py                                   # -> perf/results/static_sm90.json
    PYTHONPATH=/tmp/tri36 python perf/static_sm90.py --out perf/results/static_sm90_triton3.6.json
    python perf/static_sm90.py --update                          # compile only what the report lacks
    python perf/static_sm90.py --candidates                      # -> perf/results/static_sm90_candidates.json

The launches are the launchers' own: the attention launchers (padded, gathered and packed layouts,
with and without dropout, every head dim, fp16/bf16/fp32), the row kernels (every row-block width,
each variant), run under tokdrop.kernels.tuning.record() on small CPU tensors of BERT-base strides,
so that the arguments, constexprs and specialisations (divisibility by 16, unit strides, absent
pointers) are exactly what triton's JIT would compile on a GPU. Each configuration of the kernel's
autotune space is compiled with triton.compile for GPUTarget("cuda", 90, 32), the target of an H100
or H200. Registers and spills come from the cubin triton built (cuobjdump --dump-resource-usage) and
the ptxas log of that build; shared memory from the compiled kernel's metadata. --candidates
compiles a wider set of attention tiles (padded layout; bf16, and fp32 without dropout) to choose the spaces from.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

PERF = Path(__file__).resolve().parent
REPO = PERF.parent
DEFAULT_OUT = PERF / "results" / "static_sm90.json"
CAPABILITY, WARP_SIZE = 90, 32

# sm_90 (H100/H200) per-SM limits (CUDA C Programming Guide, compute capability 9.0).
REGS_PER_SM = 65536
MAX_REGS_PER_THREAD = 255
REG_ALLOC_UNIT = 256  # registers, per warp
SMEM_PER_SM = 228 * 1024
MAX_SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024  # the system's share of each resident block
MAX_THREADS_PER_SM = 2048
MAX_WARPS_PER_SM = MAX_THREADS_PER_SM // WARP_SIZE
MAX_BLOCKS_PER_SM = 32

# --candidates: attention tiles beside the shipped spaces, (BLOCK_M, BLOCK_N, num_warps, num_stages).
CANDIDATES = {
    "_attn_fwd_kernel": [
        (128, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (128, 32, 8, 3),
        (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2),
    ],
    "_attn_bwd_dkdv_kernel": [
        (64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 128, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2),
        (16, 64, 4, 2), (32, 64, 4, 3),
    ],
    "_attn_bwd_dq_kernel": [
        (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2),
        (64, 16, 4, 2), (64, 32, 4, 3),
    ],
    "_attn_bwd_preprocess_kernel": [(128, None, 4, 1), (64, None, 4, 1), (32, None, 4, 1), (128, None, 8, 1)],
}  # fmt: skip


# ------------------------------------------------------------------------------------------ launches


def launches(*, dtypes=None, layouts=("padded", "gathered", "packed"), dropouts=(0.0, 0.1), rows=True):
    """Every launch the launchers make for the shipped head dims, dtypes, layouts and dropout
    settings (and the row kernels' widths and variants), as tokdrop.kernels.tuning.Launch records."""
    import torch

    from tokdrop.kernels import rows as rk
    from tokdrop.kernels import subset_attention as sa
    from tokdrop.kernels.tuning import record

    dtypes = dtypes or (torch.float16, torch.bfloat16, torch.float32)
    batch, seq, hidden = 2, 512, 768  # BERT-base strides; the batch only scales the batch stride
    recorded = []
    with record() as out:
        for d in sa.HEAD_DIMS:
            nh = hidden // d
            for dtype in dtypes:
                for layout in layouts:
                    for p in dropouts:
                        _attention_launches(sa, torch, batch, seq, nh, d, dtype, layout, p)
        seed = torch.zeros(1, dtype=torch.int64)
        sa.dropout_keep_mask(seed, batch, 2, 40, 40, 0.1)
        if rows:
            for dtype in dtypes:
                for block_h in rk.BLOCK_HS:
                    _row_launches(rk, torch, batch, block_h, dtype)
        recorded.extend(out)
    return recorded


def _attention_launches(sa, torch, batch, seq, nh, d, dtype, layout, dropout_p):
    seed = torch.zeros(1, dtype=torch.int64) if dropout_p else None
    lens = torch.full((batch,), seq, dtype=torch.int32)
    if layout == "packed":
        q = torch.empty(batch * seq, nh, d, dtype=dtype)
        cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32)
        q_seq = k_seq = cu
        q_index, lq = None, seq
    else:
        q = torch.empty(batch, seq, nh, d, dtype=dtype)
        q_seq = k_seq = lens
        q_index = torch.zeros(batch, seq // 2, dtype=torch.int64) if layout == "gathered" else None
        lq = seq if q_index is None else seq // 2
    args = (q_seq, k_seq, q_index, seed, d**-0.5, dropout_p, lq, seq, layout == "packed")
    out, lse = sa._launch_fwd(q, q, q, *args)
    sa._launch_bwd(out, q, q, q, out, lse, *args)


def _row_launches(rk, torch, batch, hidden, dtype):
    slots, positions = 32, 64
    x = torch.empty(batch, positions, hidden, dtype=dtype)
    idx = torch.zeros(batch, slots, dtype=torch.int64)
    lens = torch.full((batch,), slots, dtype=torch.int64)
    inv = torch.zeros(batch, positions, dtype=torch.int32)
    kept = torch.empty(batch, slots, hidden, dtype=dtype)
    rk._gather_rows(x, idx, None)  # drop_tokens
    rk._gather_rows(x, idx, lens)  # restore_tokens' backward, d_kept
    rk._merge_rows(None, kept, inv, x)  # drop_tokens' backward
    rk._merge_rows(x, kept, inv, x)  # restore_tokens
    rk._merge_rows(x, None, inv, x)  # restore_tokens' backward, d_saved


# ------------------------------------------------------------------------------------------ identity


def _dtype_of(launch) -> str:
    """The element type of the kernel's first floating-point tensor argument."""
    for arg in launch.args:
        if getattr(arg, "is_floating_point", lambda: False)():
            return str(arg.dtype).removeprefix("torch.")
    return "none"


def _constexpr_names(kernel) -> list[str]:
    fn = getattr(kernel, "fn", kernel)
    return [name for name, param in inspect.signature(fn).parameters.items() if "constexpr" in str(param.annotation)]


def identity(launch, cfg: dict) -> dict:
    """What selects a compiled kernel: name, dtype, space key, constexprs, warps and stages."""
    blocks = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    constexprs = {k: v for k, v in {**launch.kwargs, **blocks}.items() if k in _constexpr_names(launch.tiled.kernel)}
    key = launch.space_key
    return {
        "kernel": launch.tiled.name,
        "dtype": _dtype_of(launch),
        "head_dim": constexprs.get("HEAD_DIM"),
        "space_key": key,
        "constexprs": dict(sorted(constexprs.items())),
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
    }


def identity_key(entry: dict) -> str:
    fields = ("kernel", "dtype", "space_key", "constexprs", "num_warps", "num_stages")
    return json.dumps({k: entry[k] for k in fields}, sort_keys=True)


def shipped_identities() -> list[dict]:
    """Every configuration the launchers and their autotune spaces can select (no compilation)."""
    seen = {}
    for launch in launches():
        for cfg in launch.tiled.space(launch.space_key):
            entry = identity(launch, cfg)
            seen.setdefault(identity_key(entry), entry)
    return list(seen.values())


def kernel_source_hash() -> str:
    """sha256 over the source of every Triton function of the kernel modules (kernels and helpers),
    the same under the interpreter and the JIT: the report is stale when it changes."""
    from tokdrop.kernels import rows as rk
    from tokdrop.kernels import subset_attention as sa

    digest = hashlib.sha256()
    for module in (sa, rk):
        for name, obj in sorted(vars(module).items()):
            fn = getattr(obj, "fn", None)
            if inspect.isfunction(fn) and type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                digest.update(name.encode() + b"\0" + inspect.getsource(fn).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------- compilation


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.is_file() else name


def ptxas_for_target() -> str:
    """The ptxas triton runs for sm_90 (triton 3.9: ptxas-blackwell, CUDA 13; 3.6: ptxas, CUDA 12.8)."""
    from triton.backends.nvidia import compiler as nv

    return nv.get_ptxas(CAPABILITY).path


def compile_one(launch, cfg: dict) -> dict:
    """Compile one configuration for sm_90a and read its resources."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", CAPABILITY, WARP_SIZE)
    backend = make_backend(target)
    fn = launch.tiled.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.kwargs, **cfg}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - started
    usage = _resource_usage(compiled.asm["cubin"])
    ptxas = _parse_ptxas(log.getvalue())
    shared = int(compiled.metadata.shared)
    result = {
        "registers": usage["REG"],
        "spill_stores": ptxas.get("spill_stores"),
        "spill_loads": ptxas.get("spill_loads"),
        "stack_frame_bytes": usage["STACK"],
        "local_bytes": usage["LOCAL"],
        "shared_bytes": shared,
        "static_shared_bytes": usage["SHARED"],
        "ptxas_registers": ptxas.get("registers"),
        "compile_s": round(seconds, 2),
    }
    result.update(occupancy(result["registers"], shared + usage["SHARED"], cfg["num_warps"]))
    result["spills"] = bool((result["spill_stores"] or 0) or (result["spill_loads"] or 0) or usage["LOCAL"])
    result["fits"] = (
        result["registers"] <= MAX_REGS_PER_THREAD
        and shared + usage["SHARED"] <= MAX_SMEM_PER_BLOCK
        and result["blocks_per_sm"] >= 1
    )
    return result


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {
        key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line) if key in ("REG", "STACK", "SHARED", "LOCAL")
    }


def _parse_ptxas(log: str) -> dict[str, int]:
    found = {}
    for key, pattern in (
        ("registers", r"Used (\d+) registers"),
        ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"),
    ):
        match = re.search(pattern, log)
        if match:
            found[key] = int(match.group(1))
    return found


def occupancy(registers: int, shared_bytes: int, num_warps: int) -> dict[str, object]:
    """Resident blocks and warps per sm_90 SM, and which limit binds."""
    regs_per_warp = -(-registers * WARP_SIZE // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "registers": (REGS_PER_SM // regs_per_warp) // num_warps if regs_per_warp else MAX_BLOCKS_PER_SM,
        "shared_memory": SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_BLOCK),
        "threads": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    if shared_bytes > MAX_SMEM_PER_BLOCK:
        limits["shared_memory"] = 0
    blocks = min(limits.values())
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * num_warps,
        "occupancy": blocks * num_warps / MAX_WARPS_PER_SM,
        "limited_by": min(limits, key=limits.get),
    }


# ---------------------------------------------------------------------------------------------- main


def _candidate_configs(launch, tiles=None) -> list[dict]:
    name = launch.tiled.name
    shipped = list(launch.tiled.space(launch.space_key))
    extra = []
    for m, n, warps, stages in CANDIDATES.get(name, []) if tiles is None else tiles.get(name, []):
        cfg = {"BLOCK_M": m, "num_warps": warps, "num_stages": stages}
        if n is not None:
            cfg["BLOCK_N"] = n
        extra.append(cfg)
    return shipped + [cfg for cfg in extra if cfg not in shipped]


def run(configs_of, selected, progress: bool, limit: int | None = None, reuse: dict | None = None) -> list[dict]:
    """Compile each distinct configuration (reuse: identity key -> an entry still valid for it)."""
    work, seen, entries = [], set(), []
    for launch in selected:  # launches that differ only in runtime values compile alike
        for cfg in configs_of(launch):
            key = identity_key(identity(launch, cfg))
            if key not in seen:
                seen.add(key)
                work.append((launch, cfg))
    work = work[:limit]
    started = time.monotonic()
    for i, (launch, cfg) in enumerate(work):
        entry = identity(launch, cfg)
        if reuse and identity_key(entry) in reuse:
            entries.append(reuse[identity_key(entry)])
            continue
        try:
            entry.update(compile_one(launch, cfg))
        except Exception as err:  # e.g. out of shared memory at compile time: recorded, not fatal
            entry.update({"error": f"{type(err).__name__}: {str(err)[:300]}", "fits": False, "spills": None})
        entries.append(entry)
        if progress:
            print(
                f"[{i + 1}/{len(work)} {time.monotonic() - started:6.0f} s] {entry['kernel']} {entry['dtype']} "
                f"{entry['constexprs']} w{entry['num_warps']} s{entry['num_stages']}: "
                + (
                    entry.get("error")
                    or f"{entry['registers']} regs, spill {entry['spill_stores']}/"
                    f"{entry['spill_loads']} B, smem {entry['shared_bytes']}, occ {entry['occupancy']:.3f}"
                ),
                file=sys.stderr,
                flush=True,
            )
    return entries


def _reusable(path: Path, triton_version: str) -> dict:
    """Entries of an earlier report still valid: same triton and kernel code (configurations that
    are no longer selectable are dropped, since only the current ones are looked up)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("triton") != triton_version or old.get("kernel_source_sha256") != kernel_source_hash():
        return {}
    return {identity_key(e): e for e in old["configs"] if "error" not in e}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="compile wider attention candidate tiles (padded; bf16, fp32 without dropout)",
    )
    parser.add_argument(
        "--tiles",
        nargs="+",
        default=None,
        help="with --candidates: KERNEL:M,N,WARPS,STAGES tiles instead of CANDIDATES",
    )
    parser.add_argument("--kernels", nargs="+", default=None, help="only these kernels (names as in the report)")
    parser.add_argument("--dtypes", nargs="+", default=None, help="only these dtypes (float16, bfloat16, float32)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None, help="only these head dims")
    parser.add_argument("--limit", type=int, default=None, help="compile only the first N configurations")
    parser.add_argument(
        "--update",
        action="store_true",
        help="reuse the entries of --out made by the same triton from the same kernel code; compile only new ones",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if "triton" in sys.modules:
        raise RuntimeError("static_sm90 must set up triton itself: run it as a script, before triton is imported")
    # The kernels must be JIT functions, not the interpreter's; a fresh cache makes ptxas run (and
    # log) for every configuration.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="static_sm90_cache_")
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

    import torch
    import triton

    if args.candidates:
        selected = launches(dtypes=(torch.bfloat16,), layouts=("padded",), rows=False)
        selected += launches(dtypes=(torch.float32,), layouts=("padded",), dropouts=(0.0,), rows=False)
        tiles = None
        if args.tiles:
            tiles = {}
            for spec in args.tiles:
                kernel, numbers = spec.split(":")
                m, n, warps, stages = (None if x == "-" else int(x) for x in numbers.split(","))
                tiles.setdefault(kernel, []).append((m, n, warps, stages))
        configs_of = lambda launch: _candidate_configs(launch, tiles)  # noqa: E731
        default_out = PERF / "results" / "static_sm90_candidates.json"
    else:
        selected = launches()
        configs_of = lambda launch: launch.tiled.space(launch.space_key)  # noqa: E731
        default_out = DEFAULT_OUT
    if args.kernels:
        selected = [launch for launch in selected if launch.tiled.name in args.kernels]
    if args.dtypes:
        selected = [launch for launch in selected if _dtype_of(launch) in args.dtypes]
    if args.head_dims:
        selected = [launch for launch in selected if launch.kwargs.get("HEAD_DIM") in args.head_dims]
    out = args.out or default_out
    reuse = _reusable(out, triton.__version__) if args.update else None
    entries = run(configs_of, selected, not args.quiet, args.limit, reuse)
    from provenance import git_commit  # perf/ is the script's folder, hence on sys.path

    ptxas = ptxas_for_target()
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    payload = {
        "tool": "perf/static_sm90.py",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "target": f"GPUTarget('cuda', {CAPABILITY}, {WARP_SIZE}): sm_90a, H100/H200",
        "ptxas": f"{os.path.relpath(ptxas, Path(triton.__file__).parent.parent)} ({version})",
        "git": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "candidates": args.candidates,
        "kernel_source_sha256": kernel_source_hash(),
        "specialisation": "the launchers' arguments for BERT-base strides (hidden 768, max lengths 512, "
        "row widths 1..1024): strides divisible by 16, head dims unit-stride",
        "limits": {
            "registers_per_sm": REGS_PER_SM,
            "max_registers_per_thread": MAX_REGS_PER_THREAD,
            "register_allocation_unit_per_warp": REG_ALLOC_UNIT,
            "shared_bytes_per_sm": SMEM_PER_SM,
            "max_shared_bytes_per_block": MAX_SMEM_PER_BLOCK,
            "reserved_shared_bytes_per_block": SMEM_RESERVED_PER_BLOCK,
            "max_threads_per_sm": MAX_THREADS_PER_SM,
            "max_blocks_per_sm": MAX_BLOCKS_PER_SM,
        },
        "summary": {
            "configs": len(entries),
            "spilling": sum(bool(e.get("spills")) for e in entries),
            "not_fitting": sum(not e.get("fits") for e in entries),
            "errors": sum("error" in e for e in entries),
        },
        "configs": entries,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"{payload['summary']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
