"""Validation of an export against the float32 PyTorch model, with dtype-aware tolerances."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tokdrop.export.errors import ExportError
from tokdrop.export.preparation import Prepared
from tokdrop.export.report import ExportReport, ShapeCheck, describe_diffs
from tokdrop.export.shapes import make_inputs, validation_shapes
from tokdrop.export.tolerances import Tolerance
from tokdrop.kernels import use_backend

log = logging.getLogger(__name__)

# A function of (input_ids, attention_mask, token_type_ids) on the CPU giving the export's outputs
# (tensors on any device, or numpy arrays).
Runner = Callable[[Tensor, Tensor, Tensor], Sequence[Any]]


class ValidationError(ExportError):
    """The exported model disagrees with the PyTorch model past the tolerance (or gives NaN)."""

    def __init__(self, report: ExportReport) -> None:
        self.report = report
        parts = [
            f"batch {c.batch} x seq {c.seq_len}: {describe_diffs(c, label=' max abs diff')}"
            for c in report.checks
            if not c.ok
        ]
        if report.padded_rows_finite is False:
            parts.append("fully padded rows give NaN/inf")
        super().__init__(
            f"{report.format} export does not match the PyTorch model ({report.tolerance}); "
            f"nothing was written to {report.path}: " + "; ".join(parts)
        )


def _compare(
    prepared: Prepared,
    lengths: Sequence[int],
    attention_mask: Tensor,
    expected: Sequence[Tensor],
    got: Sequence[Tensor],
    tolerance: Tolerance,
) -> ShapeCheck:
    """Per-token outputs are compared at the real tokens only: what a model computes at padded
    positions is read by nothing and differs between runtimes (the LayerNorm of a padded position
    amplifies rounding). They must still be finite."""
    real_tokens = attention_mask.bool()
    check = ShapeCheck(len(lengths), attention_mask.shape[1], list(lengths), {}, True)
    for name, ref, out in zip(prepared.output_names, expected, got, strict=True):
        if out.shape != ref.shape:
            raise ExportError(
                f"output {name} has shape {tuple(out.shape)}, PyTorch gives "
                f"{tuple(ref.shape)} (batch {check.batch} x seq {check.seq_len})"
            )
        finite = bool(torch.isfinite(out).all())
        if name in prepared.module.per_token_outputs:
            ref, out = ref[real_tokens], out[real_tokens]
        diff = (out - ref).abs()
        check.max_abs_diff[name] = float(diff.max()) if diff.numel() else 0.0
        check.max_abs_reference[name] = float(ref.abs().max()) if ref.numel() else 0.0
        within = bool((diff <= tolerance.bound(ref)).all())
        check.ok = check.ok and finite and within and math.isfinite(check.max_abs_diff[name])
    return check


@torch.no_grad()
def validate(
    report: ExportReport,
    prepared: Prepared,
    run: Runner,
    max_batch: int,
    max_seq_len: int,
    tolerance: Tolerance,
    *,
    device: torch.device | str = "cpu",
    shapes: Sequence[Sequence[int]] | None = None,
) -> ExportReport:
    """Run the export (`run`, fed CPU tensors) and the PyTorch reference (on `device`) at several
    padded shapes; record the max abs differences; then check that a batch with a fully padded
    row gives finite outputs. Raises ValidationError on a mismatch."""
    report.tolerance = tolerance
    config = prepared.config

    def reference(*inputs: Tensor) -> list[Tensor]:
        return [o.float().cpu() for o in prepared.reference(*(x.to(device) for x in inputs))]

    with use_backend(prepared.backend):
        for i, lengths in enumerate(shapes or validation_shapes(max_batch, max_seq_len)):
            inputs = make_inputs(config, lengths, max(lengths), seed=10 + i)
            got = [torch.as_tensor(o).float().cpu() for o in run(*inputs)]
            check = _compare(prepared, lengths, inputs[1], reference(*inputs), got, tolerance)
            report.checks.append(check)
            log.info("validated batch %d x seq %d: %s", check.batch, check.seq_len, describe_diffs(check))
        # A fully padded row: the eager model rejects it, the exported graph must not produce NaN.
        seq_len = min(9, max_seq_len)
        lengths = [0] if max_batch == 1 else [seq_len, 0]
        outputs = [torch.as_tensor(o) for o in run(*make_inputs(config, lengths, seq_len, seed=99))]
        report.padded_rows_finite = all(bool(torch.isfinite(o.float()).all()) for o in outputs)
    if not report.ok:
        raise ValidationError(report)
    return report
