"""tokdrop: token dropping, NarrowBERT and random-LTD for BERT-style encoders.

Pretrain cheaper by computing only on the tokens that matter; serve the result as an ordinary
full-sequence BERT.
"""

from tokdrop.lazy import lazy_attributes

__version__ = "0.1.0"

# Imported on first use: `import tokdrop` (which every command's --help does) stays free of torch.
_SOURCES = {
    "BertConfig": "config",
    "NarrowConfig": "config",
    "RandomLTDConfig": "config",
    "RobertaConfig": "config",
    "TokenDropConfig": "config",
    "with_mode": "config",
    "from_transformers": "hf_checkpoint",
    "BertForMaskedLM": "model",
    "BertForSequenceClassification": "model",
    "BertModel": "model",
    "RobertaForMaskedLM": "model",
    "RobertaForSequenceClassification": "model",
    "RobertaModel": "model",
    "special_token_ids": "vocabulary",
    "layers": "layers",
}
__getattr__, __dir__ = lazy_attributes(__name__, _SOURCES)
__all__ = sorted(_SOURCES)
