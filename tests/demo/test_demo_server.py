"""``diffattn demo`` as a process: stopped with SIGTERM (``kill``, a service manager, a container stopping) or with
SIGINT (Ctrl+C, also when it was started in the background with SIGINT ignored, as `cmd &` does), it exits normally
and removes its temporary folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

STARTUP_TIMEOUT = 300.0
_SERVER = "import sys; from diffattn.cli import main; sys.exit(main(['demo', *sys.argv[1:]]))"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_config(process: subprocess.Popen, port: int, log: Path) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, f"diffattn demo exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(1)
    raise AssertionError(f"diffattn demo did not answer within {STARTUP_TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a non-interactive shell's `cmd &` gives its child


@pytest.mark.parametrize(
    ("stop", "start"),
    [(signal.SIGTERM, None), (signal.SIGINT, _ignore_sigint)],
    ids=["sigterm", "sigint-started-in-background"],
)
def test_signal_stops_the_demo_and_removes_its_temp_folder(tmp_path, stop, start):
    temp = tmp_path / "tmp"  # the demo makes its diffattn-demo-* folder here (TMPDIR)
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env.update(TMPDIR=str(temp), GRADIO_ANALYTICS_ENABLED="False")
    port = _free_port()
    log = tmp_path / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", _SERVER, "--port", str(port), "--threads", "1"],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=start,
        )
    try:
        assert _wait_for_config(process, port, log)["components"]
        folders = list(temp.glob("diffattn-demo-*"))
        assert len(folders) == 1 and folders[0].is_dir(), folders
        process.send_signal(stop)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert code == 0, f"exit status {code}:\n{log.read_text()[-3000:]}"
    assert not folders[0].exists(), f"{stop.name} left the demo's temporary folder {folders[0]}"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_ctrl_c_while_the_server_starts_is_a_normal_stop_that_closes_it(monkeypatch):
    """Ctrl+C (or SIGINT) landing inside Gradio's launch, after the server answers but before the demo blocks (the
    race the background-SIGINT test met once in CI): the demo closes the app and exits 0, without a traceback."""
    from diffattn_demo import app as app_module

    closed = []

    class FakeApp:
        def close(self):
            closed.append(True)

    class FakeModels:
        image_info = SimpleNamespace(structure=None)  # as a local folder: loaded before the page is built

        def __init__(self, *args):
            pass

        def load(self):
            return self

    def interrupted(app, settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(app_module, "prepare_environment", lambda: Path("unused"))
    monkeypatch.setattr(app_module, "Models", FakeModels)
    monkeypatch.setattr(app_module, "build_app", lambda models, temp: FakeApp())
    monkeypatch.setattr(app_module, "_serve", interrupted)
    monkeypatch.setattr(app_module.signal, "signal", lambda *args: None)  # leave pytest's own handlers alone
    assert app_module.main(["--port", "7999"]) == 0
    assert closed == [True]
