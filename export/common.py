"""What every export format shares: heads, model loading, shapes, validation, atomic output files.

A *head* fixes the exported signature. Every exported graph takes

    input_ids       int64 [batch_size, sequence_length]
    attention_mask  int64 [batch_size, sequence_length]   1 = token, 0 = padding (right padding)
    token_type_ids  int64 [batch_size, sequence_length]

with `batch_size` and `sequence_length` dynamic and shared by the three inputs, and returns

    encoder      last_hidden_state float [B, S, H], pooler_output float [B, H] (when the model has a pooler)
    classifier   logits float [B, num_labels]            (full-sequence encoder, [CLS] pooler)
    embedding    sentence_embedding float [B, H]         (mean of the real tokens' last hidden states)
    narrow-cls   logits float [B, num_labels]            (NarrowBERT: [CLS] is the only query of the
                                                          narrow layers; explicit opt-in)

Outputs are float32 whatever the compute dtype. Models configured with token dropping are exported
as the full-sequence encoder (token dropping is a pretraining mode); the report says so.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tokdrop
from tokdrop.config import BertConfig
from tokdrop.files import write_atomically
from tokdrop.hf_checkpoint import read_config
from tokdrop.kernels import use_backend

log = logging.getLogger("tokdrop.export")

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
HEADS = ("encoder", "classifier", "embedding", "narrow-cls")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BATCH_DIM, SEQ_DIM = "batch_size", "sequence_length"


@dataclass(frozen=True)
class Tolerance:
    """An output passes when |exported - reference| <= atol + rtol * |reference| everywhere."""

    atol: float
    rtol: float

    def bound(self, reference: Tensor) -> Tensor:
        return self.atol + self.rtol * reference.abs()


# fp32: the 1e-5 bound on the max abs difference. Reduced precision is compared with the
# fp32 PyTorch model; fp16 keeps 10 mantissa bits (2^-11 ~ 5e-4 relative per op) and bf16 7 bits
# (2^-8 ~ 4e-3), compounded over the layers, with LayerNorm and softmax computed in fp32.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-5, rtol=0.0),
    "fp16": Tolerance(atol=2e-2, rtol=2e-2),
    "bf16": Tolerance(atol=1e-1, rtol=5e-2),
}


class ExportError(ValueError):
    """Bad input to an export (missing/corrupt model, unsupported head, bad ranges, unwritable path)."""


class MissingDependencyError(ExportError, ImportError):
    """An optional package (onnx, onnxruntime, onnxscript, torch_tensorrt, tensorrt) is not installed."""


def require(module: str, package: str, purpose: str):
    """Import `module` or raise MissingDependencyError naming the pip package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{purpose} needs the Python package {package!r} (import name {module!r}), which is not "
            f"installed: {err}. Install it with `pip install {package}`"
            + (
                ""
                if package not in ("onnx", "onnxscript", "onnxruntime-gpu")
                else " or `pip install 'tokdrop[export]'`"
            )
        ) from err


# ------------------------------------------------------------------------------------------- report


@dataclass
class ShapeCheck:
    batch: int
    seq_len: int
    lengths: list[int]
    max_abs_diff: dict[str, float]
    ok: bool


