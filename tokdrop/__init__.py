"""tokdrop: token dropping, NarrowBERT and random-LTD for BERT-style encoders.

Pretrain cheaper by computing only on the tokens that matter; serve the result as an ordinary
full-sequence BERT.

The names below load on first use, so that the `tokdrop` command's parsers (and --help) do not
import torch.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "BertConfig": "tokdrop.config",
    "NarrowConfig": "tokdrop.config",
    "RandomLTDConfig": "tokdrop.config",
    "RobertaConfig": "tokdrop.config",
    "TokenDropConfig": "tokdrop.config",
    "with_mode": "tokdrop.config",
    "from_transformers": "tokdrop.hf_checkpoint",
    "BertForMaskedLM": "tokdrop.model",
    "BertForSequenceClassification": "tokdrop.model",
    "BertModel": "tokdrop.model",
    "RobertaForMaskedLM": "tokdrop.model",
    "RobertaForSequenceClassification": "tokdrop.model",
    "RobertaModel": "tokdrop.model",
    "special_token_ids": "tokdrop.vocabulary",
}

__all__ = sorted([*_EXPORTS, "layers"])


def __getattr__(name: str):
    if name == "layers":
        return importlib.import_module("tokdrop.layers")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokdrop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
