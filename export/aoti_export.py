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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokdrop.export.common import (
    INPUT_NAMES,
    TOLERANCES,
    ExportError,
    ExportReport,
    Prepared,
    Progress,
    Tolerance,
    check_output_path,
    check_ranges,
    describe_source,
    export_program,
    new_report,
    prepare,
    publish,
    staging,
    validate,
)

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


def to_aoti(
    model: Any,
    path: str | os.PathLike,
    *,
    head: str | None = None,
    max_batch: int = 32,
    max_seq_len: int | None = None,
    dtype: str = "fp32",
    validate_export: bool = True,
    tolerance: Tolerance | None = None,
    normalize: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Compile `model` (a tokdrop model or a checkpoint directory) with AOTInductor into a `.pt2`
    package at `path` for the CPU, validate it against the PyTorch model (loaded back with
    aoti_load_package), then move it into place. dtype: fp32, fp16 or bf16 (LayerNorm and softmax
    in fp32; outputs float32)."""
    step = Progress(progress)
    path = Path(path)
    if path.suffix != ".pt2":
        raise ExportError(f"an AOTInductor package must be named *.pt2, got {path.name!r}")
    step(f"loading the model ({describe_source(model)})")
    prepared = prepare(model, head, dtype=dtype, normalize=normalize)
    max_batch, max_seq_len = check_ranges(prepared.config, max_batch, max_seq_len)
    path = check_output_path(path)
    report = new_report("aoti", path, prepared, max_batch, max_seq_len)
    with staging(path) as stage:
        target = stage / path.name
        step(f"torch.export with batch 1..{max_batch}, sequence 1..{max_seq_len}")
        program = export_program(prepared, max_batch, max_seq_len)
        step("compiling with AOTInductor (C++ codegen and build; this takes a while)")
        configs = {"aot_inductor.metadata": package_metadata(prepared, max_batch, max_seq_len)}
        torch._inductor.aoti_compile_and_package(program, package_path=str(target), inductor_configs=configs)
        if validate_export:
            step("validating the package (aoti_load_package) against PyTorch")
            runner = torch._inductor.aoti_load_package(str(target))
            validate(report, prepared, lambda *xs: runner(*xs), max_batch, max_seq_len, tolerance or TOLERANCES[dtype])
            del runner
        else:
            report.notes.append("validation skipped on request")
        report.files = publish(stage, [path.name], path)
    report.extra["device"] = "cpu"
    report.extra["run from C++"] = f"tokdrop-serve {path} < batches.jsonl"
    report.seconds = step.elapsed
    step("done")
    return report


__all__ = ["METADATA_VERSION", "package_metadata", "to_aoti"]