@dataclass
class ExportReport:
    """What an export wrote and how its validation went (also the CLI's summary)."""

    format: str
    path: Path
    head: str
    dtype: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    batch_range: tuple[int, int]
    seq_range: tuple[int, int]
    files: list[Path] = field(default_factory=list)
    checks: list[ShapeCheck] = field(default_factory=list)
    tolerance: Tolerance | None = None
    padded_rows_finite: bool | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> dict[str, float]:
        """Largest abs difference per output over every validated shape."""
        out: dict[str, float] = {}
        for check in self.checks:
            for name, diff in check.max_abs_diff.items():
                out[name] = max(out.get(name, 0.0), diff)
        return out

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks) and self.padded_rows_finite is not False

    def summary(self) -> str:
        lines = [f"{self.format} export of head {self.head!r} ({self.dtype}) -> {self.path}"]
        lines += [f"  file: {p} ({_size(p)})" for p in self.files]
        lines.append(
            f"  inputs: {', '.join(self.input_names)} int64 [{BATCH_DIM}, {SEQ_DIM}]; "
            f"{BATCH_DIM} in [{self.batch_range[0]}, {self.batch_range[1]}], "
            f"{SEQ_DIM} in [{self.seq_range[0]}, {self.seq_range[1]}]"
        )
        lines.append(f"  outputs: {', '.join(self.output_names)}")
        for key, value in self.extra.items():
            lines.append(f"  {key}: {value}")
        if self.checks:
            tol = self.tolerance
            lines.append(f"  validation against PyTorch (tolerance atol={tol.atol:g}, rtol={tol.rtol:g}):")
            for check in self.checks:
                diffs = ", ".join(f"{k} {v:.3g}" for k, v in check.max_abs_diff.items())
                lines.append(
                    f"    batch {check.batch} x seq {check.seq_len} (lengths {_short(check.lengths)}): "
                    f"max abs diff {diffs} {'ok' if check.ok else 'MISMATCH'}"
                )
            if self.padded_rows_finite is not None:
                lines.append(f"    fully padded rows give finite outputs: {self.padded_rows_finite}")
        else:
            lines.append("  validation: skipped")
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  took {self.seconds:.1f} s")
        return "\n".join(lines)


class ValidationError(ExportError):
    """The exported model disagrees with the PyTorch model past the tolerance (or gives NaN)."""

    def __init__(self, report: ExportReport) -> None:
        self.report = report
        bad = [c for c in report.checks if not c.ok]
        parts = [
            f"batch {c.batch} x seq {c.seq_len}: "
            + ", ".join(f"{k} max abs diff {v:.3g}" for k, v in c.max_abs_diff.items())
            for c in bad
        ]
        if report.padded_rows_finite is False:
            parts.append("fully padded rows give NaN/inf")
        tol = report.tolerance
        super().__init__(
            f"{report.format} export does not match the PyTorch model "
            f"(atol={tol.atol:g}, rtol={tol.rtol:g}); nothing was written to {report.path}: " + "; ".join(parts)
        )


def _size(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "?"


def _short(values: Sequence[int]) -> str:
    text = ",".join(map(str, values))
    return text if len(values) <= 8 else ",".join(map(str, values[:8])) + ",..."


# -------------------------------------------------------------------------------------------- heads


class _Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 inside a reduced-precision model."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(
            x.dtype
        )


class _Head(nn.Module):
    output_names: tuple[str, ...]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class EncoderHead(_Head):
    """BertModel: (last_hidden_state, pooler_output) or (last_hidden_state,) without a pooler."""

    def __init__(self, model: tokdrop.BertModel) -> None:
        super().__init__(model)
        self.output_names = ("last_hidden_state",) + (() if model.pooler is None else ("pooler_output",))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor, ...]:
        out = self.model(input_ids, attention_mask, token_type_ids)
        if out.pooler_output is None:
            return (out.last_hidden_state.float(),)
        return out.last_hidden_state.float(), out.pooler_output.float()


class MeanPoolHead(_Head):
    """Sentence embeddings: mean of the last hidden states of the real tokens (L2-normalised when
    `normalize`, as sentence-transformers' all-MiniLM models do). Fully padded rows give zeros."""

    output_names = ("sentence_embedding",)

    def __init__(self, model: tokdrop.BertModel, normalize: bool = False) -> None:
        super().__init__(model)
        self.normalize = normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor]:
        hidden = self.model(input_ids, attention_mask, token_type_ids).last_hidden_state.float()
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        if self.normalize:
            pooled = F.normalize(pooled, p=2.0, dim=-1)
        return (pooled,)


