"""Fine-tune a BERT checkpoint for sequence classification on a CSV, TSV or JSONL file.

The checkpoint is a tokdrop or Hugging Face BERT directory: config.json, model.safetensors (or
pytorch_model.bin) and tokenizer.json (or vocab.txt). Each example is a text (or a text pair) and a
label, read from the named columns. Fine-tuning runs the full encoder, also for a checkpoint
pretrained with token dropping; a NarrowBERT checkpoint fine-tunes with [CLS] as the only query of
its narrow layers, as in the paper.

Validation runs after every epoch; training stops when --metric has not improved for --patience
epochs, and the best epoch's weights are kept. Without --validation, a fixed fraction of the
training rows (chosen by a hash of their text, so the same rows every run) is held out.

Writes into --out: results.json (settings, per-epoch history, accuracy and macro-F1 on validation
and --test) and model/ (Hugging Face layout with the label names, and the tokenizer).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokdrop.cli import HelpFormatter, format_table, positive_int

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}  # suffix -> CSV delimiter
METRICS = ("accuracy", "macro_f1")


def add_command(subcommands: argparse._SubParsersAction) -> None:
    """Add the `finetune` subcommand to the `tokdrop` command."""
    parser = subcommands.add_parser(
        "finetune",
        help="fine-tune a checkpoint for sequence classification on a CSV / JSONL file",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _open_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--model", type=Path, metavar="DIR", required=True, help="checkpoint directory to start from")
    data.add_argument(
        "--train", type=Path, metavar="FILE", required=True, help="training examples (.csv, .tsv or .jsonl)"
    )
    data.add_argument(
        "--validation", type=Path, metavar="FILE", default=None, help="validation examples (default: split --train)"
    )
    data.add_argument(
        "--validation-fraction",
        type=_open_fraction,
        default=0.1,
        help="fraction of --train held out for validation when --validation is not given",
    )
    data.add_argument(
        "--test", type=Path, metavar="FILE", default=None, help="test examples, scored once with the best model"
    )
    data.add_argument("--text-column", metavar="NAME", default="text", help="column of the (first) text")
    data.add_argument(
        "--text-pair-column", metavar="NAME", default=None, help="column of the second text of a pair task"
    )
    data.add_argument("--label-column", metavar="NAME", default="label", help="column of the label")
    data.add_argument(
        "--labels",
        default=None,
        metavar="A,B,...",
        help="comma-separated label set, in the order of the class ids (default: the training labels, sorted)",
    )
    data.add_argument("--max-length", type=positive_int, default=128, help="tokens per example, after truncation")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=positive_int, default=10, help="most epochs to train")
    training.add_argument("--patience", type=positive_int, default=3, help="epochs without improvement before stopping")
    training.add_argument("--metric", choices=METRICS, default="accuracy", help="validation metric for early stopping")
    training.add_argument("--batch-size", type=positive_int, default=32, help="examples per step")
    training.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate")
    training.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases, norms)")
    training.add_argument("--warmup", type=_probability, default=0.1, help="fraction of the steps spent warming up")
    training.add_argument("--dropout", type=_probability, default=0.1, help="hidden, attention and classifier dropout")
    training.add_argument("--seed", type=int, default=0, help="seed of the classifier's weights, order and dropout")
    training.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--out", type=Path, metavar="DIR", default=Path("finetune_out"), help="output directory")


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: str


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV / TSV file (with a header) or a JSONL file (one object a line)."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown file type {suffix!r}; expected one of {sorted(FORMATS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often start CSV with a BOM
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if FORMATS[suffix] is not None:
        reader = csv.DictReader(text.splitlines(), delimiter=FORMATS[suffix])
        return [(reader.line_num, row) for row in reader]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not JSON: {err}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} must be a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def read_examples(path: Path, text_column: str, text_pair_column: str | None, label_column: str) -> list[Example]:
    """The examples of a data file; a missing column or an empty value is an error naming the line."""
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no examples")
    columns = [c for c in (text_column, text_pair_column, label_column) if c is not None]
    examples = []
    for number, row in rows:
        missing = [c for c in columns if c not in row or row[c] is None]
        if missing:
            raise ValueError(
                f"{path} line {number} lacks the column(s) {missing} (it has {[k for k in row if k is not None]}); "
                f"choose them with --text-column, --text-pair-column and --label-column"
            )
        texts = [row[c] for c in columns[:-1]]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"{path} line {number}: the text columns {columns[:-1]} must hold non-empty text")
        label = row[label_column]
        if isinstance(label, (dict, list)) or str(label).strip() == "":
            raise ValueError(f"{path} line {number}: label {label!r} is not a class name")
        examples.append(Example(texts[0], texts[1] if text_pair_column else None, str(label).strip()))
    return examples


def _holdout_split(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Rows whose text hashes into the lowest `fraction` of CRC-32 go to validation: the same rows
    on every run, and repeated texts on one side only."""

    def is_validation(example: Example) -> bool:
        key = example.text if example.text_pair is None else f"{example.text}\0{example.text_pair}"
        return zlib.crc32(key.encode()) < fraction * 2**32

    train = [e for e in examples if not is_validation(e)]
    validation = [e for e in examples if is_validation(e)]
    if not train or not validation:
        raise ValueError(
            f"--validation-fraction {fraction} splits {len(examples)} examples into {len(train)} for training "
            f"and {len(validation)} for validation; give --validation FILE or another fraction"
        )
    return train, validation


