"""The one export pipeline. Every format goes through the same steps:

    check the request (dtype, file name, packages, device)     ExportFormat.check
    load and prepare the model, check the ranges and the path   prepare, check_ranges, check_output_path
    build the files into a staging folder beside the output     ExportFormat.build
    load them back and validate against PyTorch                 ExportFormat.load, validate
    move them into place                                        publish

so that a format only says how it builds its files and how it runs them.
"""

from __future__ import annotations

import abc
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokdrop.export.output_files import check_output_path, publish, staging
from tokdrop.export.preparation import Prepared, check_dtype, describe_source, prepare
from tokdrop.export.report import ExportReport
from tokdrop.export.shapes import check_ranges, dynamic_shapes, example_inputs
from tokdrop.export.signature import DTYPE_NAMES, INPUT_NAMES
from tokdrop.export.tolerances import TOLERANCES, Tolerance
from tokdrop.export.validation import Runner, validate
from tokdrop.kernels import use_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """What every format takes (the common keyword arguments of to_onnx, to_aoti, to_tensorrt).

    head: "encoder", "classifier", "embedding" or "narrow-cls" (None: from the model's class or
    config.json). max_batch / max_seq_len: the range of the dynamic axes, validated at its ends
    (max_seq_len None: the model's max_position_embeddings). dtype: the compute precision; outputs
    are float32. validate_export: compare with PyTorch before writing (tolerance None:
    TOLERANCES[dtype]). normalize: L2-normalise the embedding head. allow_random_head: export a
    classifier head the checkpoint has no weights for. progress: called with progress lines.
    """

    head: str | None = None
    max_batch: int = 32
    max_seq_len: int | None = None
    dtype: str = "fp32"
    validate_export: bool = True
    tolerance: Tolerance | None = None
    normalize: bool = False
    allow_random_head: bool = False
    progress: Callable[[str], None] | None = None


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


@dataclass
class ExportJob:
    """One export under way: what a format's steps read (and the report they add to)."""

    prepared: Prepared
    path: Path
    max_batch: int
    max_seq_len: int
    dtype: str
    report: ExportReport
    step: Progress

    def example_inputs(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """Tracing inputs on `device`."""
        return tuple(t.to(device) for t in example_inputs(self.prepared.config, self.max_batch, self.max_seq_len))

    def dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        """The shared batch and sequence Dims of the three inputs."""
        return dynamic_shapes(self.max_batch, self.max_seq_len)


class ExportFormat(abc.ABC):
    """The steps of one format; `run_export` does the rest."""

    name: str
    dtypes: Sequence[str] = DTYPE_NAMES
    # Where the PyTorch reference runs during validation.
    device = "cpu"

    def check(self, path: Path, options: ExportOptions) -> None:  # noqa: B027 - most formats need no check
        """Refuse what cannot work before the model is loaded (file name, packages, device)."""

    def module_dtype(self, dtype: str) -> str:
        """The precision of the PyTorch module that is exported (a format may convert it later)."""
        return dtype

    @abc.abstractmethod
    def build(self, job: ExportJob, stage: Path) -> None:
        """Write the export into `stage` under the final file names (intermediate files go into
        subfolders); add what the summary should show to job.report.extra."""

    @abc.abstractmethod
    def load(self, job: ExportJob, stage: Path) -> Runner:
        """The staged export as a function of (input_ids, attention_mask, token_type_ids)."""

    def obsolete_files(self, job: ExportJob) -> list[Path]:
        """Files beside the output that the new export supersedes (removed after publishing)."""
        return []


def run_export(fmt: ExportFormat, model: Any, path: str | os.PathLike, options: ExportOptions) -> ExportReport:
    """Export `model` (a tokdrop model or a checkpoint directory) in `fmt` at `path`, validate it
    against the PyTorch model and move it into place; nothing is left at `path` when anything fails.
    Raises ExportError on bad input, ValidationError (with the numbers) on a mismatch,
    MissingDependencyError when a package the format needs is missing."""
    step = Progress(options.progress)
    check_dtype(options.dtype, fmt.dtypes)
    path = Path(path)
    fmt.check(path, options)
    step(f"loading the model ({describe_source(model)})")
    prepared = prepare(
        model,
        options.head,
        dtype=fmt.module_dtype(options.dtype),
        normalize=options.normalize,
        allow_random_head=options.allow_random_head,
    )
    max_batch, max_seq_len = check_ranges(prepared.config, options.max_batch, options.max_seq_len)
    path = check_output_path(path)
    report = ExportReport(
        format=fmt.name,
        path=path,
        head=prepared.head,
        dtype=options.dtype,
        input_names=INPUT_NAMES,
        output_names=prepared.output_names,
        batch_range=(1, max_batch),
        seq_range=(1, max_seq_len),
        notes=list(prepared.notes),
    )
    job = ExportJob(prepared, path, max_batch, max_seq_len, options.dtype, report, step)
    try:
        with staging(path) as stage:
            fmt.build(job, stage)
            if options.validate_export:
                run = fmt.load(job, stage)
                prepared.reference.to(fmt.device)
                tolerance = options.tolerance or TOLERANCES[options.dtype]
                validate(report, prepared, run, max_batch, max_seq_len, tolerance, device=fmt.device)
                del run  # a session or loaded package can hold the staged files open
            else:
                report.notes.append("validation skipped on request")
            report.files = publish(stage, path)
        for stale in fmt.obsolete_files(job):
            stale.unlink(missing_ok=True)
    finally:
        report.seconds = step.elapsed
    step("done")
    return report


def export_program(job: ExportJob, device: torch.device | str = "cpu") -> torch.export.ExportedProgram:
    """torch.export of the job's module (moved to `device`) with the shared dynamic dims."""
    with use_backend(job.prepared.backend):
        return torch.export.export(
            job.prepared.module.to(device), job.example_inputs(device), dynamic_shapes=job.dynamic_shapes()
        )
