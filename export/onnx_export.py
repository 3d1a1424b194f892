"""ONNX export through torch's dynamo exporter, validated with ONNX Runtime.

    report = to_onnx(model_or_dir, "model.onnx", head="encoder", max_batch=32, max_seq_len=512,
                     optimize=True, dtype="fp16")

- opset >= 18; inputs input_ids / attention_mask / token_type_ids with the dynamic axes
  `batch_size` and `sequence_length` shared by all three.
- Weights go to external data (`<name>.data` beside the graph) when they exceed the 2 GB protobuf
  limit (or when asked).
- `optimize=True` rewrites the graph with onnxscript's ORT fusions: fused Attention,
  SkipLayerNormalization and BiasGelu (counts in the report). Two small rewrites run around
  them so that tokdrop's attention matches the fusion patterns: the zeroing of padded query rows
  moves after the head merge, and the Shape of a projection is read from its input.
- `dtype="fp16"` converts the float weights/ops to fp16 with onnxruntime's converter, keeping
  LayerNormalization, SkipLayerNormalization and Softmax in fp32 and the graph inputs/outputs as
  they are (outputs stay float32). Tolerance vs the fp32 PyTorch model: see TOLERANCES["fp16"].
- ONNX Runtime runs on TensorRT / CUDA execution providers when a GPU and their libraries are
  there, otherwise on the CPU provider, with a logged notice.
"""

from __future__ import annotations

import collections
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokdrop.export.errors import ExportError, require
from tokdrop.export.pipeline import ExportFormat, ExportJob, ExportOptions, run_export
from tokdrop.export.report import ExportReport
from tokdrop.export.signature import INPUT_NAMES
from tokdrop.export.validation import Runner
from tokdrop.kernels import use_backend

log = logging.getLogger(__name__)

# Protobuf refuses messages of 2 GiB and more; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu")
FP32_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "Softmax")


def use_external_data(weight_bytes: int, external_data: bool | None) -> bool:
    """External data when forced, or (None) when the weights would overflow a 2 GB protobuf."""
    return weight_bytes >= EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)


