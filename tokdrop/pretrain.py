"""Masked-LM pretraining of a BERT encoder: dense, with token dropping, as NarrowBERT or with
random-LTD; on one process or on many through torchrun (DDP or FSDP2).

    tokdrop pretrain --config run.toml
    torchrun --nproc-per-node 8 -m tokdrop.pretrain --config run.toml --parallel fsdp2

Settings: the defaults, then the --preset model size, then the --config file (TOML; YAML with
PyYAML installed), then the flags; later wins. A config file names settings as the flags do
(dashes or underscores), at top level or in tables of any name ([model], [data], ...); paths in it
are relative to the file.

Data: text files, or directories of them, are tokenised once into memory-mapped shards under
--shard-dir (default OUT/shards), which later runs over the same files reuse; --data can also name
a shard directory. Empty and non-UTF-8 files are skipped with a warning and counted. Rows are
packed to --seq-len, visited in an order fixed by --seed, and split by rank: a step takes
--batch-size x --grad-accum x world-size sequences.

Output in --out: metrics.jsonl (every --log-every steps), checkpoints/step-N (every --save-every
steps, at the end, and on SIGTERM/SIGINT), model/ (save_pretrained + tokenizer.json) at the end.
--resume continues from the newest checkpoint exactly: the same batches, masks, dropout and
importance table as a run that was never stopped.

random_ltd and --full-every change the kept length from step to step. The length is a Python value
baked into each compiled graph, so with --compile every distinct length compiles once: at most
(seq_len - start) / --ltd-granularity + 2 graphs. Eager mode pays nothing.

Exit status: 0 done; 1 stopped by --max-bad-steps non-finite losses in a row or by a failed
checkpoint save (the newest intact checkpoint is named); 2 bad settings or data; 128+N stopped by
signal N after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tokdrop.cli import HelpFormatter
from tokdrop.config import MODES, BertConfig, TokenDropConfig, with_mode
from tokdrop.data import MaskingCollator, load_tokenizer, special_token_ids
from tokdrop.files import write_atomically
from tokdrop.layers import max_kept
from tokdrop.model import IGNORE_INDEX, BertForMaskedLM
from tokdrop.presets import PRESETS
from tokdrop.resume import (
    CheckpointSaveError,
    list_checkpoints,
    load_checkpoint,
    on_rank_zero,
    save_checkpoint,
    verify_checkpoint,
)
from tokdrop.shards import (
    MANIFEST,
    MaskedStream,
    PackedRows,
    ShardSet,
    build_shards,
    derive_seed,
    rank_batches,
    sources_of,
    text_files,
)
from tokdrop.training import build_model, make_optimizer, warmup_linear_decay

# The size settings and the BertConfig fields they set.
SIZE_FIELDS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "intermediate": "intermediate_size",
}


def _setting(
    default: Any, help: str, kind: str, *, choices: Sequence[str] | None = None, minimum: float | None = None
) -> Any:
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices, "minimum": minimum})


@dataclass
class Settings:
    """Everything a run is configured by; each field is a flag and a config-file key."""

    # model
    preset: str = _setting("base", "model size", "str", choices=tuple(PRESETS))
    layers: int | None = _setting(None, "encoder layers (default: the preset's)", "int", minimum=1)
    hidden: int | None = _setting(None, "hidden size (default: the preset's)", "int", minimum=1)
    heads: int | None = _setting(None, "attention heads (default: the preset's)", "int", minimum=1)
    intermediate: int | None = _setting(None, "feed-forward size (default: the preset's)", "int", minimum=1)
    dropout: float = _setting(0.1, "hidden and attention dropout", "float", minimum=0)
    max_position_embeddings: int = _setting(512, "position embeddings (>= --seq-len)", "int", minimum=1)
    mode: str = _setting("token_drop", "training mode", "str", choices=MODES)
    keep: float | int = _setting(0.5, "token_drop: kept fraction (float) or count (int) of the middle layers", "number")
    full_layers: int = _setting(2, "narrow: full layers before the narrow ones", "int", minimum=0)
    ltd_start: float | int = _setting(0.25, "random_ltd: kept fraction or count at step 0", "number")
    ltd_ramp_steps: int | None = _setting(
        None, "random_ltd: steps until every token is kept (default: half of --steps)", "int", minimum=1
    )
    ltd_granularity: int = _setting(
        16, "random_ltd: the kept count grows in steps of this many tokens", "int", minimum=1
    )
    full_every: int = _setting(
        0,
        "token_drop/random_ltd: every N-th step keeps every token (ScTD-style consistency); 0 = never",
        "int",
        minimum=0,
    )
    # data
    data: list[str] | None = _setting(None, "text files, directories of them, or one shard directory", "paths")
    shard_dir: str | None = _setting(None, "where text data is tokenised to (default: OUT/shards)", "path")
    tokenizer: str | None = _setting(
        None, "tokenizer.json or vocab.txt (default: train a WordPiece one on the data)", "path"
    )
    vocab_size: int = _setting(30522, "vocabulary of a trained tokenizer", "int", minimum=6)
    seq_len: int = _setting(128, "tokens per sequence", "int", minimum=3)
    mlm_probability: float = _setting(0.15, "fraction of tokens predicted", "float", minimum=0)
    num_workers: int = _setting(2, "DataLoader worker processes per rank", "int", minimum=0)
    # optimisation
    steps: int = _setting(1_000_000, "training steps (one skipped for a non-finite loss counts)", "int", minimum=1)
    batch_size: int = _setting(32, "sequences per micro-batch and rank", "int", minimum=1)
    grad_accum: int = _setting(1, "micro-batches per step", "int", minimum=1)
    lr: float = _setting(1e-4, "peak AdamW learning rate", "float", minimum=0)
    warmup_steps: int = _setting(10_000, "linear warm-up steps, then linear decay to 0", "int", minimum=0)
    weight_decay: float = _setting(0.01, "AdamW weight decay (not on biases and LayerNorm)", "float", minimum=0)
    max_grad_norm: float = _setting(1.0, "gradient clipping norm; 0 = off", "float", minimum=0)
    precision: str = _setting(
        "auto", "autocast dtype; auto = bf16 on CUDA, fp32 on CPU", "str", choices=("auto", "fp32", "bf16", "fp16")
    )
    compile: bool = _setting(False, "torch.compile the model", "bool")
    parallel: str = _setting("ddp", "data parallelism under torchrun", "str", choices=("ddp", "fsdp2"))
    seed: int = _setting(0, "seed of weights, data order, masking and dropout", "int")
    # run
    out: str = _setting("pretrain_out", "output directory", "path")
    save_every: int = _setting(1000, "checkpoint every N steps", "int", minimum=1)
    keep_last: int = _setting(3, "checkpoints kept", "int", minimum=1)
    log_every: int = _setting(10, "metrics line every N steps", "int", minimum=1)
    max_bad_steps: int = _setting(10, "stop after this many non-finite losses in a row", "int", minimum=1)
    tensorboard: bool = _setting(False, "also log to OUT/tensorboard (needs the tensorboard package)", "bool")

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value, meta = getattr(self, spec.name), spec.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise ValueError(f"{spec.name} must be one of {meta['choices']}, got {value!r}")
            if meta["minimum"] is not None and value is not None and value < meta["minimum"]:
                raise ValueError(f"{spec.name} must be >= {meta['minimum']}, got {value!r}")
        for name, field_name in SIZE_FIELDS.items():
            if getattr(self, name) is None:
                setattr(self, name, PRESETS[self.preset][field_name])
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be less than steps={self.steps}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len={self.seq_len} exceeds max_position_embeddings={self.max_position_embeddings}")
        if self.full_every and self.mode not in ("token_drop", "random_ltd"):
            raise ValueError(
                f"full_every={self.full_every} needs mode token_drop or random_ltd, got mode={self.mode!r}"
            )
        if self.mode == "token_drop":
            max_kept(self.seq_len, self.keep)  # raises, naming `keep`, unless a fraction or count <= seq_len
        if self.mode == "random_ltd":
            start = max_kept(self.seq_len, self.ltd_start)
            if start >= self.seq_len:
                raise ValueError(f"ltd_start={self.ltd_start!r} keeps all {self.seq_len} tokens from the start")

    @property
    def ramp_steps(self) -> int:
        return self.ltd_ramp_steps or max(1, self.steps // 2)


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
    }
)


# --------------------------------------------------------------------------------------- settings


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


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML or YAML file, tables flattened; paths resolved against the file's folder."""
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


