"""The special tokens of a tokenizer, from Hugging Face `tokenizers` or from `transformers`, in BERT's
naming ([PAD], [CLS], ...) or RoBERTa's (<pad>, <s>, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpecialTokenIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def as_tuple(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)

    def always_kept(self) -> tuple[int, ...]:
        """The ids token dropping always keeps, for TokenDropConfig(allow_ids=...): [CLS], [SEP],
        [MASK] and [UNK] (RoBERTa: <s>, </s>, <mask>, <unk>)."""
        return (self.cls, self.sep, self.mask, self.unk)


# Each role's token in BERT's and in RoBERTa's vocabularies.
_NAMES = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
}


def special_tokens(tokenizer: Any) -> SpecialTokenIds:
    """The ids of [PAD], [UNK], [CLS], [SEP] and [MASK] (or RoBERTa's <pad>, <unk>, <s>, </s>, <mask>)
    of a `tokenizers.Tokenizer` or a transformers tokenizer."""
    if hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer
        lookup = tokenizer.token_to_id
    elif hasattr(tokenizer, "convert_tokens_to_ids") and hasattr(tokenizer, "get_vocab"):
        vocab = tokenizer.get_vocab()
        lookup = vocab.get
    else:
        raise TypeError(f"expected a tokenizers.Tokenizer or a transformers tokenizer, got {type(tokenizer).__name__}")
    ids, missing = {}, []
    for role, names in _NAMES.items():
        found = [lookup(name) for name in names if lookup(name) is not None]
        if found:
            ids[role] = found[0]
        else:
            missing.append(" or ".join(names))
    if missing:
        raise ValueError(f"the vocabulary lacks the special tokens {missing}")
    return SpecialTokenIds(**ids)


def special_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """SpecialTokenIds.always_kept of the tokenizer's vocabulary."""
    return special_tokens(tokenizer).always_kept()