class ClassifierHead(_Head):
    """Sequence classification on the full-sequence encoder: every position is computed (also in
    the narrow layers of a NarrowBERT model, which gives the same [CLS] logits as its [CLS]-only
    forward, since narrow-layer queries do not interact)."""

    output_names = ("logits",)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor]:
        pooled = self.model.bert(input_ids, attention_mask, token_type_ids).pooler_output
        return (self.model.classifier(pooled).float(),)


class NarrowClsHead(_Head):
    """NarrowBERT [CLS]-only classifier: the model's own forward, where after the full layers
    [CLS] is the only query (keys/values still come from the whole sequence)."""

    output_names = ("logits",)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor]:
        return (self.model(input_ids, attention_mask, token_type_ids).logits.float(),)


@dataclass
class Prepared:
    """A head ready for export, the fp32 PyTorch reference it is validated against, and notes."""

    module: _Head
    reference: _Head
    config: BertConfig
    head: str
    dtype: str
    backend: str
    notes: list[str]

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.module.output_names


def describe_source(model: Any) -> str:
    return f"checkpoint {model}" if isinstance(model, (str, os.PathLike)) else type(model).__name__


def _model_class(head: str) -> type[nn.Module]:
    return tokdrop.BertModel if head in ("encoder", "embedding") else tokdrop.BertForSequenceClassification


def _infer_head(model: nn.Module | None, directory: Path | None) -> str:
    if isinstance(model, tokdrop.BertForSequenceClassification):
        return "classifier"
    if model is not None:
        return "encoder"
    import json

    try:
        architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []
    return "classifier" if any("SequenceClassification" in str(a) for a in architectures) else "encoder"


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ExportError(f"unsupported head {head!r}; expected one of {HEADS}")


def check_dtype(dtype: str, allowed: Sequence[str] = tuple(DTYPES)) -> None:
    if dtype not in allowed:
        raise ExportError(f"unsupported dtype {dtype!r} for this format; expected one of {tuple(allowed)}")


def check_ranges(config: BertConfig, max_batch: int, max_seq_len: int | None) -> tuple[int, int]:
    """Validated (max_batch, max_seq_len); max_seq_len None means max_position_embeddings."""
    if max_seq_len is None:
        max_seq_len = config.max_position_embeddings
    for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExportError(f"{name} must be an int >= 1, got {value!r}")
    if max_seq_len > config.max_position_embeddings:
        raise ExportError(
            f"max_seq_len={max_seq_len} is above the model's max_position_embeddings="
            f"{config.max_position_embeddings}: positions past it have no embedding"
        )
    return max_batch, max_seq_len


def _describe_token_drop(config: BertConfig) -> str:
    drop = config.token_drop
    return (
        f"the checkpoint is configured for token dropping (keep={drop.keep}, start_layer="
        f"{drop.start_layer}, end_layer={drop.end_layer}); it is exported as the full-sequence "
        f"encoder with dropping off (token dropping is a pretraining mode)"
    )


