"""`tokdrop pretrain`: settings, shards, exact resume (also after a real SIGKILL), faults, and DDP /
FSDP2 on CPU with gloo matching a single process."""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokdrop import BertForMaskedLM, BertModel, pretrain
from tokdrop.data import pack_sequences
from tokdrop.pretrain import checkpoints, locks
from tokdrop.pretrain import shards as shards_module
from tokdrop.pretrain.modes import consistency_step, kept_length, model_config
from tokdrop.pretrain.settings import Settings, add_arguments, read_config_file, settings_from_arguments
from tokdrop.pretrain.shards import ShardSet, build_shards, sources_of, text_files
from tokdrop.pretrain.stream import MaskedStream, PackedRows, feistel_permutation, rank_batches
from tokdrop.vocabulary import SpecialTokenIds

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "pretrain_base.toml"
TINY = [
    "--preset", "tiny", "--layers", "4", "--hidden", "32", "--heads", "2", "--intermediate", "64",
    "--seq-len", "32", "--batch-size", "4", "--steps", "8", "--warmup-steps", "2", "--log-every", "1",
    "--save-every", "4", "--num-workers", "0",
]  # fmt: skip
# Subprocesses get one thread each: the same arithmetic in every run, and less contention on 2 cores.
# They run in tmp_path: `python -m` puts the current directory on sys.path, and the checkout's tokdrop/
# folder would shadow the installed package.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _write_corpus(directory: Path, files: int = 3, lines: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "the of and to in is was for on that with as by at from his her which are were".split()
    words += [f"w{i}" for i in range(250)]
    directory.mkdir(parents=True)
    for index in range(files):
        text = "".join(" ".join(rng.choices(words, k=rng.randint(5, 30))) + ".\n" for _ in range(lines))
        (directory / f"part{index}.txt").write_text(text)
    return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A shard directory of a small synthetic corpus with a 400-token WordPiece vocabulary."""
    root = tmp_path_factory.mktemp("pretrain")
    corpus = _write_corpus(root / "corpus")
    assert (
        pretrain.main(["--data", str(corpus), "--vocab-size", "400", "--out", str(root / "prep"), "--prepare-only"])
        == 0
    )
    return root / "prep" / "shards"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose much to contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pretrain(*argv: str) -> int:
    """`tokdrop pretrain ARGV` in this process; a bad setting raises its ValueError."""
    parser = argparse.ArgumentParser()
    pretrain.add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", *argv])
    return args.run(args)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(out: Path) -> list[str]:
    return [p.name for p in checkpoints.list_checkpoints(out / "checkpoints")]


# ---------------------------------------------------------------------------------------- settings


def test_config_file_then_flags_and_presets(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'preset = "small"\n[model]\nmode = "narrow"\nhidden = 256\nheads = 4\n'
        '[data]\ndata = "corpus"\nseq-len = 64\n[train]\nlr = 1\nsteps = 50\nwarmup_steps = 5\n'
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_arguments(parser.parse_args(["--config", str(config), "--hidden", "128", "--heads", "2"]))
    assert (settings.layers, settings.hidden, settings.heads, settings.intermediate) == (4, 128, 2, 2048)
    assert settings.mode == "narrow" and settings.seq_len == 64 and settings.lr == 1.0
    assert settings.data == [str(tmp_path / "corpus")]  # relative to the config file
    assert settings.weight_decay == 0.01 and settings.warmup_steps == 5
    # BERT's 10,000 warm-up steps, scaled down to a tenth of a shorter run.
    assert Settings(steps=1_000_000).warmup_steps == 10_000 and Settings(steps=50).warmup_steps == 5
    base, large = Settings(preset="base"), Settings(preset="large", steps=20_000)
    assert (base.layers, base.hidden, base.heads, base.intermediate) == (12, 768, 12, 3072)
    assert (large.layers, large.hidden, large.heads, large.intermediate) == (24, 1024, 16, 4096)

    example = read_config_file(EXAMPLE)
    assert Settings(**example).hidden == 768 and Settings(**example).warmup_steps == 10_000


def test_the_example_config_runs_with_data_and_says_when_data_is_missing(shards, tmp_path):
    with pytest.raises(ValueError, match=r"no data: set --data \(or `data` in the --config file\)"):
        _pretrain("--config", str(EXAMPLE))
    assert not (EXAMPLE.parent / "runs").exists()  # refused before its --out is made
    small = ["--layers", "2", "--hidden", "32", "--heads", "2", "--intermediate", "64", "--seq-len", "32"]
    small += ["--batch-size", "2", "--steps", "3", "--num-workers", "0", "--no-compile"]  # compiling takes minutes
    out = tmp_path / "run"
    assert _pretrain("--config", str(EXAMPLE), "--data", str(shards), "--out", str(out), *small) == 0
    config = BertForMaskedLM.from_pretrained(out / "model").config
    assert config.token_drop.keep == 0.5 and _checkpoints(out) == ["step-00000003"]


def test_yaml_config_file(tmp_path):
    pytest.importorskip("yaml")
    config = tmp_path / "run.yaml"
    config.write_text("model: {preset: tiny}\nsteps: 30\nwarmup-steps: 3\n")
    assert read_config_file(config) == {"preset": "tiny", "steps": 30, "warmup_steps": 3}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("batchsize = 3\n", "'batchsize' is not a setting"),
        ("[train]\nsteps = 'many'\n", "'steps' must be an integer, got 'many'"),
        ("steps = [\n", "is not valid"),
        ("mode = 'sparse'\n", "mode must be one of"),
        ("steps = 10\nwarmup_steps = 10000\n", "warmup_steps=10000 must be less than steps=10"),
        ("lr = inf\n", "lr must be a finite number, got inf"),
        ("max_grad_norm = nan\n", "max_grad_norm must be a finite number, got nan"),
        ("weight_decay = nan\n", "weight_decay must be a finite number, got nan"),
        ("keep = -inf\n", "keep must be a finite number, got -inf"),
        ("lr = 0\n", "lr must be > 0, got 0.0"),
        ("dropout = 1\n", "dropout must be < 1, got 1.0"),
        ("mlm_probability = 0\n", "mlm_probability must be > 0, got 0.0"),
        ("seed = 18446744073709551616\n", "seed must be < 18446744073709551616, got 18446744073709551616"),
        ("seed = -1\n", "seed must be >= 0, got -1"),
        ("mode = 'narrow'\nlayers = 3\nfull_layers = 3\n", "full_layers=3 leaves no narrow layer in layers=3"),
        ("mode = 'random_ltd'\nlayers = 1\n", "mode='random_ltd' needs layers >= 2"),
        ("seq_len = 1024\n", "seq_len=1024 exceeds max_position_embeddings=512"),
        ("mode = 'dense'\nconsistency_every = 2\n", "consistency_every=2 needs mode token_drop"),
        ("keep = 1.5\n", "keep must be in"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path, text, match):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ValueError, match=match):
        _pretrain("--config", str(config))


@pytest.mark.parametrize(
    ("flag", "value", "match"),
    [
        ("--lr", "inf", "lr must be a finite number, got inf"),
        ("--max-grad-norm", "nan", "max_grad_norm must be a finite number, got nan"),
        ("--weight-decay", "nan", "weight_decay must be a finite number, got nan"),
        ("--seed", str(2**64), f"seed must be < {2**64}"),
        ("--seed", "-5", "seed must be >= 0, got -5"),
    ],
)
def test_bad_flags_are_refused_before_any_work(tmp_path, flag, value, match):
    with pytest.raises(ValueError, match=match):
        _pretrain("--data", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "out"), flag, value)
    assert not (tmp_path / "out").exists()


def test_help_states_defaults_without_none(capsys):
    parser = argparse.ArgumentParser()
    pretrain.add_command(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "None" not in text
    assert "--data DATA [DATA ...] text files, directories of them, or one shard directory (required" in text
    assert "--warmup-steps WARMUP_STEPS linear warm-up steps, then linear decay to 0 (default: a tenth" in text
    assert "--lr LR peak AdamW learning rate (default: 0.0001)" in text


def test_help_is_fast_and_loads_no_torch(tmp_path):
    probe = (
        "import sys, time; start = time.perf_counter(); from tokdrop.cli import main\n"
        "try:\n    main(['pretrain', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(time.perf_counter() - start, 'torch' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=ENV, cwd=tmp_path, capture_output=True, text=True, check=True
    )
    seconds, loaded = done.stderr.split()
    assert loaded == "False" and float(seconds) < 1.0


def test_the_modules_that_build_the_parser_import_no_torch_of_their_own():
    """What pretrain owes to the test above, which also needs a lazy `import tokdrop`: the parser's
    modules import torch (and the trainer) only inside functions."""
    allowed = {"tokdrop.checks", "tokdrop.cli", "tokdrop.presets", "tokdrop.pretrain.settings"}
    for name in ("__init__.py", "settings.py"):
        imported = set()
        for node in ast.parse((REPO / "tokdrop" / "pretrain" / name).read_text()).body:
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module)
        assert {module for module in imported if module.split(".")[0] in ("tokdrop", "torch")} <= allowed, name


@pytest.mark.parametrize("mode", ["dense", "token_drop", "narrow", "random_ltd"])
def test_the_tiny_preset_runs_in_every_mode(shards, tmp_path, mode):
    small = ["--seq-len", "32", "--batch-size", "2", "--num-workers", "0", "--steps", "2", "--save-every", "2"]
    out = tmp_path / mode
    assert _pretrain("--preset", "tiny", "--mode", mode, "--data", str(shards), "--out", str(out), *small) == 0
    config = BertForMaskedLM.from_pretrained(out / "model").config
    assert config.num_hidden_layers == 2
    assert config.narrow is None if mode != "narrow" else config.narrow.full_layers == 1  # 2 leaves no narrow layer


def test_a_one_layer_dense_model_trains(shards, tmp_path):
    argv = ["--data", str(shards), "--out", str(tmp_path), *TINY, "--layers", "1", "--mode", "dense"]
    assert _pretrain(*argv) == 0


def test_fp16_is_refused_on_cpu(shards, tmp_path):
    with pytest.raises(ValueError, match="fp16.*needs a CUDA GPU"):
        _pretrain("--data", str(shards), "--out", str(tmp_path), *TINY, "--precision", "fp16")


def test_random_ltd_kept_length_grows_in_few_steps_to_the_full_length():
    settings = Settings(
        mode="random_ltd",
        seq_len=128,
        ltd_start=0.25,
        ltd_granularity=16,
        steps=1000,
        warmup_steps=10,
        ltd_ramp_steps=500,
    )
    lengths = [kept_length(settings, step) for step in range(1000)]
    assert lengths[0] == 32 and lengths[499] < 128 and set(lengths[500:]) == {128}
    assert lengths == sorted(lengths)
    assert sorted(set(lengths)) == list(range(32, 129, 16))  # one compiled graph each
    sctd = Settings(mode="token_drop", keep=0.5, consistency_every=4, steps=20, warmup_steps=1, seq_len=64)
    assert [kept_length(sctd, step) for step in range(8)] == [0.5] * 8
    config = model_config(sctd, 100, SpecialTokenIds(0, 1, 2, 3, 4), 10)
    assert [consistency_step(config, step) for step in range(8)] == [True, False, False, False] * 2


# ------------------------------------------------------------------------------------------ shards


def test_feistel_permutation_is_a_bijection():
    for size in (1, 2, 3, 7, 64, 100, 1000):
        for key in ((0, 0), (5, 1)):
            assert sorted(feistel_permutation(i, size, key) for i in range(size)) == list(range(size))
    assert [feistel_permutation(i, 1000, (0, 0)) for i in range(10)] != list(range(10))


def test_shards_skip_bad_files_and_hold_the_packed_token_stream(tmp_path, shards):
    corpus = _write_corpus(tmp_path / "corpus", files=1)
    (corpus / "empty.txt").write_text("  \n\n")
    (corpus / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (corpus / ".hidden").write_text("never read")
    tokenizer = ShardSet(shards).tokenizer()
    files = text_files([corpus])
    with pytest.warns(UserWarning, match="skipping data file") as caught:
        built = build_shards(
            files,
            tmp_path / "shards",
            tokenizer=tokenizer,
            vocab_size=400,
            sources=sources_of(files, None, 400),
            shard_tokens=1000,
        )
    assert len(caught) == 2 and len(files) == 3
    assert sorted((Path(s["path"]).name, s["reason"].split(" (")[0]) for s in built.skipped) == [
        ("empty.txt", "empty"),
        ("latin1.txt", "not UTF-8"),
    ]
    assert built.dtype.name == "uint16" and len(built.counts) > 1 and max(built.counts) == 1000
    assert isinstance(built.tokens(0), np.memmap)

    # The rows of one shard are pack_sequences' rows of the same text.
    text = corpus / "part0.txt"
    whole = build_shards([text], tmp_path / "one", tokenizer=tokenizer, vocab_size=400, sources={})
    lines = [line for line in text.read_text().splitlines() if line.strip()]
    expected = pack_sequences(tokenizer, lines, 32)
    rows = PackedRows(whole, 32, cls_id=tokenizer.token_to_id("[CLS]"), sep_id=tokenizer.token_to_id("[SEP]"))
    assert len(rows) == len(expected)
    assert all(torch.equal(rows[i], expected[i]) for i in (0, 1, len(rows) - 1))

    truncated = tmp_path / "one" / "tokens-00000.bin"
    truncated.write_bytes(truncated.read_bytes()[:-2])
    with pytest.raises(ValueError, match=rf"shard file {re.escape(str(truncated))} holds"):
        ShardSet(tmp_path / "one")


def test_a_step_is_the_same_rows_and_masks_on_any_number_of_ranks(shards):
    from tokdrop.data import MaskingCollator

    set_ = ShardSet(shards)
    tokenizer = set_.tokenizer()
    stream = MaskedStream(PackedRows(set_, 32, 2, 3), MaskingCollator.from_tokenizer(tokenizer), seed=7)
    single = list(rank_batches(3, 5, 8, 1, 0, 1))
    split = [list(rank_batches(3, 5, 4, 1, rank, 2)) for rank in (0, 1)]
    assert [a + b for a, b in zip(*split, strict=True)] == single
    for position in single[0][:3]:
        first, again = stream[position], stream[position]
        assert all(torch.equal(first[k], again[k]) for k in first)
    epoch = len(stream.rows)
    assert not torch.equal(stream[0]["labels"], stream[epoch]["labels"])  # the next epoch masks anew


def test_data_that_is_not_a_file_says_what_it_is(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"data path '.*pipe' is a FIFO \(named pipe\), not a text file"):
        _pretrain("--data", str(fifo), "--out", out, "--prepare-only")
    with pytest.raises(ValueError, match=r"data path '/dev/null' is a character device, not a text file"):
        _pretrain("--data", "/dev/null", "--out", out, "--prepare-only")
    with pytest.raises(ValueError, match=r"data path '.*missing' does not exist"):
        _pretrain("--data", str(tmp_path / "missing"), "--out", out, "--prepare-only")
    with pytest.raises(ValueError, match=r"config file .*pipe is a FIFO \(named pipe\), not a TOML or YAML file"):
        _pretrain("--config", str(fifo))  # reading it would wait for a writer forever
    corpus = _write_corpus(tmp_path / "corpus", files=1, lines=20)
    with pytest.raises(ValueError, match=r"tokenizer '.*pipe' is a FIFO \(named pipe\), not a tokenizer.json"):
        _pretrain("--data", str(corpus), "--tokenizer", str(fifo), "--out", out, "--prepare-only")
    with pytest.raises(ValueError, match=r"--out .*part0.txt is a regular file, not a directory"):
        _pretrain("--data", str(corpus), "--out", str(corpus / "part0.txt"), "--prepare-only")
    with pytest.raises(ValueError, match=r"checkpoint .*part0.txt is a regular file, not a checkpoint directory"):
        _pretrain(
            "--data", str(corpus), "--vocab-size", "300", "--out", out, *TINY, "--resume", str(corpus / "part0.txt")
        )


def test_a_line_longer_than_a_piece_gives_the_tokens_of_its_words(tmp_path, shards):
    """Text is cut into pieces at white space; a line of 300,000 characters tokenises as its words do."""
    words = (f"w{i % 250} of the" for i in range(40_000))
    long_line = " ".join(words)
    assert len(long_line) > 4 * shards_module._PIECE_CHARS
    (tmp_path / "long.txt").write_text(long_line)
    (tmp_path / "lines.txt").write_text(long_line.replace(" ", "\n"))
    tokenizer = ShardSet(shards).tokenizer()
    built = [
        build_shards([tmp_path / name], tmp_path / f"{name}.shards", tokenizer=tokenizer, vocab_size=400, sources={})
        for name in ("long.txt", "lines.txt")
    ]
    assert built[0].counts == built[1].counts and built[0].total_tokens >= 120_000
    assert np.array_equal(built[0].tokens(0), built[1].tokens(0))


def _write_words(path: Path, size: int, end_of_line: str = ".\n") -> Path:
    """A text file of about `size` bytes: lines of 20 random words, or one line with end_of_line=" "."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(250)] + "the of and to in is was for on".split()
    with path.open("w") as text:
        while text.tell() < size:
            text.write(" ".join(rng.choices(words, k=20)) + end_of_line)
    return path


