"""From a checkpoint directory or a tokdrop model to the module an export traces and the float32
PyTorch reference it is validated against.

Models configured with token dropping or random-LTD are exported as the full-sequence encoder
(both are pretraining modes); the notes say so.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

import tokdrop
from tokdrop.config import BertConfig
from tokdrop.export.errors import ExportError
from tokdrop.export.heads import DTYPES, Head, in_reduced_precision, make_head
from tokdrop.export.signature import DTYPE_NAMES, HEADS
from tokdrop.hf_checkpoint import CONFIG_NAME, PYTORCH_NAME, SAFETENSORS_NAME, read_config
from tokdrop.model import BertModel, MaskedLM, SequenceClassifier

CLASSIFIER_HEADS = ("classifier", "narrow-cls")


@dataclass
class Prepared:
    """A head ready for export, the float32 PyTorch reference it is validated against, and notes.
    `module` is `reference` itself in float32; `backend` is the attention backend of both."""

    module: Head
    reference: Head
    config: BertConfig
    head: str
    dtype: str
    backend: str
    notes: list[str]

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.module.output_names


def describe_source(model: Any) -> str:
    return f"checkpoint {model}" if isinstance(model, (str, os.PathLike)) else type(model).__name__


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ExportError(f"unsupported head {head!r}; expected one of {HEADS}")


def check_dtype(dtype: str, allowed: Sequence[str] = DTYPE_NAMES) -> None:
    if dtype not in allowed:
        raise ExportError(f"unsupported dtype {dtype!r} for this format; expected one of {tuple(allowed)}")


def _model_class(head: str, directory: Path) -> type[nn.Module]:
    """The class that loads `directory` for `head`: BERT's or RoBERTa's, by config.json's model_type."""
    try:
        model_type = json.loads((directory / CONFIG_NAME).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None  # from_pretrained names the problem
    family = "Roberta" if model_type == "roberta" else "Bert"
    return getattr(tokdrop, f"{family}ForSequenceClassification" if head in CLASSIFIER_HEADS else f"{family}Model")


def _checkpoint_head(directory: Path) -> str:
    """classifier when config.json names a sequence-classification architecture, else encoder."""
    try:
        architectures = json.loads((directory / CONFIG_NAME).read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []
    return "classifier" if any("SequenceClassification" in str(a) for a in architectures) else "encoder"


def _stored_weight_names(directory: Path) -> set[str]:
    """Names of the weights the checkpoint holds (read after from_pretrained accepted the file)."""
    safetensors_path = directory / SAFETENSORS_NAME
    if safetensors_path.is_file():
        with safe_open(str(safetensors_path), framework="pt") as weights:
            return set(weights.keys())
    return set(torch.load(directory / PYTORCH_NAME, map_location="cpu", weights_only=True))


def _describe_token_drop(config: BertConfig) -> str:
    drop = config.token_drop
    return (
        f"the checkpoint is configured for token dropping (keep={drop.keep}, start_layer="
        f"{drop.start_layer}, end_layer={drop.end_layer}); it is exported as the full-sequence "
        f"encoder with dropping off (token dropping is a pretraining mode)"
    )


def _untrained_parts(directory: Path, head: str, model: nn.Module) -> list[str]:
    """The parts of `head` that the checkpoint holds no weights for (a masked-LM or encoder
    checkpoint has neither a classifier nor, often, a pooler)."""
    stored = _stored_weight_names(directory)
    encoder = model.base_model if isinstance(model, SequenceClassifier) else model
    parts = {}
    if encoder.pooler is not None:  # RoBERTa's classifier has none
        parts["pooler"] = any(name.endswith("pooler.dense.weight") for name in stored)
    if head in CLASSIFIER_HEADS:
        parts["classifier"] = any(name.startswith("classifier.") for name in stored)
    return [part for part, present in parts.items() if not present]


def load_model(
    directory: str | os.PathLike, head: str | None = None, *, allow_random_head: bool = False
) -> tuple[nn.Module, str, list[str]]:
    """Load a tokdrop or Hugging Face BERT directory for `head` (None: classifier when config.json
    names a sequence-classification architecture, else encoder). Token dropping and random-LTD are
    switched off. A classifier head whose weights the checkpoint lacks is refused unless
    `allow_random_head`. Returns (model in eval mode, head, notes)."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise ExportError(f"model directory {directory} {problem}")
    head = _checkpoint_head(directory) if head is None else head
    check_head(head)
    model_class = _model_class(head, directory)
    try:
        config = read_config(directory, model_class.config_class)
    except ValueError as err:
        raise ExportError(f"cannot read the model config: {err}") from err
    notes = [] if config.token_drop is None else [_describe_token_drop(config)]
    if head == "narrow-cls" and config.narrow is None:
        raise ExportError(
            f"head 'narrow-cls' needs a NarrowBERT checkpoint (config.narrow set); "
            f"{directory} has a plain BERT config: use head 'classifier'"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = model_class.from_pretrained(directory, token_drop=None, random_ltd=None)
        except (ValueError, TypeError, OSError) as err:
            raise ExportError(f"cannot load the model from {directory}: {err}") from err
    untrained = _untrained_parts(directory, head, model)
    if head in CLASSIFIER_HEADS and untrained:
        what = " and ".join(f"{part} weights" for part in untrained)
        if not allow_random_head:
            raise ExportError(
                f"head {head!r} needs a trained classifier, but {directory} holds no {what} (it is not a "
                f"sequence-classification checkpoint): its logits would come from random weights. Export "
                f"head 'encoder' or 'embedding', or allow the random head (allow_random_head=True, "
                f"--allow-random-head)"
            )
        notes.append(f"WARNING: the checkpoint holds no {what}: they are randomly initialised (allowed)")
    elif "pooler" in untrained:
        # An encoder without pooler weights: export no pooler_output rather than a random one.
        model.pooler = None
        notes.append("the checkpoint has no pooler weights: pooler_output is not exported")
    # The freshly-initialised warning is what the notes above already say.
    notes += [f"WARNING from loading: {w.message}" for w in caught if "freshly initialised" not in str(w.message)]
    return model.eval(), head, notes


def _own_copy(model: nn.Module, head: str | None) -> tuple[nn.Module, str, list[str]]:
    """A float32 CPU copy of a tokdrop model instance (the caller's stays as it is), dropping off."""
    if not isinstance(model, (BertModel, SequenceClassifier, MaskedLM)):
        raise ExportError(
            f"expected a tokdrop model (BertModel, RobertaModel, their masked-LM or sequence-classification "
            f"classes) or a checkpoint directory, got {type(model).__name__}"
        )
    if head is None:
        head = "classifier" if isinstance(model, SequenceClassifier) else "encoder"
    check_head(head)
    notes = [] if model.config.token_drop is None else [_describe_token_drop(model.config)]
    model = copy.deepcopy(model).float().cpu().eval()
    model.config = dataclasses.replace(model.config, token_drop=None, random_ltd=None)
    return model, head, notes


def prepare(
    model: nn.Module | str | os.PathLike,
    head: str | None = None,
    *,
    dtype: str = "fp32",
    normalize: bool = False,
    allow_random_head: bool = False,
) -> Prepared:
    """Turn a tokdrop model (or a checkpoint directory) into the export module of `head`.

    fp32 uses the `sdpa` attention path; fp16/bf16 cast the weights, keep LayerNorm in fp32 and use
    the `eager` attention path, whose softmax runs in fp32. The reference is always fp32 PyTorch.
    """
    check_dtype(dtype)
    if isinstance(model, (str, os.PathLike)):
        model, head, notes = load_model(model, head, allow_random_head=allow_random_head)
    else:
        model, head, notes = _own_copy(model, head)
    config = model.config
    if head in ("encoder", "embedding") and not isinstance(model, BertModel):
        model = model.base_model
    if head in CLASSIFIER_HEADS and not isinstance(model, SequenceClassifier):
        raise ExportError(f"head {head!r} needs a sequence-classification model, got {type(model).__name__}")
    if head == "narrow-cls" and config.narrow is None:
        raise ExportError("head 'narrow-cls' needs a NarrowBERT model (config.narrow set)")
    if head == "classifier" and config.narrow is not None:
        notes.append(
            "NarrowBERT model exported as the full-sequence classifier (every position is a "
            "query); ask for head 'narrow-cls' for the [CLS]-only graph"
        )
    if head == "narrow-cls":
        notes.append(
            f"NarrowBERT [CLS]-only classifier: {config.narrow.full_layers} full layers, then "
            f"{config.num_hidden_layers - config.narrow.full_layers} narrow layers with [CLS] "
            f"as the only query"
        )
    if head == "encoder" and getattr(model, "pooler", None) is None and not any("pooler" in n for n in notes):
        notes.append("the model has no pooler: the encoder head returns last_hidden_state only")
    reference = make_head(head, model, normalize).eval()
    if dtype == "fp32":
        module = reference
    else:
        module = in_reduced_precision(make_head(head, copy.deepcopy(model), normalize), DTYPES[dtype]).eval()
    for p in list(reference.parameters()) + list(module.parameters()):
        p.requires_grad_(False)
    backend = "sdpa" if dtype == "fp32" else "eager"
    return Prepared(module, reference, config, head, dtype, backend, notes)
