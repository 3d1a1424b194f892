"""The FLOP model of a masked-LM training step, per mode: what the benchmarks divide by to get
TFLOP/s and MFU, and the ratio each mode should reach against dense.

Attention costs 4*H*D*Lq*Lk forward (QK^T and PV, H heads of width D), linear layers 2*tokens*in*out;
a matmul's backward computes two products of the forward's size, attention's backward recomputes
part of the forward (FlashAttention: 2.5x). Embedding look-ups, LayerNorms and softmax are left out:
they are small next to the matmuls.
"""

from __future__ import annotations

from tokdrop.config import BertConfig, drop_schedule
from tokdrop.layers import max_kept

LINEAR_BACKWARD = 2.0
ATTENTION_BACKWARD = 2.5


def _layer_flops(config: BertConfig, n_queries: int, n_keys: int) -> float:
    """Training FLOPs of one encoder layer: `n_queries` tokens go through the query and output
    projections, attention and the FFN; keys and values are projected from `n_keys` tokens."""
    hidden, inner = config.hidden_size, config.intermediate_size
    linear = 2 * (2 * n_queries * hidden * hidden + 2 * n_keys * hidden * hidden + 2 * n_queries * hidden * inner)
    attention = 4 * hidden * n_queries * n_keys
    return (1 + LINEAR_BACKWARD) * linear + (1 + ATTENTION_BACKWARD) * attention


def training_flops(
    config: BertConfig, seq_len: int, num_predictions: int, *, decode_every_position: bool = False
) -> float:
    """FLOPs of one training step per sequence of `seq_len` real tokens with `num_predictions`
    masked positions, following the mode of `config` (dense, token dropping or NarrowBERT).

    The MLM head (transform + vocabulary projection) runs on the predicted positions, or on every
    position with `decode_every_position` (as Hugging Face's BertForMaskedLM does). Embedding
    look-ups, LayerNorms and softmax are left out: they are small next to the matmuls.
    """
    n_layers = config.num_hidden_layers
    full = _layer_flops(config, seq_len, seq_len)
    if config.token_drop is not None:
        start, end = drop_schedule(n_layers, config.token_drop.start_layer, config.token_drop.end_layer)
        kept = max_kept(seq_len, config.token_drop.keep)
        encoder = (
            (start + n_layers - end) * full
            + _layer_flops(config, kept, seq_len)  # the cross layer
            + (end - start - 1) * _layer_flops(config, kept, kept)
        )
    elif config.narrow is not None:
        n_full = config.narrow.full_layers
        encoder = n_full * full + (n_layers - n_full) * _layer_flops(config, num_predictions, seq_len)
    else:
        encoder = n_layers * full
    decoded = seq_len if decode_every_position else num_predictions
    hidden = config.hidden_size
    head = (1 + LINEAR_BACKWARD) * 2 * decoded * (hidden * hidden + hidden * config.vocab_size)
    return encoder + head
