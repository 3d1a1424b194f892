"""BERT and RoBERTa encoders with token dropping, NarrowBERT and random-LTD, parameter-compatible with
Hugging Face's.

A forward pass, from BertForMaskedLM.forward down: the inputs are checked; the predicted positions
are packed into static slots; BertModel.encode embeds the tokens, picks the attention backend once
(tokdrop.kernels: the config's request, `use_backend` or $TOKDROP_ATTENTION) and runs the Encoder,
whose layer plan (tokdrop.layers) follows the config's mode; each BertLayer calls
tokdrop.kernels.attention, which runs the chosen backend (the Triton kernels on CUDA by default);
the MLM head decodes the predicted positions only.

RoBERTa shares all of it: its classes differ from BERT's in parameter names (`roberta.`, `lm_head.`),
position ids (offset by padding_idx + 1), one token type, and the classification head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokdrop.config import ACTIVATIONS, BertConfig, RobertaConfig
from tokdrop.hf_checkpoint import PretrainedMixin
from tokdrop.kernels import Backend, active_backend, resolve_backend
from tokdrop.layers import (
    FULL,
    NARROW,
    BertLayer,
    Encoder,
    TokenImportance,
    narrow_plan,
    pack_positions,
    pad,
    random_ltd_plan,
    token_drop_plan,
    unpad,
)

IGNORE_INDEX = -100


def _field(self: tuple, key: int | slice | str) -> Any:
    """Outputs answer by position (a tuple's index) and, like transformers' ModelOutput, by name."""
    return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)


def _items(self: tuple) -> list[tuple[str, Any]]:
    """The fields that are set, by name: what transformers' ModelOutput holds as a dict."""
    return [(name, value) for name, value in zip(self._fields, self, strict=True) if value is not None]


class BertOutput(NamedTuple):
    last_hidden_state: Tensor  # [B, S, H], or [B, M, H] at the query positions
    pooler_output: Tensor | None  # [B, H] from the first position, or None without a pooler
    __getitem__ = _field
    items = _items


class MaskedLMOutput(NamedTuple):
    loss: Tensor | None
    logits: Tensor  # [B, P, V] at `positions`; [B, S, V] when no labels are given
    positions: Tensor  # [B, P] predicted positions; the first `counts[b]` of row b are real
    counts: Tensor  # [B]
    consistency: Tensor | None = None  # ScTD's KL term (weighted, in the loss) on consistency steps
    __getitem__ = _field
    items = _items


class SequenceClassifierOutput(NamedTuple):
    loss: Tensor | None
    logits: Tensor  # [B, num_labels]
    __getitem__ = _field
    items = _items


def check_inputs(
    config: BertConfig, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None
) -> None:
    """Raise a ValueError/TypeError naming whatever is wrong with a batch (the value checks eagerly only)."""
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"input_ids must be an integer tensor, got {type(input_ids).__name__} "
            f"{getattr(input_ids, 'dtype', '')} (int64 and int32 are taken)"
        )
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq_len] tensor, got shape {tuple(input_ids.shape)}")
    for name, extra in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if extra is None:
            continue
        if not isinstance(extra, Tensor):
            raise TypeError(f"{name} must be a tensor like input_ids, got {type(extra).__name__}")
        if tuple(extra.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} has shape {tuple(extra.shape)} but input_ids has {tuple(input_ids.shape)}")
    if token_type_ids is not None and (token_type_ids.dtype.is_floating_point or token_type_ids.dtype == torch.bool):
        raise TypeError(f"token_type_ids must be an integer tensor, got {token_type_ids.dtype}")
    seq_len = input_ids.shape[1]
    if seq_len > config.max_sequence_length:
        offset = f" less the position offset {config.position_offset}" if config.position_offset else ""
        raise ValueError(
            f"sequence length {seq_len} exceeds max_position_embeddings={config.max_position_embeddings}{offset}"
        )
    if torch.compiler.is_compiling():
        return
    # Every value check in one device-to-host transfer; the messages' details only on a failure.
    stats = [input_ids.min(), input_ids.max()]
    if token_type_ids is not None:
        stats += [token_type_ids.min(), token_type_ids.max()]
    if attention_mask is not None:
        stats += [
            ((attention_mask != 0) & (attention_mask != 1)).any(),
            (attention_mask.sum(dim=1) == 0).any(),
            (attention_mask[:, 1:] > attention_mask[:, :-1]).any(),
        ]
    low, high, *rest = torch.stack([stat.to(torch.int64) for stat in stats]).tolist()
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")
    if token_type_ids is not None:
        type_low, type_high, *rest = rest
        if type_low < 0 or type_high >= config.type_vocab_size:
            raise ValueError(
                f"token_type_ids must be in [0, {config.type_vocab_size}), got values {type_low}..{type_high}"
            )
    if attention_mask is not None:
        not_binary, empty, left_padded = rest
        if not_binary:
            raise ValueError("attention_mask must hold only 0 and 1")
        if empty:
            row = int((attention_mask.sum(dim=1) == 0).nonzero()[0, 0])
            raise ValueError(f"row {row} of attention_mask has no real tokens")
        if left_padded:
            row = int((attention_mask[:, 1:] > attention_mask[:, :-1]).any(dim=1).nonzero()[0, 0])
            raise ValueError(
                f"row {row} of attention_mask is not right-padded: each row must be all ones, then all zeros"
            )


