"""optimum-quanto compiles its C++/CUDA extensions on first use, under a lock file in
site-packages (`optimum/quanto/library/extensions/<kind>/build/lock`, torch's FileBaton).
A process killed while building leaves that file behind, and every later process then
waits on it forever, printing nothing.

The builder keeps the lock file open while it builds, so a lock that no live process
holds open is stale: it is removed. A lock a live process holds is waited on, for at most
`timeout_s` and stopping at once when `cancel` is set; then the wait ends with a message
that names the file and the process.

Quanto builds in its own package folder. Where that folder cannot be written (a shared or
system install, a read-only image) the build, and even loading a finished build (torch
takes the lock file first), fails at the first quantized layer; redirect_builds() then
moves the build folder to the user's cache (IMPQ_TUI_CACHE or XDG_CACHE_HOME).
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

from core.errors import Cancelled, UserError

BUILD_TIMEOUT_S = 900.0   # a first build takes one to a few minutes
KINDS = ("cpp", "cuda", "hip", "mps")     # quanto's extensions, a folder each


def _registered() -> dict:
    """Quanto's extensions registered in this process (cpp always; cuda, hip or mps where
    the device is present), by name: quanto_cpp, quanto_cuda, ..."""
    from optimum.quanto.library.extensions import extension

    return extension._extensions


def build_folder(kind: str) -> Path:
    """Where quanto builds its `kind` extension (cpp, cuda, hip, mps): the registered
    extension's folder (moved by redirect_builds, if it was), else quanto's default."""
    import optimum.quanto.library.extensions as extensions

    ext = _registered().get(f"quanto_{kind}")
    if ext is not None:
        return Path(ext.build_directory)
    return Path(extensions.__file__).parent / kind / "build"


def quanto_locks() -> list[Path]:
    """The lock files of quanto's extension builds that exist now."""
    return [lock for lock in (build_folder(kind) / "lock" for kind in KINDS) if lock.exists()]


def will_build(kind: str) -> bool:
    """Whether quanto's `kind` extension (cpp, cuda, mps) is still to be built for this torch:
    the next quanto module on such a device builds it first (96 s on an H200 host, printing
    nothing), as quanto's loader decides from the build folder's pytorch_version.txt."""
    import torch

    version = build_folder(kind) / "pytorch_version.txt"
    try:
        return version.read_text().strip() != torch.__version__
    except OSError:
        return True


def writable(folder: Path) -> bool:
    """Whether files can be made in `folder` (made if missing), tried rather than judged from
    mode bits: root passes those on a read-only file system."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def redirect_builds() -> dict[str, Path]:
    """Point each quanto extension not loaded yet whose build folder cannot be written to
    one in the user's cache (built there once per torch); returns what moved, by name."""
    from core.models import cache_dir

    moved = {}
    for name, ext in _registered().items():
        if ext._lib is not None or writable(Path(ext.build_directory)):
            continue
        folder = cache_dir() / "quanto-kernels" / name
        if not writable(folder):
            raise UserError(
                f"optimum-quanto builds its {name} kernels on first use, but neither its own folder "
                f"{ext.build_directory} nor {folder} can be written. Set IMPQ_TUI_CACHE to a "
                "writable folder.")
        ext.build_directory = str(folder)
        moved[name] = folder
    return moved


def holders(path: Path) -> list[int]:
    """Pids of live processes that hold `path` open (Linux /proc; [] where unreadable)."""
    target = os.path.realpath(path)
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == target:
                    pids.append(int(entry.name))
                    break
        except OSError:      # gone meanwhile, or another user's process
            continue
    return pids


def clear_stale_locks(timeout_s: float = BUILD_TIMEOUT_S, cancel: threading.Event | None = None,
                      log=lambda message: None) -> None:
    """Remove quanto build locks whose builder is gone; wait, bounded, for a live one."""
    for lock in quanto_locks():
        deadline = time.monotonic() + timeout_s
        while lock.exists():
            owners = [pid for pid in holders(lock) if pid != os.getpid()]
            if not owners:
                lock.unlink(missing_ok=True)
                log(f"removed {lock}: a stale lock left by a quanto extension build that was "
                    "killed")
                break
            if cancel is not None and cancel.is_set():
                raise Cancelled
            if time.monotonic() > deadline:
                raise UserError(
                    f"process {owners[0]} has held {lock} for over {timeout_s:.0f} s while building "
                    "optimum-quanto's C++ extension. Wait for it to finish, or stop that process "
                    "and remove the file.")
            time.sleep(0.2)