# ---------------------------------------------------------------------------------------- providers


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU (its driver's device files), whatever torch was built for."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version"))


def select_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Execution providers to ask ONNX Runtime for: `requested` if given, else TensorRT and CUDA
    where onnxruntime has them and an NVIDIA GPU is present, then always the CPU provider."""
    ort = require("onnxruntime", "onnxruntime-gpu", "ONNX validation")
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            log.warning(
                "onnxruntime %s lacks the execution providers %s (it has %s); they are skipped",
                ort.__version__,
                missing,
                available,
            )
        chosen = [p for p in requested if p in available]
    else:
        gpu = [p for p in GPU_PROVIDERS if p in available]
        if gpu and not gpu_present():
            log.warning(
                "no NVIDIA GPU found: onnxruntime's %s are not usable here; running on %s", ", ".join(gpu), CPU_PROVIDER
            )
            gpu = []
        chosen = gpu
    if CPU_PROVIDER not in chosen:
        chosen.append(CPU_PROVIDER)
    return chosen


def make_session(
    path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None, spin: bool = True
):
    """An ONNX Runtime session on the best providers, with a logged notice when it falls back to CPU.
    spin=False stops idle worker threads from spinning (fairer when other work shares the cores)."""
    ort = require("onnxruntime", "onnxruntime-gpu", "ONNX validation")
    chosen = select_providers(providers)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as err:  # noqa: BLE001 - a provider failing to initialise raises anything
        if chosen == [CPU_PROVIDER]:
            raise ExportError(f"ONNX Runtime cannot load {path}: {err}") from err
        log.warning("ONNX Runtime could not start %s (%s); falling back to %s", chosen[:-1], err, CPU_PROVIDER)
        session = ort.InferenceSession(str(path), sess_options=options, providers=[CPU_PROVIDER])
    active = session.get_providers()
    dropped = [p for p in chosen if p not in active]
    if dropped:
        log.warning(
            "ONNX Runtime is not using %s (their libraries or the GPU are missing); running on %s",
            ", ".join(dropped),
            ", ".join(active),
        )
    return session


def run_session(session: Any, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> list[np.ndarray]:
    feed = {
        name: np.ascontiguousarray(np.asarray(t), dtype=np.int64)
        for name, t in zip(INPUT_NAMES, (input_ids, attention_mask, token_type_ids), strict=True)
    }
    return session.run(None, feed)


# ------------------------------------------------------------------------------------------- fusion


def _rewrite_rules():
    """Two rewrites that let onnxscript's ORT fusions see tokdrop's attention as BERT attention."""
    from onnxscript.rewriter import pattern

    # (1) Reshape(Where(qmask[B,S,1,1], 0, Transpose(attn)))  ->  Where(qmask[B,S,1], 0, Reshape(Transpose(attn)))
    # zeroing of padded query rows after, instead of before, merging the heads (same values).
    def merged_pattern(op, attn, cond, fill, shape):
        return op.Reshape(op.Where(cond, fill, op.Transpose(attn, perm=[0, 2, 1, 3])), shape)

    def merged_replacement(op, attn, cond, fill, shape):
        merged = op.Reshape(op.Transpose(attn, perm=[0, 2, 1, 3]), shape)
        return op.Where(op.Squeeze(cond, op.Constant(value_ints=[3])), fill, merged)

    def merged_check(context, attn, cond, fill, shape, **_):
        cs = cond.shape
        return (
            cs is not None
            and len(cs) == 4
            and cs[2] == 1
            and cs[3] == 1
            and fill.shape is not None
            and len(fill.shape) == 0
        )

    # (2) Shape(Add(MatMul(x, W), b), start, end) over leading axes -> Shape(x, start, end), so the
    # projections feed only the attention and the bias can be folded into it.
    def shape_pattern(op, x, w, b):
        return op.Shape(op.Add(op.MatMul(x, w), b), _allow_other_attributes=True, _outputs=["shape"])

    def shape_replacement(op, x, w, b, shape, **_):
        node = shape.producer()
        return op.Shape(x, start=node.attributes.get_int("start", 0), end=node.attributes.get_int("end"))

    def shape_check(context, x, w, b, shape, **_):
        node = shape.producer()
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end")
        return (
            x.shape is not None
            and w.shape is not None
            and len(w.shape) == 2
            and end is not None
            and 0 <= start < end <= len(x.shape) - 1
        )

    return (
        pattern.RewriteRule(merged_pattern, merged_replacement, merged_check),
        pattern.RewriteRule(shape_pattern, shape_replacement, shape_check, remove_nodes=False),
    )


def fuse_for_ort(model: Any) -> dict[str, int]:
    """Apply onnxscript's ORT fusions to an onnx_ir model in place; return the fused-op counts."""
    require("onnxscript", "onnxscript", "the ORT-optimised ONNX graph")
    from onnxscript import optimizer
    from onnxscript.rewriter import RewriteRuleSet, ort_fusions

    merged_rule, shape_rule = _rewrite_rules()
    RewriteRuleSet([merged_rule]).apply_to_model(model)
    fused, counts = ort_fusions.optimize_for_ort(model)
    if fused is not model:
        raise ExportError(
            "onnxscript's optimize_for_ort returned a new model; this onnxscript version is not supported"
        )
    # optimize_for_ort stops at MultiHeadAttention when a projection also feeds a Shape; after
    # rewrite (2) the bias folding and the packed-QKV Attention fusion apply.
    try:
        from onnxscript.rewriter.ort_fusions.attention import fuse_attention
        from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
    except ImportError as err:  # other onnxscript layouts: keep what optimize_for_ort fused
        log.warning("onnxscript lacks the MHA bias / Attention fusions (%s); keeping MultiHeadAttention", err)
    else:
        if RewriteRuleSet([shape_rule]).apply_to_model(model):
            fuse_mha_bias(model)
            fuse_attention(model)
            optimizer.optimize(model)
    ops = collections.Counter(node.op_type for node in model.graph)
    log.info("onnxscript fusion counts: %s", counts)
    return {op: ops.get(op, 0) for op in FUSED_OPS}


def _dedupe(model: Any) -> None:
    """onnxruntime's fp16 converter emits one Cast per (initializer, blocked consumer) with the same
    name when an initializer feeds several fp32-kept nodes; keep one of each (they are identical)."""
    seen: set[tuple[str, ...]] = set()
    nodes = []
    for node in model.graph.node:
        key = tuple(node.output)
        if node.op_type == "Cast" and key in seen:
            continue
        seen.add(key)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    names: set[str] = set()
    infos = []
    for info in model.graph.value_info:
        if info.name not in names:
            names.add(info.name)
            infos.append(info)
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)


def to_fp16(src: Path, dst: Path, external: bool) -> None:
    """fp16 copy of an ONNX file: LayerNorm / SkipLayerNorm / Softmax and the I/O stay fp32."""
    onnx = require("onnx", "onnx", "fp16 ONNX export")
    require("onnxruntime", "onnxruntime-gpu", "fp16 ONNX export")
    from onnxruntime.transformers import float16

    model = onnx.load(str(src))
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    model = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    _dedupe(model)
    _save_proto(model, dst, external)


def _save_proto(model: Any, dst: Path, external: bool) -> None:
    onnx = require("onnx", "onnx", "ONNX export")
    if external:
        onnx.save_model(
            model,
            str(dst),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=dst.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(dst))


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def write_onnx(
    job: ExportJob, target: Path, *, opset: int = 18, optimize: bool = False, external: bool = False
) -> dict[str, Any]:
    """Write the job's (float32) module as ONNX at `target`: ORT-fused when `optimize`, converted
    to fp16 when the job's dtype is fp16, weights in `<target>.data` when `external`. Returns what
    the summary shows about it."""
    job.step(
        f"exporting with torch.onnx.export(dynamo=True, opset {opset}), batch 1..{job.max_batch}, "
        f"sequence 1..{job.max_seq_len}"
    )
    _export(job, target, opset, external)
    extra: dict[str, Any] = {}
    if optimize:
        job.step("fusing for ONNX Runtime (onnxscript ort_fusions)")
        extra["fused ops"] = _optimize_file(target, external)
    if job.dtype == "fp16":
        job.step("converting to fp16 (LayerNorm, SkipLayerNorm, Softmax and I/O kept fp32)")
        _rewrite_in_place(target, lambda dst: to_fp16(target, dst, external))
    extra["opset"] = opset
    extra["external data"] = f"yes ({target.name}.data)" if external else "no"
    return extra


