"""A lock left by a killed quanto extension build is removed; one a live process holds is
waited on for a bounded time, then reported by name; where quanto's folder cannot be
written its kernels are built in the user's cache (core.backends.build_lock)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.backends import build_lock
from core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


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

    from optimum.quanto.library.extensions import extension

    monkeypatch.setattr(extensions, "__file__", str(tmp_path / "__init__.py"))
    monkeypatch.setattr(extension._extensions["quanto_cpp"], "build_directory",
                        str(tmp_path / "cpp" / "build"))
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


BUILD_ELSEWHERE = """
import sys
from pathlib import Path
import torch
from optimum.quanto.library.extensions import extension
from core.backends.quanto import QuantoBackend

ext = extension._extensions["quanto_cpp"]
ext.build_directory = sys.argv[1]
backend = QuantoBackend(group_size=32)
print("moved:", {name: str(folder) for name, folder in backend.moved.items()})
print("note:", backend.first_use(torch.device("cpu")))
torch.manual_seed(0)
linear = torch.nn.Linear(64, 32)
w = backend._dequantize(backend._quantize_linear(linear, 2))     # quanto's C++ unpack
print("error:", float((w - linear.weight).abs().max()))
print("built:", ext.build_directory, ext._lib is not None)
"""


def test_quanto_builds_its_kernels_in_the_cache_where_its_folder_is_read_only(tmp_path):
    """A shared or system install of quanto whose folder the user cannot write: the kernels
    are built, for real, in the user's cache, and the run says where. (The blocked folder is
    below a regular file, which nobody can write into, root included.)"""
    blocked = tmp_path / "site-packages-file"
    blocked.write_text("")
    env = {**os.environ, "IMPQ_TUI_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", BUILD_ELSEWHERE, str(blocked / "build")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    cache = tmp_path / "cache" / "quanto-kernels" / "quanto_cpp"
    assert lines["moved"] == repr({"quanto_cpp": str(cache)})
    assert f"C++ kernels in {cache}, its own folder being read-only" in lines["note"]
    assert 0 < float(lines["error"]) < 0.2         # 2-bit weights of a U(-1/8, 1/8) layer
    assert lines["built"] == f"{cache} True"
    assert (cache / "pytorch_version.txt").read_text().strip() == torch.__version__
    assert list(cache.glob("quanto_cpp*.so"))


def test_an_unwritable_cache_too_is_a_message_naming_both(tmp_path, monkeypatch):
    from optimum.quanto.library.extensions import extension

    blocked = tmp_path / "file"
    blocked.write_text("")
    ext = extension._extensions["quanto_cpp"]
    monkeypatch.setattr(ext, "build_directory", str(blocked / "build"))
    monkeypatch.setattr(ext, "_lib", None)
    monkeypatch.setenv("IMPQ_TUI_CACHE", str(blocked / "cache"))
    with pytest.raises(UserError) as info:
        build_lock.redirect_builds()
    assert str(blocked / "build") in str(info.value) and "IMPQ_TUI_CACHE" in str(info.value)
    assert ext.build_directory == str(blocked / "build")
