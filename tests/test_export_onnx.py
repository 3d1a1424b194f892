"""ONNX export: dynamo exporter, heads, ORT validation, fusions, fp16, external data, bad input, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tokdrop
from tokdrop.export import (
    TOLERANCES,
    ExportError,
    MissingDependencyError,
    Tolerance,
    ValidationError,
    make_inputs,
    make_session,
    onnx_export,
    select_providers,
    to_onnx,
)
from tokdrop.export import cli as export_cli

onnx = pytest.importorskip("onnx", reason="the export extra (onnx) is not installed")
pytest.importorskip("onnxscript", reason="the export extra (onnxscript) is not installed")
pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime-gpu) is not installed")

TINY = tokdrop.BertConfig(
    vocab_size=211,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=48,
    num_labels=3,
)
MAX_BATCH, MAX_SEQ = 4, 48
FAMILIES = ("bert", "roberta")


def _tiny(family: str) -> tokdrop.BertConfig:
    """TINY of `family`: RoBERTa's has its padding id 1, one token type and 2 more position
    embeddings (its positions start after the padding id), so that both take MAX_SEQ tokens."""
    if family == "bert":
        return TINY
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_labels")
    return tokdrop.RobertaConfig(
        **{name: getattr(TINY, name) for name in sizes}, max_position_embeddings=TINY.max_position_embeddings + 2
    )


def _of(family: str, name: str) -> str:
    """The key of checkpoint `name` of `family` in the checkpoints fixture."""
    return name if family == "bert" else f"{family}_{name}"


def _class(family: str, kind: str) -> type[torch.nn.Module]:
    """tokdrop's class of `family` and `kind` ("Model", "ForSequenceClassification", ...)."""
    return getattr(tokdrop, {"bert": "Bert", "roberta": "Roberta"}[family] + kind)


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (fresh LayerNorms/biases are all 1/0, which the exporter dedupes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _save(root: Path, name: str, cls, config: tokdrop.BertConfig = TINY, **changes) -> Path:
    torch.manual_seed(0)
    model = _perturb(cls(dataclasses.replace(config, **changes)))
    model.save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx_ckpt")
    return {
        "encoder": _save(root, "encoder", tokdrop.BertModel),
        "classifier": _save(root, "classifier", tokdrop.BertForSequenceClassification),
        "narrow": _save(
            root, "narrow", tokdrop.BertForSequenceClassification, narrow=tokdrop.NarrowConfig(full_layers=1)
        ),
        "token_drop": _save(root, "token_drop", tokdrop.BertForMaskedLM, token_drop=tokdrop.TokenDropConfig(keep=0.5)),
        "roberta_encoder": _save(root, "roberta_encoder", tokdrop.RobertaModel, _tiny("roberta")),
        "roberta_classifier": _save(
            root, "roberta_classifier", tokdrop.RobertaForSequenceClassification, _tiny("roberta")
        ),
        "roberta_token_drop": _save(
            root,
            "roberta_token_drop",
            tokdrop.RobertaForMaskedLM,
            _tiny("roberta"),
            token_drop=tokdrop.TokenDropConfig(keep=0.5),
        ),
    }


def _graph_dims(path: Path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def _op_counts(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_fp32_dynamic_axes_and_padding(checkpoints, tmp_path, family):
    path = tmp_path / "encoder.onnx"
    report = to_onnx(checkpoints[_of(family, "encoder")], path, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ)
    assert report.output_names == ("last_hidden_state", "pooler_output")
    assert len(report.checks) >= 3 and report.padded_rows_finite
    assert all(d <= 1e-5 for d in report.max_abs_diff.values()), report.summary()
    assert {(c.batch, c.seq_len) for c in report.checks} >= {(1, 7), (MAX_BATCH, MAX_SEQ)}
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    dims = _graph_dims(path)
    assert dims == {
        name: ["batch_size", "sequence_length"] for name in ("input_ids", "attention_mask", "token_type_ids")
    }
    assert report.files == [path] and _leftovers(tmp_path) == []

    # Independent check at a shape the validation did not use, plus a fully padded row.
    session = make_session(path)
    reference = _class(family, "Model").from_pretrained(checkpoints[_of(family, "encoder")], attn_backend="sdpa").eval()
    ids, mask, types = make_inputs(reference.config, [11, 4, 1], seq_len=13, seed=5)
    with torch.no_grad():
        expected = reference(ids, mask, types)
    got = onnx_export.run_session(session, ids, mask, types)
    assert np.abs(got[0] - expected.last_hidden_state.numpy()).max() <= 1e-5
    assert np.abs(got[1] - expected.pooler_output.numpy()).max() <= 1e-5
    mask[1] = 0
    assert all(np.isfinite(o).all() for o in onnx_export.run_session(session, ids, mask, types))


@pytest.mark.parametrize("family", FAMILIES)
def test_ort_fusions_counted(checkpoints, tmp_path, family):
    path = tmp_path / "fused.onnx"
    report = to_onnx(checkpoints[_of(family, "encoder")], path, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ, optimize=True)
    layers = TINY.num_hidden_layers
    counts = _op_counts(path)
    assert counts.get("Attention", 0) == layers, counts
    assert counts.get("SkipLayerNormalization", 0) == 2 * layers + 1, counts  # + embeddings LayerNorm
    assert counts.get("BiasGelu", 0) == layers, counts
    assert report.extra["fused ops"]["Attention"] == layers
    assert all(d <= 1e-5 for d in report.max_abs_diff.values()), report.summary()


def test_fp16_keeps_layernorm_and_softmax_fp32(checkpoints, tmp_path):
    path = tmp_path / "fp16.onnx"
    report = to_onnx(checkpoints["encoder"], path, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ, dtype="fp16")
    assert report.dtype == "fp16" and report.tolerance.atol == 2e-2
    assert 0 < max(report.max_abs_diff.values()) <= 2e-2, report.summary()
    model = onnx.load(str(path))
    init = {t.name: t.data_type for t in model.graph.initializer}
    fp16 = onnx.TensorProto.FLOAT16
    assert any(t == fp16 for t in init.values())
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):  # fed fp32 (weights or Casts)
            for name in node.input[1:]:
                assert init.get(name, onnx.TensorProto.FLOAT) != fp16, (node.name, name)
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT] * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_with_external_data(checkpoints, tmp_path, family):
    path = tmp_path / "cls.onnx"
    checkpoint = checkpoints[_of(family, "classifier")]
    report = to_onnx(checkpoint, path, max_batch=MAX_BATCH, external_data=True)
    assert report.head == "classifier" and report.output_names == ("logits",)
    assert report.seq_range == (1, MAX_SEQ)  # the default: every position embedding, less RoBERTa's offset
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls.onnx", "cls.onnx.data"]
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = [t for t in graph.initializer if "word_embeddings" in t.name]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert {e.value for t in weights for e in t.external_data if e.key == "location"} == {"cls.onnx.data"}
    assert all(d <= 1e-5 for d in report.max_abs_diff.values())

    # Independent check against the eager model at a shape the validation did not use, with padding.
    model = _class(family, "ForSequenceClassification").from_pretrained(checkpoint).eval()
    ids, mask, types = make_inputs(model.config, [MAX_SEQ, 11, 1], seed=5)
    with torch.no_grad():
        expected = model(ids, mask, types).logits
    got = torch.from_numpy(onnx_export.run_session(make_session(path), ids, mask, types)[0])
    assert ((got - expected).abs() <= TOLERANCES["fp32"].bound(expected)).all(), (got - expected).abs().max()


def test_external_data_threshold():
    assert onnx_export.use_external_data(3 * 2**30, None)
    assert not onnx_export.use_external_data(100 * 2**20, None)
    assert onnx_export.use_external_data(10, True) and not onnx_export.use_external_data(3 * 2**30, False)


@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_head_of_token_drop_checkpoint(checkpoints, tmp_path, family):
    report = to_onnx(
        checkpoints[_of(family, "token_drop")],
        tmp_path / "emb.onnx",
        head="embedding",
        max_batch=MAX_BATCH,
        max_seq_len=MAX_SEQ,
        normalize=True,
    )
    assert report.output_names == ("sentence_embedding",)
    assert any("token dropping" in note and "dropping off" in note for note in report.notes), report.notes
    assert all(d <= 1e-5 for d in report.max_abs_diff.values())


def test_narrow_cls_is_explicit_and_matches_full_classifier(checkpoints, tmp_path):
    narrow = to_onnx(
        checkpoints["narrow"], tmp_path / "narrow.onnx", head="narrow-cls", max_batch=MAX_BATCH, max_seq_len=MAX_SEQ
    )
    assert any("[CLS]-only" in note for note in narrow.notes)
    assert all(d <= 1e-5 for d in narrow.max_abs_diff.values())
    full = to_onnx(checkpoints["narrow"], tmp_path / "full.onnx", max_batch=MAX_BATCH, max_seq_len=MAX_SEQ)
    assert full.head == "classifier"  # inferred from config.json; never narrow-cls implicitly
    ids, mask, types = make_inputs(TINY, [20, 9, 3], seq_len=20, seed=3)
    a = onnx_export.run_session(make_session(tmp_path / "narrow.onnx"), ids, mask, types)[0]
    b = onnx_export.run_session(make_session(tmp_path / "full.onnx"), ids, mask, types)[0]
    assert np.abs(a - b).max() <= 1e-5
    assert _op_counts(tmp_path / "narrow.onnx").get("MatMul", 0) > 0
    with pytest.raises(ExportError, match="narrow-cls.*NarrowBERT"):
        to_onnx(checkpoints["classifier"], tmp_path / "x.onnx", head="narrow-cls")


def test_model_instance_is_not_modified(tmp_path):
    torch.manual_seed(0)
    model = _perturb(tokdrop.BertForSequenceClassification(dataclasses.replace(TINY, attn_backend="eager")))
    model.train()
    report = to_onnx(model, tmp_path / "m.onnx", max_batch=2, max_seq_len=16)
    assert report.head == "classifier"
    assert model.training and model.config.attn_backend == "eager"


def test_bad_inputs(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        to_onnx(tmp_path / "missing", tmp_path / "a.onnx")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="config"):
        to_onnx(corrupt, tmp_path / "a.onnx")
    (corrupt / "config.json").write_text((checkpoints["encoder"] / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ExportError, match="cannot load"):
        to_onnx(corrupt, tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="unsupported head"):
        to_onnx(checkpoints["encoder"], tmp_path / "a.onnx", head="token-classification")
    with pytest.raises(ExportError, match="max_position_embeddings"):
        to_onnx(checkpoints["encoder"], tmp_path / "a.onnx", max_seq_len=TINY.max_position_embeddings + 1)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="not a directory"):
        to_onnx(checkpoints["encoder"], blocker / "a.onnx")
    with pytest.raises(ExportError, match="is a directory"):
        to_onnx(checkpoints["encoder"], tmp_path)
    with pytest.raises(ExportError, match="dtype"):
        to_onnx(checkpoints["encoder"], tmp_path / "a.onnx", dtype="bf16")
    assert not (tmp_path / "a.onnx").exists() and _leftovers(tmp_path) == []


def test_validation_mismatch_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    real = onnx_export.run_session
    monkeypatch.setattr(onnx_export, "run_session", lambda *a: [o + 1e-3 for o in real(*a)])
    path = tmp_path / "bad.onnx"
    with pytest.raises(ValidationError, match=r"max abs diff 0\.001") as err:
        to_onnx(checkpoints["encoder"], path, max_batch=2, max_seq_len=16)
    assert not err.value.report.ok
    assert not path.exists() and _leftovers(tmp_path) == []


def test_execution_providers_fall_back_to_cpu(caplog):
    if onnx_export.gpu_present():
        pytest.skip("a GPU is present: the CPU fallback notice is not expected")
    with caplog.at_level(logging.WARNING, logger="tokdrop.export"):
        providers = select_providers()
    assert providers == ["CPUExecutionProvider"]
    import onnxruntime as ort

    if any(p in ort.get_available_providers() for p in onnx_export.GPU_PROVIDERS):
        assert "CPUExecutionProvider" in caplog.text and "no NVIDIA GPU" in caplog.text
    with caplog.at_level(logging.WARNING, logger="tokdrop.export"):
        assert select_providers(["NoSuchExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider" in caplog.text


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tokdrop")
    export_cli.add_command(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def _onnx_argv(model: Path, out: Path, *more: str) -> list[str]:
    return ["export", "--format", "onnx", "--model", str(model), "--out", str(out), *more]


def test_cli(checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli.onnx"
    code = _cli(_onnx_argv(checkpoints["token_drop"], out, "--max-batch", "2", "--max-seq-len", "16"))
    text = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "validation against PyTorch" in text and "dropping off" in text and "head 'encoder'" in text
    assert _cli(_onnx_argv(tmp_path / "nope", out)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _cli(_onnx_argv(checkpoints["encoder"], out, "--max-seq-len", "4096")) == 2
    assert "max_position_embeddings" in capsys.readouterr().err

    real = onnx_export.run_session
    monkeypatch.setattr(onnx_export, "run_session", lambda *a: [o + 1e-3 for o in real(*a)])
    bad = tmp_path / "mismatch.onnx"
    code = _cli(_onnx_argv(checkpoints["encoder"], bad, "--max-batch", "2", "--max-seq-len", "16", "--quiet"))
    captured = capsys.readouterr()
    assert code == 1 and not bad.exists()
    assert "MISMATCH" in captured.out and "0.001" in captured.err


def test_missing_onnx_package_is_named(monkeypatch, checkpoints, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what an uninstalled package looks like
    with pytest.raises(MissingDependencyError, match="onnxscript"):
        to_onnx(checkpoints["encoder"], tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_real_minilm_on_tokenised_text(minilm_dir, tmp_path):
    from tokdrop.data import load_tokenizer

    directory = minilm_dir
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    texts = [
        "Token dropping skips the unimportant tokens in the middle layers.",
        "NarrowBERT keeps only the masked tokens as queries.",
        "Export the fine-tuned encoder to ONNX and validate it with ONNX Runtime at several shapes.",
    ]
    encodings = tokenizer.encode_batch(texts)
    seq = max(len(e.ids) for e in encodings)
    ids = torch.zeros(len(texts), seq, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = torch.tensor(enc.ids)
        mask[row, : len(enc.ids)] = 1
    path = tmp_path / "minilm.onnx"
    report = to_onnx(directory, path, head="embedding", normalize=True, max_batch=4, max_seq_len=64, optimize=True)
    assert report.extra["fused ops"]["Attention"] == 6
    assert all(d <= 1e-5 for d in report.max_abs_diff.values()), report.summary()
    got = onnx_export.run_session(make_session(path), ids, mask, torch.zeros_like(ids))[0]
    model = tokdrop.BertModel.from_pretrained(directory, attn_backend="sdpa").eval()
    with torch.no_grad():
        hidden = model(ids, mask).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    assert np.abs(got - expected).max() <= 1e-5
    assert float((got[0] * got[1]).sum()) < 0.99  # different sentences, different embeddings


def test_real_minilm_default_export_at_full_length(minilm_dir, tmp_path):
    """The default validation passes on a real checkpoint at its full length, where the fixed
    atol=1e-5 over every position failed (last_hidden_state max abs diff 9.75e-05, all of it at
    padded positions: real tokens differ by < 1e-5, and the bound scales with max |hidden| ~ 6)."""
    path = tmp_path / "minilm.onnx"
    report = to_onnx(minilm_dir, path, max_batch=4, max_seq_len=512)
    assert report.ok and report.files == [path] and report.tolerance == TOLERANCES["fp32"]
    full = [c for c in report.checks if (c.batch, c.seq_len) == (4, 512)]
    assert full and min(full[0].lengths) < 512, report.summary()  # padded rows at the full length
    hidden = report.max_abs_diff["last_hidden_state"]
    assert 0 < hidden <= 5e-5, report.summary()  # measured, and kept in the report
    assert 1 < full[0].max_abs_reference["last_hidden_state"] < 100
    assert "max |ref|" in report.summary() and "scale_rtol=1e-05" in report.summary()


def _corrupt_at(where: str):
    """A run_session that changes last_hidden_state at the padded positions (or at a real one)."""
    real = onnx_export.run_session

    def run(session, ids, mask, types):
        hidden, *rest = real(session, ids, mask, types)
        hidden = hidden.copy()
        padded = ~np.asarray(mask, dtype=bool)
        if where == "padded":
            hidden[padded] += 1.0
        elif where == "padded-nan":
            hidden[padded] = np.nan
        else:
            hidden[0, 0, 0] += 1e-3
        return [hidden, *rest]

    return run


def test_padded_positions_are_not_compared_but_must_be_finite(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "run_session", _corrupt_at("padded"))
    report = to_onnx(checkpoints["encoder"], tmp_path / "a.onnx", max_batch=MAX_BATCH, max_seq_len=MAX_SEQ)
    assert report.ok and report.max_abs_diff["last_hidden_state"] <= 1e-5
    for where in ("padded-nan", "real"):
        monkeypatch.setattr(onnx_export, "run_session", _corrupt_at(where))
        with pytest.raises(ValidationError) as err:
            to_onnx(checkpoints["encoder"], tmp_path / "b.onnx", max_batch=MAX_BATCH, max_seq_len=MAX_SEQ)
        assert not err.value.report.ok and err.value.report.seconds > 0
    assert not (tmp_path / "b.onnx").exists() and _leftovers(tmp_path) == []


def test_tolerance_must_be_finite_and_non_negative(checkpoints, tmp_path, capsys):
    for bad in (float("nan"), -1e-5, float("inf")):
        with pytest.raises(ExportError, match="atol must be a finite number >= 0"):
            Tolerance(atol=bad, rtol=0.0)
    assert _cli(_onnx_argv(checkpoints["encoder"], tmp_path / "a.onnx", "--scale-rtol", "nan")) == 2
    assert "scale_rtol must be a finite number" in capsys.readouterr().err


def test_classifier_head_without_classifier_weights_is_refused(checkpoints, tmp_path, capsys):
    """An MLM (or encoder) checkpoint has no classifier: its logits would be random."""
    for name in ("token_drop", "encoder"):
        with pytest.raises(ExportError, match="random weights.*allow_random_head") as err:
            to_onnx(checkpoints[name], tmp_path / "cls.onnx", head="classifier")
        assert "classifier weights" in str(err.value)
    report = to_onnx(
        checkpoints["token_drop"],
        tmp_path / "cls.onnx",
        head="classifier",
        allow_random_head=True,
        max_batch=2,
        max_seq_len=16,
    )
    assert report.ok and any("randomly initialised (allowed)" in note for note in report.notes), report.notes
    argv = _onnx_argv(checkpoints["token_drop"], tmp_path / "cli.onnx", "--head", "classifier", "--quiet")
    argv += ["--max-batch", "2", "--max-seq-len", "16"]
    assert _cli(argv) == 2 and "--allow-random-head" in capsys.readouterr().err
    assert not (tmp_path / "cli.onnx").exists()
    assert _cli([*argv, "--allow-random-head"]) == 0 and (tmp_path / "cli.onnx").is_file()


@pytest.mark.parametrize(("field", "value"), [("token_drop", "yes"), ("narrow", 3)])
def test_bad_mode_in_config_json_is_a_clear_error(checkpoints, tmp_path, field, value):
    directory = tmp_path / "bad"
    directory.mkdir()
    for file in checkpoints["encoder"].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {field: value}))
    with pytest.raises(ExportError, match=field):
        to_onnx(directory, tmp_path / "a.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "tokdrop.cli", *_onnx_argv(directory, tmp_path / "a.onnx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert field in done.stderr and "cannot read the model config" in done.stderr
    assert _leftovers(tmp_path) == [] and not (tmp_path / "a.onnx").exists()


def _help_entries(text: str) -> dict[str, str]:
    """Flag -> its entry (the flag's lines) in an argparse help text."""
    blocks = re.split(r"\n(?=  -)", text)
    return {block.split()[0]: block for block in blocks if block.startswith("  --")}


def test_help_imports_no_torch_and_shows_each_default_once():
    code = (
        "import contextlib, io, sys\n"
        "from tokdrop.cli import main\n"
        "text = io.StringIO()\n"
        "with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):\n"
        "    main(['export', '--help'])\n"
        "print('torch' in sys.modules)\n"
        "print(text.getvalue())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    imported_torch, text = done.stdout.split("\n", 1)
    assert imported_torch == "False"  # importing torch is what took --help 3 s
    entries = _help_entries(text)
    assert "(default: None)" not in text and "--allow-random-head" in entries
    assert entries["--head"].count("default") == 1, entries["--head"]
    for required in ("--format", "--model", "--out"):
        assert "default" not in entries[required], entries[required]
    assert "(default: 32)" in entries["--max-batch"]
