"""Stop signals: SIGTERM or SIGINT (a scheduler's pre-emption, Ctrl-C) ends a run cleanly after the
current step, with a checkpoint; a second signal acts at once."""

from __future__ import annotations

import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Turns the first SIGTERM/SIGINT into a request to checkpoint and stop at the end of the step;
    the handlers are then restored, so a second signal acts at once."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
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


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which stops between steps."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


__all__ = ["STOP_SIGNALS", "StopSignals", "ignore_stop_signals"]