def check_labels(labels: object, shape: tuple[int, ...], low: int, high: int) -> None:
    """Labels must be an integer tensor of `shape` with values in [low, high) or IGNORE_INDEX."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != shape:
        raise ValueError(f"labels must have shape {shape}, got {tuple(labels.shape)}")
    if not torch.compiler.is_compiling():
        bad = ((labels < low) | (labels >= high)) & (labels != IGNORE_INDEX)
        if bool(bad.any()):
            raise ValueError(f"labels must be in [{low}, {high}) or {IGNORE_INDEX}, got {int(labels[bad][0])}")


def _at_least_fp32(x: Tensor) -> Tensor:
    """Losses of bf16/fp16 logits in float32; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _mean_loss(losses: Tensor, count: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor:
    """Sum of `losses` over `count` items, or over `num_items_in_batch` when a trainer gives the count
    of a batch accumulated over several micro-batches (transformers.Trainer does)."""
    total = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return losses.sum() / total


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.position_offset = config.position_offset

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        # Right padding: position j of every row is token j (padding rows are never read).
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + self.position_offset
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_token: Tensor) -> Tensor:
        return torch.tanh(self.dense(first_token))


def init_bert_weights(module: nn.Module, std: float) -> None:
    """Hugging Face BERT's initialisation, for `nn.Module.apply`."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def layer_plan(config: BertConfig) -> tuple[str, ...]:
    """The kind of each encoder layer (see tokdrop.layers) in the config's mode."""
    layers = config.num_hidden_layers
    if config.narrow is not None:
        return narrow_plan(layers, config.narrow.full_layers)
    if config.token_drop is not None:
        plan = token_drop_plan(layers, config.token_drop.start_layer, config.token_drop.end_layer)
    elif config.random_ltd is not None:
        plan = random_ltd_plan(layers, config.random_ltd.layers)
    else:
        plan = (FULL,) * layers
    if config.last_layer_subset and plan[-1] == FULL:
        plan = (*plan[:-1], NARROW)  # a full layer where no queries are given
    return plan