def test_a_50_mb_line_is_tokenised_in_bounded_memory(tmp_path, shards):
    _write_words(tmp_path / "one-line.txt", 50_000_000, end_of_line=" ")
    # VmHWM is the peak of this process's own memory; ru_maxrss would also count the RSS of the
    # test process it was forked from (Linux carries it across exec), 1.8 GiB late in a full run.
    probe = (
        "import re, sys\nfrom tokdrop.pretrain import main\nstatus = main(sys.argv[1:])\n"
        "peak_kib = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]\n"
        "print(status, int(peak_kib) * 1024, file=sys.stderr)"
    )
    argv = ["--data", str(tmp_path / "one-line.txt"), "--tokenizer", str(shards / "tokenizer.json")]
    argv += ["--out", str(tmp_path / "out"), "--prepare-only"]
    done = subprocess.run(
        [sys.executable, "-c", probe, *argv], env=ENV, cwd=tmp_path, capture_output=True, text=True, check=True
    )
    status, peak_bytes = map(int, done.stderr.split()[-2:])
    assert status == 0 and ShardSet(tmp_path / "out" / "shards").total_tokens > 10_000_000
    # Python, torch and the tokenizer take about 0.5 GiB; the whole line at once took 11 GiB.
    assert peak_bytes < 1 << 30, f"peak RSS {peak_bytes / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------- a run


