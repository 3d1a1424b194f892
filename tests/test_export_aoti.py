"""AOTInductor export and the C++ runner tokdrop-serve (built with cmake once per session)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokdrop
from tokdrop.export import ExportError, to_aoti

ROOT = Path(__file__).resolve().parents[1]
TINY = tokdrop.BertConfig(
    vocab_size=300,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
MAX_BATCH, MAX_SEQ = 4, 48


def _english_paragraphs() -> list[str]:
    """Real English prose that ships with Python (the text behind help('if') and friends)."""
    from pydoc_data.topics import topics

    from tokdrop.corpus import split_paragraphs

    return [p for name in sorted(topics)[:60] for p in split_paragraphs(topics[name])]


@pytest.fixture(scope="module")
def tokenizer():
    from tokdrop.data import train_tokenizer

    return train_tokenizer(_english_paragraphs(), vocab_size=TINY.vocab_size)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    config = dataclasses.replace(TINY, vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = tokdrop.BertModel(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    directory = tmp_path_factory.mktemp("aoti_ckpt") / "encoder"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def package(tmp_path_factory, checkpoint):
    path = tmp_path_factory.mktemp("aoti") / "encoder.pt2"
    report = to_aoti(checkpoint, path, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ)
    return path, report


@pytest.fixture(scope="module")
def serve(tmp_path_factory) -> Path:
    """Configure and build tokdrop-serve with cmake against the installed torch wheel's libtorch."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            pytest.skip(f"building tokdrop-serve needs {tool!r} on PATH")
    build = tmp_path_factory.mktemp("serve_build")
    configure = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(build),
        f"-DPython3_EXECUTABLE={sys.executable}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    for command in (configure, ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    binary = build / "tokdrop-serve"
    assert binary.is_file()
    return binary


def _reference(checkpoint: Path) -> tokdrop.BertModel:
    return tokdrop.BertModel.from_pretrained(checkpoint, attn_backend="sdpa").eval()


def test_package_validated_and_reloads(package, checkpoint):
    path, report = package
    assert report.files == [path] and path.is_file()
    assert all(d <= 1e-5 for d in report.max_abs_diff.values()), report.summary()
    assert report.padded_rows_finite and {(c.batch, c.seq_len) for c in report.checks} >= {(MAX_BATCH, MAX_SEQ)}
    runner = torch._inductor.aoti_load_package(str(path))
    meta = runner.get_metadata()
    assert meta["tokdrop.max_batch"] == str(MAX_BATCH) and meta["tokdrop.max_seq_len"] == str(MAX_SEQ)
    assert meta["tokdrop.outputs"] == "last_hidden_state,pooler_output"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp/staging left


