"""TensorRT export: torch-tensorrt's dynamo path, or TensorRT's ONNX parser.

    report = to_tensorrt(model_or_dir, "model.ep", head="encoder", max_batch=32, max_seq_len=512,
                         opt_batch=8, opt_seq_len=128, dtype="fp16")
    report = to_tensorrt_from_onnx("model.onnx", "model.engine", ...)   # or to_tensorrt(..., route="onnx")

Written against torch-tensorrt 2.11-2.14 (TensorRT 10/11):

- `torch_tensorrt.dynamo.compile(exported_program, arg_inputs=[torch_tensorrt.Input(min_shape,
  opt_shape, max_shape, dtype=torch.int64, name=...)], ...)` on the program that torch.export made
  with one shared Dim per axis, so the min/opt/max profiles of the three inputs agree.
- Precision: TensorRT 11 and recent torch-tensorrt are strongly typed (`use_explicit_typing`,
  default True; `enabled_precisions` deprecated): the precision comes from the model, so fp16/bf16
  cast the weights (LayerNorm and softmax stay fp32). Older versions without `use_explicit_typing`
  get `enabled_precisions={dtype}` instead.
- Saved as an ExportedProgram (`.ep`, reload with `torch_tensorrt.load(path).module()`) or an
  AOTInductor package (`.pt2`, reload with `torch._inductor.aoti_load_package`), via
  `torch_tensorrt.save(..., output_format=..., arg_inputs=..., dynamic_shapes=..., retrace=True)`.
- The ONNX route builds a serialized engine (`.engine` / `.plan`) with `tensorrt.OnnxParser` and
  one optimisation profile (min/opt/max per input); strongly typed networks where the TensorRT
  version has the flag, the fp16 ONNX graph giving fp16 precision.

Nothing here imports torch_tensorrt or tensorrt at module import: asking for them without them
raises MissingDependencyError naming the package. Validation runs on the GPU against the fp32
PyTorch model on the same device.

NOT RUN in this project's CI or development machines: they have neither an NVIDIA GPU nor
TensorRT; tests/test_export_tensorrt.py runs these paths where both exist and skips elsewhere.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokdrop.export.common import (
    DTYPES,
    INPUT_NAMES,
    TOLERANCES,
    ExportError,
    ExportReport,
    Progress,
    Tolerance,
    check_dtype,
    check_output_path,
    check_ranges,
    dynamic_shapes,
    example_inputs,
    new_report,
    prepare,
    publish,
    require,
    staging,
    validate,
)
from tokdrop.kernels import use_backend

TORCH_TRT_FORMATS = {".ep": "exported_program", ".pt2": "aot_inductor"}
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def _need_gpu(purpose: str) -> None:
    if not torch.cuda.is_available():
        raise ExportError(
            f"{purpose} needs an NVIDIA GPU with CUDA; torch {torch.__version__} sees none "
            f"(torch.cuda.is_available() is False)"
        )


def _profiles(max_batch: int, max_seq_len: int, opt_batch: int | None, opt_seq_len: int | None):
    opt_b = min(max_batch, opt_batch or max(1, max_batch // 2))
    opt_s = min(max_seq_len, opt_seq_len or max(1, max_seq_len // 2))
    if opt_b < 1 or opt_s < 1:
        raise ExportError(f"opt_batch / opt_seq_len must be >= 1, got {opt_batch}, {opt_seq_len}")
    return (1, 1), (opt_b, opt_s), (max_batch, max_seq_len)


def to_tensorrt(
    model: Any,
    path: str | os.PathLike,
    *,
    head: str | None = None,
    max_batch: int = 32,
    max_seq_len: int | None = None,
    opt_batch: int | None = None,
    opt_seq_len: int | None = None,
    dtype: str = "fp32",
    route: str = "torch",
    validate_export: bool = True,
    tolerance: Tolerance | None = None,
    normalize: bool = False,
    workspace_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Compile `model` (tokdrop model or checkpoint directory) with TensorRT and save it at `path`.

    route "torch": torch-tensorrt's dynamo path; `path` ends in .ep (ExportedProgram) or .pt2
    (AOTInductor package). route "onnx": ONNX export, then TensorRT's ONNX parser; `path` ends in
    .engine/.plan. min shapes are (1, 1); opt defaults to half the max.
    """
    if route == "onnx":
        return to_tensorrt_from_onnx(
            model,
            path,
            head=head,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            opt_batch=opt_batch,
            opt_seq_len=opt_seq_len,
            dtype=dtype,
            validate_export=validate_export,
            tolerance=tolerance,
            normalize=normalize,
            workspace_bytes=workspace_bytes,
            progress=progress,
        )
    if route != "torch":
        raise ExportError(f"route must be 'torch' or 'onnx', got {route!r}")
    step = Progress(progress)
    path = Path(path)
    output_format = TORCH_TRT_FORMATS.get(path.suffix)
    if output_format is None:
        raise ExportError(
            f"torch-tensorrt output must end in {' or '.join(TORCH_TRT_FORMATS)} "
            f"(ExportedProgram / AOTInductor package), got {path.name!r}"
        )
    check_dtype(dtype)
    torch_trt = require("torch_tensorrt", "torch-tensorrt", "TensorRT export (route 'torch')")
    _need_gpu("TensorRT export")
    step("loading the model")
    prepared = prepare(model, head, dtype=dtype, normalize=normalize)
    max_batch, max_seq_len = check_ranges(prepared.config, max_batch, max_seq_len)
    path = check_output_path(path)
    low, opt, high = _profiles(max_batch, max_seq_len, opt_batch, opt_seq_len)
    device = torch.device("cuda")
    prepared.module.to(device)
    prepared.reference.to(device)
    report = new_report("tensorrt", path, prepared, max_batch, max_seq_len)
    report.extra.update(
        {
            "route": f"torch-tensorrt {getattr(torch_trt, '__version__', '?')} dynamo",
            "profile (batch, seq)": f"min {low}, opt {opt}, max {high}",
            "saved as": output_format,
        }
    )
    example = tuple(t.to(device) for t in example_inputs(prepared.config, max_batch, max_seq_len))
    shapes = dynamic_shapes(max_batch, max_seq_len)
    with use_backend(prepared.backend):
        step("torch.export with one shared Dim per axis")
        program = torch.export.export(prepared.module, example, dynamic_shapes=shapes)
        # one Input per positional input, in INPUT_NAMES order; the same batch/seq profile for each
        inputs = [torch_trt.Input(min_shape=low, opt_shape=opt, max_shape=high, dtype=torch.int64) for _ in INPUT_NAMES]
        settings: dict[str, Any] = {"min_block_size": 1, "truncate_double": True}
        params = inspect.signature(torch_trt.dynamo.compile).parameters
        if "use_explicit_typing" in params:  # strongly typed: precision from the (cast) model
            settings["use_explicit_typing"] = True
        elif dtype != "fp32":
            settings["enabled_precisions"] = {DTYPES[dtype]}
        if workspace_bytes:
            settings["workspace_size"] = workspace_bytes
        step(f"compiling with torch_tensorrt.dynamo.compile ({', '.join(f'{k}={v}' for k, v in settings.items())})")
        compiled = torch_trt.dynamo.compile(program, arg_inputs=inputs, **settings)
        with staging(path) as stage:
            target = stage / path.name
            step(f"saving ({output_format})")
            torch_trt.save(
                compiled,
                str(target),
                output_format=output_format,
                arg_inputs=list(example),
                dynamic_shapes=shapes,
                retrace=True,
            )
            if validate_export:
                step("reloading and validating against PyTorch on the GPU")
                if output_format == "aot_inductor":
                    loaded = torch._inductor.aoti_load_package(str(target))
                else:
                    loaded = torch_trt.load(str(target)).module()

                def run(*xs):
                    out = loaded(*(x.to(device) for x in xs))
                    return [o.float().cpu() for o in (out if isinstance(out, (list, tuple)) else [out])]

                _validate_on(device, report, prepared, run, max_batch, max_seq_len, tolerance or TOLERANCES[dtype])
            report.files = publish(stage, [path.name], path)
    report.seconds = step.elapsed
    step("done")
    return report