def load_model(directory: str | os.PathLike, head: str | None = None) -> tuple[nn.Module, str, list[str]]:
    """Load a tokdrop or Hugging Face BERT directory for `head` (None: classifier when config.json
    names a sequence-classification architecture, else encoder). Token dropping and random-LTD are
    switched off. Returns (model in eval mode, head, notes)."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise ExportError(f"model directory {directory} {problem}")
    head = _infer_head(None, directory) if head is None else head
    check_head(head)
    try:
        config = read_config(directory)
    except ValueError as err:
        raise ExportError(f"cannot read the model config: {err}") from err
    notes = []
    if config.token_drop is not None:
        notes.append(_describe_token_drop(config))
    if head == "narrow-cls" and config.narrow is None:
        raise ExportError(
            f"head 'narrow-cls' needs a NarrowBERT checkpoint (config.narrow set); "
            f"{directory} has a plain BERT config: use head 'classifier'"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = _model_class(head).from_pretrained(directory, token_drop=None, random_ltd=None)
        except (ValueError, TypeError, OSError) as err:
            raise ExportError(f"cannot load the model from {directory}: {err}") from err
    for warning in caught:
        message = str(warning.message)
        if isinstance(model, tokdrop.BertModel) and "pooler.dense" in message and "freshly initialised" in message:
            # A masked-LM checkpoint has no pooler: export no pooler_output rather than a random one.
            model.pooler = None
            notes.append("the checkpoint has no pooler weights: pooler_output is not exported")
            if message.split(":", 1)[1].strip().startswith("2 weights"):
                continue  # the pooler's weight and bias were all that was missing
        notes.append(f"WARNING from loading: {message}")
    return model.eval(), head, notes


def _cast(head: _Head, dtype: torch.dtype) -> _Head:
    head = head.to(dtype)
    for module in head.modules():
        if type(module) is nn.LayerNorm:
            module.float()
            module.__class__ = _Fp32LayerNorm
    return head


def prepare(
    model: nn.Module | str | os.PathLike, head: str | None = None, *, dtype: str = "fp32", normalize: bool = False
) -> Prepared:
    """Turn a tokdrop model (or a checkpoint directory) into the export module of `head`.

    fp32 uses the `sdpa` attention path; fp16/bf16 cast the weights, keep LayerNorm in fp32 and use
    the `eager` attention path, whose softmax runs in fp32. The reference is always fp32 PyTorch.
    """
    check_dtype(dtype)
    backend = "sdpa" if dtype == "fp32" else "eager"
    if isinstance(model, (str, os.PathLike)):
        model, head, notes = load_model(model, head)
    else:
        if not isinstance(model, (tokdrop.BertModel, tokdrop.BertForSequenceClassification, tokdrop.BertForMaskedLM)):
            raise ExportError(
                f"expected a tokdrop BertModel / BertForSequenceClassification / "
                f"BertForMaskedLM or a checkpoint directory, got {type(model).__name__}"
            )
        head = _infer_head(model, None) if head is None else head
        check_head(head)
        notes = []
        if model.config.token_drop is not None:
            notes.append(_describe_token_drop(model.config))
        model = copy.deepcopy(model).float().cpu().eval()
        model.config = dataclasses.replace(model.config, token_drop=None, random_ltd=None)
    config = model.config
    if head in ("encoder", "embedding") and not isinstance(model, tokdrop.BertModel):
        model = model.bert
    if head in ("classifier", "narrow-cls") and not isinstance(model, tokdrop.BertForSequenceClassification):
        raise ExportError(f"head {head!r} needs a BertForSequenceClassification model, got {type(model).__name__}")
    if head == "narrow-cls" and config.narrow is None:
        raise ExportError("head 'narrow-cls' needs a NarrowBERT model (config.narrow set)")
    if head == "classifier" and config.narrow is not None:
        notes.append(
            "NarrowBERT model exported as the full-sequence classifier (every position is a "
            "query); ask for head 'narrow-cls' for the [CLS]-only graph"
        )
    if head == "narrow-cls":
        notes.append(
            f"NarrowBERT [CLS]-only classifier: {config.narrow.full_layers} full layers, then "
            f"{config.num_hidden_layers - config.narrow.full_layers} narrow layers with [CLS] "
            f"as the only query"
        )
    if head == "encoder" and getattr(model, "pooler", None) is None and not any("pooler" in n for n in notes):
        notes.append("the model has no pooler: the encoder head returns last_hidden_state only")
    factory: Callable[[nn.Module], _Head] = {
        "encoder": EncoderHead,
        "classifier": ClassifierHead,
        "embedding": lambda m: MeanPoolHead(m, normalize=normalize),
        "narrow-cls": NarrowClsHead,
    }[head]
    reference = factory(model).eval()
    module = reference if dtype == "fp32" else _cast(factory(copy.deepcopy(model)), DTYPES[dtype]).eval()
    for p in list(reference.parameters()) + list(module.parameters()):
        p.requires_grad_(False)
    return Prepared(module, reference, config, head, dtype, backend, notes)


# ------------------------------------------------------------------------------------------- inputs


def make_inputs(
    config: BertConfig, lengths: Sequence[int], seq_len: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Random right-padded (input_ids, attention_mask, token_type_ids) with the given real lengths
    (a length of 0 is a fully padded row); token types 0 then 1 for the second half of each row."""
    seq_len = max(max(lengths), 1) if seq_len is None else seq_len
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    low = min(5, config.vocab_size - 1)
    ids = torch.randint(low, config.vocab_size, (batch, seq_len), generator=g)
    lens = torch.tensor(list(lengths))
    mask = (torch.arange(seq_len) < lens[:, None]).long()
    ids = torch.where(mask.bool(), ids, config.pad_token_id)
    types = ((torch.arange(seq_len) >= (lens[:, None] + 1) // 2) & mask.bool()).long()
    if config.type_vocab_size < 2:
        types.zero_()
    return ids, mask, types


def dynamic_shapes(max_batch: int, max_seq_len: int) -> dict[str, dict[int, Any]]:
    """One batch Dim and one sequence Dim shared by the three inputs (static where the range is a
    single value, which torch.export cannot mark dynamic)."""
    from torch.export import Dim

    batch = Dim(BATCH_DIM, min=1, max=max_batch) if max_batch > 1 else None
    seq = Dim(SEQ_DIM, min=1, max=max_seq_len) if max_seq_len > 1 else None
    axes = {k: v for k, v in ((0, batch), (1, seq)) if v is not None}
    return {name: dict(axes) for name in INPUT_NAMES}


def example_inputs(config: BertConfig, max_batch: int, max_seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tracing inputs: sizes >= 2 where dynamic (0/1 would be specialised), padding in the last row."""
    batch = min(2, max_batch)
    seq = min(8, max_seq_len)
    lengths = [seq] * batch
    if batch > 1:
        lengths[-1] = max(1, seq // 2)
    return make_inputs(config, lengths, seq)


def validation_shapes(max_batch: int, max_seq_len: int) -> list[list[int]]:
    """Per-row real lengths of the validation batches: small, odd and the maximum, with padding."""
    shapes = [[min(7, max_seq_len)]]
    b, s = min(3, max_batch), min(37, max_seq_len)
    shapes.append([s, max(1, s // 3), max(1, s - 5)][:b])
    b, s = max_batch, max_seq_len
    g = torch.Generator().manual_seed(1)
    rows = [s] + torch.randint(1, s + 1, (b - 1,), generator=g).tolist()
    shapes.append(rows)
    unique = []
    for lengths in shapes:
        if lengths not in unique:
            unique.append(lengths)
    return unique


@torch.no_grad()
def validate(
    report: ExportReport,
    prepared: Prepared,
    run: Callable[..., Sequence[Any]],
    max_batch: int,
    max_seq_len: int,
    tolerance: Tolerance,
    shapes: Sequence[Sequence[int]] | None = None,
) -> ExportReport:
    """Run `run(input_ids, attention_mask, token_type_ids) -> outputs` (tensors or numpy arrays)
    and the PyTorch reference at several padded shapes; record max abs diffs; then check that a
    batch with a fully padded row gives finite outputs. Raises ValidationError on a mismatch."""
    report.tolerance = tolerance
    config = prepared.config
    with use_backend(prepared.backend):
        for i, lengths in enumerate(shapes or validation_shapes(max_batch, max_seq_len)):
            seq_len = max(lengths)
            inputs = make_inputs(config, lengths, seq_len, seed=10 + i)
            expected = prepared.reference(*inputs)
            got = [torch.as_tensor(o).float() for o in run(*inputs)]
            diffs, ok = {}, True
            for name, ref, out in zip(prepared.output_names, expected, got, strict=True):
                if out.shape != ref.shape:
                    raise ExportError(
                        f"output {name} has shape {tuple(out.shape)}, PyTorch gives "
                        f"{tuple(ref.shape)} (batch {len(lengths)} x seq {seq_len})"
                    )
                diff = (out - ref).abs()
                diffs[name] = float(diff.max()) if diff.numel() else 0.0
                ok = ok and bool(torch.isfinite(out).all()) and bool((diff <= tolerance.bound(ref)).all())
                if not math.isfinite(diffs[name]):
                    ok = False
            report.checks.append(ShapeCheck(len(lengths), seq_len, list(lengths), diffs, ok))
            log.info("validated batch %d x seq %d: %s", len(lengths), seq_len, diffs)
        # A fully padded row: the eager model rejects it, the exported graph must not produce NaN.
        batch = min(2, max_batch)
        seq_len = min(9, max_seq_len)
        lengths = [0] if batch == 1 else [seq_len, 0]
        outs = [torch.as_tensor(o) for o in run(*make_inputs(config, lengths, seq_len, seed=99))]
        report.padded_rows_finite = all(bool(torch.isfinite(o.float()).all()) for o in outs)
    if not report.ok:
        raise ValidationError(report)
    return report


# ------------------------------------------------------------------------------------------- output


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before an expensive export) when `path` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"output path {path} is a directory; give a file name")
    parent = path.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ExportError(f"cannot write the output {path}: {ancestor} is not a directory")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.{secrets.token_hex(4)}.probe"
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as err:
        raise ExportError(f"cannot write the output {path}: {err.strerror or err}") from err
    return path


@contextlib.contextmanager
def staging(path: Path) -> Iterator[Path]:
    """A temporary directory beside `path` (same file system, so renames are atomic) in which the
    export writes its files under their final names; removed afterwards, whatever happens."""
    stage = path.parent / f".{path.name}.{secrets.token_hex(6)}.staging"
    stage.mkdir()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, names: Sequence[str], path: Path) -> list[Path]:
    """Move the staged files onto their final places (each rename atomic); the main file `path`
    goes last, so it only appears once everything it refers to is in place."""
    finals = []
    for name in sorted(names, key=lambda n: n == path.name):
        final = path.parent / name

        def move(temp: Path, staged: Path = stage / name) -> None:
            os.replace(staged, temp)

        write_atomically(final, move)
        finals.append(final)
    return finals


class Progress:
    """Progress lines for the CLI (or any callback taking a string)."""

    def __init__(self, callback: Callable[[str], None] | None) -> None:
        self.callback = callback
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        log.info(message)
        if self.callback is not None:
            self.callback(f"[{time.perf_counter() - self.start:6.1f}s] {message}")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def new_report(fmt: str, path: Path, prepared: Prepared, max_batch: int, max_seq_len: int) -> ExportReport:
    return ExportReport(
        format=fmt,
        path=path,
        head=prepared.head,
        dtype=prepared.dtype,
        input_names=INPUT_NAMES,
        output_names=prepared.output_names,
        batch_range=(1, max_batch),
        seq_range=(1, max_seq_len),
        notes=list(prepared.notes),
    )


def export_program(prepared: Prepared, max_batch: int, max_seq_len: int) -> torch.export.ExportedProgram:
    """torch.export of the head with the shared dynamic batch/sequence dims."""
    example = example_inputs(prepared.config, max_batch, max_seq_len)
    with use_backend(prepared.backend):
        return torch.export.export(prepared.module, example, dynamic_shapes=dynamic_shapes(max_batch, max_seq_len))


__all__ = [
    "DTYPES",
    "HEADS",
    "INPUT_NAMES",
    "TOLERANCES",
    "ExportError",
    "ExportReport",
    "MissingDependencyError",
    "Prepared",
    "ShapeCheck",
    "describe_source",
    "Tolerance",
    "ValidationError",
    "check_output_path",
    "load_model",
    "make_inputs",
    "prepare",
    "validate",
    "validation_shapes",
]
