"""SIGINT / SIGTERM during fine-tuning: finish the current step, checkpoint, then stop."""
from __future__ import annotations

import signal
import threading
from types import FrameType

from leanconv.errors import LeanconvError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(LeanconvError):
    """Fine-tuning stopped on a signal after writing a checkpoint; ``resume=True`` continues it."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGINT)


class StopRequests:
    """A context that turns the first SIGINT / SIGTERM into a request (``requested``) instead of death.

    A second signal raises ``KeyboardInterrupt`` at once (the last checkpoint stays intact). Only the
    main thread can install handlers; elsewhere, signals keep their default behaviour.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