def _batch_lines(tokenizer, texts: list[str], batch: int) -> tuple[list[str], list[tuple]]:
    """JSON lines of real tokenised text: ragged rows without a mask, and rectangular rows with an
    explicit mask and token types; plus the padded tensors PyTorch should see for each line."""
    encodings = [e.ids[:MAX_SEQ] for e in tokenizer.encode_batch(texts)]
    lines, tensors = [], []
    for start in range(0, len(encodings), batch):
        rows = encodings[start : start + batch]
        seq = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), seq, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        types = torch.zeros_like(ids)
        if (start // batch) % 2 == 0:
            lines.append(json.dumps({"input_ids": rows}))
        else:
            types[:, seq // 2 :] = 1
            types *= mask
            lines.append(
                json.dumps(
                    {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "token_type_ids": types.tolist()}
                )
            )
        tensors.append((ids, mask, types))
    return lines, tensors


def test_cpp_runner_matches_pytorch_on_real_text(serve, package, checkpoint, tokenizer, tmp_path):
    path, _ = package
    from pydoc_data.topics import topics

    from tokdrop.corpus import split_paragraphs

    # Held out from the tokenizer's training text; long paragraphs are cut at MAX_SEQ tokens.
    texts = [p for name in sorted(topics)[60:80] for p in split_paragraphs(topics[name])][:11]
    texts += ["Short one.", "x"]
    lines, tensors = _batch_lines(tokenizer, texts, batch=3)
    source = tmp_path / "batches.jsonl"
    source.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    done = subprocess.run([str(serve), str(path), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    outputs = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(outputs) == len(lines)
    # stdin works the same
    piped = subprocess.run([str(serve), str(path)], input=lines[0] + "\n", capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and json.loads(piped.stdout) == outputs[0]
    model = _reference(checkpoint)
    worst = 0.0
    with torch.no_grad():
        for got, (ids, mask, types) in zip(outputs, tensors, strict=True):
            expected = model(ids, mask, types)
            for name, tensor in (
                ("last_hidden_state", expected.last_hidden_state),
                ("pooler_output", expected.pooler_output),
            ):
                diff = (torch.tensor(got[name]) - tensor).abs().max().item()
                worst = max(worst, diff)
    assert worst <= 1e-5, worst

    # A fully padded row (possible with an explicit mask) gives finite numbers, never NaN/null.
    padded = json.dumps({"input_ids": [[2, 7, 9], [0, 0, 0]], "attention_mask": [[1, 1, 1], [0, 0, 0]]})
    done = subprocess.run([str(serve), str(path)], input=padded + "\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "null" not in done.stdout and torch.isfinite(torch.tensor(result["last_hidden_state"])).all()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('{"input_ids": [[2, 7.5]]}', "integers"),
        ('{"input_ids": [[2, 999999]]}', "outside the vocabulary"),
        ('{"input_ids": [[2, -1]]}', "outside the vocabulary"),
        ('{"input_ids": [[2, 99999999999999999999]]}', "int64"),
        ('{"input_ids": [[2, 5, 6]], "attention_mask": [[1, 0, 1]]}', "right-padded"),
        ('{"input_ids": [[2, 5, 6]], "attention_mask": [[1, 2, 1]]}', "only 0 and 1"),
        ('{"input_ids": [[2, 5, 6]], "attention_mask": [[1, 1]]}', "has 2 values"),
        ('{"input_ids": [[2, 5, 6], [2]], "attention_mask": [[1, 1, 1], [1]]}', "same length"),
        ('{"input_ids": [[2, 5]], "token_type_ids": [[0, 7]]}', "outside [0, 2)"),
        ('{"input_ids": [[1], [1], [1], [1], [1]]}', "batch size 5 is outside"),
        ('{"input_ids": [[' + ",".join(["5"] * (MAX_SEQ + 1)) + "]]}", "sequence length 49 is outside"),
        ('{"input_ids": []}', "batch size 0 is outside"),
        ('{"input_ids": [[]]}', "sequence length 0 is outside"),
        ('{"ids": [[2]]}', "unknown key"),
        ("[" * 100000, "nested too deeply"),
        ('"just a string"', "JSON object"),
    ],
)
def test_cpp_runner_rejects_bad_input(serve, package, line, message):
    path, _ = package
    done = subprocess.run(
        [str(serve), str(path)],
        input='{"input_ids": [[2, 5]]}\n' + line + "\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "line 2" in done.stderr and message in done.stderr, done.stderr
    assert len(done.stdout.splitlines()) == 1  # the good first line was answered


def test_cpp_runner_rejects_bad_packages_and_usage(serve, package, tmp_path):
    path, _ = package
    cases = []
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    cases.append(([str(corrupt)], 3, "cannot load"))
    cases.append(([str(tmp_path / "missing.pt2")], 3, "does not exist"))
    cases.append(([str(tmp_path)], 3, "is not a file"))
    cases.append(([], 2, "usage"))
    cases.append(([str(path), str(tmp_path / "no-input.jsonl")], 2, "cannot open input"))
    cases.append(([str(path), "--threads", "zero"], 2, "--threads"))
    cases.append(([str(path), "--bogus"], 2, "unknown option"))
    for argv, code, message in cases:
        done = subprocess.run([str(serve), *argv], input="", capture_output=True, text=True, timeout=300)
        assert done.returncode == code and message in done.stderr, (argv, done.returncode, done.stderr)


def test_cpp_runner_refuses_foreign_package(serve, tmp_path):
    """A .pt2 made without tokdrop's metadata has no ranges to check inputs against: refused."""

    class Plain(torch.nn.Module):
        def forward(self, x):
            return x + 1

    foreign = tmp_path / "foreign.pt2"
    program = torch.export.export(Plain(), (torch.ones(2),))
    torch._inductor.aoti_compile_and_package(program, package_path=str(foreign))
    done = subprocess.run([str(serve), str(foreign)], input="", capture_output=True, text=True, timeout=300)
    assert done.returncode == 3 and "not a tokdrop package" in done.stderr


def test_to_aoti_bad_input(checkpoint, tmp_path):
    with pytest.raises(ExportError, match=r"\.pt2"):
        to_aoti(checkpoint, tmp_path / "model.so")
    with pytest.raises(ExportError, match="max_position_embeddings"):
        to_aoti(checkpoint, tmp_path / "model.pt2", max_seq_len=TINY.max_position_embeddings + 1)
    with pytest.raises(ExportError, match="unsupported head"):
        to_aoti(checkpoint, tmp_path / "model.pt2", head="qa")
    with pytest.raises(ExportError, match="does not exist"):
        to_aoti(tmp_path / "nothing", tmp_path / "model.pt2")
    assert list(tmp_path.iterdir()) == []
