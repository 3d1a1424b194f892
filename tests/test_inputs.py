"""Each bad input raises a ValueError / TypeError whose message names the offending value."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import tokdrop
from tokdrop.kernels import backends as attention_module
from tokdrop.layers import max_kept, select_tokens

VOCAB, MAX_POS = 100, 16
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=MAX_POS,
)


def config(**changes) -> tokdrop.BertConfig:
    return tokdrop.BertConfig(**(BASE | changes))


@pytest.fixture(scope="module")
def mlm():
    torch.manual_seed(0)
    return tokdrop.BertForMaskedLM(config()).eval()


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return tokdrop.BertModel(config()).eval()


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return tokdrop.BertForSequenceClassification(config(num_labels=3)).eval()


@pytest.fixture
def ids():
    return torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def models():
    return pytest.mark.parametrize("model_name", ["encoder", "mlm", "classifier"])


def lit(value) -> str:
    """A regex matching str(value) literally, not inside a longer number."""
    return rf"(?<![\d.]){re.escape(str(value))}(?![\d.])"


# ---------------------------------------------------------------- keep


@pytest.mark.parametrize("keep", [0, -3, 0.0, -0.5, 1.5, 1.0000001, float("nan"), float("inf")])
def test_keep_outside_range(keep):
    with pytest.raises(ValueError, match=rf"keep .*got {re.escape(str(keep))}$"):
        tokdrop.TokenDropConfig(keep=keep)


@pytest.mark.parametrize("keep", ["0.5", None, True, [0.5], torch.tensor(0.5)])
def test_keep_not_a_number(keep):
    with pytest.raises(TypeError, match=rf"keep must be .*got {re.escape(repr(keep))}"):
        tokdrop.TokenDropConfig(keep=keep)


@pytest.mark.parametrize("keep", [1.0, 0.01, 1, 7])
def test_keep_valid_edges(keep):
    assert tokdrop.TokenDropConfig(keep=keep).keep == keep


def test_integer_keep_larger_than_sequence():
    scores, lengths = torch.rand(2, 8), torch.tensor([8, 5])
    with pytest.raises(ValueError, match=r"keep=9 tokens is more than the sequence length 8"):
        select_tokens(scores, lengths, 9)
    with pytest.raises(ValueError, match=r"keep=9 tokens is more than the sequence length 8"):
        max_kept(8, 9)
    assert max_kept(8, 8) == 8  # the boundary itself is fine
    index, counts = select_tokens(scores, lengths, 8)
    assert counts.tolist() == [8, 5]


def test_integer_keep_larger_than_sequence_in_the_model(ids):
    model = tokdrop.BertForMaskedLM(config(token_drop=tokdrop.TokenDropConfig(keep=10))).train()
    labels = torch.where(torch.arange(8) % 3 == 0, ids, -100)
    with pytest.raises(ValueError, match=r"keep=10 tokens is more than the sequence length 8"):
        model(ids, labels=labels)
    model.eval()  # dense in eval mode: keep does not apply
    model(ids, labels=labels)


def test_integer_keep_larger_than_max_positions():
    with pytest.raises(ValueError, match=r"keep=17 tokens exceeds max_position_embeddings=16"):
        config(token_drop=tokdrop.TokenDropConfig(keep=17))


@pytest.mark.parametrize("keep", [0, 1.5, "half"])
def test_keep_in_the_encoder_and_selection(keep):
    error = TypeError if isinstance(keep, str) else ValueError
    with pytest.raises(error, match=re.escape(repr(keep)) if isinstance(keep, str) else lit(keep)):
        select_tokens(torch.rand(1, 4), torch.tensor([4]), keep)
    with pytest.raises(error, match="keep"):
        tokdrop.layers.TokenDropEncoder([torch.nn.Identity()] * 4, keep=keep)


# ---------------------------------------------------------------- input_ids


@models()
def test_sequence_longer_than_max_positions(request, model_name):
    model = request.getfixturevalue(model_name)
    too_long = torch.ones(2, MAX_POS + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds max_position_embeddings=16"):
        model(too_long)
    model(torch.ones(2, MAX_POS, dtype=torch.long))  # exactly max_position_embeddings is fine


@models()
@pytest.mark.parametrize("bad", [-1, -100, VOCAB, VOCAB + 57])
def test_token_id_outside_vocabulary(request, model_name, ids, bad):
    model = request.getfixturevalue(model_name)
    ids = ids.clone()
    ids[1, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {lit(bad)} is outside the vocabulary \[0, 100\)"):
        model(ids)


def test_token_id_edges_are_valid(encoder):
    encoder(torch.tensor([[0, 1, VOCAB - 1]]))


@models()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_input_ids(request, model_name, ids, dtype):
    model = request.getfixturevalue(model_name)
    with pytest.raises(TypeError, match=rf"input_ids must be an integer tensor.*{str(dtype).split('.')[1]}"):
        model(ids.to(dtype))


def test_input_ids_not_a_tensor_bert_model(encoder):
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor, got list"):
        encoder([[1, 2, 3]])


@pytest.mark.parametrize("shape", [(8,), (1, 2, 4), (0, 8), (2, 0)])
def test_input_ids_wrong_rank_or_empty_bert_model(encoder, shape):
    named = rf"input_ids must be a non-empty \[batch, seq_len\].*{re.escape(str(shape))}"
    with pytest.raises(ValueError, match=named):
        encoder(torch.ones(shape, dtype=torch.long))


@pytest.mark.parametrize("bad", [[[1, 2, 3]], torch.ones(8, dtype=torch.long)], ids=["list", "1d"])
def test_input_ids_malformed_masked_lm(mlm, bad):
    with pytest.raises((TypeError, ValueError), match="input_ids"):
        mlm(bad)


# ---------------------------------------------------------------- attention_mask / token_type_ids


@models()
@pytest.mark.parametrize("name", ["attention_mask", "token_type_ids"])
@pytest.mark.parametrize("shape", [(2, 7), (2, 9), (1, 8), (8,), (2, 8, 1)])
def test_mask_and_type_shape_mismatch(request, model_name, ids, name, shape):
    model = request.getfixturevalue(model_name)
    extra = torch.ones(shape, dtype=torch.long)
    if name == "token_type_ids":
        extra.zero_()
    named = rf"{name} has shape {re.escape(str(shape))} but input_ids has \(2, 8\)"
    with pytest.raises(ValueError, match=named):
        model(ids, **{name: extra})


@models()
@pytest.mark.parametrize("bad", [2, 5, -1])
def test_token_type_ids_out_of_range(request, model_name, ids, bad):
    model = request.getfixturevalue(model_name)
    types = torch.zeros_like(ids)
    types[0, 4] = bad
    low, high = min(bad, 0), max(bad, 0)
    with pytest.raises(ValueError, match=rf"token_type_ids must be in \[0, 2\), got values {low}\.\.{high}"):
        model(ids, token_type_ids=types)


@models()
def test_row_without_real_tokens(request, model_name, ids):
    model = request.getfixturevalue(model_name)
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"row 1 of attention_mask has no real tokens"):
        model(ids, attention_mask=mask)


@models()
@pytest.mark.parametrize(
    "row", [[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 1]], ids=["left", "hole", "late"]
)
def test_attention_mask_not_right_padded(request, model_name, ids, row):
    model = request.getfixturevalue(model_name)
    mask = torch.ones_like(ids)
    mask[1] = torch.tensor(row)
    with pytest.raises(ValueError, match=r"row 1 of attention_mask is not right-padded"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("value", [2, -1, 0.5])
def test_attention_mask_values(encoder, ids, value):
    mask = torch.ones(ids.shape, dtype=torch.float32 if isinstance(value, float) else torch.long)
    mask[0, 5] = value
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 and 1"):
        encoder(ids, attention_mask=mask)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.float32])
def test_attention_mask_dtypes_accepted(encoder, ids, dtype):
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ref = encoder(ids, attention_mask=mask).last_hidden_state
    out = encoder(ids, attention_mask=mask.to(dtype)).last_hidden_state
    assert torch.equal(ref, out)


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("shape", [(2, 7), (2, 9), (8,), (1, 8), (2, 8, 1)])
def test_mlm_labels_wrong_shape(mlm, ids, shape):
    labels = torch.full(shape, -100)
    named = rf"labels must have shape \(2, 8\), got {re.escape(str(shape))}"
    with pytest.raises(ValueError, match=named):
        mlm(ids, labels=labels)


def test_mlm_labels_not_a_tensor(mlm, ids):
    with pytest.raises(TypeError, match=r"labels must be a tensor, got list"):
        mlm(ids, labels=ids.tolist())


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 20, -1, -99, -101])
def test_mlm_label_ids_out_of_range(mlm, ids, bad):
    labels = torch.full_like(ids, -100)
    labels[0, 2] = 5
    labels[1, 4] = bad
    with pytest.raises(ValueError, match=r"labels must be in \[0, 100\) or -100"):
        mlm(ids, labels=labels)


@pytest.mark.parametrize("bad", [VOCAB + 20, -7])
def test_mlm_label_error_names_the_value(mlm, ids, bad):
    labels = torch.full_like(ids, -100)
    labels[1, 4] = bad
    with pytest.raises(ValueError, match=lit(bad)):
        mlm(ids, labels=labels)


def test_mlm_float_labels(mlm, ids):
    with pytest.raises(TypeError, match=r"labels.*float32"):
        mlm(ids, labels=torch.full(ids.shape, -100.0))


@pytest.mark.parametrize("shape", [(2, 8), (3,), (1,), (2, 1)])
def test_classification_labels_wrong_shape(classifier, ids, shape):
    with pytest.raises(ValueError, match=rf"labels must have shape \(2,\), got {re.escape(str(shape))}"):
        classifier(ids, labels=torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("bad", [3, 7, -1])
def test_classification_label_out_of_range(classifier, ids, bad):
    with pytest.raises(ValueError, match=rf"labels.*{lit(bad)}"):
        classifier(ids, labels=torch.tensor([0, bad]))


def test_classification_ignored_label_is_allowed(classifier, ids):
    out = classifier(ids, labels=torch.tensor([1, -100]))  # -100 = ignore, as in Hugging Face
    assert torch.isfinite(out.loss)


def test_classification_float_labels(classifier, ids):
    with pytest.raises(TypeError, match=r"labels.*float32"):
        classifier(ids, labels=torch.tensor([0.0, 1.0]))


def test_regression_accepts_float_labels(ids):
    model = tokdrop.BertForSequenceClassification(config(num_labels=1)).eval()
    assert torch.isfinite(model(ids, labels=torch.tensor([0.5, -1.5])).loss)


# ---------------------------------------------------------------- BertConfig


@pytest.mark.parametrize(
    "changes, error, named",
    [
        ({"num_attention_heads": 5}, ValueError, r"hidden_size=32 is not a multiple of num_attention_heads=5"),
        ({"hidden_size": 30, "num_attention_heads": 4}, ValueError, r"hidden_size=30 .*num_attention_heads=4"),
        ({"hidden_act": "tanh"}, ValueError, r"hidden_act must be one of .*got 'tanh'"),
        ({"hidden_act": None}, ValueError, r"hidden_act .*got None"),
        ({"hidden_dropout_prob": 1.0}, ValueError, r"hidden_dropout_prob must be a probability in \[0, 1\), got 1\.0"),
        ({"hidden_dropout_prob": -0.1}, ValueError, r"hidden_dropout_prob .*got -0\.1"),
        ({"attention_probs_dropout_prob": 1.5}, ValueError, r"attention_probs_dropout_prob .*got 1\.5"),
        ({"attention_probs_dropout_prob": float("nan")}, ValueError, r"attention_probs_dropout_prob .*got nan"),
        ({"classifier_dropout": 1.0}, ValueError, r"classifier_dropout .*got 1\.0"),
        ({"hidden_dropout_prob": "0.1"}, ValueError, r"hidden_dropout_prob .*got '0\.1'"),
        ({"vocab_size": 0}, ValueError, r"vocab_size must be >= 1, got 0"),
        ({"hidden_size": 32.0}, TypeError, r"hidden_size must be an int, got 32\.0"),
        ({"num_hidden_layers": True}, TypeError, r"num_hidden_layers must be an int, got True"),
        ({"pad_token_id": -1}, ValueError, r"pad_token_id must be >= 0, got -1"),
        ({"pad_token_id": VOCAB}, ValueError, r"pad_token_id=100 is outside vocab_size=100"),
        ({"max_predictions_per_seq": 0}, ValueError, r"max_predictions_per_seq must be >= 1, got 0"),
        (
            {"token_drop": tokdrop.TokenDropConfig(), "narrow": tokdrop.NarrowConfig(1)},
            ValueError,
            r"token_drop and narrow are exclusive",
        ),
        (
            {"narrow": tokdrop.NarrowConfig(full_layers=2)},
            ValueError,
            r"narrow\.full_layers=2 leaves no narrow layer in num_hidden_layers=2",
        ),
        ({"narrow": tokdrop.NarrowConfig(full_layers=5)}, ValueError, r"narrow\.full_layers=5"),
        (
            {"token_drop": tokdrop.TokenDropConfig(start_layer=2)},
            ValueError,
            r"start_layer=2, end_layer=1, num_hidden_layers=2",
        ),
        (
            {"token_drop": tokdrop.TokenDropConfig(start_layer=0, end_layer=3)},
            ValueError,
            r"start_layer=0, end_layer=3, num_hidden_layers=2",
        ),
        (
            {"token_drop": tokdrop.TokenDropConfig(allow_ids=(1, 100))},
            ValueError,
            r"allow_ids entry 100 is outside vocab_size=100",
        ),
        ({"token_drop": {"keep": 2.0}}, ValueError, r"keep must be in \(0, 1\] as a fraction, got 2\.0"),
        ({"attn_backend": "cudnn"}, ValueError, r"attn_backend='cudnn' is not an attention backend"),
    ],
)
def test_invalid_bert_config(changes, error, named):
    with pytest.raises(error, match=named):
        config(**changes)


@pytest.mark.parametrize(
    "kwargs, error, named",
    [
        ({"importance": "loss"}, ValueError, r"importance must be one of .*got 'loss'"),
        ({"beta": 1.0}, ValueError, r"beta must be a probability in \[0, 1\), got 1\.0"),
        ({"init_value": float("inf")}, ValueError, r"init_value must be finite, got inf"),
        ({"allow_ids": (1, -2)}, ValueError, r"allow_ids entry must be >= 0, got -2"),
        ({"allow_ids": (1, "2")}, TypeError, r"allow_ids entry must be an int, got '2'"),
    ],
)
def test_invalid_token_drop_config(kwargs, error, named):
    with pytest.raises(error, match=named):
        tokdrop.TokenDropConfig(**kwargs)


@pytest.mark.parametrize("full_layers, error", [(-1, ValueError), (1.0, TypeError), ("2", TypeError)])
def test_invalid_narrow_config(full_layers, error):
    with pytest.raises(error, match=rf"full_layers must be .*got {re.escape(repr(full_layers))}"):
        tokdrop.NarrowConfig(full_layers=full_layers)


def test_valid_configs_build():
    """The boundaries of the checks above are accepted."""
    config(
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.999,
        classifier_dropout=0.0,
        pad_token_id=VOCAB - 1,
        narrow=tokdrop.NarrowConfig(full_layers=1),
    )
    config(num_hidden_layers=4, token_drop=tokdrop.TokenDropConfig(keep=16, start_layer=0, end_layer=4))
    for backend in attention_module.backend_names():
        assert config(attn_backend=backend).attn_backend == backend


# ---------------------------------------------------------------- attention backend


def test_unknown_backend_via_config(ids, monkeypatch):
    monkeypatch.delenv(attention_module.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=r"attn_backend='bogus'"):
        tokdrop.BertModel(config(attn_backend="bogus")).eval()(ids)


def test_unavailable_backend_via_config(ids, monkeypatch):
    monkeypatch.delenv(attention_module.ENV_VAR, raising=False)
    missing = [name for name, b in attention_module._REGISTRY.items() if b.attention is None]
    if not missing:
        pytest.skip("every attention backend is available here")
    model = tokdrop.BertModel(config(attn_backend=missing[0])).eval()
    with pytest.raises(ValueError, match=rf"attention backend '{missing[0]}' is not available"):
        model(ids)


def test_unknown_backend_via_env_is_read_on_every_call(encoder, ids, monkeypatch):
    """TOKDROP_ATTENTION wins over the config and is read again on every eager call."""
    monkeypatch.delenv(attention_module.ENV_VAR, raising=False)
    ref = encoder(ids).last_hidden_state
    monkeypatch.setenv("TOKDROP_ATTENTION", "bogus")
    with pytest.raises(ValueError, match=r"\$TOKDROP_ATTENTION='bogus' is not an attention backend"):
        encoder(ids)
    monkeypatch.setenv("TOKDROP_ATTENTION", "eager")
    assert attention_module.resolve_backend("sdpa", "cpu").name == "eager"
    assert torch.allclose(encoder(ids).last_hidden_state, ref, atol=1e-5)
    monkeypatch.setenv("TOKDROP_ATTENTION", "nonsense")
    with pytest.raises(ValueError, match=r"\$TOKDROP_ATTENTION='nonsense'"):
        encoder(ids)
    with pytest.raises(ValueError, match=r"\$TOKDROP_ATTENTION='nonsense'"):
        attention_module.resolve_backend("sdpa", "cpu")
    monkeypatch.delenv("TOKDROP_ATTENTION")
    assert attention_module.resolve_backend("sdpa", "cpu").name == "sdpa"
    assert torch.equal(encoder(ids).last_hidden_state, ref)


def test_env_backend_overrides_a_valid_config(ids, monkeypatch):
    model = tokdrop.BertModel(config(attn_backend="sdpa")).eval()
    monkeypatch.setenv("TOKDROP_ATTENTION", "bogus")
    with pytest.raises(ValueError, match=r"'bogus'"):
        model(ids)


def test_env_backend_is_used(encoder, ids, monkeypatch):
    """The backend the env var names is the one that runs."""
    calls = []
    eager = attention_module._REGISTRY["eager"]

    def spy(*args, **kwargs):
        calls.append(1)
        return eager.attention(*args, **kwargs)

    monkeypatch.setitem(attention_module._REGISTRY, "eager", dataclasses.replace(eager, attention=spy))
    monkeypatch.setenv("TOKDROP_ATTENTION", "eager")
    encoder(ids)
    assert len(calls) == BASE["num_hidden_layers"]
    monkeypatch.setenv("TOKDROP_ATTENTION", "sdpa")
    encoder(ids)
    assert len(calls) == BASE["num_hidden_layers"]
