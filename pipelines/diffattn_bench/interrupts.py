"""Long runs (training, sweeps) stop cleanly on Ctrl+C, ``kill -INT`` and ``kill`` (SIGTERM) alike, also when
started in the background: a non-interactive shell's ``cmd &`` or ``nohup`` leaves SIGINT ignored, so Python would
install no KeyboardInterrupt handler and the run's ``except KeyboardInterrupt`` (save a checkpoint, then stop) would
never run."""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["stop_on_signals"]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread from now on."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
