"""Hugging Face interop of the models: the checkpoint layout on disk (config.json + model.safetensors,
pytorch_model.bin also read) and conversion to and from transformers models in memory.

The token-importance table of a token-dropping model is training state that transformers does not
know: it is saved beside the weights as token_importance.safetensors, so that transformers loads
the directory without warnings. Training-state checkpoints (optimizer, RNG, data position) are
tokdrop.pretrain's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tokdrop.config import BertConfig
from tokdrop.files import write_directory_atomically

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
IMPORTANCE_NAME = "token_importance.safetensors"
# What a save replaces in an existing directory; everything else there (a tokenizer) stays.
SAVED_NAMES = (CONFIG_NAME, SAFETENSORS_NAME, PYTORCH_NAME, IMPORTANCE_NAME, "model.safetensors.index.json")

IMPORTANCE_KEY = "token_importance.table"
# Keys of an encoder itself, which the task models store under "bert." / "roberta.".
_BASE_KEYS = ("embeddings.", "encoder.", "pooler.", "token_importance.")
# Heads of other model classes: loading a checkpoint into a different head drops them silently.
_OTHER_HEADS = ("cls.", "lm_head.", "classifier.", "qa_outputs.")
# Fields of a transformers config that tokdrop's models cannot represent, and what they must be.
_UNSUPPORTED = {"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False}


def _model_key(key: str, family: str, prefix: str) -> str:
    """Map a checkpoint key (any class of the family, old gamma/beta names) to a model's naming:
    `family` is "bert" or "roberta", `prefix` the model's own ("" for the encoder itself)."""
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    if key.startswith(family + "."):
        key = key[len(family) + 1 :]
    elif not key.startswith(_BASE_KEYS):
        return key
    return f"{prefix}.{key}" if prefix else key


def _read_weights(directory: Path) -> dict[str, Tensor]:
    safetensors_path, pytorch_path = directory / SAFETENSORS_NAME, directory / PYTORCH_NAME
    path = safetensors_path if safetensors_path.is_file() else pytorch_path
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir())
        raise ValueError(f"{directory} has no {SAFETENSORS_NAME} or {PYTORCH_NAME} (it holds {present})")
    state = _read_tensors(path)
    importance = directory / IMPORTANCE_NAME
    if importance.is_file():
        state |= _read_tensors(importance)
    return state


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        # weights_only=True refuses anything but tensors and containers.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt file raises anything from SafetensorError to IndexError
        raise ValueError(f"cannot read weights from {path}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{path} must hold a state_dict (a dict of name -> tensor), got {type(state).__name__}")
    return state


