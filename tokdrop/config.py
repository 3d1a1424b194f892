"""Configurations: Hugging Face `BertConfig` field names plus the modes that spend compute only on the
tokens that matter (token dropping, NarrowBERT, random-LTD)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from tokdrop.checks import check_int, check_number, check_probability
from tokdrop.kernels import backend_names
from tokdrop.presets import MODES

IMPORTANCE_MODES = ("mlm_loss", "random")
# Hugging Face's names of the feed-forward activations.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def check_keep(keep: Any, name: str = "keep") -> None:
    """`keep` is a fraction of each sequence's real tokens in (0, 1], or a fixed count (int >= 1)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{name} must be a float fraction or an int count, got {keep!r}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] as a fraction, got {keep}")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"{name} must be >= 1 as a token count, got {keep}")


def drop_schedule(num_layers: int, start_layer: int | None, end_layer: int | None) -> tuple[int, int]:
    """(cross layer, first full layer after the restore) of token dropping in `num_layers` layers;
    None picks the paper's: L/2 - 1 and L - 1."""
    start = max(0, num_layers // 2 - 1) if start_layer is None else start_layer
    end = num_layers - 1 if end_layer is None else end_layer
    if not 0 <= start < end <= num_layers:
        raise ValueError(
            f"token dropping needs 0 <= start_layer < end_layer <= num_hidden_layers, got "
            f"start_layer={start}, end_layer={end}, num_hidden_layers={num_layers}"
        )
    return start, end


@dataclass
class TokenDropConfig:
    """Token dropping (Hou et al. 2022). Layers before `start_layer` see every token; `start_layer`
    is the cross layer (kept queries over all keys/values); layers up to `end_layer` - 1 see kept
    tokens only; the kept outputs are then scattered back and layers from `end_layer` on are full.
    None picks the paper's schedule: start = L/2 - 1, end = L - 1.

    importance "mlm_loss" keeps the tokens with the highest moving-average MLM loss of their id;
    "random" keeps a random subset (one subset for the whole dropped block: not random-LTD, which
    draws per layer, see RandomLTDConfig). `allow_ids` are always kept ([CLS], [SEP], [MASK], [UNK];
    `tokdrop.special_token_ids` lists them for a tokenizer).

    ScTD (Zhong et al. 2023): every `consistency_every`-th training step (0: never) the batch also
    runs through the full model, and the loss becomes the mean of both MLM losses plus
    `consistency_weight` x two KL divergences between the first token's representations of the
    dropping and the full pass (the input of the last layer, and the output). The model computes it
    when the training loop asks (forward(consistency=True); `consistency_due(step)` says when).
    """

    keep: float | int = 0.5
    start_layer: int | None = None
    end_layer: int | None = None
    importance: str = "mlm_loss"
    beta: float = 0.995
    init_value: float = 10.0
    allow_ids: tuple[int, ...] = ()
    consistency_every: int = 0
    consistency_weight: float = 0.05

    def consistency_due(self, step: int) -> bool:
        """Whether training step `step` (0-based) is one of ScTD's consistency steps."""
        return self.consistency_every > 0 and step % self.consistency_every == 0

    def __post_init__(self) -> None:
        check_keep(self.keep)
        check_int("consistency_every", self.consistency_every, 0)
        check_number("consistency_weight", self.consistency_weight, minimum=0.0)
        for name in ("start_layer", "end_layer"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0)
        if self.importance not in IMPORTANCE_MODES:
            raise ValueError(f"importance must be one of {IMPORTANCE_MODES}, got {self.importance!r}")
        check_probability("beta", self.beta)
        check_number("init_value", self.init_value)
        if isinstance(self.allow_ids, (str, bytes)) or not isinstance(self.allow_ids, Sequence):
            raise TypeError(f"allow_ids must be a sequence of token ids, got {self.allow_ids!r}")
        self.allow_ids = tuple(self.allow_ids)
        for token_id in self.allow_ids:
            check_int("allow_ids entry", token_id, 0)


@dataclass
class NarrowConfig:
    """NarrowBERT (Li et al. 2023): `full_layers` ordinary layers, then narrow layers whose queries
    are a subset of positions and whose keys/values come from the last full layer's output."""

    full_layers: int = 2

    def __post_init__(self) -> None:
        check_int("full_layers", self.full_layers, 0)


@dataclass
class RandomLTDConfig:
    """random-LTD (Yao et al. 2022): each of `layers` (None: every layer but the first and the last)
    draws its own random subset of `keep` tokens per sequence (a fraction of each row's real tokens,
    or a count); the kept tokens go through that layer attending only to each other, the others
    bypass it unchanged. Training mode only. Subsets come from torch's random generator, so they
    differ between data-parallel ranks seeded differently (as tokdrop pretrain seeds them)."""

    keep: float | int = 0.5
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_keep(self.keep)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise TypeError(f"layers must be a sequence of layer indices or None, got {self.layers!r}")
            self.layers = tuple(self.layers)
            for layer in self.layers:
                check_int("layers entry", layer, 0)


# The mode fields of BertConfig, and what a dict (as in config.json) in them becomes.
_MODE_FIELDS = {"token_drop": TokenDropConfig, "narrow": NarrowConfig, "random_ltd": RandomLTDConfig}


@dataclass
class BertConfig:
    """Hugging Face BertConfig's fields (and names) plus tokdrop's modes."""

    model_type: ClassVar[str] = "bert"
    architecture: ClassVar[str] = "BERT"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    # Names of the classes (config.json's id2label); None names them LABEL_0, LABEL_1, ...
    id2label: dict[int, str] | None = None
    classifier_dropout: float | None = None
    # Static number of prediction slots per sequence for the MLM head (BERT's
    # max_predictions_per_seq). None counts them from the labels, which needs a host sync.
    max_predictions_per_seq: int | None = None
    attn_backend: str | None = None
    token_drop: TokenDropConfig | None = None
    narrow: NarrowConfig | None = None
    random_ltd: RandomLTDConfig | None = None
    # With labels, the masked-LM model runs its last layer's queries at the predicted positions only
    # (keys and values from every token): the same loss for less compute. Without labels the layer
    # is full.
    last_layer_subset: bool = True
    # Forward passes over padded batches run every layer on the packed real tokens only (MosaicBERT's
    # unpadding): the same outputs for less compute; fine-tuning and inference, not token dropping.
    unpad: bool = False

    def __post_init__(self) -> None:
        for name, kind in _MODE_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, kind(**value))
            elif value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}, a dict of its fields or None, got {value!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "num_labels",
        ):
            check_int(name, getattr(self, name), 1)
        check_int("pad_token_id", self.pad_token_id, 0)
        if self.id2label is not None:
            self._check_labels()
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is outside vocab_size={self.vocab_size}")
        if self.attn_backend is not None and self.attn_backend not in backend_names():
            raise ValueError(
                f"attn_backend={self.attn_backend!r} is not an attention backend; "
                f"expected None or one of {backend_names()}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {tuple(ACTIVATIONS)}, got {self.hidden_act!r}")
        check_number("initializer_range", self.initializer_range, positive=True)
        check_number("layer_norm_eps", self.layer_norm_eps, positive=True)
        check_probability("hidden_dropout_prob", self.hidden_dropout_prob)
        check_probability("attention_probs_dropout_prob", self.attention_probs_dropout_prob)
        if self.classifier_dropout is not None:
            check_probability("classifier_dropout", self.classifier_dropout)
        if self.max_predictions_per_seq is not None:
            check_int("max_predictions_per_seq", self.max_predictions_per_seq, 1)
        if self.max_sequence_length < 1:
            raise ValueError(
                f"max_position_embeddings={self.max_position_embeddings} leaves no position after the "
                f"offset {self.position_offset}"
            )
        for name in ("last_layer_subset", "unpad"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        modes = [name for name in _MODE_FIELDS if getattr(self, name) is not None]
        if len(modes) > 1:
            raise ValueError(f"{' and '.join(modes)} are exclusive modes; set at most one")
        self._check_modes()

    def _check_labels(self) -> None:
        if not isinstance(self.id2label, dict):
            raise TypeError(f"id2label must be a dict of class id -> name, got {self.id2label!r}")
        try:
            names = {int(i): name for i, name in self.id2label.items()}  # config.json's keys are strings
        except (TypeError, ValueError) as err:
            raise ValueError(f"id2label keys must be class ids, got {list(self.id2label)}") from err
        if sorted(names) != list(range(self.num_labels)) or not all(isinstance(n, str) for n in names.values()):
            raise ValueError(
                f"id2label must name each of the num_labels={self.num_labels} classes 0..{self.num_labels - 1} "
                f"with a string, got {self.id2label!r}"
            )
        # Hugging Face's default names are no names: one canonical config either way.
        generic = all(name == f"LABEL_{i}" for i, name in names.items())
        self.id2label = None if generic else dict(sorted(names.items()))

    def _check_modes(self) -> None:
        layers = self.num_hidden_layers
        for name in ("token_drop", "random_ltd"):
            mode = getattr(self, name)
            if mode is not None and isinstance(mode.keep, int) and mode.keep > self.max_position_embeddings:
                raise ValueError(
                    f"{name}.keep={mode.keep} tokens exceeds max_position_embeddings={self.max_position_embeddings}"
                )
        if self.token_drop is not None:
            _, end = drop_schedule(layers, self.token_drop.start_layer, self.token_drop.end_layer)
            if self.token_drop.consistency_every and end == layers:
                raise ValueError(
                    "token_drop.consistency_every needs a full last layer (end_layer < num_hidden_layers): "
                    f"its constraints compare the restored states, got end_layer={end}"
                )
            for token_id in self.token_drop.allow_ids:
                if token_id >= self.vocab_size:
                    raise ValueError(f"allow_ids entry {token_id} is outside vocab_size={self.vocab_size}")
        if self.narrow is not None and self.narrow.full_layers >= layers:
            raise ValueError(
                f"narrow.full_layers={self.narrow.full_layers} leaves no narrow layer in num_hidden_layers={layers}"
            )
        if self.random_ltd is not None and self.random_ltd.layers is not None:
            outside = [i for i in self.random_ltd.layers if i >= layers]
            if outside:
                raise ValueError(f"random_ltd.layers {outside} are outside num_hidden_layers={layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """Position id of a sequence's first token."""
        return 0

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence the position embeddings cover."""
        return self.max_position_embeddings - self.position_offset

    def to_dict(self) -> dict[str, Any]:
        """The config.json content: Hugging Face's BERT fields plus tokdrop's own."""
        out = dataclasses.asdict(self)
        out.pop("num_labels")
        names = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        out["id2label"] = {str(i): name for i, name in names.items()}
        out["label2id"] = {name: i for i, name in names.items()}
        out["model_type"] = self.model_type
        out["position_embedding_type"] = "absolute"
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides: Any) -> BertConfig:
        """Read a Hugging Face / tokdrop config.json dict; unknown Hugging Face fields are ignored."""
        model_type = raw.get("model_type")
        if model_type != cls.model_type:
            raise ValueError(
                f"not a {cls.architecture} config: model_type={model_type!r} (expected {cls.model_type!r})"
            )
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type={position_type!r} is not supported (only 'absolute')")
        if raw.get("is_decoder") or raw.get("add_cross_attention"):
            raise ValueError("decoder / cross-attention BERT configs are not supported")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if "id2label" in raw and "num_labels" not in raw:
            kwargs["num_labels"] = len(raw["id2label"])
        kwargs.update(overrides)
        return cls(**kwargs)


@dataclass
class RobertaConfig(BertConfig):
    """Hugging Face RobertaConfig's fields and defaults: position ids start after the padding id,
    one token type."""

    model_type: ClassVar[str] = "roberta"
    architecture: ClassVar[str] = "RoBERTa"

    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    @property
    def position_offset(self) -> int:
        return self.pad_token_id + 1


def with_mode(
    base: BertConfig, mode: str, *, keep: float | int = 0.5, full_layers: int = 2, allow_ids: Sequence[int] = ()
) -> BertConfig:
    """`base` in one of `MODES`, whatever mode it had: dense; token dropping at `keep` (the paper's
    layers, `allow_ids` always kept); NarrowBERT after `full_layers`; random-LTD at `keep`."""
    dense = dataclasses.replace(base, token_drop=None, narrow=None, random_ltd=None)
    if mode == "dense":
        return dense
    if mode == "token_drop":
        return dataclasses.replace(dense, token_drop=TokenDropConfig(keep=keep, allow_ids=tuple(allow_ids)))
    if mode == "narrow":
        return dataclasses.replace(dense, narrow=NarrowConfig(full_layers=full_layers))
    if mode == "random_ltd":
        return dataclasses.replace(dense, random_ltd=RandomLTDConfig(keep=keep))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


__all__ = [
    "ACTIVATIONS",
    "MODES",
    "BertConfig",
    "NarrowConfig",
    "RandomLTDConfig",
    "RobertaConfig",
    "TokenDropConfig",
    "check_keep",
    "drop_schedule",
    "with_mode",
]
