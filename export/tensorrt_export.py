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
from pathlib import Path
from typing import Any

import torch

from tokdrop.export.errors import ExportError, require
from tokdrop.export.heads import DTYPES
from tokdrop.export.onnx_export import require_exporter, use_external_data, weight_bytes, write_onnx
from tokdrop.export.pipeline import ExportFormat, ExportJob, ExportOptions, export_program, run_export
from tokdrop.export.report import ExportReport
from tokdrop.export.signature import INPUT_NAMES
from tokdrop.export.validation import Runner
from tokdrop.kernels import use_backend

ROUTES = ("torch", "onnx")
TORCH_TRT_FORMATS = {".ep": "exported_program", ".pt2": "aot_inductor"}
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def _need_gpu(purpose: str) -> None:
    if not torch.cuda.is_available():
        raise ExportError(
            f"{purpose} needs an NVIDIA GPU with CUDA; torch {torch.__version__} sees none "
            f"(torch.cuda.is_available() is False)"
        )


def _torch_tensorrt() -> Any:
    return require("torch_tensorrt", "torch-tensorrt", "TensorRT export (route 'torch')")


def _tensorrt() -> Any:
    return require("tensorrt", "tensorrt", "TensorRT export (route 'onnx')")


def _outputs_on_cpu(outputs: Any) -> list[torch.Tensor]:
    return [o.float().cpu() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


class _TensorRTFormat(ExportFormat):
    """What both routes share: a GPU, one optimisation profile (min (1, 1), opt, max) for each of
    the three inputs, and validation against the PyTorch model on the GPU."""

    name = "tensorrt"
    device = "cuda"

    def __init__(
        self, *, opt_batch: int | None = None, opt_seq_len: int | None = None, workspace_bytes: int | None = None
    ) -> None:
        for label, value in (
            ("opt_batch", opt_batch),
            ("opt_seq_len", opt_seq_len),
            ("workspace_bytes", workspace_bytes),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ExportError(f"{label} must be None or an int >= 1, got {value!r}")
        self.opt_batch = opt_batch
        self.opt_seq_len = opt_seq_len
        self.workspace_bytes = workspace_bytes

    def profile(self, job: ExportJob) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(min, opt, max) (batch, seq) shapes; opt defaults to half the max."""
        opt_batch = min(job.max_batch, self.opt_batch or max(1, job.max_batch // 2))
        opt_seq = min(job.max_seq_len, self.opt_seq_len or max(1, job.max_seq_len // 2))
        return (1, 1), (opt_batch, opt_seq), (job.max_batch, job.max_seq_len)

    def describe(self, job: ExportJob, route: str) -> None:
        low, opt, high = self.profile(job)
        job.report.extra["route"] = route
        job.report.extra["profile (batch, seq)"] = f"min {low}, opt {opt}, max {high}"


class TorchTensorRTFormat(_TensorRTFormat):
    """torch-tensorrt's dynamo path, saved as an ExportedProgram (.ep) or AOTInductor package (.pt2)."""

    def check(self, path: Path, options: ExportOptions) -> None:
        if path.suffix not in TORCH_TRT_FORMATS:
            raise ExportError(
                f"torch-tensorrt output must end in {' or '.join(TORCH_TRT_FORMATS)} "
                f"(ExportedProgram / AOTInductor package), got {path.name!r}"
            )
        _torch_tensorrt()
        _need_gpu("TensorRT export")

    def build(self, job: ExportJob, stage: Path) -> None:
        torch_trt = _torch_tensorrt()
        output_format = TORCH_TRT_FORMATS[job.path.suffix]
        self.describe(job, f"torch-tensorrt {getattr(torch_trt, '__version__', '?')} dynamo")
        job.report.extra["saved as"] = output_format
        low, opt, high = self.profile(job)
        job.step("torch.export with one shared Dim per axis")
        program = export_program(job, self.device)
        # one Input per positional input, in INPUT_NAMES order; the same batch/seq profile for each
        inputs = [torch_trt.Input(min_shape=low, opt_shape=opt, max_shape=high, dtype=torch.int64) for _ in INPUT_NAMES]
        settings: dict[str, Any] = {"min_block_size": 1, "truncate_double": True}
        if "use_explicit_typing" in inspect.signature(torch_trt.dynamo.compile).parameters:
            settings["use_explicit_typing"] = True  # strongly typed: precision from the (cast) model
        elif job.dtype != "fp32":
            settings["enabled_precisions"] = {DTYPES[job.dtype]}
        if self.workspace_bytes:
            settings["workspace_size"] = self.workspace_bytes
        with use_backend(job.prepared.backend):
            job.step(
                f"compiling with torch_tensorrt.dynamo.compile ({', '.join(f'{k}={v}' for k, v in settings.items())})"
            )
            compiled = torch_trt.dynamo.compile(program, arg_inputs=inputs, **settings)
            job.step(f"saving ({output_format})")
            torch_trt.save(
                compiled,
                str(stage / job.path.name),
                output_format=output_format,
                arg_inputs=list(job.example_inputs(self.device)),
                dynamic_shapes=job.dynamic_shapes(),
                retrace=True,
            )

    def load(self, job: ExportJob, stage: Path) -> Runner:
        job.step("reloading and validating against PyTorch on the GPU")
        target = str(stage / job.path.name)
        if TORCH_TRT_FORMATS[job.path.suffix] == "aot_inductor":
            loaded = torch._inductor.aoti_load_package(target)
        else:
            loaded = _torch_tensorrt().load(target).module()
        return lambda *inputs: _outputs_on_cpu(loaded(*(x.to(self.device) for x in inputs)))


class TensorRTOnnxFormat(_TensorRTFormat):
    """The ONNX route: the ONNX graph (fp32 or fp16), then TensorRT's ONNX parser; a serialized engine."""

    dtypes = ("fp32", "fp16")

    def check(self, path: Path, options: ExportOptions) -> None:
        if path.suffix not in ENGINE_SUFFIXES:
            raise ExportError(f"a TensorRT engine file must end in {', '.join(ENGINE_SUFFIXES)}, got {path.name!r}")
        _tensorrt()
        require_exporter()
        _need_gpu("TensorRT export")

    def module_dtype(self, dtype: str) -> str:
        return "fp32"  # the ONNX graph is converted to fp16, as for an ONNX export

    def build(self, job: ExportJob, stage: Path) -> None:
        trt = _tensorrt()
        self.describe(job, f"ONNX -> TensorRT {trt.__version__} OnnxParser")
        # Only the engine is published: the graph it is built from stays in a subfolder.
        onnx_path = stage / "onnx" / "model.onnx"
        onnx_path.parent.mkdir()
        write_onnx(job, onnx_path, external=use_external_data(weight_bytes(job.prepared.module), None))
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        if strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        job.step("parsing the ONNX graph")
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT's ONNX parser rejected the graph: {errors}")
        config = builder.create_builder_config()
        if self.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if not strongly_typed and job.dtype == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for name in INPUT_NAMES:
            profile.set_shape(name, *self.profile(job))
        config.add_optimization_profile(profile)
        job.step("building the engine")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError("TensorRT failed to build the engine (see its log above)")
        (stage / job.path.name).write_bytes(bytes(serialized))

    def load(self, job: ExportJob, stage: Path) -> Runner:
        job.step("validating the engine against PyTorch on the GPU")
        trt = _tensorrt()
        return _EngineRunner(trt, (stage / job.path.name).read_bytes(), job.prepared.output_names)


def to_tensorrt(
    model: Any,
    path: str | os.PathLike,
    *,
    route: str = "torch",
    opt_batch: int | None = None,
    opt_seq_len: int | None = None,
    workspace_bytes: int | None = None,
    **options: Any,
) -> ExportReport:
    """Compile `model` (tokdrop model or checkpoint directory) with TensorRT and save it at `path`.

    route "torch": torch-tensorrt's dynamo path; `path` ends in .ep (ExportedProgram) or .pt2
    (AOTInductor package). route "onnx": ONNX export, then TensorRT's ONNX parser; `path` ends in
    .engine/.plan/.trt. min shapes are (1, 1); opt defaults to half the max. options: the fields of
    ExportOptions (head, max_batch, max_seq_len, dtype, validate_export, tolerance, normalize,
    allow_random_head, progress).
    """
    if route not in ROUTES:
        raise ExportError(f"route must be one of {ROUTES}, got {route!r}")
    kind = TensorRTOnnxFormat if route == "onnx" else TorchTensorRTFormat
    fmt = kind(opt_batch=opt_batch, opt_seq_len=opt_seq_len, workspace_bytes=workspace_bytes)
    return run_export(fmt, model, path, ExportOptions(**options))


def to_tensorrt_from_onnx(model: Any, path: str | os.PathLike, **keywords: Any) -> ExportReport:
    """The ONNX route of to_tensorrt (same keywords but `route`): the ONNX graph (fp32 or fp16),
    then TensorRT's ONNX parser with one optimisation profile; writes a serialized engine."""
    return to_tensorrt(model, path, route="onnx", **keywords)


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
        return _outputs_on_cpu(outputs)


__all__ = ["TensorRTOnnxFormat", "TorchTensorRTFormat", "to_tensorrt", "to_tensorrt_from_onnx"]
