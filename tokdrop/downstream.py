"""Downstream classification tasks made from the held-out Python documentation of a corpus.

Only held-out documents are used, so a model pretrained on the corpus's training split has never
seen the text it is fine-tuned and tested on. Two tasks, each written as train / validation / test
JSONL files for ``tokdrop finetune``:

- ``topic``: which part of the standard library (a top-level package or module, or the pydoc
  topics) a paragraph comes from. The classes are the groups with the most held-out paragraphs,
  each cut to the size of the smallest so that the classes are balanced.
- ``next_sentence``: whether sentence B follows sentence A in A's document ("IsNext") or was drawn
  from another held-out document ("NotNext"), half and half, as in BERT's next-sentence prediction.

Everything is decided by the corpus and ``seed``. Command line: ``python -m tokdrop.downstream OUT``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from tokdrop.corpus import Corpus, Document, load_corpus

TOPIC = "topic"
NEXT_SENTENCE = "next_sentence"
IS_NEXT, NOT_NEXT = "IsNext", "NotNext"
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
# The dictionary is not documentation, and its alphabetical documents would make both tasks trivial.
_EXCLUDED_GROUPS = {"gcide"}
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")
_MIN_SENTENCE_WORDS = 4


@dataclass(frozen=True)
class TaskFiles:
    """Where a task's splits were written, and how `tokdrop finetune` reads them."""

    name: str
    train: Path
    validation: Path
    test: Path
    labels: tuple[str, ...]
    text_pair_column: str | None  # None for single-text tasks

    def finetune_arguments(self) -> list[str]:
        """The `tokdrop finetune` flags that select this task's files, columns and labels."""
        arguments = ["--train", str(self.train), "--validation", str(self.validation), "--test", str(self.test)]
        arguments += ["--labels", ",".join(self.labels)]
        if self.text_pair_column is not None:
            arguments += ["--text-pair-column", self.text_pair_column]
        return arguments


def _documentation(corpus: Corpus) -> list[Document]:
    return [d for d in corpus.held_out_documents if d.group not in _EXCLUDED_GROUPS]


def topic_examples(corpus: Corpus, num_classes: int = 6, seed: int = 0) -> list[dict[str, str]]:
    """Balanced ``{"text", "label", "document"}`` examples of the ``num_classes`` groups with the most
    held-out paragraphs (ties broken by name)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    by_group: dict[str, list[dict[str, str]]] = defaultdict(list)
    for document in _documentation(corpus):
        for paragraph in document.paragraphs:
            by_group[document.group].append({"text": paragraph, "label": document.group, "document": document.name})
    if len(by_group) < num_classes:
        raise ValueError(
            f"the held-out documentation holds {len(by_group)} groups ({sorted(by_group)}), "
            f"fewer than num_classes={num_classes}"
        )
    largest = sorted(by_group, key=lambda group: (-len(by_group[group]), group))[:num_classes]
    per_class = len(by_group[largest[-1]])
    rng = random.Random(seed)
    return [example for group in sorted(largest) for example in rng.sample(by_group[group], per_class)]


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph: breaks after ".", "!" or "?" before a capital, quote or bracket."""
    return _SENTENCE_BREAK.split(paragraph)


