"""Preemption: SIGTERM / SIGINT ask a training run to stop after its current step.

A scheduler that preempts a job (SLURM, Kubernetes, a spot instance) sends SIGTERM; Ctrl-C
sends SIGINT. Inside :class:`StopSignals` the first such signal is only recorded, so the
Trainer can finish the step, write a checkpoint and stop; the handler then steps aside, so a
second signal acts as it normally would.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["StopSignals", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager recording the first stop signal in ``signum`` (None until one arrives).

    Handlers can only be installed from the main thread; elsewhere this records nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._restore()  # the next signal is not caught again

    def _restore(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()
