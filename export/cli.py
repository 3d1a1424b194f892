"""Export a tokdrop or Hugging Face BERT checkpoint for serving, and validate the result.

Formats:
  onnx      torch's dynamo exporter (opset >= 18), validated with ONNX Runtime; --optimize fuses
            Attention / SkipLayerNormalization / BiasGelu; --dtype fp16 keeps LayerNorm/softmax fp32
  aoti      AOTInductor .pt2 package, runnable from C++ by tokdrop-serve (see CMakeLists.txt)
  tensorrt  torch-tensorrt (.ep / .pt2) or, with --trt-route onnx, a TensorRT engine (.engine);
            needs an NVIDIA GPU with torch-tensorrt / tensorrt installed

Heads: encoder (last_hidden_state, pooler_output), classifier (logits), embedding (mean-pooled
sentence embeddings), narrow-cls (NarrowBERT [CLS]-only classifier, explicit). A model configured
with token dropping is exported as the full-sequence encoder, with dropping off.

A classifier head is refused on a checkpoint without classifier weights (e.g. a masked-LM
checkpoint) unless --allow-random-head.

Exit status: 0 exported and validated; 1 validation mismatch (numbers shown); 2 bad input
(missing/corrupt model, unsupported head, bad ranges, unwritable output, missing package).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from tokdrop.cli import HelpFormatter, add_subcommand, positive_int
from tokdrop.export.signature import DTYPE_NAMES, FORMATS, HEADS
from tokdrop.export.tolerances import TOLERANCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to export to")
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="tokdrop or Hugging Face BERT checkpoint directory (config.json + weights)",
    )
    parser.add_argument(
        "--out", required=True, metavar="PATH", help="output file (.onnx; .pt2 for aoti; .ep/.pt2/.engine for tensorrt)"
    )
    parser.add_argument(
        "--head",
        choices=HEADS,
        default=None,
        help="exported outputs (default: classifier for a sequence-classification checkpoint, else encoder)",
    )
    parser.add_argument(
        "--allow-random-head",
        action="store_true",
        help="export a classifier head even when the checkpoint has no classifier weights (random logits)",
    )
    parser.add_argument("--max-batch", type=positive_int, default=32, help="largest batch size the export accepts")
    parser.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=None,
        help="longest sequence the export accepts (default: max_position_embeddings)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="fp32",
        help="compute precision (onnx: fp32/fp16; outputs are always float32)",
    )
    parser.add_argument("--optimize", action="store_true", help="onnx: ORT-fused graph (onnxscript)")
    parser.add_argument("--opset", type=int, default=18, help="onnx: opset version (>= 18)")
    parser.add_argument(
        "--external-data",
        choices=("auto", "always", "never"),
        default="auto",
        help="onnx: weights in <out>.data (auto: only past 2 GB)",
    )
    parser.add_argument(
        "--providers",
        default=None,
        help="onnx: comma-separated ONNX Runtime execution providers for validation "
        "(default: TensorRT/CUDA when usable, else CPU)",
    )
    parser.add_argument("--normalize", action="store_true", help="embedding head: L2-normalise")
    parser.add_argument(
        "--trt-route",
        choices=("torch", "onnx"),
        default="torch",
        help="tensorrt: torch-tensorrt dynamo path or TensorRT's ONNX parser",
    )
    parser.add_argument("--opt-batch", type=positive_int, default=None, help="tensorrt: optimisation-profile batch")
    parser.add_argument(
        "--opt-seq-len", type=positive_int, default=None, help="tensorrt: optimisation-profile sequence length"
    )
    defaults = "".join(f"\n  {dtype}: {tolerance}" for dtype, tolerance in TOLERANCES.items())
    tolerance = parser.add_argument_group(
        "validation",
        "an output passes where |exported - PyTorch| <= atol + rtol * |PyTorch| + scale_rtol * max|PyTorch|\n"
        f"(per-token outputs at the real tokens only); defaults by dtype:{defaults}",
    )
    tolerance.add_argument("--atol", type=float, default=None, help="override the validation atol")
    tolerance.add_argument("--rtol", type=float, default=None, help="override the validation rtol")
    tolerance.add_argument("--scale-rtol", type=float, default=None, help="override the validation scale_rtol")
    tolerance.add_argument("--no-validate", action="store_true", help="skip validation (not recommended)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def _export(args: argparse.Namespace, progress: Any) -> Any:
    """Run the export the arguments ask for; returns its report."""
    overrides = {
        name: getattr(args, name) for name in ("atol", "rtol", "scale_rtol") if getattr(args, name) is not None
    }
    options = dict(
        head=args.head,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        dtype=args.dtype,
        validate_export=not args.no_validate,
        tolerance=dataclasses.replace(TOLERANCES[args.dtype], **overrides) if overrides else None,
        normalize=args.normalize,
        allow_random_head=args.allow_random_head,
        progress=progress,
    )
    if args.format == "onnx":
        from tokdrop.export.onnx_export import to_onnx

        external = {"auto": None, "always": True, "never": False}[args.external_data]
        providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
        return to_onnx(
            args.model,
            args.out,
            optimize=args.optimize,
            opset=args.opset,
            external_data=external,
            providers=providers,
            **options,
        )
    if args.format == "aoti":
        from tokdrop.export.aoti_export import to_aoti

        return to_aoti(args.model, args.out, **options)
    from tokdrop.export.tensorrt_export import to_tensorrt

    return to_tensorrt(
        args.model, args.out, route=args.trt_route, opt_batch=args.opt_batch, opt_seq_len=args.opt_seq_len, **options
    )


def run(args: argparse.Namespace) -> int:
    from tokdrop.export.errors import ExportError
    from tokdrop.export.validation import ValidationError

    progress = None if args.quiet else (lambda message: print(message, flush=True))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("tokdrop.export")
    log.addHandler(handler)
    try:
        report = _export(args, progress)
    except ValidationError as err:
        print(err.report.summary(), flush=True)
        print(f"tokdrop export: validation FAILED: {err}", file=sys.stderr)
        return 1
    except ExportError as err:
        print(f"tokdrop export: error: {err}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
    print(report.summary(), flush=True)
    return 0


def add_command(subcommands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `export` subcommand to the `tokdrop` command (an entry point, see pyproject.toml)."""
    summary = "export a checkpoint to ONNX / TensorRT / an AOTInductor package, validated"
    return add_subcommand(subcommands, "export", summary, __doc__, add_arguments, run)


def main(argv: list[str] | None = None) -> int:
    """`python -m tokdrop.export.cli ...`: the export command on its own."""
    parser = argparse.ArgumentParser(prog="tokdrop export", description=__doc__, formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