def _validate_on(device, report, prepared, run, max_batch, max_seq_len, tolerance) -> None:
    """validate() with the reference on `device` and its outputs compared on the CPU."""
    reference = prepared.reference

    class _OnDevice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.output_names = reference.output_names

        def forward(self, *xs):
            return tuple(o.float().cpu() for o in reference(*(x.to(device) for x in xs)))

    original = prepared.reference
    prepared.reference = _OnDevice()
    try:
        validate(report, prepared, run, max_batch, max_seq_len, tolerance)
    finally:
        prepared.reference = original


def to_tensorrt_from_onnx(
    model: Any,
    path: str | os.PathLike,
    *,
    head: str | None = None,
    max_batch: int = 32,
    max_seq_len: int | None = None,
    opt_batch: int | None = None,
    opt_seq_len: int | None = None,
    dtype: str = "fp32",
    validate_export: bool = True,
    tolerance: Tolerance | None = None,
    normalize: bool = False,
    workspace_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """The ONNX route: to_onnx (fp32 or fp16), then TensorRT's ONNX parser with one optimisation
    profile (min (1, 1), opt, max) for each of the three inputs; writes a serialized engine."""
    from tokdrop.export.onnx_export import to_onnx

    check_dtype(dtype, ("fp32", "fp16"))
    step = Progress(progress)
    path = Path(path)
    if path.suffix not in ENGINE_SUFFIXES:
        raise ExportError(f"a TensorRT engine file must end in {', '.join(ENGINE_SUFFIXES)}, got {path.name!r}")
    trt = require("tensorrt", "tensorrt", "TensorRT export (route 'onnx')")
    _need_gpu("TensorRT export")
    step("loading the model")
    prepared = prepare(model, head, dtype="fp32", normalize=normalize)
    max_batch, max_seq_len = check_ranges(prepared.config, max_batch, max_seq_len)
    path = check_output_path(path)
    low, opt, high = _profiles(max_batch, max_seq_len, opt_batch, opt_seq_len)
    report = new_report("tensorrt", path, prepared, max_batch, max_seq_len)
    report.dtype = dtype
    report.extra.update(
        {
            "route": f"ONNX -> TensorRT {trt.__version__} OnnxParser",
            "profile (batch, seq)": f"min {low}, opt {opt}, max {high}",
        }
    )
    with staging(path) as stage:
        onnx_path = stage / "model.onnx"
        step("exporting ONNX")
        to_onnx(
            model,
            onnx_path,
            head=prepared.head,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            dtype=dtype,
            validate_export=False,
            normalize=normalize,
        )
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        if strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        step("parsing the ONNX graph")
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT's ONNX parser rejected the graph: {errors}")
        config = builder.create_builder_config()
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        if not strongly_typed and dtype == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for name in INPUT_NAMES:
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        step("building the engine")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError("TensorRT failed to build the engine (see its log above)")
        (stage / path.name).write_bytes(bytes(serialized))
        if validate_export:
            step("validating the engine against PyTorch on the GPU")
            runner = _EngineRunner(trt, bytes(serialized), prepared.output_names)
            device = torch.device("cuda")
            prepared.reference.to(device)
            _validate_on(device, report, prepared, runner, max_batch, max_seq_len, tolerance or TOLERANCES[dtype])
        report.files = publish(stage, [path.name], path)
    report.seconds = step.elapsed
    step("done")
    return report


class _EngineRunner:
    """Run a serialized engine with torch CUDA tensors through the TensorRT 10+ tensor-name API."""

    def __init__(self, trt: Any, engine_bytes: bytes, output_names: tuple[str, ...]) -> None:
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        self.context = self.engine.create_execution_context()
        self.output_names = output_names
        self.trt = trt

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream()
        keep = []
        for name, tensor in zip(INPUT_NAMES, inputs, strict=True):
            tensor = tensor.to("cuda", torch.int64).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = {self.trt.float32: torch.float32, self.trt.float16: torch.float16}[
                self.engine.get_tensor_dtype(name)
            ]
            out = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        stream.synchronize()
        return [o.float().cpu() for o in outputs]


__all__ = ["to_tensorrt", "to_tensorrt_from_onnx"]
