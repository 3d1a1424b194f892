"""tokdrop: token dropping, NarrowBERT and random-LTD for BERT-style encoders.

Pretrain cheaper by computing only on the tokens that matter; serve the result as an ordinary
full-sequence BERT.
"""

from tokdrop import layers
from tokdrop.config import BertConfig, NarrowConfig, RandomLTDConfig, TokenDropConfig, with_mode
from tokdrop.model import BertForMaskedLM, BertForSequenceClassification, BertModel

__version__ = "0.1.0"

__all__ = [
    "BertConfig",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertModel",
    "NarrowConfig",
    "RandomLTDConfig",
    "TokenDropConfig",
    "layers",
    "with_mode",
]