def add_command(subcommands: argparse._SubParsersAction) -> None:
    """Add the `pretrain` subcommand to the `tokdrop` command."""
    parser = subcommands.add_parser(
        "pretrain",
        help="pretrain a BERT encoder (dense, token dropping, NarrowBERT, random-LTD)",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


# ---------------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    settings = settings_from_arguments(args)
    rank, world_size, device = _init_distributed()
    try:
        precision = _precision(settings.precision, device)
        shards = _prepare_data(settings)
        if args.prepare_only:
            if rank == 0:
                print(f"{shards.directory}: {shards.total_tokens} tokens in {len(shards.counts)} shards")
            return 0
        return _Trainer(settings, shards, rank, world_size, device, precision, args.resume).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _init_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun job when there is one: NCCL on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world_size, device


def _prepare_data(settings: Settings) -> ShardSet:
    """The shard directory of --data, tokenising text on rank 0 the first time."""
    if not settings.data:
        raise ValueError("no data: set --data to text files, directories of them, or a shard directory")
    if len(settings.data) == 1 and (Path(settings.data[0]) / MANIFEST).is_file():
        return ShardSet(settings.data[0])
    directory = Path(settings.shard_dir or Path(settings.out) / "shards")

    def tokenise() -> None:
        files = text_files(settings.data)
        sources = sources_of(files, settings.tokenizer, settings.vocab_size)
        if not directory.exists():
            tokenizer = load_tokenizer(settings.tokenizer) if settings.tokenizer else None
            build_shards(files, directory, tokenizer=tokenizer, vocab_size=settings.vocab_size, sources=sources)
        elif ShardSet(directory).sources != sources:
            raise ValueError(
                f"shard directory {directory} was made from other files or another tokenizer; "
                f"remove it or choose another --shard-dir"
            )

    on_rank_zero(tokenise)
    return ShardSet(directory)


def model_config(settings: Settings, vocab_size: int, specials: Any, predictions: int) -> BertConfig:
    """The BertConfig of a run: its size, and its mode with the paper's defaults."""
    base = BertConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        intermediate_size=settings.intermediate,
        max_position_embeddings=settings.max_position_embeddings,
        pad_token_id=specials.pad,
        hidden_dropout_prob=settings.dropout,
        attention_probs_dropout_prob=settings.dropout,
        max_predictions_per_seq=predictions,
    )
    allow_ids = (specials.cls, specials.sep, specials.mask, specials.unk)
    if settings.mode == "random_ltd":
        drop = TokenDropConfig(keep=kept_length(settings, 0), importance="random", allow_ids=allow_ids)
        return dataclasses.replace(base, token_drop=drop)
    return with_mode(base, settings.mode, keep=settings.keep, full_layers=settings.full_layers, allow_ids=allow_ids)


