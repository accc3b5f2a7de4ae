"""The run directory: everything one SPQE run produces, written so a crash loses at most
the sample in flight.

    config.json     the resolved run configuration and the hash of what decides the vectors
    costs.json      bytes per layer at each precision, weights per layer, layer names
    samples.jsonl   one line per finished sample (permutation, d, checksum), appended and fsynced
    events.log      human-readable log
    status.json     the writer's latest progress (rewritten about once a second), for watchers
    run.lock        held (flock) by the one process writing the run
    allocations/, evals/, exports/   results of later commands
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
import tempfile
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.files import read_bytes, read_text
from core.files import why as os_why

CONFIG, COSTS, SAMPLES, LOG, LOCK = "config.json", "costs.json", "samples.jsonl", "events.log", "run.lock"
STATUS = "status.json"
FORMAT = 1


@dataclass(frozen=True)
class RunConfig:
    model: str = "embedded"          # what the user passed (hub id, path, .gguf, embedded)
    calib_text: str = "builtin"
    backend: str = "quanto"
    group_size: int = 64
    samples: int = 100
    windows: int = 8
    window_tokens: int = 256
    seed: int = 0
    antithetic: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    micro_batch: int = 8
    compile: bool = False            # torch.compile the decoder layers (GPU speed; same values)
    model_name: str = ""             # resolved short name (filled in once loaded)
    gguf_types: str = ""             # gguf backend: "LOW,HIGH" llama.cpp types ("" elsewhere)
    levels: tuple[int, ...] = (2, 4)  # the precisions SPQE steps through, ascending (README, "Levels")
    # Stop once the allocations at these budgets (bits) are settled (core.settle); () runs
    # all `samples`. Like `samples`, not part of what decides the vectors.
    until_settled: tuple[float, ...] = ()
    # What the numbers depend on beyond these fields (core.fingerprint): the model's
    # files, the calibration tokens, library versions. None in runs made before it was kept.
    fingerprint: dict | None = field(default=None, compare=False, hash=False)

    # Fields that decide the sample vectors: a run continues only with these unchanged.
    IDENTITY = ("model", "calib_text", "backend", "group_size", "windows", "window_tokens",
                "seed", "antithetic", "dtype")

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(sorted({int(b) for b in self.levels})))
        object.__setattr__(self, "until_settled", tuple(sorted({float(b) for b in self.until_settled})))

    def identity_hash(self) -> str:
        identity = {k: getattr(self, k) for k in self.IDENTITY}
        if self.gguf_types:     # only gguf runs set it: every other run keeps its hash
            identity["gguf_types"] = self.gguf_types
        if tuple(self.levels) != (2, 4):   # likewise: two-level runs keep their hash
            identity["levels"] = list(self.levels)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "config_hash": self.identity_hash(), "format": FORMAT}

    @classmethod
    def from_json(cls, data: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def resolved(self, previous: "RunConfig | None" = None) -> "RunConfig":
        """The model and calibration text as paths that mean the same files from any
        folder (absolute); a value equal to `previous`'s is kept as it was recorded."""
        from core.data import resolve_text
        from core.models import resolve_model

        changes = {}
        if previous is None or self.model != previous.model:
            changes["model"] = resolve_model(self.model)
        if previous is None or self.calib_text != previous.calib_text:
            changes["calib_text"] = resolve_text(self.calib_text)
        return replace(self, **changes)


