"""What the training mode of a run builds, and how many tokens its dropping layers keep at each step.
Every distinct kept length is one graph under --compile (`max_graphs` bounds their number)."""

from __future__ import annotations

import dataclasses

from tokdrop.config import BertConfig, with_mode
from tokdrop.hf_checkpoint import read_config
from tokdrop.layers import max_kept
from tokdrop.model import BertForMaskedLM
from tokdrop.pretrain.settings import Settings
from tokdrop.vocabulary import SpecialTokenIds


def model_config(settings: Settings, vocab_size: int, specials: SpecialTokenIds, predictions: int) -> BertConfig:
    """The BertConfig of a run: its size (or its --init-from checkpoint's config), and its mode with
    the paper's defaults."""
    run_fields = dict(
        pad_token_id=specials.pad,
        hidden_dropout_prob=settings.dropout,
        attention_probs_dropout_prob=settings.dropout,
        max_predictions_per_seq=predictions,
    )
    if settings.init_from is not None:
        base = read_config(settings.init_from, **run_fields)
        if base.vocab_size < vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens, more than the vocab_size={base.vocab_size} of the "
                f"--init-from checkpoint {settings.init_from}"
            )
    else:
        base = BertConfig(
            vocab_size=vocab_size,
            hidden_size=settings.hidden,
            num_hidden_layers=settings.layers,
            num_attention_heads=settings.heads,
            intermediate_size=settings.intermediate,
            max_position_embeddings=settings.max_position_embeddings,
            **run_fields,
        )
    config = with_mode(
        base,
        settings.mode,
        keep=kept_length(settings, 0),
        full_layers=settings.full_layers,
        allow_ids=specials.always_kept(),
    )
    if config.token_drop is not None:
        drop = dataclasses.replace(
            config.token_drop,
            consistency_every=settings.consistency_every,
            consistency_weight=settings.consistency_weight,
        )
        config = dataclasses.replace(config, token_drop=drop)
    return config


def kept_length(settings: Settings, step: int) -> float | int:
    """`keep` of the token-dropping layers at step `step` (0-based): --keep for token_drop; for
    random_ltd a count growing linearly from --ltd-start to --seq-len over --ltd-ramp-steps in
    multiples of --ltd-granularity (DeepSpeed's fixed_linear schedule)."""
    seq_len = settings.seq_len
    if settings.mode != "random_ltd":
        return settings.keep
    start = max_kept(seq_len, settings.ltd_start)
    ramp_steps = settings.ltd_ramp_steps or max(1, settings.steps // 2)
    if step >= ramp_steps:
        return seq_len
    grown = (seq_len - start) * step // ramp_steps
    return start + grown - grown % settings.ltd_granularity


def max_graphs(settings: Settings) -> int:
    """An upper bound of the distinct kept lengths of a run, hence of the graphs --compile makes."""
    return settings.seq_len // settings.ltd_granularity + 2


def set_kept_length(model: BertForMaskedLM, keep: float | int) -> None:
    """Make the token-dropping or random-LTD layers of `model` keep `keep` tokens from the next
    forward on."""
    if model.config.token_drop is not None or model.config.random_ltd is not None:
        model.base_model.encoder.keep = keep


def consistency_step(config: BertConfig, step: int) -> bool:
    """Whether step `step` (0-based) is one of ScTD's consistency steps."""
    return config.token_drop is not None and config.token_drop.consistency_due(step)


def kept_fraction(config: BertConfig, seq_len: int, keep: float | int) -> float:
    """Fraction of each row's tokens that the middle layers process (packed rows have no padding)."""
    if config.token_drop is not None or config.random_ltd is not None:
        return max_kept(seq_len, keep) / seq_len
    if config.narrow is not None:
        return config.max_predictions_per_seq / seq_len
    return 1.0


__all__ = ["consistency_step", "kept_fraction", "kept_length", "max_graphs", "model_config", "set_kept_length"]