class BertModel(PretrainedMixin, nn.Module):
    """BERT encoder. Token dropping (config.token_drop) and random-LTD (config.random_ltd) act in
    training mode only; NarrowBERT (config.narrow) shapes the encoder in every mode."""

    config_class = BertConfig
    base_model_prefix = ""
    optional_keys = ("pooler.",)
    tied_keys = ()

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        drop = config.token_drop
        mode = drop or config.random_ltd
        self.encoder = Encoder(
            [BertLayer(config) for _ in range(config.num_hidden_layers)],
            layer_plan(config),
            keep=0.5 if mode is None else mode.keep,
        )
        self.token_importance = (
            None
            if drop is None
            else TokenImportance(
                config.vocab_size,
                mode=drop.importance,
                beta=drop.beta,
                init_value=drop.init_value,
                allow_ids=drop.allow_ids,
                pad_id=config.pad_token_id,
            )
        )
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(lambda module: init_bert_weights(module, config.initializer_range))

    def attention_backend(self, device_type: str | None = None) -> Backend:
        """The attention backend a forward pass on `device_type` (default: the weights' device) runs."""
        weight = self.embeddings.word_embeddings.weight
        device_type = device_type or weight.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        return resolve_backend(self.config.attn_backend, device_type, dtype, self.config.head_dim)

    def extra_repr(self) -> str:
        try:
            return f"attention={self.attention_backend()!r}"
        except ValueError as err:  # a backend that cannot run here: say so rather than fail
            return f"attention unavailable: {err}"

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        query_index: Tensor | None = None,
        query_lens: Tensor | None = None,
        token_scores: Tensor | None = None,
        return_dict: bool | None = None,
    ) -> BertOutput:
        """query_index [B, M] / query_lens [B] (index layout of tokdrop.layers): return only these
        positions. token_scores [B, S]: importance that overrides the model's own for dropping.
        return_dict is accepted for transformers' callers: the output is a named tuple that also
        answers by field name."""
        check_inputs(self.config, input_ids, attention_mask, token_type_ids)
        return self.encode(
            input_ids,
            attention_mask,
            token_type_ids,
            query_index=query_index,
            query_lens=query_lens,
            token_scores=token_scores,
            validate=query_index is not None or token_scores is not None,
        )

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        token_type_ids: Tensor | None,
        *,
        query_index: Tensor | None = None,
        query_lens: Tensor | None = None,
        token_scores: Tensor | None = None,
        dropping: bool = True,
        inputs: list[Tensor] | None = None,
        validate: bool = False,
    ) -> BertOutput:
        """forward() without the input checks, for the heads that ran them already. dropping=False
        runs a training pass of a token-dropping model in full; `inputs` collects each layer's
        input (tokdrop.layers.Encoder); validate: check query_index, query_lens and token_scores
        (device syncs), which callers that built them themselves skip."""
        batch, seq_len = input_ids.shape
        if attention_mask is None:
            lengths = torch.full((batch,), seq_len, dtype=torch.long, device=input_ids.device)
        else:
            lengths = attention_mask.sum(dim=1, dtype=torch.long)
        scores = None
        if self.training and self.token_importance is not None and dropping:
            if token_scores is not None and token_scores.shape != input_ids.shape:
                raise ValueError(
                    f"token_scores has shape {tuple(token_scores.shape)} but input_ids has {tuple(input_ids.shape)}"
                )
            scores = self.token_importance.scores(input_ids, validate=False) if token_scores is None else token_scores
        hidden = self.embeddings(input_ids, token_type_ids)
        with active_backend(self.attention_backend(input_ids.device.type)):
            if self._unpadded(attention_mask, scores, query_index, lengths):
                packed, offsets, where = unpad(hidden, lengths)
                hidden = pad(self.encoder(packed, offsets, inputs=inputs), where, batch, seq_len)
            else:
                hidden = self.encoder(
                    hidden,
                    lengths,
                    scores=scores,
                    query_index=query_index,
                    query_lens=query_lens,
                    inputs=inputs,
                    validate=validate,
                )
        pooled = None if self.pooler is None else self.pooler(hidden[:, 0])
        return BertOutput(hidden, pooled)

    def _unpadded(
        self, attention_mask: Tensor | None, scores: Tensor | None, query_index: Tensor | None, lengths: Tensor
    ) -> bool:
        """config.unpad applies to passes over padded batches that run every token in every layer; a
        batch without padding skips the packing, which would only cost time (a sync, as unpad's)."""
        dropping = scores is not None or (self.training and self.config.random_ltd is not None)
        if not self.config.unpad or attention_mask is None or dropping or query_index is not None:
            return False
        return bool((lengths < attention_mask.shape[1]).any())


