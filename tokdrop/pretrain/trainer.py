"""One rank's part of a pretraining run (`Trainer`: steps, resume, save, export), and `pretrain`,
which sets the run up (process group, data) and maps its outcome to an exit status."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tokdrop.data import MaskingCollator
from tokdrop.model import IGNORE_INDEX, BertForMaskedLM
from tokdrop.pretrain import distributed
from tokdrop.pretrain.checkpoints import (
    CHECKPOINTS,
    CheckpointSaveError,
    list_checkpoints,
    load_checkpoint,
    newest_checkpoint_note,
    save_checkpoint,
    step_directories,
    verify_checkpoint,
)
from tokdrop.pretrain.locks import run_lock
from tokdrop.pretrain.metrics import METRICS, MetricsLogger, trim_metrics
from tokdrop.pretrain.modes import (
    consistency_step,
    kept_fraction,
    kept_length,
    max_graphs,
    model_config,
    set_kept_length,
)
from tokdrop.pretrain.settings import RESUMABLE_CHANGES, Settings
from tokdrop.pretrain.shards import ShardSet, prepare_shards, require_data
from tokdrop.pretrain.signals import StopSignals, ignore_stop_signals
from tokdrop.pretrain.stream import MaskedStream, PackedRows, derive_seed, rank_batches
from tokdrop.training import build_model, make_optimizer, warmup_linear_decay
from tokdrop.vocabulary import special_tokens


def pretrain(settings: Settings, *, resume: str | None = None, prepare_only: bool = False) -> int:
    """Run `settings` on this rank (the job's other ranks run it too); returns the exit status."""
    require_data(settings)
    rank, world_size, device = distributed.init_distributed(settings.collective_timeout)
    held = contextlib.ExitStack()
    try:
        precision = _precision(settings.precision, device)
        distributed.on_rank_zero(lambda: held.enter_context(run_lock(Path(settings.out))))
        shards = prepare_shards(settings)
        if prepare_only:
            if rank == 0:
                print(f"{shards.directory}: {shards.total_tokens} tokens in {len(shards.counts)} shards")
            return 0
        return Trainer(settings, shards, rank, world_size, device, precision, resume).train()
    except CheckpointSaveError as err:  # raised on every rank
        if rank == 0:
            print(f"tokdrop pretrain: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a lost mount: the message says it all, a traceback would not
        where = f"rank {rank}: " if world_size > 1 else ""
        print(f"tokdrop pretrain: error: {where}{err}; {_newest_checkpoint(settings)}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if not distributed.is_peer_failure(err):
            raise
        message = distributed.describe_peer_failure(err)
        if message is not None:
            note = f"{_newest_checkpoint(settings)}; continue with --resume once every rank runs"
            print(f"tokdrop pretrain: error: {message}; {note}", file=sys.stderr)
        return 1
    finally:
        held.close()
        distributed.shutdown()


def _newest_checkpoint(settings: Settings) -> str:
    return newest_checkpoint_note(Path(settings.out) / CHECKPOINTS)


class Trainer:
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
        self.root = self.out / CHECKPOINTS
        tokenizer = shards.tokenizer()
        specials = special_tokens(tokenizer)
        self.collator = MaskingCollator.from_tokenizer(tokenizer, mlm_probability=settings.mlm_probability)
        self.config = model_config(
            settings, tokenizer.get_vocab_size(), specials, self.collator.num_predictions(settings.seq_len)
        )
        self.rows = PackedRows(shards, settings.seq_len, specials.cls, specials.sep)
        self.global_batch = settings.batch_size * settings.grad_accum * world_size

        self.raw = self._initial_model()  # the same weights on every rank
        self.model = self.parallel = _parallelize(self.raw, settings.parallel, world_size, device)
        if settings.compile:
            # Each kept length is one graph; let them all stay compiled.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, max_graphs(settings))
            self.model = torch.compile(self.parallel)
        self.optimizer = make_optimizer(self.raw, settings.lr, settings.weight_decay)
        self.scheduler = warmup_linear_decay(self.optimizer, settings.steps, settings.warmup_steps)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == torch.float16 else None
        torch.manual_seed(rank_seed(settings, rank))
        self.fingerprint = {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k not in RESUMABLE_CHANGES},
            "world_size": world_size,
            "corpus": shards.identity(),
        }
        self.step, self.bad_in_row, self.saved_step = 0, 0, None
        self._resume(resume)

    def _initial_model(self) -> BertForMaskedLM:
        """Fresh weights, or those of --init-from (a head it lacks starts fresh, and the run says so)."""
        s = self.settings
        if s.init_from is None:
            return build_model(self.config, s.seed, self.device)
        torch.manual_seed(s.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = BertForMaskedLM.from_pretrained(s.init_from, config=self.config)
        for warning in caught:
            self._print(f"--init-from {s.init_from}: {warning.message}")
        self._print(f"initialised the encoder from {s.init_from}")
        return model.to(self.device).train()

    # -------------------------------------------------------------------------------- resuming

    def _resume(self, resume: str | None) -> None:
        # Damaged checkpoints count too: a lost manifest must neither hide a run nor let it go back
        # silently to an earlier step.
        existing = step_directories(self.root)
        if resume is None:
            if existing:
                raise ValueError(
                    f"{self.out} already holds checkpoints (newest: {existing[-1].name}); "
                    f"pass --resume to continue that run, or choose another --out"
                )
            if (self.out / METRICS).is_file() and (self.out / METRICS).stat().st_size:
                raise ValueError(
                    f"{self.out} already holds {METRICS} of a run that stopped before its first checkpoint; "
                    f"pass --resume to start that run again at step 0, or choose another --out"
                )
            return
        if resume == "latest":
            if not existing:
                self._print(f"no checkpoint in {self.root}: starting at step 0")
                if self.rank == 0:
                    trim_metrics(self.out, 0)
                return
            path = existing[-1]
        else:
            path = Path(resume)
        try:
            state = verify_checkpoint(path)
        except ValueError as err:
            earlier = [p.name for p in list_checkpoints(self.root) if p.name < path.name]
            hint = f"; earlier checkpoints: {earlier}, e.g. --resume {self.root / earlier[-1]}" if earlier else ""
            raise ValueError(f"{err}{hint}") from err
        changed = _changes(state["settings"], _jsonable(self.fingerprint))
        if changed:
            message = f"checkpoint {path} was made with other settings: {'; '.join(changed.values())}"
            if any(name.startswith("corpus.") for name in changed):
                message += "; the shard directory was rebuilt or replaced since: resume on the shards it was made from"
            raise ValueError(message)
        newer = [p for p in existing if p.name > path.name]
        if newer and self.rank == 0:  # a branch of the run that this one replaces; kept for inspection
            aside = Path(tempfile.mkdtemp(prefix=f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-", dir=self.root))
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
            trim_metrics(self.out, self.step)
        self._print(f"resumed from {path} at step {self.step}")

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
            worker_init_fn=ignore_stop_signals,
            generator=torch.Generator(),  # not the global RNG, whose state a checkpoint restores
        )
        batches = iter(loader)
        logger = MetricsLogger(self.out, s, self.rank, first_step=self.step)
        try:
            with StopSignals() as signals:
                while self.step < s.steps:
                    status = self._train_step(batches, signals, logger)
                    if status is not None:
                        return status
                if self.saved_step != self.step:
                    self._save()
                self._export()
        finally:
            logger.close()
        return 0

    def _train_step(
        self, batches: Iterator[dict[str, torch.Tensor]], signals: StopSignals, logger: MetricsLogger
    ) -> int | None:
        """One optimizer step; returns an exit status when the run must stop."""
        s = self.settings
        keep = kept_length(s, self.step)
        set_kept_length(self.raw, keep)
        consistency = consistency_step(self.config, self.step)
        started = time.perf_counter()
        micro = [next(batches) for _ in range(s.grad_accum)]
        counts = torch.tensor([float((b["labels"] != IGNORE_INDEX).sum()) for b in micro], device=self.device)
        total = distributed.all_reduce(counts.sum())
        loss_sum = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro):
            batch = {name: t.to(self.device, non_blocking=True) for name, t in batch.items()}
            with self._gradient_sync(index == len(micro) - 1), self._autocast():
                loss = self.model(**batch, consistency=consistency).loss
                # Each rank's loss is a mean over its own predictions, and DDP/FSDP average gradients
                # over ranks: weighting by this micro-batch's share of all predictions makes the
                # gradient that of the mean over the global batch, however predictions are spread.
                share = counts[index] / total
                self._backward(loss * (share * self.world_size))
            loss_sum += loss.detach().float() * share
        stop = distributed.all_reduce(torch.tensor(float(signals.received), device=self.device), dist.ReduceOp.MAX)
        loss_value, stop = torch.stack([distributed.all_reduce(loss_sum), stop]).tolist()
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
            kept_fraction(self.config, s.seq_len, keep),
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

    def _importance(self) -> dict[str, float] | None:
        """Statistics of the importance table's learned entries (the pinned ones are infinite)."""
        importance = self.raw.base_model.token_importance
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


def rank_seed(settings: Settings, rank: int) -> int:
    """The seed of a rank's torch generator, which draws its dropout masks and random-LTD subsets:
    one per rank, or rank 0's on every rank with --ltd-same-across-ranks."""
    return derive_seed(settings.seed, "rank", 0 if settings.ltd_same_across_ranks else rank)


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
    for layer in model.base_model.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    return model


def _changes(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """What differs between a checkpoint's settings and the run's: name -> "name: old in the
    checkpoint, new now"; tables (the corpus) entry by entry."""
    changed = {}
    for name, value in now.items():
        old = saved.get(name)
        if isinstance(old, dict) and isinstance(value, dict):
            changed |= _changes(old, value, f"{prefix}{name}.")
        elif old != value:
            changed[prefix + name] = f"{prefix}{name}: {old!r} in the checkpoint, {value!r} now"
    return changed


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))