def default_run_dir(model_name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{model_name}-{stamp}"


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: temp file, fsync, rename. The file gets the
    permissions a plain write would give (mkstemp's are private: a colleague following
    the run from a shared folder could not read config.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask, read (setting it to read it would race the app's threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def overwrite_in_place(path: Path, text: str) -> bool:
    """Rewrite an existing small file inside the blocks it already has: what still works
    on a full disk, where write_atomic needs a new file. Not atomic (a crash can leave it
    torn), so only for files readers treat as hints (status.json). False if it failed."""
    data = text.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def write_error(path: Path, exc: OSError, lost: str = "nothing was changed",
                run_dir: Path | None = None) -> UserError:
    """A failed write as a message that says what happened and what was kept. Writes of
    the run's own state (samples, costs, config) end with the resume hint; writes of
    derived files (allocations/, evals/, compare/) only ask to run the command again."""
    why = os_why(exc)
    run_dir = run_dir or path.parent
    if path.parent == run_dir and not _has_samples(run_dir):
        # A new run that fails before its first sample is removed: no folder to resume.
        hint = ("No sample had finished yet; make room or fix the permissions, then run the "
                "same command again.")
    elif path.parent == run_dir:
        hint = ("Every sample finished before is safe on disk; make room or fix the "
                f"permissions, then resume the run (`resume`) from {run_dir}.")
    else:
        hint = (f"The run in {run_dir} is unchanged; make room or fix the permissions, then "
                "run the command again.")
    return UserError(f"cannot write {path}: {why} ({lost}). {hint}")


def _has_samples(run_dir: Path) -> bool:
    try:
        return os.lstat(run_dir / SAMPLES).st_size > 0
    except OSError:
        return False


def _intact(raw: bytes) -> bool:
    """Whether raw is one whole sample record (valid JSON with a matching checksum)."""
    try:
        record = json.loads(raw)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("crc") == _crc(record)


def _crc(record: dict) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "crc"}, sort_keys=True)
    return f"{zlib.crc32(body.encode()):08x}"


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | os.PathLike, config: RunConfig) -> "RunDir":
        run = cls(path)
        config = config.resolved()      # a missing model path is refused before any folder exists
        if run.path.is_dir():
            run._clear_interrupted_create()
        if run.path.exists() and (not run.path.is_dir() or any(run.path.iterdir())):
            raise UserError(f"run directory {run.path} already exists and is not empty. Continue "
                            f"it (`resume` {run.path}), or choose another "
                            "`run_dir`.")
        run.path.mkdir(parents=True, exist_ok=True)
        run.lock()
        run.write_json(CONFIG, config.to_json())
        return run

    def _clear_interrupted_create(self) -> None:
        """A writer killed while creating the run leaves run.lock (and perhaps a temp
        file) but no config.json: nothing of value. Clear it, unless a live writer holds it."""
        names = {p.name for p in self.path.iterdir()}
        if not names or CONFIG in names or not names <= {LOCK} | {n for n in names if n.startswith(f".{CONFIG}.")}:
            return
        if LOCK in names:
            fd = os.open(self.path / LOCK, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return          # someone is creating it right now: create() refuses
            finally:
                os.close(fd)
        for name in names:
            (self.path / name).unlink(missing_ok=True)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        run = cls(path)
        if not (run.path / CONFIG).is_file():
            raise UserError(f"{run.path} is not an impq-tui run directory (no {CONFIG}). Pass the "
                            "folder that `impq-tui run` created.")
        run.config  # parse now, so a broken config fails here with a clear message
        return run

    @property
    def config(self) -> RunConfig:
        data = self.read_json(CONFIG)
        if not isinstance(data, dict):
            raise UserError(f"{self.path / CONFIG} holds no settings (a JSON "
                            f"{type(data).__name__}, not an object); the run directory is "
                            "damaged. Restore it, or start a new run.")
        config = RunConfig.from_json(data)
        if config.fingerprint is not None and not isinstance(config.fingerprint, dict):
            raise UserError(f"{self.path / CONFIG}: its fingerprint was edited or is damaged. "
                            "Restore it, or start a new run.")
        if data.get("config_hash") != config.identity_hash():
            raise UserError(f"{self.path / CONFIG} was edited or is damaged: its config_hash does "
                            "not match its contents. Restore it, or start a new run.")
        return config

    def update_config(self, config: RunConfig) -> None:
        old = self.config
        config = config.resolved(old)
        if config.fingerprint is None:
            config = replace(config, fingerprint=old.fingerprint)
        if old.identity_hash() != config.identity_hash():
            diff = [k for k in RunConfig.IDENTITY if getattr(old, k) != getattr(config, k)]
            raise UserError(f"run {self.path} was made with a different configuration "
                            f"({', '.join(f'{k}: {getattr(old, k)!r} there, {getattr(config, k)!r} now' for k in diff)}); "
                            "its samples cannot be continued with another one. Start a new run.")
        self.write_json(CONFIG, config.to_json())

    def record_fingerprint(self, fingerprint: dict) -> None:
        self.write_json(CONFIG, replace(self.config, fingerprint=fingerprint).to_json())

    # ------------------------------------------------------------ one writer
    def lock(self) -> None:
        """Hold run.lock for the life of this process; the kernel drops it if we die."""
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:      # a read-only file system or folder, a full disk
            raise self._lock_error(exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"run {self.path} is being written by {holder}. Wait for it to finish "
                            f"or stop it; open the run in the app to watch it meanwhile.") from None
        try:
            previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError as exc:
            os.close(fd)            # releases the flock
            raise self._lock_error(exc) from None
        self._lock_fd = fd
        if previous:
            # The kernel drops a flock when its holder dies, so a name left in the file is
            # a writer that crashed or was killed: its finished samples are all kept.
            self.log(f"took over run.lock from {previous}, which is no longer running")
        try:
            self._drop_torn_tail()
        except BaseException:
            self.unlock()
            raise

    def _lock_error(self, exc: OSError) -> UserError:
        return UserError(f"cannot take {self.path / LOCK}, which marks the run's one writer: "
                         f"{os_why(exc)} (nothing was changed). A run goes on only where it can "
                         "be written: make room or fix the permissions, or copy the run folder to "
                         "a writable place and continue it there (`resume`). Commands that only "
                         "read it (solve, eval, export, compare) work as it is.")

    def _drop_torn_tail(self) -> None:
        """Cut a line a crash left unfinished, so the next append starts on a fresh line; a
        whole record that lacks only its newline gets the newline instead. Only the run's
        own file is ever changed: a samples.jsonl that is a link is refused."""
        path = self.path / SAMPLES
        if not os.path.lexists(path):
            return
        data = read_bytes(path, "the run's samples", follow_links=False)
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            whole = _intact(data[keep:])
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
                try:
                    if whole:
                        os.pwrite(fd, b"\n", len(data))
                    else:
                        os.ftruncate(fd, keep)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise write_error(path, exc) from None
            self.log("closed the last sample record with its missing newline" if whole else
                     f"dropped {len(data) - keep} bytes of a sample record a crash left unfinished")

    def unlock(self) -> None:
        """Release the lock; the file is left empty (a name in it means a writer died)."""
        if self._lock_fd is not None:
            try:
                os.ftruncate(self._lock_fd, 0)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------ files
    def read_json(self, name: str):
        """A JSON file of the run, read by core.files (regular files only, bounded)."""
        path = self.path / name
        if not os.path.lexists(path):
            raise UserError(f"{path} is missing: the run directory is incomplete.")
        text = read_text(path, "the run file")
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise UserError(f"{path} cannot be read ({exc}); the run directory is damaged.") from None

    def write_json(self, name: str, obj) -> Path:
        path = self.path / name
        try:
            write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            raise write_error(path, exc, run_dir=self.path) from None
        return path

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def log(self, message: str) -> None:
        """Append to events.log: a human's record, so a full disk never fails a run here."""
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        try:
            # Never blocks (a FIFO put there) nor writes through a link to another file.
            fd = os.open(self.path / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK, 0o644)
        except OSError:
            return
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.write(fd, f"{stamp} {message}\n".encode())
        except OSError:
            pass
        finally:
            os.close(fd)

    # ------------------------------------------------------------ samples
    def append_sample(self, record: dict) -> None:
        """One line per sample, written by a single write() and fsynced: a crash leaves
        either the whole line or a torn tail that reading drops."""
        record = {**record, "cfg": self.config.identity_hash(), "t": round(time.time(), 3)}
        record["crc"] = _crc(record)
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        path = self.path / SAMPLES
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            # Whatever part of the line reached the disk has no newline: reading drops it
            # and the next lock() cuts it off.
            raise write_error(path, exc, f"sample {record.get('m', -1) + 1} was not saved") from None

    def samples(self) -> list[dict]:
        """Finished samples, ordered by index, each index once. A torn last line (a crash
        mid-write) is dropped; damage anywhere else is reported."""
        path = self.path / SAMPLES
        if not os.path.lexists(path):
            return []
        data = read_bytes(path, "the run's samples", follow_links=False)
        lines = data.split(b"\n")
        torn = len(lines) if not data.endswith(b"\n") else None   # a tail no newline closed
        cfg = self.config.identity_hash()
        records: dict[int, dict] = {}
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                ok = isinstance(record, dict) and record.get("crc") == _crc(record)
            except ValueError:
                ok = False
            if not ok:
                if number == torn:
                    continue
                raise UserError(f"{path} line {number} is damaged (bad JSON or checksum). Remove "
                                "that line to continue the run without it.")
            if record.get("cfg") != cfg:
                raise UserError(f"{path} line {number} belongs to another configuration "
                                f"(config hash {record.get('cfg')}, this run {cfg}).")
            records.setdefault(record["m"], record)
        return [records[m] for m in sorted(records)]

    def finite_samples(self) -> list[dict]:
        """The samples every estimate uses: those whose losses were all finite (with
        antithetic pairs, a flagged sample takes its partner out too, keeping the pairs)."""
        records = self.samples()
        bad = {r["m"] for r in records if r.get("nonfinite")}
        if bad and self.config.antithetic:
            bad |= {m ^ 1 for m in bad}
        return [r for r in records if r["m"] not in bad]

    def D(self) -> np.ndarray:
        """The [M, L x S] matrix of per-sample marginal vectors, one column per drop (per
        layer with two levels); non-finite samples left out."""
        rows = [r["d"] for r in self.finite_samples()]
        if not rows:
            steps = len(self.config.levels) - 1
            return np.empty((0, steps * len(self.read_json(COSTS)["m_lo"]) if self.has(COSTS) else 0))
        return np.asarray(rows, dtype=np.float64)

    def P(self) -> np.ndarray:
        """The [M, L x S] walk orders behind the rows of D(), as drop indices (i*S + k; the
        permutations of layers with two levels), in the same order."""
        from core.interactions import drop_order

        steps = len(self.config.levels) - 1
        rows = [drop_order(r["perm"], steps) for r in self.finite_samples()]
        return np.asarray(rows, dtype=np.int64) if rows else np.empty((0, self.D().shape[1]), np.int64)

    def write_costs(self, costs: dict) -> None:
        self.write_json(COSTS, {**costs, "crc": _crc(costs)})

    def read_costs(self) -> dict:
        """costs.json without its checksum; an edited or damaged file is refused."""
        data = self.read_json(COSTS)
        crc = data.pop("crc", None) if isinstance(data, dict) else None
        if crc is None or crc != _crc(data):
            raise UserError(f"{self.path / COSTS} was edited or is damaged (its checksum is "
                            f"{'missing' if crc is None else 'wrong'}): "
                            "budgets computed from it would be wrong. Delete it and continue "
                            f"the run (`resume` {self.path}) to measure it again.")
        return data

    def costs(self):
        from core.solver import Costs

        data = self.read_costs()
        return Costs.from_json(data)
