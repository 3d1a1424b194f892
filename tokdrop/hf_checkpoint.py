"""The Hugging Face checkpoint layout of the models: config.json + model.safetensors (pytorch_model.bin is
also read). Training-state checkpoints (optimizer, RNG, data position) are tokdrop.pretrain's."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tokdrop.config import BertConfig
from tokdrop.files import write_atomically

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"

# Keys of the encoder itself, which a BertFor* model stores under "bert.".
_BASE_KEYS = ("embeddings.", "encoder.", "pooler.", "token_importance.")
# Tied to the word embeddings, so never stored (as in Hugging Face).
_TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# Heads of other BERT classes: loading a checkpoint into a different head drops them silently.
_OTHER_HEADS = ("cls.", "classifier.", "qa_outputs.")


def _model_key(key: str, prefix: str) -> str:
    """Map a checkpoint key (any BERT class, old gamma/beta names) to this model's naming."""
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    if key.startswith("bert."):
        key = key[len("bert.") :]
    elif not key.startswith(_BASE_KEYS):
        return key
    return prefix + key


def _read_weights(directory: Path) -> dict[str, Tensor]:
    safetensors_path, pytorch_path = directory / SAFETENSORS_NAME, directory / PYTORCH_NAME
    path = safetensors_path if safetensors_path.is_file() else pytorch_path
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir())
        raise ValueError(f"{directory} has no {SAFETENSORS_NAME} or {PYTORCH_NAME} (it holds {present})")
    try:
        if path == safetensors_path:
            return load_file(path)
        # weights_only=True refuses anything but tensors and containers.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt file raises anything from SafetensorError to IndexError
        raise ValueError(f"cannot read weights from {path}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{path} must hold a state_dict (a dict of name -> tensor), got {type(state).__name__}")
    return state


def read_config(directory: str | os.PathLike, **overrides: Any) -> BertConfig:
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
        return BertConfig.from_dict(raw, **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


class PretrainedMixin:
    """save_pretrained / from_pretrained in the Hugging Face layout, for the BERT model classes.

    A class sets `checkpoint_prefix` ("" or "bert.") and `optional_keys`: prefixes of parameters a
    checkpoint may lack (a head it was not trained with), which then keep their fresh initialisation.
    """

    checkpoint_prefix: str
    optional_keys: tuple[str, ...]
    config: BertConfig

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k not in _TIED_KEYS}
        config = self.config.to_dict() | {"architectures": [type(self).__name__], "tie_word_embeddings": True}
        # Serialised before anything is written, so a config that cannot be saved changes nothing.
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        write_atomically(directory / SAFETENSORS_NAME, lambda temp: save_file(state, temp, metadata={"format": "pt"}))
        write_atomically(directory / CONFIG_NAME, lambda temp: Path(temp).write_text(config_text))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **config_overrides: Any):
        """Load a tokdrop or Hugging Face BERT directory; config fields can be overridden, e.g.
        token_drop=TokenDropConfig(...) to continue pretraining a dense checkpoint with dropping."""
        directory = Path(directory)
        if not directory.is_dir():
            problem = "is not a directory" if directory.exists() else "does not exist"
            raise ValueError(f"checkpoint directory {directory} {problem}")
        model = cls(read_config(directory, **config_overrides))
        expected = {k: v for k, v in model.state_dict().items() if k not in _TIED_KEYS}
        loaded: dict[str, Tensor] = {}
        unexpected = []
        decoder = None
        for key, value in _read_weights(directory).items():
            name = _model_key(key, cls.checkpoint_prefix)
            if name in expected:
                loaded[name] = value
            elif name == _TIED_KEYS[0]:
                decoder = value
            elif not (
                name.startswith(_OTHER_HEADS)
                or name in _TIED_KEYS
                or name.endswith("position_ids")
                or "token_importance." in name
                or name.startswith(cls.checkpoint_prefix + "pooler.")
            ):
                unexpected.append(key)
        embeddings = loaded.get(cls.checkpoint_prefix + "embeddings.word_embeddings.weight")
        if (
            decoder is not None
            and embeddings is not None
            and _TIED_KEYS[0] in model.state_dict()
            and not torch.equal(decoder, embeddings)
        ):
            raise ValueError(
                f"{directory}: {_TIED_KEYS[0]} differs from the word embeddings; "
                f"tokdrop ties them, so an untied MLM decoder cannot be loaded"
            )
        for name, value in loaded.items():
            if value.shape != expected[name].shape:
                raise ValueError(
                    f"{directory}: {name} has shape {tuple(value.shape)}, "
                    f"the config needs {tuple(expected[name].shape)}"
                )
        missing = [k for k in expected if k not in loaded and "token_importance." not in k]
        required = [k for k in missing if not k.startswith(cls.optional_keys)]
        if required:
            raise ValueError(f"{directory} lacks {len(required)} weights of {cls.__name__}, e.g. {required[:3]}")
        if missing:
            warnings.warn(
                f"{cls.__name__}: {len(missing)} weights not in {directory} are freshly initialised: {missing[:4]}",
                stacklevel=2,
            )
        if unexpected:
            warnings.warn(
                f"{cls.__name__}: ignored {len(unexpected)} unknown weights in {directory}: {unexpected[:4]}",
                stacklevel=2,
            )
        model.load_state_dict(loaded, strict=False)
        return model
