"""Long runs stop with a checkpoint on kill -INT and kill (SIGTERM) also when started in the background, where the
shell leaves SIGINT ignored (``diffattn_bench.interrupts``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

RUN = """
import time
from diffattn_bench.interrupts import stop_on_signals
stop_on_signals()
try:
    print("started", flush=True)  # inside the try: a signal right after it is the run's, not the start-up's
    time.sleep(60)
except KeyboardInterrupt as stop:
    print("checkpoint saved:", stop, flush=True)
    raise SystemExit(130)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_background_run_stops_through_its_interrupt_handler(signum):
    def as_background() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `cmd &` in a non-interactive shell does

    process = subprocess.Popen(
        [sys.executable, "-c", RUN],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=as_background,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert process.stdout.readline().strip() == "started"
    start = time.perf_counter()
    process.send_signal(signum)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 130 and time.perf_counter() - start < 30
    assert f"checkpoint saved: stopped by signal {signum.name}" in out
