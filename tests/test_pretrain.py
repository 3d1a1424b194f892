"""`tokdrop pretrain`: settings, shards, exact resume (also after a real SIGKILL), faults, and DDP /
FSDP2 on CPU with gloo matching a single process."""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokdrop import BertForMaskedLM, pretrain, resume
from tokdrop.data import pack_sequences
from tokdrop.pretrain import Settings, kept_length
from tokdrop.shards import (
    MaskedStream,
    PackedRows,
    ShardSet,
    build_shards,
    feistel_permutation,
    rank_batches,
    sources_of,
    text_files,
)

REPO = Path(__file__).resolve().parent.parent
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
    return [p.name for p in resume.list_checkpoints(out / "checkpoints")]


# ---------------------------------------------------------------------------------------- settings


def test_config_file_then_flags_and_presets(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'preset = "small"\n[model]\nmode = "narrow"\nhidden = 256\nheads = 4\n'
        '[data]\ndata = "corpus"\nseq-len = 64\n[train]\nlr = 1\nsteps = 50\nwarmup_steps = 5\n'
    )
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    settings = pretrain.settings_from_arguments(
        parser.parse_args(["--config", str(config), "--hidden", "128", "--heads", "2"])
    )
    assert (settings.layers, settings.hidden, settings.heads, settings.intermediate) == (4, 128, 2, 2048)
    assert settings.mode == "narrow" and settings.seq_len == 64 and settings.lr == 1.0
    assert settings.data == [str(tmp_path / "corpus")]  # relative to the config file
    assert settings.weight_decay == 0.01 and Settings(steps=20_000).warmup_steps == 10_000
    base, large = Settings(preset="base"), Settings(preset="large", steps=20_000)
    assert (base.layers, base.hidden, base.heads, base.intermediate) == (12, 768, 12, 3072)
    assert (large.layers, large.hidden, large.heads, large.intermediate) == (24, 1024, 16, 4096)

    example = pretrain.read_config_file(REPO / "examples" / "pretrain_base.toml")
    assert Settings(**example).hidden == 768 and example["data"] == [str(REPO / "examples" / "corpus")]


def test_yaml_config_file(tmp_path):
    pytest.importorskip("yaml")
    config = tmp_path / "run.yaml"
    config.write_text("model: {preset: tiny}\nsteps: 30\nwarmup-steps: 3\n")
    assert pretrain.read_config_file(config) == {"preset": "tiny", "steps": 30, "warmup_steps": 3}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("batchsize = 3\n", "'batchsize' is not a setting"),
        ("[train]\nsteps = 'many'\n", "'steps' must be an integer, got 'many'"),
        ("steps = [\n", "is not valid"),
        ("mode = 'sparse'\n", "mode must be one of"),
        ("steps = 10\n", "warmup_steps=10000 must be less than steps=10"),
        ("seq_len = 1024\n", "seq_len=1024 exceeds max_position_embeddings=512"),
        ("mode = 'dense'\nfull_every = 2\n", "full_every=2 needs mode token_drop or random_ltd"),
        ("keep = 1.5\n", "keep must be in"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path, text, match):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ValueError, match=match):
        _pretrain("--config", str(config))


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
    consistent = Settings(mode="token_drop", keep=0.5, full_every=4, steps=20, warmup_steps=1, seq_len=64)
    assert [kept_length(consistent, step) for step in range(8)] == [0.5, 0.5, 0.5, 64] * 2


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


@pytest.mark.parametrize("mode", ["random_ltd", "narrow"])
def test_resume_repeats_the_uninterrupted_run_bitwise(shards, tmp_path, mode):
    extra = ["--mode", mode] + (["--full-every", "3", "--ltd-ramp-steps", "6"] if mode == "random_ltd" else [])
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
        "--full-every",
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


def test_disk_full_during_save_keeps_the_previous_checkpoint(shards, tmp_path, monkeypatch, capsys):
    save, calls = resume.dcp.save, [0]

    def save_until_the_disk_fills(state, checkpoint_id, **options):
        calls[0] += 1
        if calls[0] == 1:
            return save(state, checkpoint_id=checkpoint_id, **options)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(resume.dcp, "save", save_until_the_disk_fills)
    out = tmp_path / "run"
    assert _pretrain("--data", str(shards), "--out", str(out), *TINY) == 1
    message = capsys.readouterr().err
    assert "could not save checkpoint" in message and "No space left on device" in message
    assert "the newest intact one is" in message and "step-00000004" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]  # no partial
    resume.verify_checkpoint(out / "checkpoints" / "step-00000004")


# ------------------------------------------------------------------------------------- distributed


def _torchrun(*argv: str, cwd: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tokdrop.pretrain",
        *argv,
    ]
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
    one, two = (load_file(out / "model" / "model.safetensors") for out in (single, ranks))
    table = "bert.token_importance.table"
    assert torch.allclose(one[table], two[table], atol=1e-5, rtol=0)
    assert all(torch.allclose(one[k], two[k], atol=1e-5, rtol=0) for k in one)

    if parallel == "fsdp2":  # sharded checkpoint: resume from step 2 on both ranks, bitwise
        shutil.rmtree(ranks / "checkpoints" / "step-00000004")
        shutil.rmtree(ranks / "checkpoints" / "step-00000005")
        whole = _losses(ranks)
        _torchrun(*argv, "--out", str(ranks), "--batch-size", "2", "--parallel", parallel, "--resume", cwd=tmp_path)
        assert _losses(ranks) == whole
