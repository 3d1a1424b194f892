"""Model-level equivalences: token dropping and NarrowBERT against dense and slow references."""

import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import tokdrop
from tokdrop.layers import select_tokens

BASE = tokdrop.BertConfig(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=40,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    attn_backend="eager",
)


def make(cls, **changes):
    torch.manual_seed(0)
    return cls(dataclasses.replace(BASE, **changes)).double()


def batch(seed=1, lengths=(20, 13, 1, 7)):
    g = torch.Generator().manual_seed(seed)
    seq_len = max(lengths)
    ids = torch.randint(1, BASE.vocab_size, (len(lengths), seq_len), generator=g)
    mask = (torch.arange(seq_len) < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask  # padding id 0
    types = torch.randint(0, 2, ids.shape, generator=g) * mask
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.3) & mask.bool(), ids, -100)
    labels[:, 0] = ids[:, 0]  # every row predicts something
    return ids, mask, types, labels


def share_weights(target, source):
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all("token_importance" in k for k in missing)
    return target


def real_logits(out):
    valid = torch.arange(out.positions.shape[1]) < out.counts[:, None]
    return out.logits[valid]


@pytest.mark.parametrize("keep", [1.0, 20])
def test_keep_all_token_dropping_equals_dense(keep):
    ids, mask, types, labels = batch()
    dense = make(tokdrop.BertForMaskedLM).train()
    drop = share_weights(make(tokdrop.BertForMaskedLM, token_drop=tokdrop.TokenDropConfig(keep=keep)), dense)
    a, b = dense(ids, mask, types, labels), drop.train()(ids, mask, types, labels)
    torch.testing.assert_close(real_logits(b), real_logits(a), rtol=0, atol=1e-12)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-12)


def test_narrow_with_one_narrow_layer_and_every_query_equals_dense():
    ids, mask, types, _ = batch()
    dense = make(tokdrop.BertModel).eval()
    narrow = share_weights(make(tokdrop.BertModel, narrow=tokdrop.NarrowConfig(full_layers=3)), dense).eval()
    real = mask.bool()
    torch.testing.assert_close(narrow(ids, mask, types)[0][real], dense(ids, mask, types)[0][real], rtol=0, atol=1e-12)


def test_narrow_mlm_at_predicted_positions_equals_dense_there():
    ids, mask, types, labels = batch()
    dense = make(tokdrop.BertForMaskedLM).eval()
    narrow = share_weights(make(tokdrop.BertForMaskedLM, narrow=tokdrop.NarrowConfig(full_layers=3)), dense)
    a, b = dense(ids, mask, types, labels), narrow.eval()(ids, mask, types, labels)
    torch.testing.assert_close(real_logits(b), real_logits(a), rtol=0, atol=1e-12)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-12)


def slow_layer(layer, x, memory):
    """One BERT layer for a single unpadded sequence: queries x [M, H] over keys/values memory [N, H]."""
    proj, heads = layer.attention.self, layer.num_heads
    q = proj.query(x).view(len(x), heads, -1).transpose(0, 1)
    k = proj.key(memory).view(len(memory), heads, -1).transpose(0, 1)
    v = proj.value(memory).view(len(memory), heads, -1).transpose(0, 1)
    probs = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
    context = (probs @ v).transpose(0, 1).reshape(len(x), -1)
    out = layer.attention.output
    x = out.LayerNorm(x + out.dense(context))
    ffn = layer.output
    return ffn.LayerNorm(x + ffn.dense(F.gelu(layer.intermediate.dense(x))))