def test_text_is_tokenised_once(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", files=1, lines=50)
    argv = ["--data", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "out"), "--prepare-only"]
    assert _pretrain(*argv) == 0
    tokens = tmp_path / "out" / "shards" / "tokens-00000.bin"
    written = tokens.stat().st_mtime_ns
    assert _pretrain(*argv) == 0 and tokens.stat().st_mtime_ns == written
    with (corpus / "part0.txt").open("a") as text:
        text.write("more text\n")
    with pytest.raises(ValueError, match="was made from other files or another tokenizer"):
        _pretrain(*argv)


def test_gradient_accumulation_matches_one_big_batch(shards, tmp_path):
    # Dense: with token dropping, the importance table is updated per micro-batch, which shifts the
    # later selections slightly.
    argv = ["--data", str(shards), *TINY, "--steps", "4", "--dropout", "0", "--mode", "dense"]
    assert _pretrain(*argv, "--out", str(tmp_path / "big")) == 0
    assert _pretrain(*argv, "--out", str(tmp_path / "accum"), "--batch-size", "2", "--grad-accum", "2") == 0
    assert _losses(tmp_path / "accum") == pytest.approx(_losses(tmp_path / "big"), abs=1e-5, rel=0)


def test_run_logs_checkpoints_and_exports(shards, tmp_path):
    out = tmp_path / "run"
    assert _pretrain("--data", str(shards), "--out", str(out), *TINY, "--keep-last", "1") == 0
    lines = _metrics(out)
    assert [line["step"] for line in lines] == list(range(1, 9))
    assert {"loss", "lr", "tokens_per_s", "kept_fraction", "importance"} <= lines[0].keys()
    assert lines[0]["kept_fraction"] == 0.5 and lines[1]["lr"] == 1e-4
    assert set(lines[0]["importance"]) == {"mean", "std", "min", "max"}
    assert _checkpoints(out) == ["step-00000008"]  # --keep-last 1
    model = BertForMaskedLM.from_pretrained(out / "model")
    assert model.config.token_drop is not None and (out / "model" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        _pretrain("--data", str(shards), "--out", str(out), *TINY)


@pytest.mark.parametrize("mode", ["random_ltd", "narrow", "token_drop"])
def test_resume_repeats_the_uninterrupted_run_bitwise(shards, tmp_path, mode):
    extra = ["--mode", mode] + {
        "random_ltd": ["--ltd-ramp-steps", "6"],
        "token_drop": ["--consistency-every", "3"],
    }.get(mode, [])
    whole = tmp_path / "whole"
    assert _pretrain("--data", str(shards), "--out", str(whole), *TINY, *extra) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    shutil.rmtree(resumed / "model")
    assert _pretrain("--data", str(shards), "--out", str(resumed), *TINY, *extra, "--resume") == 0
    assert _logged(resumed) == _logged(whole)
    assert _weights(resumed) == _weights(whole)


def _logged(out: Path) -> list[dict]:
    """The metrics lines less the timings: what an exact resume must repeat."""
    return [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in _metrics(out)]


def _losses(out: Path) -> list[float]:
    return [line["loss"] for line in _metrics(out)]


def _weights(out: Path) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in load_file(out / "model" / "model.safetensors").items()}


