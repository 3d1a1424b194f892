"""Hugging Face checkpoint layout: config.json + model.safetensors (pytorch_model.bin also read)."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from tokdrop.config import BertConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"

# Keys of the encoder itself, which a BertFor* model stores under "bert.".
_BASE_KEYS = ("embeddings.", "encoder.", "pooler.", "token_importance.")
# Tied to the word embeddings, so never stored (as in Hugging Face).
_TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# Heads of other BERT classes: loading a checkpoint into a different head drops them silently.
_OTHER_HEADS = ("cls.", "classifier.", "qa_outputs.")


def write_atomically(path: Path, write: Any) -> None:
    """Call write(temp_path) and rename the result onto `path`, so a crash leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _model_key(key: str, prefix: str) -> str:
    """Map a checkpoint key (any BERT class, old gamma/beta names) to this model's naming."""
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    if key.startswith("bert."):
        key = key[len("bert."):]
    elif not key.startswith(_BASE_KEYS):
        return key
    return prefix + key


def _read_weights(directory: Path) -> dict[str, Tensor]:
    safetensors_path, pytorch_path = directory / SAFETENSORS_NAME, directory / PYTORCH_NAME
    try:
        if safetensors_path.is_file():
            return load_file(safetensors_path)
        if pytorch_path.is_file():
            return torch.load(pytorch_path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError) as err:
        path = safetensors_path if safetensors_path.is_file() else pytorch_path
        raise ValueError(f"cannot read weights from {path}: {err}") from err
    present = sorted(p.name for p in directory.iterdir())
    raise ValueError(f"{directory} has no {SAFETENSORS_NAME} or {PYTORCH_NAME} (it holds {present})")


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
    return BertConfig.from_dict(raw, **overrides)


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
        write_atomically(directory / SAFETENSORS_NAME,
                         lambda temp: save_file(state, temp, metadata={"format": "pt"}))
        write_atomically(directory / CONFIG_NAME,
                         lambda temp: Path(temp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **config_overrides: Any):
        """Load a tokdrop or Hugging Face BERT directory; config fields can be overridden, e.g.
        token_drop=TokenDropConfig(...) to continue pretraining a dense checkpoint with dropping."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"checkpoint directory {directory} does not exist")
        model = cls(read_config(directory, **config_overrides))
        expected = {k: v for k, v in model.state_dict().items() if k not in _TIED_KEYS}
        loaded: dict[str, Tensor] = {}
        unexpected = []
        for key, value in _read_weights(directory).items():
            name = _model_key(key, cls.checkpoint_prefix)
            if name in expected:
                loaded[name] = value
            elif not (name.startswith(_OTHER_HEADS) or name in _TIED_KEYS or name.endswith("position_ids")
                      or "token_importance." in name):
                unexpected.append(key)
        for name, value in loaded.items():
            if value.shape != expected[name].shape:
                raise ValueError(f"{directory}: {name} has shape {tuple(value.shape)}, "
                                 f"the config needs {tuple(expected[name].shape)}")
        missing = [k for k in expected if k not in loaded and "token_importance." not in k]
        required = [k for k in missing if not k.startswith(cls.optional_keys)]
        if required:
            raise ValueError(f"{directory} lacks {len(required)} weights of {cls.__name__}, e.g. {required[:3]}")
        if missing:
            warnings.warn(f"{cls.__name__}: {len(missing)} weights not in {directory} are freshly "
                          f"initialised: {missing[:4]}", stacklevel=2)
        if unexpected:
            warnings.warn(f"{cls.__name__}: ignored {len(unexpected)} unknown weights in {directory}: "
                          f"{unexpected[:4]}", stacklevel=2)
        model.load_state_dict(loaded, strict=False)
        return model