def _export(job: ExportJob, target: Path, opset: int, external: bool) -> None:
    prepared = job.prepared
    # torch.onnx logs a warning per torchvision op it cannot register; irrelevant here.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with use_backend(prepared.backend), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            program = torch.onnx.export(
                prepared.module,
                job.example_inputs(),
                dynamo=True,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(prepared.output_names),
                dynamic_shapes=job.dynamic_shapes(),
                optimize=True,
                verbose=False,
            )
    finally:
        registration.setLevel(level)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(target), external_data=external)


def _rewrite_in_place(target: Path, write: Callable[[Path], None]) -> None:
    """write(new_path) a new version of the staged `target` (and its data file) in a subfolder,
    then move it over the old one."""
    sub = target.parent / "rewrite"
    sub.mkdir()
    write(sub / target.name)
    for file in sub.iterdir():
        os.replace(file, target.parent / file.name)
    sub.rmdir()


def _optimize_file(target: Path, external: bool) -> dict[str, int]:
    ir = require("onnx_ir", "onnx-ir", "the ORT-optimised ONNX graph")
    model = ir.load(str(target))
    counts = fuse_for_ort(model)
    _rewrite_in_place(
        target, lambda dst: ir.save(model, str(dst), external_data=dst.name + ".data" if external else None)
    )
    return counts


# ------------------------------------------------------------------------------------------- export


def check_opset(opset: Any) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 18:
        raise ExportError(f"opset must be an int >= 18, got {opset!r}")
    return opset


def require_exporter() -> None:
    """The packages torch's dynamo ONNX exporter needs."""
    require("onnx", "onnx", "ONNX export")
    require("onnxscript", "onnxscript", "ONNX export (torch's dynamo exporter)")


class OnnxFormat(ExportFormat):
    """torch's dynamo exporter, then ONNX Runtime for validation."""

    name = "onnx"
    dtypes = ("fp32", "fp16")

    def __init__(
        self,
        *,
        optimize: bool = False,
        opset: int = 18,
        external_data: bool | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.optimize = optimize
        self.opset = check_opset(opset)
        self.external_data = external_data
        self.providers = providers

    def check(self, path: Path, options: ExportOptions) -> None:
        require_exporter()
        if options.validate_export:
            require("onnxruntime", "onnxruntime-gpu", "ONNX validation")

    def module_dtype(self, dtype: str) -> str:
        return "fp32"  # fp16 is converted on the ONNX graph, keeping LayerNorm and softmax fp32

    def _external(self, job: ExportJob) -> bool:
        return use_external_data(weight_bytes(job.prepared.module), self.external_data)

    def build(self, job: ExportJob, stage: Path) -> None:
        extra = write_onnx(
            job, stage / job.path.name, opset=self.opset, optimize=self.optimize, external=self._external(job)
        )
        job.report.extra.update(extra)

    def load(self, job: ExportJob, stage: Path) -> Runner:
        session = make_session(stage / job.path.name, self.providers)
        providers = ", ".join(session.get_providers())
        job.report.extra["execution providers"] = providers
        job.step(f"validating with ONNX Runtime ({providers})")
        return lambda *inputs: run_session(session, *inputs)

    def obsolete_files(self, job: ExportJob) -> list[Path]:
        # An earlier export's weights file, which nothing refers to once the graph holds them.
        return [] if self._external(job) else [job.path.with_name(job.path.name + ".data")]


def to_onnx(
    model: Any,
    path: str | os.PathLike,
    *,
    optimize: bool = False,
    opset: int = 18,
    external_data: bool | None = None,
    providers: Sequence[str] | None = None,
    **options: Any,
) -> ExportReport:
    """Export `model` (a tokdrop model or a checkpoint directory) to ONNX at `path` and validate it
    with ONNX Runtime against the PyTorch model. Nothing is left at `path` when anything fails.

    options: the fields of ExportOptions (head, max_batch, max_seq_len, dtype "fp32" or "fp16",
    validate_export, tolerance, normalize, allow_random_head, progress). optimize: ORT fusions.
    opset: >= 18. external_data: None = only past 2 GB. providers: ONNX Runtime execution
    providers for validation (None: the best usable). Raises ExportError on bad input,
    ValidationError (with the numbers) on a mismatch, MissingDependencyError when
    onnx/onnxscript/onnxruntime is missing.
    """
    fmt = OnnxFormat(optimize=optimize, opset=opset, external_data=external_data, providers=providers)
    return run_export(fmt, model, path, ExportOptions(**options))


__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "OnnxFormat",
    "fuse_for_ort",
    "gpu_present",
    "make_session",
    "run_session",
    "select_providers",
    "to_fp16",
    "to_onnx",
    "use_external_data",
    "write_onnx",
]
