"""Turning SIGTERM and SIGINT into a stop request, safely.

A Python signal handler runs in the main thread between two bytecodes, so
one that calls ``threading.Event.set()`` deadlocks when the main thread was
inside that same event's ``wait()`` at that moment (both take the event's
non-reentrant lock): the process then ignores every later SIGTERM and only
SIGKILL ends it. systemd signals the whole control group at once, which
makes that moment likely for an idle worker polling in ``wait()``. The
handler here hands ``set()`` to a short-lived thread instead, which takes
the lock once the main thread has let go of it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType


def stop_on_signals(
    stop: threading.Event,
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    on_signal: Callable[[signal.Signals], None] | None = None,
) -> None:
    """Make each of ``signals`` set ``stop`` (after calling ``on_signal``, which must not take locks either)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if on_signal is not None:
            on_signal(signal.Signals(signum))
        threading.Thread(target=stop.set, name="stop-request", daemon=True).start()

    for signum in signals:
        signal.signal(signum, handler)