class RobertaModel(BertModel):
    """RoBERTa encoder: BertModel with RoBERTa's position ids and one token type."""

    config_class = RobertaConfig


class BertLMPredictionHead(nn.Module):
    """transform (dense, activation, LayerNorm), then the decoder tied to the word embeddings."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = ACTIVATIONS[config.hidden_act]
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT
        self.decoder.bias = self.bias

    def forward(self, hidden: Tensor) -> Tensor:
        hidden = self.transform.LayerNorm(self.act(self.transform.dense(hidden)))
        return self.decoder(hidden)


class RobertaLMHead(nn.Module):
    """RoBERTa's MLM head: dense, GELU, layer_norm, then the decoder tied to the word embeddings."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(hidden))))


class MaskedLM(PretrainedMixin, nn.Module):
    """Masked-LM pretraining; the head runs only at the predicted positions.

    Predicted positions are packed into P slots per row: config.max_predictions_per_seq when set
    (static shapes, needed for torch.compile to skip the host sync), else the largest count in the
    batch. In NarrowBERT mode the predicted positions are the narrow layers' queries, and with
    config.last_layer_subset the last layer's.
    """

    # transformers.Trainer then passes num_items_in_batch, the predictions of an accumulated batch.
    accepts_loss_kwargs = True

    def __init__(self, config: BertConfig, base: type[BertModel]) -> None:
        super().__init__()
        self.config = config
        setattr(self, self.base_model_prefix, base(config, add_pooling_layer=False))

    def _init_head(self) -> None:
        # The decoder is tied to the word embeddings, which the encoder initialised.
        for module in self.head.modules():
            if module is not self.head.decoder:
                init_bert_weights(module, self.config.initializer_range)

    @property
    def base_model(self) -> BertModel:
        return getattr(self, self.base_model_prefix)

    @property
    def head(self) -> nn.Module:
        raise NotImplementedError

    def _prediction_slots(self, predicted: Tensor, extra: int = 0) -> tuple[Tensor, Tensor]:
        """The predicted positions packed into P slots (+ `extra` for positions that ride along)."""
        seq_len = predicted.shape[1]
        slots = self.config.max_predictions_per_seq
        if slots is None:
            slots = seq_len if torch.compiler.is_compiling() else max(1, int(predicted.sum(dim=1).max()))
        else:
            slots += extra
        return pack_positions(predicted, min(slots, seq_len))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        token_scores: Tensor | None = None,
        consistency: bool = False,
        num_items_in_batch: Tensor | int | None = None,
        return_dict: bool | None = None,
    ) -> MaskedLMOutput:
        """labels [B, S]: the original id at predicted positions, IGNORE_INDEX elsewhere.
        consistency: a ScTD consistency step (TokenDropConfig.consistency_due says when); the first
        slot of each row then holds the first token. num_items_in_batch: divide the summed loss by
        this many predictions instead of this batch's (a trainer's gradient accumulation).
        return_dict: accepted, see BertModel.forward."""
        check_inputs(self.config, input_ids, attention_mask, token_type_ids)
        model = self.base_model
        if labels is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
            counts = torch.full_like(positions[:, 0], input_ids.shape[1])
            hidden = model.encode(
                input_ids, attention_mask, token_type_ids, token_scores=token_scores, validate=token_scores is not None
            )[0]
            return MaskedLMOutput(None, self.head(hidden), positions, counts)
        check_labels(labels, tuple(input_ids.shape), 0, self.config.vocab_size)
        predicted = labels != IGNORE_INDEX
        if consistency:
            self._check_consistency()
            predicted = predicted | (torch.arange(labels.shape[1], device=labels.device) == 0)
        positions, counts = self._prediction_slots(predicted, extra=int(consistency))
        slot_valid = torch.arange(positions.shape[1], device=positions.device) < counts[:, None]
        targets = torch.where(slot_valid, labels.gather(1, positions), IGNORE_INDEX)
        predictions = (targets != IGNORE_INDEX).sum()

        def run(dropping: bool, inputs: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
            hidden = model.encode(
                input_ids,
                attention_mask,
                token_type_ids,
                query_index=positions,
                query_lens=counts,
                token_scores=token_scores,
                dropping=dropping,
                inputs=inputs,
                validate=token_scores is not None,
            )[0]
            logits = self.head(hidden)
            per_prediction = F.cross_entropy(
                _at_least_fp32(logits.flatten(0, 1)), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
            )
            return hidden, logits, per_prediction

        if not consistency:
            _, logits, per_prediction = run(dropping=True)
            loss, term = _mean_loss(per_prediction, predictions, num_items_in_batch), None
        else:
            dropped_inputs, full_inputs = [], []
            dropped, logits, per_prediction = run(dropping=True, inputs=dropped_inputs)
            full, _, full_per_prediction = run(dropping=False, inputs=full_inputs)
            mlm = 0.5 * (per_prediction + full_per_prediction)
            kl = _first_token_kl(dropped_inputs[-1], full_inputs[-1]) + _first_token_kl(dropped, full)
            term = self.config.token_drop.consistency_weight * kl
            loss = _mean_loss(mlm, predictions, num_items_in_batch) + _mean_loss(term, predictions, num_items_in_batch)
        if model.token_importance is not None:
            model.token_importance.update(targets, per_prediction.detach().view_as(targets), validate=False)
        return MaskedLMOutput(loss, logits, positions, counts, term)

    def _check_consistency(self) -> None:
        if self.config.token_drop is None or not self.training:
            raise ValueError(
                "consistency=True is ScTD's step of token-dropping training: it needs config.token_drop "
                f"and training mode (token_drop={self.config.token_drop!r}, training={self.training})"
            )


def _first_token_kl(dropped: Tensor, full: Tensor) -> Tensor:
    """ScTD's constraint: KL(softmax(full) || softmax(dropped)) over the hidden units of the first
    token's states [B, *, H], summed over the batch (both passes get its gradient)."""
    return F.kl_div(
        F.log_softmax(_at_least_fp32(dropped[:, 0]), dim=-1),
        F.softmax(_at_least_fp32(full[:, 0]), dim=-1),
        reduction="sum",
    )


class BertForMaskedLM(MaskedLM):
    __doc__ = MaskedLM.__doc__
    config_class = BertConfig
    base_model_prefix = "bert"
    optional_keys = ("cls.",)
    tied_keys = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, BertModel)
        self.cls = nn.Module()  # Hugging Face's parameter names: cls.predictions.*
        self.cls.predictions = BertLMPredictionHead(config, self.bert.embeddings.word_embeddings)
        self._init_head()

    @property
    def head(self) -> nn.Module:
        return self.cls.predictions


