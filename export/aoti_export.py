"""AOTInductor export: a `.pt2` package with dynamic batch/sequence ranges, for Python or C++.

    report = to_aoti(model_or_dir, "model.pt2", head="encoder", max_batch=32, max_seq_len=512)

The package runs in Python (`torch._inductor.aoti_load_package(path)(input_ids, attention_mask,
token_type_ids)`) and in C++ (`tokdrop-serve`, built by the top-level CMakeLists.txt, through
`torch::inductor::AOTIModelPackageLoader`). Its metadata (all strings) tell a runner what it may
feed: `tokdrop.min_batch` / `tokdrop.max_batch` / `tokdrop.min_seq_len` / `tokdrop.max_seq_len`,
`tokdrop.vocab_size`, `tokdrop.type_vocab_size`, `tokdrop.pad_token_id`, `tokdrop.inputs` and
`tokdrop.outputs` (comma-separated names), `tokdrop.head`, `tokdrop.dtype`, `tokdrop.version`.
Out-of-range shapes or ids must be rejected before running: compiled code does not check them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tokdrop.export.errors import ExportError
from tokdrop.export.pipeline import ExportFormat, ExportJob, ExportOptions, export_program, run_export
from tokdrop.export.preparation import Prepared
from tokdrop.export.report import ExportReport
from tokdrop.export.signature import INPUT_NAMES
from tokdrop.export.validation import Runner

METADATA_VERSION = "1"


def package_metadata(prepared: Prepared, max_batch: int, max_seq_len: int) -> dict[str, str]:
    config = prepared.config
    return {
        "tokdrop.version": METADATA_VERSION,
        "tokdrop.head": prepared.head,
        "tokdrop.dtype": prepared.dtype,
        "tokdrop.inputs": ",".join(INPUT_NAMES),
        "tokdrop.outputs": ",".join(prepared.output_names),
        "tokdrop.min_batch": "1",
        "tokdrop.max_batch": str(max_batch),
        "tokdrop.min_seq_len": "1",
        "tokdrop.max_seq_len": str(max_seq_len),
        "tokdrop.vocab_size": str(config.vocab_size),
        "tokdrop.type_vocab_size": str(config.type_vocab_size),
        "tokdrop.pad_token_id": str(config.pad_token_id),
        "tokdrop.hidden_size": str(config.hidden_size),
    }


class AotiFormat(ExportFormat):
    """An AOTInductor package for the CPU, loaded back with aoti_load_package for validation."""

    name = "aoti"

    def check(self, path: Path, options: ExportOptions) -> None:
        if path.suffix != ".pt2":
            raise ExportError(f"an AOTInductor package must be named *.pt2, got {path.name!r}")

    def build(self, job: ExportJob, stage: Path) -> None:
        job.step(f"torch.export with batch 1..{job.max_batch}, sequence 1..{job.max_seq_len}")
        program = export_program(job)
        job.step("compiling with AOTInductor (C++ codegen and build; this takes a while)")
        configs = {"aot_inductor.metadata": package_metadata(job.prepared, job.max_batch, job.max_seq_len)}
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(stage / job.path.name), inductor_configs=configs
        )
        job.report.extra["device"] = "cpu"
        job.report.extra["run from C++"] = f"tokdrop-serve {job.path} < batches.jsonl"

    def load(self, job: ExportJob, stage: Path) -> Runner:
        job.step("validating the package (aoti_load_package) against PyTorch")
        return torch._inductor.aoti_load_package(str(stage / job.path.name))


def to_aoti(model: Any, path: str | os.PathLike, **options: Any) -> ExportReport:
    """Compile `model` (a tokdrop model or a checkpoint directory) with AOTInductor into a `.pt2`
    package at `path` for the CPU, validate it against the PyTorch model (loaded back with
    aoti_load_package), then move it into place.

    options: the fields of ExportOptions (head, max_batch, max_seq_len, dtype fp32/fp16/bf16 with
    LayerNorm and softmax in fp32 and float32 outputs, validate_export, tolerance, normalize,
    allow_random_head, progress).
    """
    return run_export(AotiFormat(), model, path, ExportOptions(**options))


__all__ = ["METADATA_VERSION", "AotiFormat", "package_metadata", "to_aoti"]
