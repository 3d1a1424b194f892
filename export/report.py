"""What an export wrote and how its validation went: the return value of every exporter and the
command line's summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokdrop.export.signature import BATCH_DIM, SEQ_DIM

if TYPE_CHECKING:
    from tokdrop.export.validation import Tolerance


@dataclass
class ShapeCheck:
    """One validation batch: its real lengths per row, and per output the largest abs difference
    from PyTorch and the largest |PyTorch value| (the output's scale), both over the compared
    elements (real tokens only for per-token outputs)."""

    batch: int
    seq_len: int
    lengths: list[int]
    max_abs_diff: dict[str, float]
    ok: bool
    max_abs_reference: dict[str, float] = field(default_factory=dict)


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
            lines.append(f"  validation against PyTorch (tolerance {self.tolerance}):")
            for check in self.checks:
                lines.append(
                    f"    batch {check.batch} x seq {check.seq_len} (lengths {_short(check.lengths)}): "
                    f"max abs diff {describe_diffs(check)} {'ok' if check.ok else 'MISMATCH'}"
                )
            if self.padded_rows_finite is not None:
                lines.append(f"    fully padded rows give finite outputs: {self.padded_rows_finite}")
        else:
            lines.append("  validation: skipped")
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  took {self.seconds:.1f} s")
        return "\n".join(lines)


def describe_diffs(check: ShapeCheck, label: str = "") -> str:
    """'name{label} 1.2e-06 (max |ref| 3.4), ...' for the outputs of one validation batch."""
    parts = []
    for name, diff in check.max_abs_diff.items():
        scale = check.max_abs_reference.get(name)
        parts.append(f"{name}{label} {diff:.3g}" + ("" if scale is None else f" (max |ref| {scale:.3g})"))
    return ", ".join(parts)


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