def read_config(directory: str | os.PathLike, config_class: type[BertConfig] = BertConfig, **overrides: Any):
    """The config.json of a checkpoint directory as `config_class`, with fields overridden."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{Path(directory)} is not a checkpoint directory: {CONFIG_NAME} is missing")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    try:
        return config_class.from_dict(raw, **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


class PretrainedMixin:
    """save_pretrained / from_pretrained in the Hugging Face layout, and to_transformers, for the
    model classes.

    A class sets `config_class`, `base_model_prefix` (the encoder's attribute, "" for the encoder
    itself), `tied_keys` (the decoder's, which share the word embeddings and are never stored) and
    `optional_keys`: prefixes of parameters a checkpoint may lack (a head it was not trained with),
    which then keep their fresh initialisation. Its state_dict leaves the tied keys out, as
    transformers' files do, so that any safetensors writer (transformers.Trainer's) can save it.
    """

    config_class: type[BertConfig]
    base_model_prefix: str
    optional_keys: tuple[str, ...]
    tied_keys: tuple[str, ...]
    config: BertConfig

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(_drop_tied_keys)
        self.register_load_state_dict_post_hook(_tied_keys_are_loaded)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the Hugging Face layout into `directory` in one step: a kill leaves the old
        checkpoint or the new one. Other files there (a tokenizer) stay."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        importance = {k: state.pop(k) for k in list(state) if k.endswith(IMPORTANCE_KEY)}
        config = self.config.to_dict() | {"architectures": [type(self).__name__], "tie_word_embeddings": True}
        # Serialised before anything is written, so a config that cannot be saved changes nothing.
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"

        def write(temp: Path) -> None:
            _save_tensors(state, temp / SAFETENSORS_NAME)
            if importance:
                _save_tensors(importance, temp / IMPORTANCE_NAME)
            (temp / CONFIG_NAME).write_text(config_text)
            for name in (SAFETENSORS_NAME, IMPORTANCE_NAME, CONFIG_NAME):
                if (temp / name).exists():
                    os.chmod(temp / name, 0o666 & ~_umask())

        write_directory_atomically(Path(directory), write, SAVED_NAMES)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config: BertConfig | None = None, **config_overrides: Any):
        """Load a tokdrop or Hugging Face directory. config: use this config instead of the
        directory's config.json (e.g. for a transformers.Trainer checkpoint, which has none).
        Config fields can be overridden, e.g. token_drop=TokenDropConfig(...) to continue
        pretraining a dense checkpoint with token dropping."""
        directory = Path(directory)
        if not directory.is_dir():
            problem = "is not a directory" if directory.exists() else "does not exist"
            raise ValueError(f"checkpoint directory {directory} {problem}")
        if config is None:
            config = read_config(directory, cls.config_class, **config_overrides)
        elif config_overrides:
            config = dataclasses.replace(config, **config_overrides)
        model = cls(config)
        model.load_weights(_read_weights(directory), str(directory))
        return model

    def load_weights(self, weights: Mapping[str, Tensor], source: str) -> None:
        """Load a checkpoint's weights (any class of the family, Hugging Face names) into this
        model, checking names, shapes and dtypes; heads the checkpoint lacks stay fresh (warned)."""
        model: nn.Module = self  # type: ignore[assignment]
        family = self.config_class.model_type
        expected = model.state_dict()
        loaded: dict[str, Tensor] = {}
        unexpected = []
        decoder = None
        for key, value in weights.items():
            name = _model_key(key, family, self.base_model_prefix)
            if name in expected:
                loaded[name] = value
            elif name in self.tied_keys:
                decoder = value if name.endswith("weight") else decoder
            elif not (
                name.startswith(_OTHER_HEADS)
                or name.endswith("position_ids")
                or IMPORTANCE_KEY in name
                or ".pooler." in f".{name}"
            ):
                unexpected.append(key)
        embeddings = loaded.get(_model_key("embeddings.word_embeddings.weight", family, self.base_model_prefix))
        if decoder is not None and embeddings is not None and self.tied_keys and not torch.equal(decoder, embeddings):
            raise ValueError(
                f"{source}: {self.tied_keys[0]} differs from the word embeddings; tokdrop ties them, so an "
                "untied MLM decoder cannot be loaded"
            )
        for name, value in loaded.items():
            if value.shape != expected[name].shape:
                raise ValueError(
                    f"{source}: {name} has shape {tuple(value.shape)}, the config needs {tuple(expected[name].shape)}"
                )
            if not value.is_floating_point():
                raise ValueError(f"{source}: {name} holds {value.dtype} values; weights must be floating point")
        missing = [k for k in expected if k not in loaded and IMPORTANCE_KEY not in k]
        required = [k for k in missing if not k.startswith(self.optional_keys)]
        if required:
            raise ValueError(f"{source} lacks {len(required)} weights of {type(self).__name__}, e.g. {required[:3]}")
        if missing:
            warnings.warn(
                f"{type(self).__name__}: {len(missing)} weights not in {source} are freshly initialised: {missing[:4]}",
                stacklevel=3,
            )
        if unexpected:
            warnings.warn(
                f"{type(self).__name__}: ignored {len(unexpected)} unknown weights in {source}: {unexpected[:4]}",
                stacklevel=3,
            )
        model.load_state_dict(loaded, strict=False)

    def to_transformers(self) -> nn.Module:
        """The transformers model of the same class with the same weights (in eval mode). Token
        dropping, NarrowBERT and random-LTD have no transformers counterpart: it runs dense."""
        import transformers

        hf_class = getattr(transformers, type(self).__name__)
        raw = self.config.to_dict()
        hf_config = getattr(transformers, type(self.config).__name__).from_dict(
            {k: v for k, v in raw.items() if k not in ("token_drop", "narrow", "random_ltd")}
        )
        model = hf_class(hf_config)
        state = {k: v for k, v in self.state_dict().items() if IMPORTANCE_KEY not in k}  # type: ignore[attr-defined]
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in self.tied_keys]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{hf_class.__name__} of transformers {transformers.__version__} does not take these weights: "
                f"missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}"
            )
        model.tie_weights()
        return model.to(next(self.parameters())).eval()  # type: ignore[attr-defined]


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as the OSError they are."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as err:
        raise OSError(f"cannot write {path.name}: {err}") from err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _drop_tied_keys(module: PretrainedMixin, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in module.tied_keys:
        state.pop(prefix + key, None)


def _tied_keys_are_loaded(module: PretrainedMixin, incompatible: Any) -> None:
    """The tied keys share the word embeddings' tensors, which the state dict does hold (the missing
    keys carry the prefix of any module the model is wrapped in)."""
    for key in list(incompatible.missing_keys):
        if key.endswith(module.tied_keys):
            incompatible.missing_keys.remove(key)


def from_transformers(
    hf_model: nn.Module, *, token_drop: Any = None, narrow: Any = None, random_ltd: Any = None, **config_overrides: Any
) -> nn.Module:
    """The tokdrop model of the same class as a transformers model in memory (BertModel,
    BertForMaskedLM, BertForSequenceClassification and their RoBERTa counterparts), with the same
    weights, in the same training/eval mode, with token dropping, NarrowBERT or random-LTD when
    given (tokdrop.TokenDropConfig / NarrowConfig / RandomLTDConfig)."""
    import tokdrop.model as models

    name = type(hf_model).__name__
    cls = getattr(models, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PretrainedMixin)) or name.startswith("_"):
        supported = sorted(n for n in models.__all__ if n.endswith(("Model", "MaskedLM", "Classification")))
        raise TypeError(f"from_transformers takes one of {supported}, got {name}")
    raw = hf_model.config.to_dict()
    for field, wanted in _UNSUPPORTED.items():
        if raw.get(field, wanted) != wanted:
            raise ValueError(f"{name}.config.{field}={raw[field]!r} is not supported by tokdrop (only {wanted!r})")
    config = cls.config_class.from_dict(
        raw, token_drop=token_drop, narrow=narrow, random_ltd=random_ltd, **config_overrides
    )
    model = cls(config)
    model.load_weights(hf_model.state_dict(), f"the {name}")
    return model.to(next(hf_model.parameters())).train(hf_model.training)
