"""A lock left by a killed quanto extension build is removed; one a live process holds is
waited on for a bounded time, then reported by name (core.backends.build_lock)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from core.backends import build_lock
from core.errors import UserError


@pytest.fixture
def lock(tmp_path, monkeypatch):
    path = tmp_path / "cpp" / "build" / "lock"
    path.parent.mkdir(parents=True)
    monkeypatch.setattr(build_lock, "quanto_locks", lambda: [path] if path.exists() else [])
    return path


def test_a_lock_whose_builder_died_is_removed(lock):
    # what FileBaton leaves when its process is killed: the file, held by nobody
    proc = subprocess.run([sys.executable, "-c", f"import os; os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)"])
    assert proc.returncode == 0 and lock.exists()
    seen = []
    build_lock.clear_stale_locks(timeout_s=5, log=seen.append)
    assert not lock.exists()
    assert str(lock) in seen[0]


def test_a_lock_a_live_builder_holds_is_a_message_after_the_timeout(lock):
    holder = subprocess.Popen([sys.executable, "-c", f"import os, time; os.open({str(lock)!r}, "
                               "os.O_CREAT | os.O_EXCL); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert build_lock.holders(lock) == [holder.pid]
        start = time.monotonic()
        with pytest.raises(UserError) as info:
            build_lock.clear_stale_locks(timeout_s=1.0)
        assert time.monotonic() - start < 3
        assert str(lock) in str(info.value) and str(holder.pid) in str(info.value)
        assert lock.exists()        # a live build's lock is never taken away
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_released_while_waiting_ends_the_wait(lock):
    holder = subprocess.Popen([sys.executable, "-c", f"import os, time; fd = os.open({str(lock)!r}, "
                               "os.O_CREAT | os.O_EXCL); print('held', flush=True); time.sleep(1); "
                               f"os.close(fd); os.unlink({str(lock)!r})"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        build_lock.clear_stale_locks(timeout_s=30)
        assert not lock.exists()
    finally:
        holder.wait()


def test_the_first_quanto_use_on_a_device_says_the_kernels_will_be_built(tmp_path, monkeypatch):
    """Quanto builds a device's kernels when its build folder records no build for this torch
    (quanto's own check): then the run says so before the silent minute and a half."""
    import optimum.quanto.library.extensions as extensions
    import torch

    from core.backends.quanto import QuantoBackend

    monkeypatch.setattr(extensions, "__file__", str(tmp_path / "__init__.py"))
    backend = QuantoBackend()
    assert build_lock.will_build("cuda")
    assert "building optimum-quanto's CUDA kernels" in backend.first_use(torch.device("cuda"))
    version = tmp_path / "cuda" / "build" / "pytorch_version.txt"
    version.parent.mkdir(parents=True)
    version.write_text("2.0.0\n")                 # built for another torch: built again
    assert build_lock.will_build("cuda")
    version.write_text(torch.__version__ + "\n")
    assert not build_lock.will_build("cuda") and backend.first_use(torch.device("cuda")) is None
    assert "C++ kernels" in backend.first_use(torch.device("cpu"))     # cpp/ has no build here
