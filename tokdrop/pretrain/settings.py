"""The settings of a pretraining run: one schema (`Settings`) that is at once the flags, the
config-file keys and the validation, read from defaults, --preset, --config (TOML or YAML) and flags.

Nothing here imports torch, so that building the parser (`--help`) stays fast."""

from __future__ import annotations

import argparse
import dataclasses
import math
import operator
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokdrop.presets import MODES, PRESETS

# The size settings and the BertConfig fields they set.
SIZE_FIELDS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "intermediate": "intermediate_size",
}


# Bounds a setting may declare: (name, test, how the message says it).
_BOUNDS = (
    ("minimum", operator.ge, ">="),
    ("above", operator.gt, ">"),
    ("maximum", operator.le, "<="),
    ("below", operator.lt, "<"),
)
# A token-dropping mode drops from a middle layer and runs the last layer on every token again.
_DROPPING_MODES = ("token_drop", "random_ltd")


def _setting(default: Any, help: str, kind: str, *, choices: Sequence[str] | None = None, **bounds: float) -> Any:
    unknown = bounds.keys() - {name for name, _, _ in _BOUNDS}
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}")
    metadata = {"help": help, "kind": kind, "choices": choices} | {name: bounds.get(name) for name, _, _ in _BOUNDS}
    return field(default=default, metadata=metadata)


