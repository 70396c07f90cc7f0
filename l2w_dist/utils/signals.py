"""Stop signals as a request that a loop polls at a safe point, the one mechanism for every
command: ``l2w-train`` (also under torchrun), ``l2w-eval`` and the Slurm tasks.

    stop = StopSignals()              # SIGINT and SIGTERM
    with stop:                        # handlers installed, the previous ones restored after
        for batch in loader:
            ...
            if stop():                # a signal arrived: checkpoint here, then exit stop.exit_code
                break

The handler only records the signal (no I/O, no collectives), so it is safe wherever the
process happens to be: the loop decides where to stop. A second SIGINT (Ctrl-C pressed
again) raises :class:`SignalAbort` at once, for a user who will not wait for the checkpoint.
Inside :meth:`StopSignals.interrupting`, or with ``interrupt=True``, every signal raises
:class:`SignalAbort` at once: for work that keeps no state worth saving (an evaluation).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any


class SignalAbort(KeyboardInterrupt):
    """Raised by the handler where the process stops at once rather than at the next safe point.

    A KeyboardInterrupt, so code that cleans up after Ctrl-C (DataLoader workers, which exit
    quietly on it) treats it as one.
    """

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(f"stopped by {self.signal.name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal: 128 + its number."""
        return 128 + int(self.signal)


class StopSignals:
    """Records stop signals; ``stop()`` is True once one arrived.

    ``signals``: the signals handled (default SIGINT and SIGTERM). ``abort_on_repeat``: those
    that raise :class:`SignalAbort` when a stop was already requested (default SIGINT: a
    second Ctrl-C). ``interrupt``: every signal raises :class:`SignalAbort` at once.
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM),
        *,
        abort_on_repeat: Iterable[int] = (signal.SIGINT,),
        interrupt: bool = False,
    ) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.abort_on_repeat = {signal.Signals(s) for s in abort_on_repeat}
        self.interrupt = interrupt
        self.received: list[str] = []  # signal names, in arrival order
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        repeated = bool(self.received)
        self.received.append(sig.name)
        if self.interrupt or (repeated and sig in self.abort_on_repeat):
            raise SignalAbort(signum)

    def __call__(self) -> bool:
        return bool(self.received)

    @property
    def first(self) -> signal.Signals | None:
        """The signal that requested the stop (None before any)."""
        return signal.Signals[self.received[0]] if self.received else None

    @property
    def exit_code(self) -> int:
        """128 + the first signal's number (130 for SIGINT, 143 for SIGTERM); 0 before any."""
        return 128 + int(self.first) if self.received else 0

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        """Within the block a signal raises :class:`SignalAbort` at once (one already
        received raises on entry): for work whose only state is its unfinished result."""
        if self.received:
            raise SignalAbort(self.first)
        before, self.interrupt = self.interrupt, True
        try:
            yield
        finally:
            self.interrupt = before
