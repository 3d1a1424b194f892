"""The exported modules: one per head (see `tokdrop.export.signature`), each taking
(input_ids, attention_mask, token_type_ids) and returning a tuple of float32 outputs, and their
reduced-precision variant with LayerNorm kept in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tokdrop
from tokdrop.export.signature import DTYPE_NAMES

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16), strict=True))


class Head(nn.Module):
    """An export head around a tokdrop model. `output_names` name the returned tensors in order;
    `per_token_outputs` are those shaped [B, S, ...], whose values at padded positions nothing reads."""

    output_names: tuple[str, ...]
    per_token_outputs: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class EncoderHead(Head):
    """BertModel: (last_hidden_state, pooler_output) or (last_hidden_state,) without a pooler."""

    per_token_outputs = ("last_hidden_state",)

    def __init__(self, model: tokdrop.BertModel) -> None:
        super().__init__(model)
        self.output_names = ("last_hidden_state",) + (() if model.pooler is None else ("pooler_output",))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor, ...]:
        out = self.model(input_ids, attention_mask, token_type_ids)
        if out.pooler_output is None:
            return (out.last_hidden_state.float(),)
        return out.last_hidden_state.float(), out.pooler_output.float()


class MeanPoolHead(Head):
    """Sentence embeddings: mean of the last hidden states of the real tokens (L2-normalised when
    `normalize`, as sentence-transformers' all-MiniLM models do). Fully padded rows give zeros."""

    output_names = ("sentence_embedding",)

    def __init__(self, model: tokdrop.BertModel, normalize: bool = False) -> None:
        super().__init__(model)
        self.normalize = normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor]:
        hidden = self.model(input_ids, attention_mask, token_type_ids).last_hidden_state.float()
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        if self.normalize:
            pooled = F.normalize(pooled, p=2.0, dim=-1)
        return (pooled,)


class ClassifierHead(Head):
    """Sequence classification on the full-sequence encoder: every position is computed (also in
    the narrow layers of a NarrowBERT model, which gives the same [CLS] logits as its [CLS]-only
    forward, since narrow-layer queries do not interact)."""

    output_names = ("logits",)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor]:
        encoded = self.model.base_model(input_ids, attention_mask, token_type_ids)
        return (self.model.classify(encoded).float(),)


class NarrowClsHead(Head):
    """NarrowBERT [CLS]-only classifier: the model's own forward, where after the full layers
    [CLS] is the only query (keys/values still come from the whole sequence)."""

    output_names = ("logits",)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor]:
        return (self.model(input_ids, attention_mask, token_type_ids).logits.float(),)


def make_head(head: str, model: nn.Module, normalize: bool = False) -> Head:
    """The export module of `head` around `model` (a BertModel or RobertaModel for
    encoder/embedding, a sequence classifier of either for classifier/narrow-cls)."""
    if head == "embedding":
        return MeanPoolHead(model, normalize=normalize)
    return {"encoder": EncoderHead, "classifier": ClassifierHead, "narrow-cls": NarrowClsHead}[head](model)


class Fp32LayerNorm(nn.Module):
    """A LayerNorm whose weights stay float32 and which computes in float32 inside a
    reduced-precision model (its input and output keep the model's dtype)."""

    def __init__(self, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.normalized_shape = layer_norm.normalized_shape
        self.eps = layer_norm.eps
        # Copies, so that casting the model afterwards leaves them float32.
        self.weight = _fp32_copy(layer_norm.weight)
        self.bias = _fp32_copy(layer_norm.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def _fp32_copy(parameter: nn.Parameter | None) -> nn.Parameter | None:
    if parameter is None:
        return None
    return nn.Parameter(parameter.detach().float().clone(), requires_grad=parameter.requires_grad)


def in_reduced_precision(head: Head, dtype: torch.dtype) -> Head:
    """`head` (float32, changed in place) cast to `dtype`, with every LayerNorm replaced by an
    Fp32LayerNorm holding its original float32 weights."""
    fp32_norms = {name: Fp32LayerNorm(m) for name, m in head.named_modules() if isinstance(m, nn.LayerNorm)}
    head.to(dtype)
    for name, norm in fp32_norms.items():
        head.set_submodule(name, norm)
    return head
