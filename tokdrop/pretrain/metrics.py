"""What a run reports, on rank 0: OUT/metrics.jsonl (one JSON object per logged step), the progress
bar and, with --tensorboard, OUT/tensorboard."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tokdrop.files import write_atomically
from tokdrop.pretrain.settings import Settings

METRICS = "metrics.jsonl"


def trim_metrics(out: Path, step: int) -> None:
    """Drop the lines that a killed run logged after step `step` (they are redone), and a line torn
    by the kill."""
    path = out / METRICS
    if path.is_file():
        kept = [line for line in path.read_text().splitlines(keepends=True) if _logged_step(line) <= step]
        write_atomically(path, lambda temp: Path(temp).write_text("".join(kept)))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class MetricsLogger:
    """metrics.jsonl, the progress bar and TensorBoard, all on rank 0."""

    def __init__(self, out: Path, settings: Settings, rank: int, first_step: int) -> None:
        self.every, self.active = settings.log_every, rank == 0
        self.tokens, self.seconds = 0, 0.0
        self.file = self.board = self.bar = None
        if not self.active:
            return
        self.path = out / METRICS
        self.file = open(self.path, "a", encoding="utf-8")
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
        try:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
        except OSError as err:  # a write error names no file
            raise OSError(err.errno, err.strerror, str(self.path)) from err
        if self.board is not None:
            for name in ("loss", "lr", "tokens_per_s", "kept_fraction"):
                if line[name] is not None:
                    self.board.add_scalar(name, line[name], step)
        self.tokens, self.seconds = 0, 0.0

    def close(self) -> None:
        for handle in (self.bar, self.file, self.board):
            if handle is not None:
                handle.close()


__all__ = ["METRICS", "MetricsLogger", "trim_metrics"]