@pytest.mark.parametrize("full_layers", [0, 1, 2])
def test_narrow_equals_slow_reference(full_layers):
    """Every position a query; each narrow layer attends over the fixed output of the last full layer."""
    ids, mask, types, _ = batch()
    model = make(tokdrop.BertModel, narrow=tokdrop.NarrowConfig(full_layers=full_layers)).eval()
    out = model(ids, mask, types)[0]
    embedded = model.embeddings(ids, types)
    for row, length in enumerate(mask.sum(1).tolist()):
        hidden = embedded[row, :length]
        for layer in model.encoder.layer[:full_layers]:
            hidden = slow_layer(layer, hidden, hidden)
        queries = hidden
        for layer in model.encoder.layer[full_layers:]:
            queries = slow_layer(layer, queries, hidden)
        torch.testing.assert_close(out[row, :length], queries, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("keep", "start", "end"), [(0.5, None, None), (0.3, 0, 4), (3, 1, 3)])
def test_token_dropping_equals_slow_reference(keep, start, end):
    """Per sequence, unpadded: full layers, cross layer, kept-only layers, restore, full layers."""
    ids, mask, types, _ = batch()
    drop = tokdrop.TokenDropConfig(keep=keep, start_layer=start, end_layer=end, allow_ids=(5,))
    model = make(tokdrop.BertModel, token_drop=drop).train()
    scores = torch.randn(ids.shape, dtype=torch.float64)
    out = model(ids, mask, types, token_scores=scores)[0]
    embedded = model.embeddings(ids, types)
    layers = model.encoder.layer
    plan = model.encoder.plan
    start, end = plan.index("cross"), len(plan) - plan[::-1].index("kept" if "kept" in plan else "cross")
    for row, length in enumerate(mask.sum(1).tolist()):
        hidden = embedded[row, :length]
        for layer in layers[:start]:
            hidden = slow_layer(layer, hidden, hidden)
        index, count = select_tokens(scores[row : row + 1], mask[row : row + 1].sum(1), keep)
        kept_positions = index[0, : int(count)]
        kept = slow_layer(layers[start], hidden[kept_positions], hidden)
        for layer in layers[start + 1 : end]:
            kept = slow_layer(layer, kept, kept)
        hidden = hidden.clone()
        hidden[kept_positions] = kept
        for layer in layers[end:]:
            hidden = slow_layer(layer, hidden, hidden)
        torch.testing.assert_close(out[row, :length], hidden, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["dense", "token_drop", "narrow"])
def test_padding_never_leaks_into_real_positions(mode):
    changes = {
        "token_drop": {"token_drop": tokdrop.TokenDropConfig(keep=0.5)},
        "narrow": {"narrow": tokdrop.NarrowConfig(full_layers=2)},
        "dense": {},
    }[mode]
    model = make(tokdrop.BertForMaskedLM, **changes).train()
    ids, mask, types, labels = batch()
    noisy = torch.where(mask.bool(), ids, torch.randint_like(ids, 1, BASE.vocab_size))
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the importance table learns
    a = model(ids, mask, types, labels)
    model.load_state_dict(state)
    b = model(noisy, mask, types, labels)
    torch.testing.assert_close(real_logits(a), real_logits(b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["dense", "token_drop", "narrow"])
def test_gradients_reach_exactly_the_trainable_parameters(mode):
    changes = {
        "token_drop": {"token_drop": tokdrop.TokenDropConfig(keep=0.5)},
        "narrow": {"narrow": tokdrop.NarrowConfig(full_layers=2)},
        "dense": {},
    }[mode]
    model = make(tokdrop.BertForMaskedLM, **changes).train()
    ids, mask, types, labels = batch()
    model(ids, mask, types, labels).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, buffer in model.named_buffers():
        assert not buffer.requires_grad, name
    # Positions past the sequence length take no part, so their embeddings get no gradient.
    embedding_grad = model.bert.embeddings.position_embeddings.weight.grad
    assert embedding_grad[ids.shape[1] :].abs().sum() == 0


def test_mlm_importance_updates_in_training_only():
    model = make(tokdrop.BertForMaskedLM, token_drop=tokdrop.TokenDropConfig(keep=0.5, allow_ids=(4,)))
    ids, mask, types, labels = batch()
    before = model.bert.token_importance.table.clone()
    model.eval()(ids, mask, types, labels)
    assert torch.equal(model.bert.token_importance.table, before)
    model.train()(ids, mask, types, labels)
    changed = (model.bert.token_importance.table != before).nonzero().flatten()
    predicted = labels[labels >= 0].unique()
    assert set(changed.tolist()) == set(predicted.tolist()) - {0, 4}


def test_sequence_classification_narrow_uses_cls_query_only():
    dense = make(tokdrop.BertForSequenceClassification).eval()
    narrow = share_weights(
        make(tokdrop.BertForSequenceClassification, narrow=tokdrop.NarrowConfig(full_layers=3)), dense
    ).eval()
    ids, mask, types, _ = batch()
    labels = torch.tensor([0, 1, 1, 0])
    a, b = dense(ids, mask, types, labels), narrow(ids, mask, types, labels)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-12)