def test_resume_after_sigkill_is_bitwise(shards, tmp_path):
    """A run killed with SIGKILL mid-way and resumed gives the same losses and weights, bit for
    bit, as a run that was never interrupted."""
    argv = [
        "--data",
        str(shards),
        *TINY,
        "--steps",
        "40",
        "--save-every",
        "3",
        "--dropout",
        "0.1",
        "--consistency-every",
        "5",
        "--num-workers",
        "1",
    ]
    command = [sys.executable, "-m", "tokdrop.pretrain", *argv]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([*command, "--out", str(whole)], env=ENV, cwd=tmp_path, check=True, capture_output=True)

    process = subprocess.Popen(
        [*command, "--out", str(killed)], env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000006").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    logged = len(_metrics(killed))
    assert 6 <= logged < 40 and not (killed / "model").exists()

    subprocess.run([*command, "--out", str(killed), "--resume"], env=ENV, cwd=tmp_path, check=True, capture_output=True)
    assert _logged(killed) == _logged(whole)  # every step once, the same floats
    assert _weights(killed) == _weights(whole)


# ------------------------------------------------------------------------------------------ faults


def test_corrupt_checkpoint_is_named_and_earlier_ones_stay(shards, tmp_path):
    out = tmp_path / "run"
    assert _pretrain("--data", str(shards), "--out", str(out), *TINY) == 0
    earlier = out / "checkpoints" / "step-00000004"
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    shard = next((out / "checkpoints" / "step-00000008").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(
        ValueError,
        match=rf"checkpoint file {re.escape(str(shard))} is corrupt.*--resume "
        rf"{re.escape(str(earlier))}",
    ):
        _pretrain("--data", str(shards), "--out", str(out), *TINY, "--resume")
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match=rf"checkpoint file {re.escape(str(shard))} is truncated"):
        _pretrain("--data", str(shards), "--out", str(out), *TINY, "--resume")
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before

    # Resuming from the earlier one sets the bad one aside and redoes its steps; the next save
    # removes what a kill during a save left.
    killed_save = out / "checkpoints" / ".step-00000006.tmp"
    killed_save.mkdir()
    (killed_save / "__0_0.distcp").write_bytes(b"half")
    assert _pretrain("--data", str(shards), "--out", str(out), *TINY, "--resume", str(earlier)) == 0
    assert _checkpoints(out) == ["step-00000004", "step-00000008"] and not killed_save.exists()
    assert [line["step"] for line in _metrics(out)] == list(range(1, 9))


def test_a_lost_manifest_neither_hides_a_run_nor_sends_it_back(shards, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    argv = ["--data", str(shards), "--out", str(out), *TINY]
    assert _pretrain(*argv) == 0
    (root / "step-00000008" / "manifest.json").unlink()
    newest, earlier = (re.escape(str(root / name)) for name in ("step-00000008", "step-00000004"))
    with pytest.raises(
        ValueError,
        match=rf"checkpoint {newest} is incomplete: manifest.json is missing; "
        rf"earlier checkpoints: \['step-00000004'\], e.g. --resume {earlier}$",
    ):
        _pretrain(*argv, "--resume")
    # Resuming from the earlier one sets the damaged one aside (it used to block the next save of
    # that step with "Directory not empty").
    assert _pretrain(*argv, "--resume", str(root / "step-00000004")) == 0
    assert _checkpoints(out) == ["step-00000004", "step-00000008"]
    assert [line["step"] for line in _metrics(out)] == list(range(1, 9))
    (damaged,) = root.glob("abandoned-*/step-00000008")
    assert not (damaged / "manifest.json").exists()

    for manifest in root.glob("step-*/manifest.json"):
        manifest.unlink()
    with pytest.raises(ValueError, match=r"already holds checkpoints \(newest: step-00000008\).*--resume"):
        _pretrain(*argv)


def test_a_kill_before_the_first_checkpoint_then_resume_logs_each_step_once(shards, tmp_path):
    out = tmp_path / "run"
    argv = ["--data", str(shards), "--out", str(out), *TINY, "--steps", "30", "--save-every", "30"]
    process = subprocess.Popen(
        [sys.executable, "-m", "tokdrop.pretrain", *argv],
        env=ENV,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(_metrics(out)) >= 3, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert _checkpoints(out) == []
    with pytest.raises(ValueError, match="already holds metrics.jsonl of a run that stopped before its first"):
        _pretrain(*argv)
    assert _pretrain(*argv, "--resume") == 0
    assert [line["step"] for line in _metrics(out)] == list(range(1, 31))


def _wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> None:
    """Poll `condition` until it holds; fail if `process` ends first or time runs out."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"the process ended first, with status {process.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_second_run_on_one_out_is_refused(shards, tmp_path):
    out = tmp_path / "run"
    argv = ["--data", str(shards), "--out", str(out), *TINY, "--steps", "100000", "--save-every", "100000"]
    first = subprocess.Popen(
        [sys.executable, "-m", "tokdrop.pretrain", *argv],
        env=ENV,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(_metrics(out)) >= 1, first)
        with pytest.raises(
            ValueError, match=rf"--out {re.escape(str(out))} is in use by another run \(process {first.pid} on "
        ):
            _pretrain(*argv)
    finally:
        first.send_signal(signal.SIGTERM)
    assert first.wait(120) == 128 + signal.SIGTERM  # stopped with a checkpoint
    with locks.run_lock(out):  # released at the end
        pass


def test_a_second_run_building_one_shard_directory_is_refused(shards, tmp_path):
    shard_dir = tmp_path / "shared"
    argv = [
        "--data",
        str(_write_words(tmp_path / "corpus.txt", 10_000_000)),
        "--tokenizer",
        str(shards / "tokenizer.json"),
    ]
    argv += ["--shard-dir", str(shard_dir), "--prepare-only"]
    command = [sys.executable, "-m", "tokdrop.pretrain", *argv, "--out", str(tmp_path / "first")]
    first = subprocess.Popen(command, env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock_file = tmp_path / ".shared.lock"  # read, never locked here: that could make the first run fail
    _wait_for(lambda: lock_file.is_file() and lock_file.read_text().startswith(f"{first.pid} on "), first)
    with pytest.raises(ValueError, match=rf"shard directory {re.escape(str(shard_dir))} is in use by another run"):
        _pretrain(*argv, "--out", str(tmp_path / "second"))
    assert first.wait(300) == 0
    assert _pretrain(*argv, "--out", str(tmp_path / "second")) == 0  # built now: reused


def test_resume_refuses_a_rebuilt_shard_directory(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", files=1)
    assert (
        _pretrain("--data", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "prep"), "--prepare-only") == 0
    )
    shard_dir, original = tmp_path / "prep" / "shards", tmp_path / "original"
    shutil.copytree(shard_dir, original)
    argv = ["--data", str(shard_dir), "--out", str(tmp_path / "run"), *TINY, "--steps", "4", "--save-every", "2"]
    assert _pretrain(*argv) == 0

    # The same lines in another order: the same token counts and vocabulary, other token ids.
    lines = (corpus / "part0.txt").read_text().splitlines(keepends=True)
    random.Random(1).shuffle(lines)
    (tmp_path / "shuffled.txt").write_text("".join(lines))
    shutil.rmtree(shard_dir)
    tokenizer = ShardSet(original).tokenizer()
    build_shards([tmp_path / "shuffled.txt"], shard_dir, tokenizer=tokenizer, vocab_size=400, sources={})
    assert ShardSet(shard_dir).counts == ShardSet(original).counts
    digest = "'[0-9a-f]{64}'"
    with pytest.raises(
        ValueError,
        match=rf"other settings: corpus\.tokens_sha256: {digest} in the checkpoint, {digest} now; "
        r"the shard directory was rebuilt or replaced since",
    ):
        _pretrain(*argv, "--resume")

    # The same token ids, another tokenizer.
    shutil.rmtree(shard_dir)
    shutil.copytree(original, shard_dir)
    config = json.loads((shard_dir / "tokenizer.json").read_text())
    vocab = config["model"]["vocab"]
    word = next(token for token in vocab if not token.startswith("["))
    vocab[word + "x"] = vocab.pop(word)
    (shard_dir / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"corpus\.tokenizer_sha256: {digest} in the checkpoint, {digest} now"):
        _pretrain(*argv, "--resume")

    shutil.rmtree(shard_dir)
    shutil.copytree(original, shard_dir)
    assert _pretrain(*argv, "--resume") == 0


def test_resume_with_other_settings_names_them(shards, tmp_path):
    out = tmp_path / "run"
    assert _pretrain("--data", str(shards), "--out", str(out), *TINY, "--steps", "4", "--save-every", "2") == 0
    with pytest.raises(ValueError, match=r"other settings: lr: 0.0001 in the checkpoint, 0.001 now"):
        _pretrain("--data", str(shards), "--out", str(out), *TINY, "--steps", "4", "--resume", "--lr", "1e-3")
    with pytest.raises(ValueError, match=r"hidden: 32 in the checkpoint, 64 now"):
        _pretrain("--data", str(shards), "--out", str(out), *TINY, "--steps", "4", "--resume", "--hidden", "64")


def _loss_override(monkeypatch, losses: dict[int, float | None], send: dict[int, int] | None = None) -> None:
    """Make call n of BertForMaskedLM.forward return loss * losses[n] (NaN or inf), or send a signal."""
    forward, calls = BertForMaskedLM.forward, [0]

    def patched(self, *args, **kwargs):
        calls[0] += 1
        out = forward(self, *args, **kwargs)
        if send and calls[0] in send:
            os.kill(os.getpid(), send[calls[0]])
        return out._replace(loss=out.loss * losses[calls[0]]) if calls[0] in losses else out

    monkeypatch.setattr(BertForMaskedLM, "forward", patched)


def test_a_non_finite_loss_skips_the_step(shards, tmp_path, monkeypatch):
    _loss_override(monkeypatch, {3: float("nan")})
    out = tmp_path / "run"
    assert _pretrain("--data", str(shards), "--out", str(out), *TINY) == 0
    lines = _metrics(out)
    assert lines[2]["loss"] is None and lines[2]["skipped"] == "non-finite loss"
    assert all(isinstance(line["loss"], float) for i, line in enumerate(lines) if i != 2)


def test_non_finite_losses_in_a_row_stop_with_a_checkpoint(shards, tmp_path, monkeypatch, capsys):
    _loss_override(monkeypatch, {n: float("inf") for n in range(2, 9)})
    out = tmp_path / "run"
    assert _pretrain("--data", str(shards), "--out", str(out), *TINY, "--max-bad-steps", "3") == 1
    assert "not finite for 3 steps in a row (steps 2 to 4)" in capsys.readouterr().err
    assert _checkpoints(out) == ["step-00000004"] and not (out / "model").exists()


def test_sigterm_checkpoints_and_stops(shards, tmp_path, monkeypatch):
    _loss_override(monkeypatch, {}, send={3: signal.SIGTERM})
    out = tmp_path / "run"
    assert _pretrain("--data", str(shards), "--out", str(out), *TINY) == 128 + signal.SIGTERM
    assert _checkpoints(out) == ["step-00000003"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    monkeypatch.undo()
    assert _pretrain("--data", str(shards), "--out", str(out), *TINY, "--resume") == 0
    assert _checkpoints(out)[-1] == "step-00000008"


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(shards, small_disk, capsys):
    out = small_disk("2m") / "run"  # a TINY checkpoint takes 1.4 MB: the second one cannot fit
    assert _pretrain("--data", str(shards), "--out", str(out), *TINY) == 1
    message = capsys.readouterr().err
    assert "Traceback" not in message and "CheckpointException" not in message
    assert f"could not save checkpoint {out / 'checkpoints' / 'step-00000008'}: " in message
    # torch.save reports a full disk as "unexpected pos"; DCP's own writes as ENOSPC.
    assert re.search(r"(No space left on device|unexpected pos).* free of 2.0 MiB on its filesystem\)", message)
    assert f"the newest intact checkpoint is {out / 'checkpoints' / 'step-00000004'}" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]  # no partial .tmp
    checkpoints.verify_checkpoint(out / "checkpoints" / "step-00000004")
    assert not (out / "model").exists()


def test_a_full_disk_while_tokenising_names_the_shard_directory(tmp_path, small_disk, capsys):
    corpus = _write_corpus(tmp_path / "corpus", files=1, lines=3000)  # 240 KB of text, 100 KB of tokens
    out = small_disk("64k") / "run"
    assert _pretrain("--data", str(corpus), "--vocab-size", "300", "--out", str(out), "--prepare-only") == 1
    message = capsys.readouterr().err
    assert f"cannot write shard directory {out / 'shards'}: " in message
    assert re.search(r"\(\d+ bytes free of 64.0 KiB on its filesystem\)", message)
    assert f"there is no intact checkpoint in {out / 'checkpoints'}" in message
    assert [p.name for p in out.iterdir() if not p.name.endswith(".lock")] == []  # no half-written shards


# ------------------------------------------------------------------------------------- distributed


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _torchrun(*argv: str, cwd: Path) -> None:
    command = [*TORCHRUN, "-m", "tokdrop.pretrain", *argv]
    done = subprocess.run(command, env=ENV, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_ranks_with_gloo_match_one_process(shards, tmp_path, parallel):
    """2 ranks x 2 rows per step = 1 process x 4 rows: the same rows and masks by construction
    (MaskedStream); the loss and gradient are means over the global batch's predictions (the
    per-rank means are weighted by prediction counts); the importance table is all-reduced."""
    argv = ["--data", str(shards), *TINY, "--steps", "5", "--dropout", "0", "--save-every", "2"]
    single, ranks = tmp_path / "single", tmp_path / parallel
    assert _pretrain(*argv, "--out", str(single)) == 0
    _torchrun(*argv, "--out", str(ranks), "--batch-size", "2", "--parallel", parallel, cwd=tmp_path)
    assert _losses(ranks) == pytest.approx(_losses(single), abs=1e-5, rel=0)
    one, two = (
        load_file(out / "model" / "model.safetensors") | load_file(out / "model" / "token_importance.safetensors")
        for out in (single, ranks)
    )
    table = "bert.token_importance.table"
    assert torch.allclose(one[table], two[table], atol=1e-5, rtol=0)
    assert all(torch.allclose(one[k], two[k], atol=1e-5, rtol=0) for k in one)

    if parallel == "fsdp2":  # sharded checkpoint: resume from step 2 on both ranks, bitwise
        shutil.rmtree(ranks / "checkpoints" / "step-00000004")
        shutil.rmtree(ranks / "checkpoints" / "step-00000005")
        whole = _losses(ranks)
        _torchrun(*argv, "--out", str(ranks), "--batch-size", "2", "--parallel", parallel, "--resume", cwd=tmp_path)
        assert _losses(ranks) == whole


@pytest.mark.parametrize("same", [False, True])
def test_random_ltd_ranks_draw_their_own_subsets_unless_asked_for_the_same(tmp_path, same):
    """Two gloo ranks seeded as tokdrop pretrain seeds them (tests/ltd_ranks.py): different random-LTD
    subsets by default, as in DeepSpeed; the same on every rank with --ltd-same-across-ranks."""
    out = tmp_path / "drawn.json"
    flag = ["--ltd-same-across-ranks"] if same else []
    script = Path(__file__).with_name("ltd_ranks.py")
    command = [*TORCHRUN, str(script), str(out), *flag]
    done = subprocess.run(command, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text()) == {"layers_drawn": 4, "same": same}  # 2 ltd layers x 2 steps


def test_ltd_same_across_ranks_needs_random_ltd():
    with pytest.raises(ValueError, match="ltd_same_across_ranks needs mode random_ltd, got mode='token_drop'"):
        Settings(mode="token_drop", ltd_same_across_ranks=True)


def _rank_pids(agent: int) -> dict[int, int]:
    """The worker processes of a torchrun agent, by RANK."""
    pids = {}
    for task in Path(f"/proc/{agent}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            pids |= {int(entry[5:]): child for entry in environment if entry.startswith(b"RANK=")}
    return pids


def _ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie
    except FileNotFoundError:
        return True


# Runs that last until a rank is stopped; the other rank gives up 5 s after the last answer.
ENDLESS = ["--batch-size", "2", "--steps", "100000", "--save-every", "100000", "--collective-timeout", "5"]


def test_a_stopped_rank_is_named_instead_of_hanging_the_job(shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    command = [*TORCHRUN, "--max-restarts", "0", "-m", "tokdrop.pretrain", "--data", str(shards), "--out", str(out)]
    with log.open("w") as stderr:
        job = subprocess.Popen(
            [*command, *TINY, *ENDLESS], env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr
        )
    ranks = {}
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(_metrics(out)) >= 2, job)
        ranks = _rank_pids(job.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        _wait_for(lambda: _ended(ranks[0]), job)  # rank 0 gives up by itself
        waited = time.monotonic() - stopped
    finally:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(ranks[1], signal.SIGKILL)
        job.wait(120)
    message = log.read_text()
    assert "tokdrop pretrain: error: rank 0 of 2: rank 1 does not answer (Timed out waiting 5000ms" in message
    assert "collectives wait --collective-timeout=5 s; there is no intact checkpoint in" in message
    assert "continue with --resume once every rank runs" in message
    assert waited < 60  # the timeout, a roll call of 5 s, and a loaded machine


def test_a_killed_rank_is_named(shards, tmp_path):
    """Two ranks started by hand (no torchrun agent, which would stop the survivor itself)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tokdrop.pretrain", "--data", str(shards), "--out", str(out), *TINY, *ENDLESS]
    ranks = []
    for rank in (0, 1):
        with (tmp_path / f"rank{rank}.txt").open("w") as stderr:
            environment = {**job, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            ranks.append(
                subprocess.Popen(command, env=environment, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
            )
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(_metrics(out)) >= 2, ranks[0])
        ranks[1].kill()
        assert ranks[0].wait(60) == 1
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    message = (tmp_path / "rank0.txt").read_text()
    assert re.search(r"tokdrop pretrain: error: rank 0 of 2: rank 1 does not answer \(.*by peer", message), message
    assert "Traceback" not in message


def test_ranks_wait_for_rank_zero_tokenising_longer_than_the_collective_timeout(shards, tmp_path):
    corpus = _write_words(tmp_path / "corpus.txt", 10_000_000)  # tokenising takes seconds
    argv = ["--data", str(corpus), "--tokenizer", str(shards / "tokenizer.json"), "--out", str(tmp_path / "out")]
    _torchrun(*argv, "--prepare-only", "--collective-timeout", "1", cwd=tmp_path)
    assert ShardSet(tmp_path / "out" / "shards").total_tokens > 2_000_000


# ---------------------------------------------------------------------------------- --init-from


def _documentation_text(path: Path, held_out: bool) -> Path:
    """Real English: Python's documentation, the training or the held-out documents."""
    from tokdrop.corpus import load_corpus

    corpus = load_corpus(sources=("pydoc_topics", "docstrings"))
    path.write_text("\n".join(corpus.held_out if held_out else corpus.train) + "\n")
    return path


def _held_out_loss(model_dir: Path, text: Path, tokenizer_dir: Path) -> float:
    from tokdrop.data import MaskingCollator, load_tokenizer, pack_sequences
    from tokdrop.training import evaluate

    tokenizer = load_tokenizer(tokenizer_dir)
    rows = pack_sequences(tokenizer, text.read_text().splitlines(), 64)[:64]
    batches = [MaskingCollator.from_tokenizer(tokenizer, seed=1)(r) for r in rows.split(16)]
    return evaluate(BertForMaskedLM.from_pretrained(model_dir), batches).loss


def test_continued_pretraining_from_minilm(minilm_dir, tmp_path, capsys):
    """--init-from a real checkpoint without an MLM head: the run says the head is fresh, the encoder
    starts from the checkpoint's weights, and the held-out loss falls faster than from scratch."""
    train = _documentation_text(tmp_path / "train.txt", held_out=False)
    held_out = _documentation_text(tmp_path / "held_out.txt", held_out=True)
    common = [
        "--data",
        str(train),
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--save-every",
        "1000",
    ]
    assert (
        _pretrain(*common, "--init-from", str(minilm_dir), "--steps", "2", "--lr", "1e-7", "--out", str(tmp_path / "a"))
        == 0
    )
    printed = capsys.readouterr().out
    assert "initialised the encoder from" in printed and "freshly initialised" in printed
    minilm = BertModel.from_pretrained(minilm_dir).state_dict()
    started = BertForMaskedLM.from_pretrained(tmp_path / "a" / "model").bert.state_dict()
    assert max((started[k] - minilm[k]).abs().max().item() for k in minilm if k in started) < 1e-4

    losses = {}
    for name, init in (
        ("minilm", ["--init-from", str(minilm_dir)]),
        ("scratch", ["--preset", "minilm-l6", "--tokenizer", str(minilm_dir)]),
    ):
        out = tmp_path / name
        assert _pretrain(*common, *init, "--steps", "30", "--lr", "3e-4", "--out", str(out)) == 0
        losses[name] = _held_out_loss(out / "model", held_out, minilm_dir)
    assert losses["minilm"] < losses["scratch"] - 0.3, losses
