"""How close an export must come to the float32 PyTorch model, by dtype (torch-free, so that the
command line's help can show the defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from tokdrop.export.errors import ExportError

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Tolerance:
    """An output passes when every compared element satisfies

        |exported - reference| <= atol + rtol * |reference| + scale_rtol * max|reference|

    max|reference| being the output's scale: rounding errors grow with the size of the values a
    result is computed from, so an element near zero in an output of large values (a hidden state
    after LayerNorm) carries the error of the large ones."""

    atol: float
    rtol: float
    scale_rtol: float = 0.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ExportError(f"tolerance {item.name} must be a finite number >= 0, got {value!r}")

    def bound(self, reference: Tensor) -> Tensor:
        magnitude = reference.abs()
        scale = magnitude.max() if magnitude.numel() else 0.0
        return self.atol + self.rtol * magnitude + self.scale_rtol * scale

    def __str__(self) -> str:
        return f"atol={self.atol:g}, rtol={self.rtol:g}, scale_rtol={self.scale_rtol:g}"


# fp32: float32 rounding (6e-8) compounded over the layers, relative to the output's scale. Measured
# on all-MiniLM-L6-v2 at batch 32 x seq 512 (max |hidden| 5.9): ONNX Runtime differs from PyTorch by
# 6.4e-6 at the real tokens, AOTInductor by 7.4e-6; the bound there is 6.9e-5.
# Reduced precision is compared with the fp32 PyTorch model; fp16 keeps 10 mantissa bits (2^-11 ~
# 5e-4 relative per op) and bf16 7 bits (2^-8 ~ 4e-3), compounded over the layers, with LayerNorm and
# softmax computed in fp32.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-5, rtol=0.0, scale_rtol=1e-5),
    "fp16": Tolerance(atol=2e-2, rtol=2e-2),
    "bf16": Tolerance(atol=1e-1, rtol=5e-2),
}