def test_sequence_classification_fine_tunes_without_dropping():
    model = make(tokdrop.BertForSequenceClassification, token_drop=tokdrop.TokenDropConfig(keep=0.5))
    dense = share_weights(make(tokdrop.BertForSequenceClassification), model)
    ids, mask, types, _ = batch()
    torch.testing.assert_close(
        model.train()(ids, mask, types).logits, dense.train()(ids, mask, types).logits, rtol=0, atol=0
    )


def test_fixed_prediction_slots_match_counted_slots():
    ids, mask, types, labels = batch()
    counted = make(tokdrop.BertForMaskedLM).eval()
    fixed = share_weights(make(tokdrop.BertForMaskedLM, max_predictions_per_seq=15), counted).eval()
    a, b = counted(ids, mask, types, labels), fixed(ids, mask, types, labels)
    assert b.logits.shape[1] == 15 and a.logits.shape[1] == int((labels >= 0).sum(1).max())
    torch.testing.assert_close(real_logits(b), real_logits(a), rtol=0, atol=1e-12)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="more than the 2 slots"):
        share_weights(make(tokdrop.BertForMaskedLM, max_predictions_per_seq=2), counted)(ids, mask, types, labels)


# ---------------------------------------------------------------------------------- last-layer subset


def loss_and_grads(model, *inputs, **kwargs):
    model.zero_grad()
    out = model(*inputs, **kwargs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["dense", "token_drop", "random_ltd"])
def test_last_layer_subset_gives_the_full_last_layers_loss_and_gradients(mode):
    """Queries at the predicted positions only in the last layer: float64 loss, every gradient and
    the importance update equal the full last layer's."""
    changes = {
        "dense": {},
        "token_drop": {"token_drop": tokdrop.TokenDropConfig(keep=0.5, allow_ids=(4,))},
        "random_ltd": {"random_ltd": tokdrop.RandomLTDConfig(keep=0.5)},
    }[mode]
    ids, mask, types, labels = batch()
    full = make(tokdrop.BertForMaskedLM, last_layer_subset=False, **changes).train()
    subset = share_weights(make(tokdrop.BertForMaskedLM, last_layer_subset=True, **changes), full).train()
    assert full.bert.encoder.plan[-1] == "full" and subset.bert.encoder.plan[-1] == "narrow"
    scores = torch.randn(ids.shape, dtype=torch.float64)
    results = []
    for model in (full, subset):
        torch.manual_seed(5)  # the same random-LTD subsets
        results.append(loss_and_grads(model, ids, mask, types, labels, token_scores=scores))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(real_logits(b), real_logits(a), rtol=0, atol=1e-10)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-10, msg=name)
    if mode == "token_drop":
        torch.testing.assert_close(subset.bert.token_importance.table, full.bert.token_importance.table)


