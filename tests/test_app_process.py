"""The app as a person runs it over SSH: a process with a terminal of its own (a pty).
A run started from the form outlives that terminal closing (SIGHUP to the app), and
opening it again shows it live, then done; `q` ends the app's process while a
comparison is being computed in a worker thread."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
from test_app import (
    PATIENCE_S,
    ROOT,
    pilot_test,
    status_of,
    until,
    wait_for_writer_to_end,
)

from core.runs import RunDir
from impq_tui.app import ImpqApp
from impq_tui.screens.dashboard import Dashboard

F5, ENTER = b"\x1b[15~", b"\r"
ANSI = re.compile(rb"\x1b(\[[0-9;?<>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")

FORM = """
import sys
from impq_tui.app import ImpqApp
from impq_tui.screens.setup import SetupDefaults

model, run_dir, samples = sys.argv[1], sys.argv[2], int(sys.argv[3])
ImpqApp(setup=SetupDefaults(model=model, samples=samples, windows=8, window_tokens=128,
                            device="cpu", run_dir=run_dir, until_settled=False),
        cursor_blink=False).run()
"""


class TerminalApp:
    """`python ARGS` as the session leader of a new pty, its screen read as it comes."""

    def __init__(self, *args: str, size: tuple[int, int] = (100, 30)) -> None:
        env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": str(ROOT),
               "HF_HUB_OFFLINE": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:      # the child: the pty is its controlling terminal
            # as a login shell's child has it, whatever this test was started under (nohup
            # leaves SIGHUP ignored, and an ignored signal stays ignored across exec)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, *args], env)
        cols, rows = size
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.output = bytearray()
        self.status: int | None = None
        self._hanging_up = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Never blocked in read() for long: a read in flight holds the terminal open after
        # close(), so hang_up's close would reach the app only with its next output.
        while not self._hanging_up.is_set():
            if not select.select([self.fd], [], [], 0.05)[0]:
                continue
            try:
                data = os.read(self.fd, 65536)
            except OSError:       # EIO: the terminal hung up
                return
            if not data:
                return
            self.output.extend(data)

    def screen_text(self) -> str:
        return ANSI.sub(b"", bytes(self.output)).decode(errors="replace")

    def wait_for(self, text: str, patience: float = PATIENCE_S) -> None:
        deadline = time.monotonic() + patience
        while text not in self.screen_text():
            assert self.poll() is None, f"the app ended before showing {text!r}"
            assert time.monotonic() < deadline, f"the app never showed {text!r}"
            time.sleep(0.1)

    def press(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def poll(self) -> int | None:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status

    def wait(self, patience: float) -> float:
        """Seconds until the app's process ended (AssertionError after `patience`)."""
        start = time.monotonic()
        while self.poll() is None:
            assert time.monotonic() - start < patience, "the app's process did not end"
            time.sleep(0.01)
        return time.monotonic() - start

    def hang_up(self) -> None:
        """Close the terminal, as a dropped SSH connection does: the kernel sends SIGHUP
        to the session's processes (once no read of ours holds the terminal open)."""
        self._hanging_up.set()
        self._reader.join()
        os.close(self.fd)

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


def run_pid(run_dir: Path) -> int | None:
    """The pid of the run's process once it takes pause and continue (core.control)."""
    try:
        return json.loads((run_dir / "control.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


@pilot_test
async def test_run_outlives_the_terminal_and_reopens_live(tiny_model_dir, tmp_path):
    run_dir, samples = tmp_path / "outlives", 40
    app = TerminalApp("-c", FORM, str(tiny_model_dir), str(run_dir), str(samples))
    try:
        app.wait_for("Start")
        app.press(F5)
        deadline = time.monotonic() + PATIENCE_S
        while (pid := run_pid(run_dir)) is None:
            assert app.poll() is None and time.monotonic() < deadline, app.screen_text()[-2000:]
            time.sleep(0.1)
        app.wait_for("running")
        app.hang_up()
        app.wait(patience=10)
    finally:
        app.kill()
    assert os.WIFSIGNALED(app.status) and os.WTERMSIG(app.status) == signal.SIGHUP

    # the run's process did not get the hangup: it goes on with no app at all
    at_hangup = len(RunDir.open(run_dir).samples())
    while len(RunDir.open(run_dir).samples()) < at_hangup + 2:
        assert status_of(run_dir)["state"] == "running" and time.monotonic() < deadline
        time.sleep(0.05)
    # held (as the app's pause key does) so that it is surely still going when reopened
    os.kill(pid, signal.SIGUSR1)

    reopened = ImpqApp(str(run_dir), cursor_blink=False)
    async with reopened.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: isinstance(reopened.screen, Dashboard), "the dashboard")
        dash = reopened.screen
        await until(pilot, lambda: dash.state == "paused", "the run, live and paused")
        assert dash.writer.pid == pid and len(dash.D) < samples
        await pilot.press("p")                   # continue
        await until(pilot, lambda: dash.state == "completed" and len(dash.D) == samples,
                    "the run to finish")
        np.testing.assert_array_equal(dash.D, RunDir.open(run_dir).D())

    assert wait_for_writer_to_end(run_dir) == "completed"
    assert len(RunDir.open(run_dir).samples()) == samples
    status = status_of(run_dir)
    assert status["state"] == "completed" and status["pid"] == pid


def test_quit_does_not_wait_for_a_comparison(tiny_model_dir, tmp_path):
    """`q` while the Compare view evaluates models in a worker thread: the process ends
    at once (the worker is a daemon thread told to stop), not after the comparison."""
    import subprocess

    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "impq_tui", "run", "--model", str(tiny_model_dir),
                    "--samples", "3", "--windows", "4", "--window-tokens", "32", "--device",
                    "cpu", "--quiet", "--run-dir", str(run_dir)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    app = TerminalApp("-m", "impq_tui", "--run", str(run_dir))
    try:
        app.wait_for("completed")
        app.press(b"c")
        app.wait_for("comparing at")
        time.sleep(1.0)                          # well into evaluating
        assert not (run_dir / "compare").exists()
        app.press(b"q")
        took = app.wait(patience=5)
    finally:
        app.kill()
    print(f"q ended the app {took:.2f} s after the key, a comparison in flight")
    assert os.WIFEXITED(app.status) and os.WEXITSTATUS(app.status) == 0
