"""tokdrop: token dropping, NarrowBERT and random-LTD for BERT-style encoders.

Pretrain cheaper by computing only on the tokens that matter; serve the result as an ordinary
full-sequence BERT.
"""

from tokdrop import layers
from tokdrop.config import (
    BertConfig,
    NarrowConfig,
    RandomLTDConfig,
    RobertaConfig,
    TokenDropConfig,
    with_mode,
)
from tokdrop.hf_checkpoint import from_transformers
from tokdrop.model import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)
from tokdrop.vocabulary import special_token_ids

__version__ = "0.1.0"

__all__ = [
    "BertConfig",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertModel",
    "NarrowConfig",
    "RandomLTDConfig",
    "RobertaConfig",
    "RobertaForMaskedLM",
    "RobertaForSequenceClassification",
    "RobertaModel",
    "TokenDropConfig",
    "from_transformers",
    "layers",
    "special_token_ids",
    "with_mode",
]