def _label_order(label: str) -> tuple[bool, int, str]:
    """Numeric labels by value ("2" before "10"), then the others alphabetically."""
    return (not label.isdigit(), int(label) if label.isdigit() else 0, label)


def resolve_labels(given: str | None, splits: dict[str, tuple[Path, list[Example]]]) -> tuple[str, ...]:
    """The label set, in class-id order: ``given`` (comma-separated) or the sorted training labels.
    Every label of every split must belong to it, and it must have two classes at least."""
    train_path, train = splits["train"]
    if given is not None:
        labels = tuple(label.strip() for label in given.split(","))
        duplicates = sorted(label for label, count in Counter(labels).items() if count > 1)
        if "" in labels or duplicates:
            raise ValueError(f"--labels {given!r} must name distinct, non-empty labels")
        if len(labels) < 2:
            raise ValueError(f"--labels {given!r} names one class; classification needs at least two")
    else:
        labels = tuple(sorted({e.label for e in train}, key=_label_order))
        if len(labels) < 2:
            raise ValueError(f"{train_path} holds only one class ({labels[0]!r}); classification needs at least two")
    known = set(labels)
    for name, (path, examples) in splits.items():
        unknown = sorted({e.label for e in examples} - known)
        if unknown:
            source = "--labels" if given is not None else f"the training labels of {train_path}"
            raise ValueError(f"{path} ({name}) has labels {unknown} that are not in {source}: {list(labels)}")
    return labels


# -------------------------------------------------------------------------------------------- metrics