class RobertaForMaskedLM(MaskedLM):
    __doc__ = MaskedLM.__doc__
    config_class = RobertaConfig
    base_model_prefix = "roberta"
    optional_keys = ("lm_head.",)
    tied_keys = ("lm_head.decoder.weight", "lm_head.decoder.bias")

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, RobertaModel)
        self.lm_head = RobertaLMHead(config, self.roberta.embeddings.word_embeddings)
        self._init_head()

    @property
    def head(self) -> nn.Module:
        return self.lm_head


class RobertaClassificationHead(nn.Module):
    """RoBERTa's head on the first token: dropout, dense, tanh, dropout, out_proj."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        dropout = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, first_token: Tensor) -> Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(first_token)))))


class SequenceClassifier(PretrainedMixin, nn.Module):
    """First-token classification (regression when num_labels == 1). Fine-tuning runs the full
    encoder: token dropping and random-LTD are pretraining modes. In NarrowBERT mode the first token
    is the only query."""

    accepts_loss_kwargs = True

    @property
    def base_model(self) -> BertModel:
        return getattr(self, self.base_model_prefix)

    def classify(self, encoded: BertOutput) -> Tensor:
        """Logits [B, num_labels] of the encoder's output."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        num_items_in_batch: Tensor | int | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutput:
        """labels [B]: class ids (float targets for regression). num_items_in_batch and return_dict
        as in the masked-LM models."""
        check_inputs(self.config, input_ids, attention_mask, token_type_ids)
        query_index = query_lens = None
        if self.config.narrow is not None:
            query_index = torch.zeros_like(input_ids[:, :1])
            query_lens = torch.ones_like(input_ids[:, 0])
        encoded = self.base_model.encode(
            input_ids, attention_mask, token_type_ids, query_index=query_index, query_lens=query_lens
        )
        logits = self.classify(encoded)
        if labels is None:
            return SequenceClassifierOutput(None, logits)
        batch = input_ids.shape[0]
        if self.config.num_labels == 1:
            if not isinstance(labels, Tensor) or tuple(labels.shape) != (batch,):
                raise ValueError(
                    f"regression labels must be a tensor of shape ({batch},), "
                    f"got {tuple(getattr(labels, 'shape', ()))} ({type(labels).__name__})"
                )
            scores = _at_least_fp32(logits.squeeze(-1))
            losses = F.mse_loss(scores, labels.to(scores.dtype), reduction="none")
            counted = torch.tensor(batch, device=logits.device)
        else:
            check_labels(labels, (batch,), 0, self.config.num_labels)
            losses = F.cross_entropy(_at_least_fp32(logits), labels, ignore_index=IGNORE_INDEX, reduction="none")
            counted = (labels != IGNORE_INDEX).sum()
        return SequenceClassifierOutput(_mean_loss(losses, counted, num_items_in_batch), logits)


