"""Helpers of the Hugging Face parity tests: tiny random models of both libraries, batches, and
comparisons at the real positions."""

from __future__ import annotations

import warnings

import torch
import transformers

import tokdrop

ATOL = 1e-5
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=24,
    type_vocab_size=2,
    pad_token_id=0,
)
CLASSES = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a distinct random value (HF initialises biases to 0, LayerNorm to 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "LayerNorm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)
    return model.eval()


def hf_model(cls_name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A transformers model of `cls_name` (a Bert or Roberta class) at TINY sizes, every parameter random."""
    config_class = transformers.RobertaConfig if cls_name.startswith("Roberta") else transformers.BertConfig
    config = config_class(**(TINY | _family_sizes(cls_name) | overrides))
    return randomize_(getattr(transformers, cls_name)(config), seed)


def td_model(cls_name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_class = tokdrop.RobertaConfig if cls_name.startswith("Roberta") else tokdrop.BertConfig
    config = config_class(**(TINY | _family_sizes(cls_name) | overrides))
    return randomize_(getattr(tokdrop, cls_name)(config), seed)


def _family_sizes(cls_name: str) -> dict:
    """RoBERTa: padding id 1, positions offset by 2, one token type."""
    if cls_name.startswith("Roberta"):
        return {"pad_token_id": 1, "max_position_embeddings": TINY["max_position_embeddings"] + 2, "type_vocab_size": 1}
    return {}


def batch(padded: bool, seed: int = 1, batch_size: int = 3, seq_len: int = 11, roberta: bool = False):
    """input_ids, attention_mask (right padding, or all ones), token_type_ids (two segments; one for
    RoBERTa, whose padding id is 1 and never appears among its real tokens)."""
    gen = torch.Generator().manual_seed(seed)
    pad = 1 if roberta else 0
    ids = torch.randint(pad + 1, TINY["vocab_size"], (batch_size, seq_len), generator=gen)
    lengths = torch.tensor([seq_len, 7, 1][:batch_size]) if padded else torch.full((batch_size,), seq_len)
    mask = (torch.arange(seq_len) < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, pad)
    types = ((torch.arange(seq_len) >= lengths[:, None] // 2) & mask.bool()).long()
    return ids, mask, types * (not roberta)


def load_quietly(cls, directory, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without any warning
        return cls.from_pretrained(directory, **overrides)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    diff = max_diff(a, b)
    assert diff <= ATOL, f"max abs diff {diff:.3g} > {ATOL}"


def assert_hidden_equal(hf_hidden, td_hidden, mask, padded) -> None:
    """tokdrop zeroes attention outputs of padded query rows: compare real positions only."""
    if padded:
        real = mask.bool()
        assert_close(hf_hidden[real], td_hidden[real])
    else:
        assert_close(hf_hidden, td_hidden)


def assert_mlm_logits_equal(hf_logits, td_out, mask) -> None:
    """tokdrop's logits [B, P, V] sit at td_out.positions; the first counts[b] slots are real."""
    for row in range(hf_logits.shape[0]):
        count = int(td_out.counts[row])
        positions = td_out.positions[row, :count]
        assert bool(mask[row, positions].all())
        assert_close(hf_logits[row, positions], td_out.logits[row, :count])


def mlm_labels(ids, mask, seed=2):
    gen = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(ids.shape, generator=gen) < 0.4) & mask.bool()
    chosen[:, 0] = True  # at least one prediction per row
    return torch.where(chosen, ids, -100)