def next_sentence_examples(corpus: Corpus, seed: int = 0) -> list[dict[str, str]]:
    """``{"text", "text_pair", "label", "document"}`` pairs of consecutive sentences (of at least
    ``_MIN_SENTENCE_WORDS`` words) of each held-out document; in a random half of them, chosen by
    ``seed``, B is replaced by a sentence of another document."""
    sentences = [
        (document.name, sentence)
        for document in _documentation(corpus)
        for paragraph in document.paragraphs
        for sentence in split_sentences(paragraph)
        if len(sentence.split()) >= _MIN_SENTENCE_WORDS
    ]
    pairs = [(a, b) for a, b in pairwise(sentences) if a[0] == b[0]]
    if len({name for name, _ in sentences}) < 2 or not pairs:
        raise ValueError("the held-out documentation needs two documents with consecutive sentences")
    rng = random.Random(seed)
    replaced = set(rng.sample(range(len(pairs)), len(pairs) // 2))
    examples = []
    for index, ((document, first), (_, second)) in enumerate(pairs):
        label = IS_NEXT
        if index in replaced:
            label = NOT_NEXT
            other_document, second = rng.choice(sentences)
            while other_document == document:
                other_document, second = rng.choice(sentences)
        examples.append({"text": first, "text_pair": second, "label": label, "document": document})
    return examples


def _split_by_label(examples: Sequence[dict[str, str]], seed: int) -> dict[str, list[dict[str, str]]]:
    """Shuffle each label's examples and cut them by SPLIT_FRACTIONS, so every split keeps the balance."""
    by_label: dict[str, list[dict[str, str]]] = defaultdict(list)
    for example in examples:
        by_label[example["label"]].append(example)
    rng = random.Random(seed)
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    for label in sorted(by_label):
        members = list(by_label[label])
        rng.shuffle(members)
        train_end = round(SPLIT_FRACTIONS[0] * len(members))
        validation_end = train_end + round(SPLIT_FRACTIONS[1] * len(members))
        splits["train"] += members[:train_end]
        splits["validation"] += members[train_end:validation_end]
        splits["test"] += members[validation_end:]
    for members in splits.values():
        rng.shuffle(members)
    return splits


def _write_task(
    name: str, examples: list[dict[str, str]], out_dir: Path, seed: int, text_pair_column: str | None
) -> TaskFiles:
    directory = out_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, members in _split_by_label(examples, seed).items():
        paths[split] = directory / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(example, ensure_ascii=False) + "\n" for example in members))
    labels = tuple(sorted({example["label"] for example in examples}))
    return TaskFiles(name, paths["train"], paths["validation"], paths["test"], labels, text_pair_column)


def make_tasks(corpus: Corpus, out_dir: str | Path, seed: int = 0, num_classes: int = 6) -> dict[str, TaskFiles]:
    """Write both tasks under ``out_dir/<task>/{train,validation,test}.jsonl`` and a summary
    ``out_dir/tasks.json`` (files, labels, example counts per split and label); return the files."""
    out_dir = Path(out_dir)
    tasks = {
        TOPIC: _write_task(TOPIC, topic_examples(corpus, num_classes, seed), out_dir, seed, None),
        NEXT_SENTENCE: _write_task(NEXT_SENTENCE, next_sentence_examples(corpus, seed), out_dir, seed, "text_pair"),
    }
    summary = {"seed": seed, "tasks": {name: _describe(task) for name, task in tasks.items()}}
    (out_dir / "tasks.json").write_text(json.dumps(summary, indent=2) + "\n")
    return tasks


def _describe(task: TaskFiles) -> dict:
    counts = {}
    for split in SPLITS:
        labels = [json.loads(line)["label"] for line in getattr(task, split).read_text().splitlines()]
        counts[split] = {label: labels.count(label) for label in task.labels}
    return {
        "labels": list(task.labels),
        "text_pair_column": task.text_pair_column,
        "files": {split: str(getattr(task, split)) for split in SPLITS},
        "examples": {split: sum(counts[split].values()) for split in SPLITS},
        "examples_per_label": counts,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokdrop.downstream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="directory to write the task files into")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling, negatives and splits")
    parser.add_argument("--held-out-fraction", type=float, default=0.1, help="the corpus's held-out fraction")
    parser.add_argument("--topic-classes", type=int, default=6, help="classes of the topic task")
    args = parser.parse_args(argv)
    try:
        # The dictionary comes last in the corpus and adds no task text, so it need not be read:
        # the documentation's split is the same without it.
        corpus = load_corpus(args.held_out_fraction, sources=("pydoc_topics", "docstrings"))
        tasks = make_tasks(corpus, args.out, args.seed, args.topic_classes)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    summary = json.loads((args.out / "tasks.json").read_text())["tasks"]
    for name in tasks:
        print(f"{name}: {summary[name]['examples']} examples, labels {summary[name]['labels']}")
    print(f"wrote {args.out}/tasks.json and the task files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