def classification_scores(predictions: Sequence[int], targets: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1; the macro average is over the classes that occur in the targets or
    the predictions (a class in neither has no defined F1)."""
    if len(predictions) != len(targets) or not targets:
        raise ValueError(f"need as many predictions as targets, at least one: {len(predictions)} vs {len(targets)}")
    pairs = list(zip(predictions, targets, strict=True))
    f1s = []
    for c in sorted(set(predictions) | set(targets)):
        true_positive = sum(p == t == c for p, t in pairs)
        predicted, actual = sum(p == c for p in predictions), sum(t == c for t in targets)
        f1s.append(2 * true_positive / (predicted + actual))
    accuracy = sum(p == t for p, t in pairs) / len(pairs)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


# ------------------------------------------------------------------------------------------- training


def _save_classifier(model, directory: Path, tokenizer_json: str) -> None:
    """The model in the Hugging Face layout (its config names the labels) and its tokenizer."""
    from tokdrop.files import write_atomically

    model.save_pretrained(directory)
    write_atomically(directory / "tokenizer.json", lambda path: Path(path).write_text(tokenizer_json))


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from tokdrop.data import load_tokenizer
    from tokdrop.files import write_atomically
    from tokdrop.hf_checkpoint import read_config
    from tokdrop.model import BertForSequenceClassification
    from tokdrop.training import make_optimizer, train_step, warmup_linear_decay

    started = time.perf_counter()
    files = {"train": args.train, "validation": args.validation, "test": args.test}
    columns = (args.text_column, args.text_pair_column, args.label_column)
    examples = {name: read_examples(path, *columns) for name, path in files.items() if path is not None}
    labels = resolve_labels(args.labels, {name: (files[name], rows) for name, rows in examples.items()})
    label_ids = {label: i for i, label in enumerate(labels)}

    config = read_config(args.model)
    if args.max_length > config.max_position_embeddings:
        raise ValueError(
            f"--max-length {args.max_length} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings})"
        )
    tokenizer = load_tokenizer(args.model)
    tokenizer_json = tokenizer.to_str()  # saved as it came, without the settings below
    specials = tokenizer.num_special_tokens_to_add(is_pair=args.text_pair_column is not None)
    if args.max_length < specials + 2:
        raise ValueError(f"--max-length {args.max_length} leaves no room for text beside {specials} special tokens")
    tokenizer.enable_truncation(args.max_length)
    tokenizer.no_padding()  # batches are padded to their longest row instead
    pad_id = tokenizer.token_to_id("[PAD]")
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(
            f"the tokenizer of {args.model} has {tokenizer.get_vocab_size()} tokens, "
            f"more than the model's vocab_size ({config.vocab_size})"
        )

    if args.validation is None:
        examples["train"], examples["validation"] = _holdout_split(examples["train"], args.validation_fraction)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)  # the fresh classifier's weights, then dropout
    with warnings.catch_warnings(record=True) as notes:  # e.g. "classifier weights freshly initialised"
        warnings.simplefilter("always")
        model = BertForSequenceClassification.from_pretrained(
            args.model,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            token_drop=None,  # pretraining modes: the saved model is the plain full encoder
            random_ltd=None,
            hidden_dropout_prob=args.dropout,
            attention_probs_dropout_prob=args.dropout,
            classifier_dropout=args.dropout,
        ).to(device)
    for note in notes:
        print(f"note: {note.message}", file=sys.stderr)

    def encode(split: list[Example]) -> list[dict[str, torch.Tensor]]:
        inputs = [e.text if e.text_pair is None else (e.text, e.text_pair) for e in split]
        encodings = tokenizer.encode_batch(inputs)
        rows = []
        for example, encoding in zip(split, encodings, strict=True):
            rows.append(
                {
                    "input_ids": torch.tensor(encoding.ids),
                    "token_type_ids": torch.tensor(encoding.type_ids),
                    "labels": torch.tensor(label_ids[example.label]),
                }
            )
        return rows

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad a batch to its longest row."""
        ids = torch.nn.utils.rnn.pad_sequence([r["input_ids"] for r in rows], batch_first=True, padding_value=pad_id)
        types = torch.nn.utils.rnn.pad_sequence([r["token_type_ids"] for r in rows], batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r["input_ids"]) for r in rows], batch_first=True)
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        batch["labels"] = torch.stack([r["labels"] for r in rows])
        return {key: value.to(device) for key, value in batch.items()}

    @torch.no_grad()
    def score(rows: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        model.eval()
        predictions = []
        for start in range(0, len(rows), args.batch_size):
            batch = collate(rows[start : start + args.batch_size])
            batch.pop("labels")
            predictions += model(**batch).logits.argmax(dim=-1).tolist()
        model.train()
        return classification_scores(predictions, [int(r["labels"]) for r in rows])

    encoded = {name: encode(rows) for name, rows in examples.items()}
    steps_per_epoch = math.ceil(len(encoded["train"]) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = warmup_linear_decay(optimizer, total_steps, warmup_steps=round(args.warmup * total_steps))
    order = torch.Generator().manual_seed(args.seed)

    history: list[dict[str, float]] = []
    best: dict | None = None
    best_state: dict[str, torch.Tensor] = {}
    train_seconds = 0.0
    model.train()
    with tqdm(total=total_steps, desc="fine-tuning", unit="step", dynamic_ncols=True) as progress:
        for epoch in range(1, args.epochs + 1):
            losses = []
            for indices in torch.randperm(len(encoded["train"]), generator=order).split(args.batch_size):
                batch = collate([encoded["train"][i] for i in indices.tolist()])
                step = train_step(model, optimizer, batch, scheduler)
                losses.append(step.loss)
                train_seconds += step.seconds
                progress.update()
                progress.set_postfix(epoch=epoch, loss=f"{step.loss:.3f}")
            scores = score(encoded["validation"])
            history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), **scores})
            if best is None or scores[args.metric] > best[args.metric]:
                best = history[-1]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            progress.set_postfix(epoch=epoch, **{f"val_{args.metric}": f"{scores[args.metric]:.3f}"})
            if epoch - best["epoch"] >= args.patience:
                break
        progress.total = progress.n  # an early stop ends the bar where training ended
        progress.refresh()

    model.load_state_dict(best_state)
    evaluated = {name: score(rows) for name, rows in encoded.items() if name != "train"}
    model_dir = args.out / "model"
    _save_classifier(model, model_dir, tokenizer_json)

    results = {
        "model": str(args.model),
        "files": {name: str(path) for name, path in files.items() if path is not None},
        "validation_fraction": None if args.validation is not None else args.validation_fraction,
        "labels": list(labels),
        "examples": {name: len(rows) for name, rows in examples.items()},
        "narrow": config.narrow is not None,
        "settings": {
            key: getattr(args, key)
            for key in ("epochs", "patience", "metric", "batch_size", "lr", "weight_decay", "warmup", "dropout")
        }
        | {"max_length": args.max_length, "seed": args.seed, "device": str(device)},
        "history": history,
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "stopped_early": len(history) < args.epochs,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        **{name: {"examples": len(encoded[name]), **scores} for name, scores in evaluated.items()},
        "model_dir": str(model_dir),
    }
    write_atomically(args.out / "results.json", lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    rows = [
        (name, str(len(encoded[name])), f"{s['accuracy']:.3f}", f"{s['macro_f1']:.3f}") for name, s in evaluated.items()
    ]
    print(format_table(("split", "examples", "accuracy", "macro-F1"), rows))
    stop = "stopped early" if results["stopped_early"] else "all epochs"
    print(
        f"best epoch {best['epoch']} of {len(history)} ({stop}), {train_seconds:.1f} s of training; "
        f"wrote {args.out}/results.json and the model to {model_dir}/"
    )
    return 0
