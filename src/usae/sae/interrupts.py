"""A clean stop for long loops: SIGINT/SIGTERM become a flag checked between steps."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the trainer saved a checkpoint at ``step`` first."""

    def __init__(self, step: int, signame: str) -> None:
        super().__init__(f"{signame} at step {step}; a checkpoint of step {step} was saved — "
                         "re-run with --resume to continue")
        self.step = step


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one
    interrupts at once, except while a checkpoint is being written (``saving``): then it
    waits for the write to land, so the checkpoint it promised exists."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.pending = False  # a second signal arrived during a save
        self._saving = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            if self._saving:
                self.pending = True
                return
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """A block that a second signal does not cut short."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