def test_last_layer_subset_is_a_full_layer_without_labels():
    ids, mask, types, _ = batch()
    full = make(tokdrop.BertForMaskedLM, last_layer_subset=False).eval()
    subset = share_weights(make(tokdrop.BertForMaskedLM), full).eval()
    torch.testing.assert_close(subset(ids, mask, types).logits, full(ids, mask, types).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ random-LTD


class RecordedSelections:
    """The (index, kept counts) of every select_tokens call an encoder makes."""

    def __init__(self, monkeypatch):
        self.calls = []

        def recording(*args, **kwargs):
            result = select_tokens(*args, **kwargs)
            self.calls.append(result)
            return result

        monkeypatch.setattr(tokdrop.layers, "select_tokens", recording)


def test_random_ltd_equals_slow_per_layer_reference(monkeypatch):
    """Each middle layer runs on its own subset of each row (gathered, attending only to each other)
    and scatters back; the other tokens skip the layer unchanged; first and last layers run full."""
    ids, mask, types, _ = batch()
    model = make(tokdrop.BertModel, num_hidden_layers=5, random_ltd=tokdrop.RandomLTDConfig(keep=0.5)).train()
    assert model.encoder.plan == ("full", "ltd", "ltd", "ltd", "narrow")
    selections = RecordedSelections(monkeypatch)
    out = model(ids, mask, types)[0]
    assert len(selections.calls) == 3
    embedded = model.embeddings(ids, types)
    layers = model.encoder.layer
    for row, length in enumerate(mask.sum(1).tolist()):
        hidden = slow_layer(layers[0], embedded[row, :length], embedded[row, :length])
        for layer, (index, counts) in zip(layers[1:4], selections.calls, strict=True):
            kept = index[row, : int(counts[row])]
            assert int(counts[row]) == -(-length // 2) and bool((kept < length).all())
            hidden = hidden.clone()
            hidden[kept] = slow_layer(layer, hidden[kept], hidden[kept])
        hidden = slow_layer(layers[4], hidden, hidden)
        torch.testing.assert_close(out[row, :length], hidden, rtol=0, atol=1e-12)


def test_random_ltd_subsets_are_fresh_per_layer_and_step_and_reproducible(monkeypatch):
    ids, mask, types, _ = batch(lengths=(20, 20, 20, 20))
    model = make(tokdrop.BertModel, num_hidden_layers=4, random_ltd=tokdrop.RandomLTDConfig(keep=0.5)).train()
    selections = RecordedSelections(monkeypatch)
    torch.manual_seed(1)
    model(ids, mask, types)
    model(ids, mask, types)
    torch.manual_seed(1)
    model(ids, mask, types)
    first, second, again = selections.calls[:2], selections.calls[2:4], selections.calls[4:]
    for (a, _), (b, _) in zip(first, again, strict=True):
        assert torch.equal(a, b)  # the same seed draws the same subsets
    subsets = [index[:, :10].sort(1).values for index, _ in first + second]
    assert all(not torch.equal(x, y) for i, x in enumerate(subsets) for y in subsets[i + 1 :])
    # Rows of one batch draw different subsets too, and the kept positions are sorted.
    assert not torch.equal(subsets[0][0], subsets[0][1])
    assert all(bool((index[:, :10].diff(dim=1) > 0).all()) for index, _ in first)


def test_random_ltd_never_keeps_padding_and_acts_in_training_only(monkeypatch):
    ids, mask, types, _ = batch(lengths=(9, 3, 1, 6))
    model = make(tokdrop.BertModel, random_ltd=tokdrop.RandomLTDConfig(keep=0.5)).train()
    selections = RecordedSelections(monkeypatch)
    model(ids, mask, types)
    lengths = mask.sum(1)
    for index, counts in selections.calls:
        assert counts.tolist() == [5, 2, 1, 3]
        for row in range(4):
            assert bool((index[row, : counts[row]] < lengths[row]).all())
    selections.calls.clear()
    dense = share_weights(make(tokdrop.BertModel), model).eval()
    torch.testing.assert_close(model.eval()(ids, mask, types)[0], dense(ids, mask, types)[0], rtol=0, atol=0)
    assert selections.calls == []


def test_random_ltd_keeping_everything_equals_dense():
    ids, mask, types, labels = batch()
    dense = make(tokdrop.BertForMaskedLM).train()
    ltd = share_weights(make(tokdrop.BertForMaskedLM, random_ltd=tokdrop.RandomLTDConfig(keep=1.0)), dense).train()
    a, b = dense(ids, mask, types, labels), ltd(ids, mask, types, labels)
    torch.testing.assert_close(real_logits(b), real_logits(a), rtol=0, atol=1e-12)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- every depth works


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("mode", ["dense", "token_drop", "random_ltd"])
def test_shallow_models_build_and_train(layers, mode):
    if mode == "token_drop" and layers == 1:
        with pytest.raises(ValueError, match="start_layer=0, end_layer=0, num_hidden_layers=1"):
            tokdrop.with_mode(dataclasses.replace(BASE, num_hidden_layers=1), mode)
        return
    config = tokdrop.with_mode(dataclasses.replace(BASE, num_hidden_layers=layers), mode)
    torch.manual_seed(0)
    model = tokdrop.BertForMaskedLM(config).double().train()
    ids, mask, types, labels = batch()
    model(ids, mask, types, labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------- ScTD


def sctd_model(keep=0.5, **changes):
    drop = tokdrop.TokenDropConfig(keep=keep, allow_ids=(4,), consistency_every=10, consistency_weight=0.05)
    return make(tokdrop.BertForMaskedLM, token_drop=drop, **changes).train()


def test_sctd_terms_vanish_when_nothing_is_dropped():
    """keep=1.0: the dropping pass is the full pass, so both KL terms are 0 and the loss is the MLM loss."""
    ids, mask, types, labels = batch()
    model = sctd_model(keep=1.0)
    plain = model(ids, mask, types, labels).loss
    step = model(ids, mask, types, labels, consistency=True)
    assert abs(step.consistency.item()) < 1e-15
    torch.testing.assert_close(step.loss, plain, rtol=0, atol=1e-12)
    assert bool((step.positions[:, 0] == 0).all())  # the first token rides along as a query


def test_sctd_gradients_reach_the_encoder_and_not_the_mlm_head():
    ids, mask, types, labels = batch()
    model = sctd_model()
    scores = torch.randn(ids.shape, dtype=torch.float64)
    out = model(ids, mask, types, labels, token_scores=scores, consistency=True)
    assert out.consistency > 0
    out.consistency.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, grad in grads.items():
        if name.startswith("cls."):
            assert grad is None or grad.abs().sum() == 0, name
        elif name.startswith("bert.encoder.layer.") or name.startswith("bert.embeddings.word"):
            assert grad is not None and grad.abs().sum() > 0, name


def test_sctd_step_averages_the_two_mlm_losses_and_updates_importance_from_the_dropping_pass():
    ids, mask, types, labels = batch()
    scores = torch.randn(ids.shape, dtype=torch.float64)
    dropping, both = sctd_model(), sctd_model()
    full = make(tokdrop.BertForMaskedLM).train()
    full.load_state_dict({k: v for k, v in dropping.state_dict().items() if "token_importance" not in k})
    expected = 0.5 * (
        dropping(ids, mask, types, labels, token_scores=scores).loss + full(ids, mask, types, labels).loss
    )
    step = both(ids, mask, types, labels, token_scores=scores, consistency=True)
    predictions = (labels != -100).sum()
    torch.testing.assert_close(step.loss, expected + step.consistency / predictions, rtol=0, atol=1e-12)
    torch.testing.assert_close(both.bert.token_importance.table, dropping.bert.token_importance.table)


def test_sctd_is_refused_where_it_does_not_apply():
    ids, mask, types, labels = batch()
    with pytest.raises(ValueError, match="consistency=True is ScTD's step of token-dropping training"):
        make(tokdrop.BertForMaskedLM).train()(ids, mask, types, labels, consistency=True)
    with pytest.raises(ValueError, match="consistency=True .* training=False"):
        sctd_model().eval()(ids, mask, types, labels, consistency=True)
    with pytest.raises(ValueError, match="consistency_every needs a full last layer"):
        tokdrop.TokenDropConfig(consistency_every=5, end_layer=4) and dataclasses.replace(
            BASE, token_drop=tokdrop.TokenDropConfig(consistency_every=5, end_layer=4)
        )
    assert [s for s in range(25) if tokdrop.TokenDropConfig(consistency_every=10).consistency_due(s)] == [0, 10, 20]


# ------------------------------------------------------------------------------------------- unpadding


NO_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.mark.parametrize("backend", ["eager", "sdpa", pytest.param("triton", marks=NO_TRITON)])
@pytest.mark.parametrize("cls", [tokdrop.BertModel, tokdrop.BertForSequenceClassification])
def test_unpadded_encoder_matches_the_padded_one(cls, backend):
    """Every layer on the packed real tokens: the same outputs and gradients as the padded path
    (float32, 1e-5), exact zeros at the padded positions; the Triton backend runs its packed kernel."""
    ids, mask, types, _ = batch(lengths=(20, 13, 1, 7))
    outputs = []
    for unpad in (False, True):
        torch.manual_seed(0)
        config = dataclasses.replace(BASE, unpad=unpad, attn_backend=backend, hidden_size=64, num_attention_heads=2)
        model = cls(config).train()  # fine-tuning: dropout is off in BASE, gradients on
        out = model(ids, mask, types)
        value = out.last_hidden_state if cls is tokdrop.BertModel else out.logits
        value.square().sum().backward()
        outputs.append((value, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (padded, padded_grads), (packed, packed_grads) = outputs
    if cls is tokdrop.BertModel:
        real = mask.bool()
        assert bool((packed[~real] == 0).all())
        padded, packed = padded[real], packed[real]
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    # The padded path's gradients include the padding rows' made-up outputs; compare a classifier's.
    if cls is tokdrop.BertForSequenceClassification:
        for name in padded_grads:
            torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_batch_without_padding_is_not_packed(monkeypatch):
    ids, mask, types, _ = batch(lengths=(9, 9, 9))
    dense = make(tokdrop.BertModel).eval()
    unpadded = share_weights(make(tokdrop.BertModel, unpad=True), dense).eval()
    packing = []
    monkeypatch.setattr(tokdrop.model, "unpad", lambda *args: packing.append(args) or tokdrop.layers.unpad(*args))
    torch.testing.assert_close(unpadded(ids, mask, types)[0], dense(ids, mask, types)[0], rtol=0, atol=0)
    assert packing == []
    mask[1, 5:] = 0
    unpadded(ids, mask, types)
    assert len(packing) == 1


def test_unpadding_is_left_to_passes_over_every_token():
    ids, mask, types, labels = batch()
    dense = make(tokdrop.BertForMaskedLM).train()
    unpadded = share_weights(make(tokdrop.BertForMaskedLM, unpad=True), dense).train()
    torch.testing.assert_close(unpadded(ids, mask, types, labels).loss, dense(ids, mask, types, labels).loss)
    with pytest.raises(ValueError, match="the packed layout runs every token"):
        unpadded.bert.encoder(
            torch.zeros(5, 32), tokdrop.layers.Packed(torch.tensor([0, 5]), 5), scores=torch.ones(1, 5)
        )


@pytest.mark.parametrize("mode", ["dense", "token_drop", "narrow", "random_ltd"])
def test_an_eager_training_step_reads_the_device_three_times(mode, monkeypatch):
    """Each read back of a device value stalls a GPU's queue: one for the batch's checks, one for the
    labels', one for the prediction slots; the layers trust what the model checked and built."""
    config = tokdrop.config.with_mode(dataclasses.replace(BASE, max_predictions_per_seq=8), mode, allow_ids=(1, 2))
    model = tokdrop.BertForMaskedLM(config).double()
    ids, mask, types, labels = batch()
    reads = []
    for method in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(
            torch.Tensor,
            method,
            lambda self, *a, _original=original, _name=method: reads.append(_name) or _original(self, *a),
        )
    model(ids, mask, types, labels=labels).loss.backward()
    assert len(reads) <= 3, reads