def _fine_tuning(config: BertConfig) -> BertConfig:
    return dataclasses.replace(config, token_drop=None, random_ltd=None)


class BertForSequenceClassification(SequenceClassifier):
    __doc__ = SequenceClassifier.__doc__
    config_class = BertConfig
    base_model_prefix = "bert"
    optional_keys = ("classifier.", "bert.pooler.")
    tied_keys = ()

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(_fine_tuning(config))
        dropout = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_bert_weights(self.classifier, config.initializer_range)

    def classify(self, encoded: BertOutput) -> Tensor:
        return self.classifier(self.dropout(encoded.pooler_output))


class RobertaForSequenceClassification(SequenceClassifier):
    __doc__ = SequenceClassifier.__doc__
    config_class = RobertaConfig
    base_model_prefix = "roberta"
    optional_keys = ("classifier.",)
    tied_keys = ()

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(_fine_tuning(config), add_pooling_layer=False)
        self.classifier = RobertaClassificationHead(config)
        self.classifier.apply(lambda module: init_bert_weights(module, config.initializer_range))

    def classify(self, encoded: BertOutput) -> Tensor:
        return self.classifier(encoded.last_hidden_state[:, 0])


__all__ = [
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertModel",
    "BertOutput",
    "MaskedLM",
    "MaskedLMOutput",
    "RobertaForMaskedLM",
    "RobertaForSequenceClassification",
    "RobertaModel",
    "SequenceClassifier",
    "SequenceClassifierOutput",
    "check_inputs",
    "check_labels",
    "layer_plan",
]
