"""The FLOP model of a masked-LM training step, per mode: what the benchmarks divide by to get
TFLOP/s and MFU, and the ratio each mode should reach against dense.

Attention costs 4*H*D*Lq*Lk forward (QK^T and PV, H heads of width D), linear layers 2*tokens*in*out;
a matmul's backward computes two products of the forward's size, attention's backward recomputes
part of the forward (FlashAttention: 2.5x). Embedding look-ups, LayerNorms and softmax are left out:
they are small next to the matmuls.
"""

from __future__ import annotations

from tokdrop.config import BertConfig
from tokdrop.layers import CROSS, FULL, KEPT, LTD, NARROW, max_kept
from tokdrop.model import layer_plan

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
    masked positions, layer by layer along the config's layer plan (tokdrop.model.layer_plan):
    cross layers run the kept tokens over every key, kept and random-LTD layers the kept tokens
    over each other, narrow layers (NarrowBERT, and the last layer with last_layer_subset) the
    predicted positions over every key.

    The MLM head (transform + vocabulary projection) runs on the predicted positions, or on every
    position with `decode_every_position` (as Hugging Face's BertForMaskedLM does). Embedding
    look-ups, LayerNorms and softmax are left out: they are small next to the matmuls.
    """
    mode = config.token_drop or config.random_ltd
    kept = seq_len if mode is None else max_kept(seq_len, mode.keep)
    shapes = {
        FULL: (seq_len, seq_len),
        CROSS: (kept, seq_len),
        KEPT: (kept, kept),
        LTD: (kept, kept),
        NARROW: (num_predictions, seq_len),
    }
    encoder = sum(_layer_flops(config, *shapes[kind]) for kind in layer_plan(config))
    decoded = seq_len if decode_every_position else num_predictions
    hidden = config.hidden_size
    head = (1 + LINEAR_BACKWARD) * 2 * decoded * (hidden * hidden + hidden * config.vocab_size)
    return encoder + head