def kept_length(settings: Settings, step: int) -> float | int:
    """`keep` of the token-dropping layers at step `step` (0-based): --keep for token_drop; for
    random_ltd a count growing linearly from --ltd-start to --seq-len over --ltd-ramp-steps in
    multiples of --ltd-granularity (DeepSpeed's fixed_linear schedule); --seq-len on full steps."""
    seq_len = settings.seq_len
    if settings.full_every and (step + 1) % settings.full_every == 0:
        return seq_len
    if settings.mode != "random_ltd":
        return settings.keep
    start = max_kept(seq_len, settings.ltd_start)
    if step >= settings.ramp_steps:
        return seq_len
    grown = (seq_len - start) * step // settings.ramp_steps
    return start + grown - grown % settings.ltd_granularity


class _StopSignals:
    """Turns the first SIGTERM/SIGINT into a request to checkpoint and stop at the end of the step;
    the handlers are then restored, so a second signal acts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which stops between steps."""
    for sig in _StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class _Trainer:
    """One rank's part of a run: model, optimizer, data stream, logs and checkpoints."""

    def __init__(
        self,
        settings: Settings,
        shards: ShardSet,
        rank: int,
        world_size: int,
        device: torch.device,
        precision: torch.dtype,
        resume: str | None,
    ) -> None:
        self.settings, self.shards, self.precision = settings, shards, precision
        self.rank, self.world_size, self.device = rank, world_size, device
        self.out = Path(settings.out)
        self.root = self.out / "checkpoints"
        tokenizer = shards.tokenizer()
        specials = special_token_ids(tokenizer)
        self.collator = MaskingCollator.from_tokenizer(tokenizer, mlm_probability=settings.mlm_probability)
        self.config = model_config(
            settings, tokenizer.get_vocab_size(), specials, self.collator.num_predictions(settings.seq_len)
        )
        self.rows = PackedRows(shards, settings.seq_len, specials.cls, specials.sep)
        self.global_batch = settings.batch_size * settings.grad_accum * world_size

        self.raw = build_model(self.config, settings.seed, device)  # the same weights on every rank
        self.model = self.parallel = _parallelize(self.raw, settings.parallel, world_size, device)
        if settings.compile:
            # Each kept length is one graph (see the module docstring); let them all stay compiled.
            torch._dynamo.config.recompile_limit = max(
                torch._dynamo.config.recompile_limit, settings.seq_len // settings.ltd_granularity + 2
            )
            self.model = torch.compile(self.parallel)
        self.optimizer = make_optimizer(self.raw, settings.lr, settings.weight_decay)
        self.scheduler = warmup_linear_decay(self.optimizer, settings.steps, settings.warmup_steps)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == torch.float16 else None
        torch.manual_seed(derive_seed(settings.seed, "rank", rank))  # dropout and random-LTD differ by rank
        self.fingerprint = {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k not in RESUMABLE_CHANGES},
            "world_size": world_size,
            "corpus": shards.identity(),
        }
        self.step, self.bad_in_row, self.saved_step = 0, 0, None
        self._resume(resume)

    # -------------------------------------------------------------------------------- resuming

    def _resume(self, resume: str | None) -> None:
        existing = list_checkpoints(self.root)
        if resume is None:
            if existing:
                raise ValueError(
                    f"{self.out} already holds checkpoints (newest: {existing[-1].name}); "
                    f"pass --resume to continue that run, or choose another --out"
                )
            return
        if resume == "latest":
            if not existing:
                self._print(f"no checkpoint in {self.root}: starting at step 0")
                return
            path = existing[-1]
        else:
            path = Path(resume)
        try:
            state = verify_checkpoint(path)
        except ValueError as err:
            earlier = [p.name for p in existing if p.name < path.name]
            hint = f"; earlier checkpoints: {earlier}, e.g. --resume {self.root / earlier[-1]}" if earlier else ""
            raise ValueError(f"{err}{hint}") from err
        changed = [
            f"{name}: {state['settings'].get(name)!r} in the checkpoint, {value!r} now"
            for name, value in self.fingerprint.items()
            if state["settings"].get(name) != _jsonable(value)
        ]
        if changed:
            raise ValueError(f"checkpoint {path} was made with other settings: {'; '.join(changed)}")
        newer = [p for p in existing if p.name > path.name]
        if newer and self.rank == 0:  # a branch of the run that this one replaces; kept for inspection
            aside = self.root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for checkpoint in newer:
                checkpoint.rename(aside / checkpoint.name)
            self._print(f"moved the checkpoints after {path.name} to {aside}")
        load_checkpoint(path, self.raw, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.bad_in_row = state["step"], state["bad_in_row"]
        self.saved_step = self.step
        if self.rank == 0:
            self._trim_metrics()
        self._print(f"resumed from {path} at step {self.step}")

    def _trim_metrics(self) -> None:
        """Drop the lines that a killed run logged after its last checkpoint (they are redone), and a
        line torn by the kill."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True) if _logged_step(line) <= self.step]
            write_atomically(path, lambda temp: Path(temp).write_text("".join(kept)))

    def _save(self) -> Path:
        state = {
            "step": self.step,
            "rows_consumed": self.step * self.global_batch,
            "bad_in_row": self.bad_in_row,
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "settings": _jsonable(self.fingerprint),
        }
        path = save_checkpoint(self.root, self.step, self.raw, self.optimizer, state, self.settings.keep_last)
        self.saved_step = self.step
        return path

    # -------------------------------------------------------------------------------- training

    def train(self) -> int:
        s = self.settings
        self.out.mkdir(parents=True, exist_ok=True)
        loader = torch.utils.data.DataLoader(
            MaskedStream(self.rows, self.collator, s.seed),
            batch_sampler=rank_batches(self.step, s.steps, s.batch_size, s.grad_accum, self.rank, self.world_size),
            num_workers=s.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_stop_signals,
            generator=torch.Generator(),  # not the global RNG, whose state a checkpoint restores
        )
        batches = iter(loader)
        logger = _MetricsLogger(self.out, s, self.rank, first_step=self.step)
        try:
            with _StopSignals() as signals:
                while self.step < s.steps:
                    status = self._train_step(batches, signals, logger)
                    if status is not None:
                        return status
                if self.saved_step != self.step:
                    self._save()
                self._export()
        except CheckpointSaveError as err:
            self._print(f"tokdrop pretrain: error: {err}", file=sys.stderr)
            return 1
        finally:
            logger.close()
        return 0

    def _train_step(
        self, batches: Iterator[dict[str, torch.Tensor]], signals: _StopSignals, logger: _MetricsLogger
    ) -> int | None:
        """One optimizer step; returns an exit status when the run must stop."""
        s = self.settings
        keep = kept_length(s, self.step)
        if self.config.token_drop is not None:
            self.raw.bert.encoder.keep = keep
        started = time.perf_counter()
        micro = [next(batches) for _ in range(s.grad_accum)]
        counts = torch.tensor([float((b["labels"] != IGNORE_INDEX).sum()) for b in micro], device=self.device)
        total = self._all_reduce(counts.sum())
        loss_sum = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro):
            batch = {name: t.to(self.device, non_blocking=True) for name, t in batch.items()}
            with self._gradient_sync(index == len(micro) - 1), self._autocast():
                loss = self.model(**batch).loss
                # Each rank's loss is a mean over its own predictions, and DDP/FSDP average gradients
                # over ranks: weighting by this micro-batch's share of all predictions makes the
                # gradient that of the mean over the global batch, however predictions are spread.
                share = counts[index] / total
                self._backward(loss * (share * self.world_size))
            loss_sum += loss.detach().float() * share
        stop = self._all_reduce(torch.tensor(float(signals.received), device=self.device), dist.ReduceOp.MAX)
        loss_value, stop = torch.stack([self._all_reduce(loss_sum), stop]).tolist()
        lr = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(loss_value)
        if finite:
            self._optimizer_step()
            self.bad_in_row = 0
        else:
            self.bad_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        logger.record(
            self.step,
            loss_value if finite else None,
            lr,
            self.global_batch * s.seq_len,
            time.perf_counter() - started,
            self._kept_fraction(keep),
            self._importance,
        )
        if self.bad_in_row >= s.max_bad_steps:
            path = self._save()
            self._print(
                f"tokdrop pretrain: error: the loss was not finite for {self.bad_in_row} steps in a "
                f"row (steps {self.step - self.bad_in_row + 1} to {self.step}); stopped. Checkpoint: "
                f"{path}. Lower --lr or check the data before resuming.",
                file=sys.stderr,
            )
            return 1
        if stop:
            path = self._save()
            self._print(f"stopped by signal {int(stop)} at step {self.step}; checkpoint {path}; continue with --resume")
            return 128 + int(stop)
        if self.step % s.save_every == 0:
            self._save()
        return None

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.settings.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce of all but the last micro-batch of a step."""
        if isinstance(self.parallel, DistributedDataParallel) and not sync:
            with self.parallel.no_sync():
                yield
            return
        if isinstance(self.parallel, FSDPModule):
            self.parallel.set_requires_gradient_sync(sync)
        yield

    def _all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
        return tensor

    def _kept_fraction(self, keep: float | int) -> float:
        """Fraction of each row's tokens that the middle layers process (packed rows have no padding)."""
        seq_len = self.settings.seq_len
        if self.config.token_drop is not None:
            return max_kept(seq_len, keep) / seq_len
        if self.config.narrow is not None:
            return self.config.max_predictions_per_seq / seq_len
        return 1.0

    def _importance(self) -> dict[str, float] | None:
        """Statistics of the importance table's learned entries (the pinned ones are infinite)."""
        importance = self.raw.bert.token_importance
        if importance is None or importance.mode != "mlm_loss":
            return None
        table = importance.table[importance.table.isfinite()].float()
        values = torch.stack([table.mean(), table.std(), table.min(), table.max()]).tolist()
        return dict(zip(("mean", "std", "min", "max"), values, strict=True))

    def _export(self) -> None:
        """save_pretrained of the final weights, with the tokenizer, in OUT/model."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.raw, options=options)  # collective under FSDP2
        if self.rank != 0:
            return
        model = BertForMaskedLM(self.config)
        model.load_state_dict(state)
        target = self.out / "model"
        model.save_pretrained(target)
        self.shards.tokenizer().save(str(target / "tokenizer.json"))
        print(f"wrote {target}")

    def _print(self, message: str, file: Any = None) -> None:
        if self.rank == 0:
            tqdm.write(message, file=file)


def _precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA GPU (fp16 autocast with loss scaling); on CPU use fp32 or bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _parallelize(model: BertForMaskedLM, parallel: str, world_size: int, device: torch.device) -> nn.Module:
    if world_size == 1:
        return model
    if parallel == "ddp":
        # No buffer broadcast: the only buffer, the importance table, is all-reduced in every update.
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    # The logits are a view (a linear layer on [B, P, H]) that nothing changes in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBertForMaskedLM\) returned a view")
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    return model


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


class _MetricsLogger:
    """metrics.jsonl, the progress bar and TensorBoard, all on rank 0."""

    def __init__(self, out: Path, settings: Settings, rank: int, first_step: int) -> None:
        self.every, self.active = settings.log_every, rank == 0
        self.tokens, self.seconds = 0, 0.0
        self.file = self.board = self.bar = None
        if not self.active:
            return
        self.file = open(out / "metrics.jsonl", "a", encoding="utf-8")
        self.bar = tqdm(total=settings.steps, initial=first_step, unit="step", dynamic_ncols=True)
        if settings.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ModuleNotFoundError as err:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from err
            self.board = SummaryWriter(str(out / "tensorboard"))

    def record(
        self,
        step: int,
        loss: float | None,
        lr: float,
        tokens: int,
        seconds: float,
        kept_fraction: float,
        importance: Callable[[], dict[str, float] | None],
    ) -> None:
        """Count a step; log it every `every` steps and whenever it was skipped. `importance` is
        only called for a logged step (it reads the table back from the device)."""
        if not self.active:
            return
        self.tokens += tokens
        self.seconds += seconds
        self.bar.update()
        self.bar.set_postfix(
            loss="skipped" if loss is None else f"{loss:.3f}", tok_s=f"{tokens / seconds:.0f}", refresh=False
        )
        if step % self.every and loss is not None:
            return
        line: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": self.tokens / self.seconds,
            "kept_fraction": kept_fraction,
        }
        statistics = importance()
        if statistics is not None:
            line["importance"] = statistics
        if loss is None:
            line["skipped"] = "non-finite loss"
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.board is not None:
            for name in ("loss", "lr", "tokens_per_s", "kept_fraction"):
                if line[name] is not None:
                    self.board.add_scalar(name, line[name], step)
        self.tokens, self.seconds = 0, 0.0

    def close(self) -> None:
        for handle in (self.bar, self.file, self.board):
            if handle is not None:
                handle.close()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tokdrop.pretrain ...`, the entry point for `torchrun -m`: `tokdrop pretrain ...`."""
    parser = argparse.ArgumentParser(prog="tokdrop")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pretrain", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except ValueError as err:
        parser.exit(2, f"tokdrop pretrain: error: {err}\n")


if __name__ == "__main__":
    raise SystemExit(main())