@dataclass
class Settings:
    """Everything a run is configured by; each field is a flag and a config-file key."""

    # model
    preset: str = _setting("base", "model size", "str", choices=tuple(PRESETS))
    init_from: str | None = _setting(
        None,
        "continue pretraining a Hugging Face BERT checkpoint directory (config.json, weights, tokenizer): its "
        "sizes replace the preset's, its tokenizer tokenises the data, a missing MLM head starts fresh",
        "path",
    )
    layers: int | None = _setting(None, "encoder layers (default: the preset's)", "int", minimum=1)
    hidden: int | None = _setting(None, "hidden size (default: the preset's)", "int", minimum=1)
    heads: int | None = _setting(None, "attention heads (default: the preset's)", "int", minimum=1)
    intermediate: int | None = _setting(None, "feed-forward size (default: the preset's)", "int", minimum=1)
    dropout: float = _setting(0.1, "hidden and attention dropout", "float", minimum=0, below=1)
    max_position_embeddings: int = _setting(512, "position embeddings (>= --seq-len)", "int", minimum=1)
    mode: str = _setting("token_drop", "training mode", "str", choices=MODES)
    keep: float | int = _setting(0.5, "token_drop: kept fraction (float) or count (int) of the middle layers", "number")
    full_layers: int | None = _setting(
        None, "narrow: full layers before the narrow ones (default: 2, at most --layers - 1)", "int", minimum=0
    )
    ltd_start: float | int = _setting(0.25, "random_ltd: kept fraction or count at step 0", "number")
    ltd_ramp_steps: int | None = _setting(
        None, "random_ltd: steps until every token is kept (default: half of --steps)", "int", minimum=1
    )
    ltd_granularity: int = _setting(
        16, "random_ltd: the kept count grows in steps of this many tokens", "int", minimum=1
    )
    ltd_same_across_ranks: bool = _setting(
        False,
        "random_ltd: every data-parallel rank draws the same subsets (its dropout masks then agree too); "
        "default: each rank its own, as in DeepSpeed",
        "bool",
    )
    consistency_every: int = _setting(
        0,
        "token_drop: every N-th step is a ScTD consistency step (the full pass too, and two KL constraints "
        "between the passes); 0 = never",
        "int",
        minimum=0,
    )
    consistency_weight: float = _setting(0.05, "token_drop: weight of ScTD's KL constraints", "float", minimum=0)
    # data
    data: list[str] | None = _setting(
        None, "text files, directories of them, or one shard directory (required: here or in --config)", "paths"
    )
    shard_dir: str | None = _setting(None, "where text data is tokenised to (default: OUT/shards)", "path")
    tokenizer: str | None = _setting(
        None, "tokenizer.json or vocab.txt (default: train a WordPiece one on the data)", "path"
    )
    vocab_size: int = _setting(30522, "vocabulary of a trained tokenizer", "int", minimum=6)
    seq_len: int = _setting(128, "tokens per sequence", "int", minimum=3)
    mlm_probability: float = _setting(0.15, "fraction of tokens predicted", "float", above=0, maximum=1)
    num_workers: int = _setting(2, "DataLoader worker processes per rank", "int", minimum=0)
    # optimisation
    steps: int = _setting(1_000_000, "training steps (one skipped for a non-finite loss counts)", "int", minimum=1)
    batch_size: int = _setting(32, "sequences per micro-batch and rank", "int", minimum=1)
    grad_accum: int = _setting(1, "micro-batches per step", "int", minimum=1)
    lr: float = _setting(1e-4, "peak AdamW learning rate", "float", above=0)
    warmup_steps: int | None = _setting(
        None,
        "linear warm-up steps, then linear decay to 0 (default: a tenth of --steps, at most 10000)",
        "int",
        minimum=0,
    )
    weight_decay: float = _setting(0.01, "AdamW weight decay (not on biases and LayerNorm)", "float", minimum=0)
    max_grad_norm: float = _setting(1.0, "gradient clipping norm; 0 = off", "float", minimum=0)
    precision: str = _setting(
        "auto", "autocast dtype; auto = bf16 on CUDA, fp32 on CPU", "str", choices=("auto", "fp32", "bf16", "fp16")
    )
    compile: bool = _setting(False, "torch.compile the model", "bool")
    parallel: str = _setting("ddp", "data parallelism under torchrun", "str", choices=("ddp", "fsdp2"))
    seed: int = _setting(0, "seed of weights, data order, masking and dropout", "int", minimum=0, below=2**64)
    # run
    out: str = _setting("pretrain_out", "output directory", "path")
    save_every: int = _setting(1000, "checkpoint every N steps", "int", minimum=1)
    keep_last: int = _setting(3, "checkpoints kept", "int", minimum=1)
    log_every: int = _setting(10, "metrics line every N steps", "int", minimum=1)
    max_bad_steps: int = _setting(10, "stop after this many non-finite losses in a row", "int", minimum=1)
    tensorboard: bool = _setting(False, "also log to OUT/tensorboard (needs the tensorboard package)", "bool")
    collective_timeout: int = _setting(
        600,
        "seconds a rank waits for the others before the run stops, naming the ranks that are missing",
        "int",
        minimum=1,
    )

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value, meta = getattr(self, spec.name), spec.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise ValueError(f"{spec.name} must be one of {meta['choices']}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{spec.name} must be a finite number, got {value!r}")
            for bound, holds, says in _BOUNDS:
                if meta[bound] is not None and value is not None and not holds(value, meta[bound]):
                    raise ValueError(f"{spec.name} must be {says} {meta[bound]}, got {value!r}")
        sizes = PRESETS[self.preset] if self.init_from is None else self._checkpoint_sizes()
        for name, field_name in SIZE_FIELDS.items():
            if getattr(self, name) is None:
                setattr(self, name, sizes[field_name])
            elif self.init_from is not None and getattr(self, name) != sizes[field_name]:
                raise ValueError(
                    f"{name}={getattr(self, name)} differs from the {field_name}={sizes[field_name]} of the "
                    f"--init-from checkpoint {self.init_from}"
                )
        if self.warmup_steps is None:  # BERT's 10,000 steps, scaled down for shorter runs
            self.warmup_steps = min(10_000, self.steps // 10)
        if self.full_layers is None:  # NarrowBERT's 2, leaving at least one narrow layer
            self.full_layers = min(2, self.layers - 1)
        if self.mode == "narrow" and self.full_layers >= self.layers:
            raise ValueError(
                f"full_layers={self.full_layers} leaves no narrow layer in layers={self.layers}: "
                f"lower --full-layers below --layers"
            )
        if self.mode in _DROPPING_MODES and self.layers < 2:
            raise ValueError(
                f"mode={self.mode!r} needs layers >= 2 (a dropping layer and a last full one), got layers={self.layers}"
            )
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be less than steps={self.steps}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len={self.seq_len} exceeds max_position_embeddings={self.max_position_embeddings}")
        if self.ltd_same_across_ranks and self.mode != "random_ltd":
            raise ValueError(f"ltd_same_across_ranks needs mode random_ltd, got mode={self.mode!r}")
        if self.consistency_every and self.mode != "token_drop":
            raise ValueError(
                f"consistency_every={self.consistency_every} needs mode token_drop, got mode={self.mode!r}"
            )
        # The kept-length rules live with the model (which imports torch); validating is part of a run.
        from tokdrop.layers import max_kept

        if self.mode == "token_drop":
            max_kept(self.seq_len, self.keep)  # raises, naming `keep`, unless a fraction or count <= seq_len
        if self.mode == "random_ltd":
            start = max_kept(self.seq_len, self.ltd_start)
            if start >= self.seq_len:
                raise ValueError(f"ltd_start={self.ltd_start!r} keeps all {self.seq_len} tokens from the start")

    def _checkpoint_sizes(self) -> dict[str, Any]:
        """The sizes in the config.json of --init-from (read without torch), and its tokenizer as
        the data's unless --tokenizer says otherwise."""
        import json

        directory = Path(self.init_from)
        path = directory / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(
                f"init_from={self.init_from!r} is not a checkpoint directory: cannot read {path}: {err}"
            ) from None
        missing = [f for f in (*SIZE_FIELDS.values(), "max_position_embeddings") if not isinstance(raw.get(f), int)]
        if missing:
            raise ValueError(f"{path} lacks the BERT sizes {missing}")
        if self.tokenizer is None:
            self.tokenizer = str(directory)
        self.max_position_embeddings = raw["max_position_embeddings"]
        return raw


SETTINGS = {spec.name: spec for spec in dataclasses.fields(Settings)}
_GROUP_STARTS = {"preset": "model", "data": "data", "steps": "optimisation", "out": "run"}
# Settings that a resumed run may change; the others must match the checkpoint's.
RESUMABLE_CHANGES = frozenset(
    {
        "data",
        "shard_dir",
        "tokenizer",
        "num_workers",
        "compile",
        "out",
        "save_every",
        "keep_last",
        "log_every",
        "max_bad_steps",
        "tensorboard",
        "collective_timeout",
    }
)


def _check_kind(name: str, kind: str, value: Any) -> Any:
    """A config-file value as the setting's kind, or a ValueError naming the setting."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "paths" and isinstance(value, str):
        value = [value]
    valid = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": number,
        "number": number,
        "str": isinstance(value, str),
        "path": isinstance(value, str),
        "bool": isinstance(value, bool),
        "paths": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not valid:
        expected = {
            "paths": "a path or a list of paths",
            "number": "a number",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
        }.get(kind, "a string")
        raise ValueError(f"setting {name!r} must be {expected}, got {value!r}")
    return float(value) if kind == "float" else value


def path_problem(path: Path, expected: str) -> str:
    """Why `path` is not what a setting `expected` ("a text file", ...), as the end of a sentence
    that starts with the path: "does not exist", "is a FIFO (named pipe), not a text file", ..."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return f"cannot be read: {err.strerror}"
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISREG: "a regular file",
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    kind = next((name for is_kind, name in kinds.items() if is_kind(mode)), "a special file")
    return f"is {kind}, not {expected}"


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML or YAML file, tables flattened; paths resolved against the file's folder."""
    if not path.is_file():  # reading a FIFO would wait for a writer forever
        raise ValueError(f"config file {path} {path_problem(path, 'a TOML or YAML file')}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read config file {path}: {err}") from err
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError as err:
                raise ValueError(f"reading {path} needs PyYAML (pip install pyyaml), or use TOML") from err
            raw = yaml.safe_load(text) or {}
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            raw = tomllib.loads(text)
    except ValueError as err:  # TOMLDecodeError and YAMLError's message both say where
        raise ValueError(f"config file {path} is not valid: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a table of settings, got {type(raw).__name__}")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        entries = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in entries:
            name = name.replace("-", "_")
            if name not in SETTINGS:
                raise ValueError(f"config file {path}: {name!r} is not a setting; known: {sorted(SETTINGS)}")
            kind = SETTINGS[name].metadata["kind"]
            item = _check_kind(name, kind, item)
            if kind == "path":
                item = str(path.parent / item)
            elif kind == "paths":
                item = [str(path.parent / p) for p in item]
            flat[name] = item
    return flat


def _number(text: str) -> int | float:
    """argparse type of `keep`-like flags: "3" is a count, "0.5" a fraction."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML (or YAML) file of settings; flags override it")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT, or from the newest one in OUT/checkpoints (starting afresh if there is none)",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="tokenise the data into shards and stop (run it before a large torchrun job)",
    )
    types = {"int": int, "float": float, "number": _number, "str": str, "path": str, "paths": str}
    group = parser
    for spec in dataclasses.fields(Settings):
        if spec.name in _GROUP_STARTS:
            group = parser.add_argument_group(_GROUP_STARTS[spec.name])
        meta = spec.metadata
        # No argparse default: a flag that is not given must not override the config file.
        help = meta["help"] if spec.default is None else f"{meta['help']} (default: {spec.default})"
        options: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help}
        if meta["kind"] == "bool":
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(type=types[meta["kind"]], choices=meta["choices"])
            if meta["kind"] == "paths":
                options["nargs"] = "+"
        group.add_argument("--" + spec.name.replace("_", "-"), **options)


def settings_from_arguments(args: argparse.Namespace) -> Settings:
    values = read_config_file(args.config) if args.config is not None else {}
    values |= {name: getattr(args, name) for name in SETTINGS if hasattr(args, name)}
    return Settings(**values)


__all__ = ["RESUMABLE_CHANGES", "SETTINGS", "Settings", "add_arguments", "read_config_file", "settings_from_arguments"]
