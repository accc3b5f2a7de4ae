"""Faults a long run must survive, on real SPQE runs of a tiny real checkpoint: out of
GPU memory (injected: CI has no GPU), NaN/inf losses, a full disk (a real 256 KiB tmpfs
where mounting is allowed, and an injected ENOSPC everywhere), edited or truncated run
files, a second writer, a stale lock, SIGTERM and SIGHUP. SIGKILL at random moments is
bench/kill_trials.py (20 trials); test_cli.py kills once."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_cli import ENV, ROOT, TINY_RUN, cli

from core import events
from core.engine import run_spqe
from core.errors import UserError
from core.evaluate import allocate
from core.models import load_model
from core.runs import SAMPLES, RunConfig, RunDir
from core.switching import PrefixEvaluator


def tiny_config(model_dir, samples: int = 3, **kw) -> RunConfig:
    return RunConfig(model=str(model_dir), samples=samples, windows=4, window_tokens=32,
                     device="cpu", micro_batch=4, **kw)


class Events(list):
    def __call__(self, event) -> None:
        self.append(event)

    def warnings(self) -> list[str]:
        return [e.message for e in self if isinstance(e, events.Log) and e.level == "warning"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """An uninterrupted 3-sample run, in process, with no fault."""
    run = RunDir.create(tmp_path_factory.mktemp("ref") / "run", tiny_config(tiny_model_dir))
    assert run_spqe(run.config, run) == "completed"
    return run


# ---------------------------------------------------------------- out of GPU memory

def _oom_above(limit: int, calls: list):
    """A layer call that runs out of memory for micro-batches above `limit` windows, as
    torch.cuda does (the same exception class)."""
    from core.switching import _layer_call

    def call(layer, h, kwargs):
        calls.append(h.shape[0])
        if h.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return _layer_call(layer, h, kwargs)
    return call


def _oom_hook(layer, limit: int):
    """A decoder layer that runs out of memory for more than `limit` windows, in the full
    forward pass and in the cached re-evaluation alike."""
    def hook(_module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def test_oom_halves_the_micro_batch_and_measures_the_same(tiny_model_dir):
    """Two evaluators over one model; between evaluations a layer changes (as SPQE's
    switch does). The one that runs out of memory measures what the other does."""
    loaded = load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    windows = torch.randint(0, 400, (8, 32), generator=torch.Generator().manual_seed(0))
    clean = PrefixEvaluator(loaded, windows, 8)
    retries = []
    faulty = PrefixEvaluator(loaded, windows, 8, on_retry=retries.append)
    expected, got = [clean.evaluate()], []
    for k, layer in enumerate((2, 1, 3)):
        with torch.no_grad():
            for p in loaded.layers[layer].parameters():
                p.mul_(0.7)
        expected.append(clean.evaluate(layer))
        hook = _oom_hook(loaded.layers[1], limit=2) if k == 1 else None
        if k == 0:
            got.append(faulty.evaluate())             # its first pass, at this state
            faulty.evaluate(layer)
        else:
            got.append(faulty.evaluate(layer))
        if hook:
            hook.remove()
    expected = expected[1:]
    assert faulty.micro_batch == 2
    assert [r.split(" (")[0] for r in retries] == [
        "out of GPU memory at micro-batch 8: continuing with micro-batch 4",
        "out of GPU memory at micro-batch 4: continuing with micro-batch 2"]
    assert len(set(expected)) == 3                       # each change moved the loss
    assert got == pytest.approx(expected, rel=1e-6)


def test_oom_with_one_window_stops_with_a_message(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    windows = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    evaluator = PrefixEvaluator(loaded, windows, 2)
    evaluator.evaluate()                       # the cache is built; now memory runs out
    _oom_hook(loaded.layers[1], limit=0)
    with pytest.raises(UserError, match="even with one window of 32 tokens.*`window_tokens`"):
        evaluator.evaluate(1)


def test_engine_continues_after_oom(tiny_model_dir, tmp_path, reference, monkeypatch):
    import core.switching

    calls = []
    monkeypatch.setattr(core.switching, "_layer_call", _oom_above(1, calls))
    run = RunDir.create(tmp_path / "run", tiny_config(tiny_model_dir))
    seen = Events()
    assert run_spqe(run.config, run, seen) == "completed"
    assert any("out of GPU memory at micro-batch 2: continuing with micro-batch 1" in w
               for w in seen.warnings())
    assert "out of GPU memory at micro-batch" in (run.path / "events.log").read_text()
    # other micro-batches sum the float32 losses in another order: v (about 6 nats/token)
    # agrees to a few float32 ulps, so the marginals agree to 5e-6 nats/token
    np.testing.assert_allclose(run.D(), reference.D(), rtol=0, atol=5e-6)


# ---------------------------------------------------------------- NaN and infinity

def _poison(monkeypatch, layer: int, when=None):
    """Give `layer`'s 2-bit weights an infinite entry, as an overflowing quantizer would:
    a real forward pass then yields a non-finite loss whenever that layer is at 2 bits."""
    import core.engine
    from core.switching import LOW, LayerSwitch

    class Poisoned(LayerSwitch):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            w = self.modules[layer][LOW][0].weight
            w.data = w.data.clone()
            w.data[0, 0] = float("inf")

    monkeypatch.setattr(core.engine, "LayerSwitch", Poisoned)


def test_a_layer_that_breaks_the_loss_is_named_and_the_run_stops(tiny_model_dir, tmp_path, monkeypatch):
    _poison(monkeypatch, layer=2)
    run = RunDir.create(tmp_path / "run", tiny_config(tiny_model_dir))
    seen = Events()
    with pytest.raises(UserError) as e:
        run_spqe(run.config, run, seen)
    message = str(e.value)
    assert "layer 2 at 2 bits alone gives a non-finite loss" in message
    assert "all-2-bit state" in message and "`group_size`" in message   # the CLI shows --group-size
    assert any(isinstance(x, events.Failed) for x in seen)
    # recorded as such: on disk, flagged, with nulls (valid JSON), out of every estimate
    line = (run.path / SAMPLES).read_text().splitlines()[0]
    record = json.loads(line)
    assert record["nonfinite"]["value"] in ("nan", "inf") and 2 in record["nonfinite"]["low_layers"]
    assert None in record["d"] and record["v_low"] is None and record["v_high"] is not None
    assert len(run.samples()) == 1 and run.D().shape == (0, 4)
    assert json.loads((run.path / "status.json").read_text())["state"] == "failed"
    with pytest.raises(UserError, match="no finished SPQE sample"):
        allocate(run, bits=3.0)


def test_a_transient_nonfinite_state_is_flagged_and_the_run_goes_on(tiny_model_dir, tmp_path,
                                                                    monkeypatch, reference):
    """A loss that is infinite in one intermediate state only (all-2-bit is finite): that
    sample is kept flagged, left out of D, the user told; the others are the reference's."""
    import core.engine
    from core.spqe import permutation
    from core.switching import LOW, LayerSwitch

    first = [int(permutation(0, 0, 4)[0])]          # sample 0's first state: this layer low
    original = PrefixEvaluator.evaluate
    switch = {}

    class Tracking(LayerSwitch):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            switch["s"] = self

    def evaluate(self, from_layer=0):
        v = original(self, from_layer)
        low = [i for i, b in enumerate(switch["s"].bits) if b == LOW]
        return float("inf") if low == first else v

    monkeypatch.setattr(core.engine, "LayerSwitch", Tracking)
    monkeypatch.setattr(PrefixEvaluator, "evaluate", evaluate)
    run = RunDir.create(tmp_path / "run", tiny_config(tiny_model_dir))
    seen = Events()
    assert run_spqe(run.config, run, seen) == "completed"
    warning = next(w for w in seen.warnings() if w.startswith("sample 1:"))
    assert f"the loss became inf (layers at 2 bits then: {first[0]})" in warning
    assert f"layer {first[0]} at 2 bits alone gives a non-finite loss" in warning
    assert len(run.samples()) == 3
    # every sample whose permutation starts with that layer passes through that state
    good = [m for m in range(3) if int(permutation(0, m, 4)[0]) != first[0]]
    assert 0 not in good and good
    assert [r["m"] for r in run.finite_samples()] == good
    np.testing.assert_array_equal(run.D(), reference.D()[good])
    assert next(e for e in seen if isinstance(e, events.SampleDone) and e.index == 0).finite is False


def test_nonfinite_marginals_never_reach_the_solver():
    from core.interactions import quadratic_model

    with pytest.raises(ValueError, match="NaN or infinite"):
        quadratic_model(np.array([[0.1, np.nan], [0.2, 0.3]]))


# ---------------------------------------------------------------- a full disk

def _to_samples(fd: int) -> bool:
    """Whether fd is open on a samples.jsonl (other writes, events.log's, go through)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(SAMPLES)
    except OSError:
        return True


def _enospc_after(n_ok: int, partial: bool):
    """os.write to samples.jsonl that works n_ok times, then (optionally) writes half the
    bytes and fails."""
    real = os.write
    count = [0]

    def write(fd, data):
        if not _to_samples(fd):
            return real(fd, data)
        count[0] += 1
        if count[0] <= n_ok:
            return real(fd, data)
        if partial:
            real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


@pytest.mark.parametrize("partial", [False, True], ids=["nothing-written", "half-a-line"])
def test_disk_full_while_appending_loses_only_that_sample(tiny_model_dir, tmp_path, reference,
                                                          monkeypatch, partial):
    import core.runs

    run = RunDir.create(tmp_path / "run", tiny_config(tiny_model_dir))
    monkeypatch.setattr(core.runs.os, "write", _enospc_after(1, partial))
    with pytest.raises(UserError) as e:
        run_spqe(run.config, run)
    assert "no space left on device (sample 2 was not saved)" in str(e.value)   # 1-based, as shown
    assert "resume the run (`resume`)" in str(e.value)
    monkeypatch.undo()
    data = (run.path / SAMPLES).read_bytes()
    assert data.endswith(b"\n") != partial            # a torn half line, or nothing
    assert [r["m"] for r in run.samples()] == [0]      # that half line never reads as a sample
    again = RunDir.open(run.path)
    assert run_spqe(again.config, again) == "completed"
    assert (run.path / SAMPLES).read_bytes().count(b"\n") == 3
    np.testing.assert_array_equal(again.D(), reference.D())


def test_a_failed_json_write_keeps_the_old_file(tmp_path, monkeypatch):
    import core.runs

    run = RunDir.create(tmp_path / "run", RunConfig())
    before = (run.path / "config.json").read_bytes()

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(core.runs.os, "fsync", fail)
    with pytest.raises(UserError, match="cannot write .*config.json: no space left on device"):
        run.update_config(RunConfig(samples=7))
    monkeypatch.undo()
    assert (run.path / "config.json").read_bytes() == before
    assert sorted(p.name for p in run.path.iterdir()) == ["config.json", "run.lock"]


def test_a_failed_write_of_a_derived_file_says_to_run_the_command_again(tmp_path, monkeypatch):
    """allocations/ and evals/ are derived: the hint is to repeat the command, not to resume."""
    import core.runs

    run = RunDir.create(tmp_path / "run", RunConfig())

    def fail(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(core.runs.os, "fsync", fail)
    (run.path / "allocations").mkdir()
    with pytest.raises(UserError) as e:
        run.write_json("allocations/bits-2.50.json", {"q": [0, 1]})
    message = str(e.value)
    assert "allocations/bits-2.50.json: disk quota exceeded" in message
    assert "`resume`" not in message and "run the command again" in message
    assert f"run in {run.path} is unchanged" in message
    with pytest.raises(UserError) as e:
        run.write_json("status.json", {"state": "running"})
    assert "resume" not in str(e.value) and "run the same command again" in str(e.value)
    (run.path / SAMPLES).write_text("{}\n")          # once a sample is on disk: resume it
    with pytest.raises(UserError) as e:
        run.write_json("status.json", {"state": "running"})
    assert f"resume the run (`resume`) from {run.path}" in str(e.value)
    monkeypatch.undo()
    assert list((run.path / "allocations").iterdir()) == []


@pytest.fixture
def small_fs(tmp_path):
    """A real 256 KiB tmpfs, where this process may mount one (root); skipped elsewhere."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


ENDLESS = 100_000      # samples: a tiny sample takes milliseconds, so faults land mid-run


def _resume_past(path, done: list, reference: RunDir) -> None:
    """Resume a few samples past what was done; the vectors are the uninterrupted run's."""
    target = max(len(done) + 2, 3)
    cli("run", "--resume", path, "--samples", target, "--quiet", check=True)
    D = RunDir.open(path).D()
    assert D.shape == (target, 4)
    np.testing.assert_array_equal(D[:3], reference.D())


def test_a_really_full_disk(tiny_model_dir, small_fs, reference):
    """The run's folder on a 256 KiB filesystem that a ballast file fills up mid-run:
    the CLI stops with the reason, nothing invalid is left, and after freeing space the
    resumed run equals the uninterrupted one."""
    path = small_fs / "run"
    ballast = small_fs / "ballast"
    proc = subprocess.Popen([sys.executable, "-m", "impq_tui", "run", "--model", str(tiny_model_dir),
                             "--samples", str(ENDLESS), "--run-dir", str(path), *TINY_RUN],
                            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (path / SAMPLES).exists() and (path / SAMPLES).read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)    # fill the disk to the last byte
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    _, stderr = proc.communicate(timeout=240)
    if proc.returncode == 0:
        pytest.skip("the run finished before the disk filled up")
    assert "no space left on device" in stderr and "Traceback" not in stderr, stderr
    status = json.loads((path / "status.json").read_text())
    assert status["state"] == "failed", status        # not "running": rewritten in place
    done = [r["m"] for r in RunDir.open(path).samples()]
    assert done == list(range(len(done))) and len(done) >= 1
    ballast.unlink()
    _resume_past(path, done, reference)


# ---------------------------------------------------------------- integrity

def test_an_edited_sample_line_is_reported_with_its_number(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference.path, copy)
    lines = (copy / SAMPLES).read_text().splitlines(True)
    lines[1] = lines[1].replace('"m": 1', '"m": 7')
    (copy / SAMPLES).write_text("".join(lines))
    proc = cli("solve", copy, "--bits", "3")
    assert proc.returncode != 0 and "line 2 is damaged" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_truncated_samples_file_keeps_the_whole_lines(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference.path, copy)
    data = (copy / SAMPLES).read_bytes()
    (copy / SAMPLES).write_bytes(data[:-40])                # a crash mid-way through line 3
    assert [r["m"] for r in RunDir.open(copy).samples()] == [0, 1]
    proc = cli("run", "--resume", copy, "--quiet", check=True)
    assert proc.returncode == 0
    np.testing.assert_array_equal(RunDir.open(copy).D(), reference.D())


def test_edited_costs_are_refused(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference.path, copy)
    costs = json.loads((copy / "costs.json").read_text())
    costs["m_lo"][0] //= 2                                 # a layer that looks cheaper
    (copy / "costs.json").write_text(json.dumps(costs))
    proc = cli("solve", copy, "--bits", "3")
    assert proc.returncode != 0 and "costs.json was edited or is damaged" in proc.stderr


def test_a_run_never_continues_with_another_config(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference.path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["seed"] = 1                                      # hash left as it was
    (copy / "config.json").write_text(json.dumps(config))
    before = (copy / SAMPLES).read_bytes()
    proc = cli("run", "--resume", copy, "--samples", 5, "--quiet")
    assert proc.returncode != 0 and "config_hash does not match" in proc.stderr
    assert (copy / SAMPLES).read_bytes() == before


# ---------------------------------------------------------------- one writer, stale locks

def _start(model_dir, path, samples: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "impq_tui", "run", "--model", str(model_dir),
                             "--samples", str(samples), "--run-dir", str(path), *TINY_RUN],
                            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_samples(proc, path, n: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (path / SAMPLES).exists() and (path / SAMPLES).read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {n} samples (exit {proc.poll()})")


def test_second_writer_refused_then_stale_lock_taken_over(tiny_model_dir, tmp_path, reference):
    path = tmp_path / "run"
    writer = _start(tiny_model_dir, path, ENDLESS)
    try:
        _wait_for_samples(writer, path, 1)
        second = cli("run", "--resume", path, "--quiet")
        assert second.returncode != 0
        assert f"is being written by pid {writer.pid} on" in second.stderr
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert f"pid {writer.pid}" in (path / "run.lock").read_text()   # the dead writer's name
    _resume_past(path, RunDir.open(path).samples(), reference)
    assert f"took over run.lock from pid {writer.pid}" in (path / "events.log").read_text()
    assert (path / "run.lock").read_text() == ""                  # released cleanly this time


# ---------------------------------------------------------------- SIGTERM, SIGHUP

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_stops_cleanly_and_the_run_resumes(tiny_model_dir, tmp_path, reference, sig):
    """A dropped SSH session (SIGHUP) or a scheduler (SIGTERM): the sample in flight is
    abandoned, everything finished is on disk, the exit says how to resume."""
    path = tmp_path / "run"
    proc = _start(tiny_model_dir, path, ENDLESS)
    _wait_for_samples(proc, path, 1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    status = json.loads((path / "status.json").read_text())
    assert status["state"] == "cancelled"
    assert (path / "run.lock").read_text() == ""                  # no lock left behind
    done = RunDir.open(path).samples()
    assert 1 <= len(done) < ENDLESS
    _resume_past(path, done, reference)


# ---------------------------------------------------------------- one reader (core.files)

def test_costs_without_a_checksum_are_refused_and_resume_measures_them_again(reference, tmp_path):
    """An edit that also drops the checksum is refused; deleting costs.json as the message
    says and resuming a finished run measures it again (it used to be a dead end)."""
    copy = tmp_path / "copy"
    shutil.copytree(reference.path, copy)
    costs = json.loads((copy / "costs.json").read_text())
    del costs["crc"]
    costs["m_lo"][0] //= 2
    (copy / "costs.json").write_text(json.dumps(costs))
    proc = cli("solve", copy, "--bits", "3")
    assert proc.returncode == 2 and "its checksum is missing" in proc.stderr
    (copy / "costs.json").unlink()
    cli("run", "--resume", copy, "--quiet", check=True)
    assert RunDir.open(copy).read_costs() == RunDir.open(reference.path).read_costs()
    cli("solve", copy, "--bits", "3", check=True)


def test_a_linked_samples_file_is_refused_and_its_target_left_alone(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference.path, copy)
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes((copy / SAMPLES).read_bytes() + b"no newline at the end")
    before = outside.read_bytes()
    (copy / SAMPLES).unlink()
    (copy / SAMPLES).symlink_to(outside)
    proc = cli("run", "--resume", copy, "--quiet")
    assert proc.returncode == 2 and "symbolic link" in proc.stderr and "Traceback" not in proc.stderr
    assert outside.read_bytes() == before


def test_a_whole_last_record_missing_only_its_newline_is_kept(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference.path, copy)
    data = (copy / SAMPLES).read_bytes()
    (copy / SAMPLES).write_bytes(data[:-1])                 # every byte but the final newline
    RunDir.open(copy).lock()
    assert (copy / SAMPLES).read_bytes() == data
    assert len(RunDir.open(copy).samples()) == len(reference.samples())


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "huge"])
def test_run_files_that_are_not_files_are_clear_errors(reference, tmp_path, kind):
    """samples.jsonl or costs.json as a FIFO (reading used to hang), a folder, a link to
    /dev/zero (reading never ended) or a file past the size bound: a message, exit 2."""
    import core.files

    copy = tmp_path / "copy"
    shutil.copytree(reference.path, copy)
    target = copy / ("costs.json" if kind == "device" else SAMPLES)
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "device":
        target.symlink_to("/dev/zero")
    else:
        with open(target, "wb") as f:
            f.truncate(core.files.RUN_FILE_LIMIT + 1)         # sparse: no disk used
    start = time.monotonic()
    proc = cli("solve", copy, "--bits", "3", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - start < 30
    expected = {"fifo": "not a regular file", "directory": "folder", "device": "not a regular file",
                "huge": "more than"}[kind]
    assert expected in proc.stderr


def test_a_closed_output_pipe_does_not_stop_the_run(tiny_model_dir, tmp_path):
    """`impq-tui run ... 2>&1 | head -1`: the reader goes away, the run goes on to the end.
    Here the reader is gone before the first line (`| true`), so every write fails."""
    run_dir = tmp_path / "piped"
    shown = [a for a in map(str, TINY_RUN) if a != "--quiet"]      # with its display
    shell = (f"{sys.executable} -m impq_tui run --model {tiny_model_dir} --samples 3 "
             f"{' '.join(shown)} --run-dir {run_dir} 2>&1 | true")
    subprocess.run(["bash", "-c", shell], env=ENV, cwd=ROOT, timeout=300)
    deadline = time.time() + 120
    while time.time() < deadline and json.loads((run_dir / "status.json").read_text()
                                                if (run_dir / "status.json").exists() else "{}").get("state") != "completed":
        time.sleep(0.2)
    assert len(RunDir.open(run_dir).samples()) == 3
    assert "output closed" in (run_dir / "events.log").read_text()


def test_solve_output_to_a_full_disk_or_a_closed_pipe(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference.path, copy)
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "impq_tui", "solve", str(copy), "--bits", "3",
                               "--json"], env=ENV, cwd=ROOT, stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert proc.returncode == 2 and "cannot write the output" in proc.stderr
    assert "Traceback" not in proc.stderr
    shell = f"{sys.executable} -m impq_tui solve {copy} --bits 3 | head -c 10; exit ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", shell], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in proc.stderr and proc.returncode in (0, 141)


def test_an_export_whose_run_is_read_only_still_reports_success(reference, tmp_path, monkeypatch):
    """The export is published before its note goes into the run directory: failing to
    write the note is a warning, not an error after the fact."""
    from core.export import export_model
    from core.runs import RunDir as Run

    def refuse(self, name, obj):
        raise UserError(f"cannot write {self.path / name}: read-only file system")

    monkeypatch.setattr(Run, "write_json", refuse)
    seen = []
    result = export_model(RunDir.open(reference.path), [4] * 4, "hqq", str(tmp_path / "out"),
                          callback=seen.append)
    assert (tmp_path / "out" / "qmodel.pt").is_file() and result.bytes > 0
    assert any("could not be written" in getattr(e, "message", "") for e in seen)


def test_resume_with_fewer_samples_than_done_is_refused(reference, tmp_path):
    copy = tmp_path / "a run with spaces"
    shutil.copytree(reference.path, copy)
    before = (copy / "config.json").read_bytes()
    proc = cli("run", "--resume", copy, "--samples", 2, "--quiet")
    assert proc.returncode == 2 and "--samples is 2, fewer than the 3 samples" in proc.stderr
    assert (copy / "config.json").read_bytes() == before


# ---------------------------------------------------------------- round two (issue 13)

def test_a_new_run_that_fills_the_disk_says_run_again_and_status_says_failed(tiny_model_dir, tmp_path,
                                                                            monkeypatch):
    """ENOSPC at the first sample, and no new file can be made either: the message does not
    ask to resume a run the CLI is about to delete, and status.json does not stay
    "running" (it is rewritten in place, the one write a full disk still takes)."""
    import core.runs

    run = RunDir.create(tmp_path / "run", tiny_config(tiny_model_dir))
    run.write_json("status.json", {"state": "running", "pid": os.getpid()})
    full = []                     # set at the first sample's write: from then on, nothing fits
    real_mkstemp, real_write = core.runs.tempfile.mkstemp, os.write

    def write(fd, data):
        if not _to_samples(fd):
            return real_write(fd, data)
        full.append(True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def mkstemp(*args, **kwargs):
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(core.runs.os, "write", write)
    monkeypatch.setattr(core.runs.tempfile, "mkstemp", mkstemp)
    with pytest.raises(UserError) as e:
        run_spqe(run.config, run)
    monkeypatch.undo()
    assert "no space left on device (sample 1 was not saved)" in str(e.value)
    assert "`resume`" not in str(e.value) and "run the same command again" in str(e.value)
    status = json.loads((run.path / "status.json").read_text())
    assert status["state"] == "failed" and "no space left" in status["message"]


def test_taking_the_lock_on_a_full_disk_or_a_read_only_file_system(reference, tmp_path, monkeypatch):
    """run.lock cannot be written: a message, the lock not held, nothing changed."""
    import core.runs

    copy = tmp_path / "run"
    shutil.copytree(reference.path, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(core.runs.os, "pwrite", full)
    with pytest.raises(UserError, match=r"run.lock, which marks the run's one writer: no space left "
                                        r"on device \(nothing was changed\)"):
        RunDir.open(copy).lock()
    monkeypatch.undo()
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith("run.lock") and flags & (os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(core.runs.os, "open", read_only)
    with pytest.raises(UserError, match="read-only file system .*solve, eval, export"):
        RunDir.open(copy).lock()
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != "run.lock"} == \
        {k: v for k, v in before.items() if k != "run.lock"}
    run = RunDir.open(copy)
    run.lock()                                   # the failed attempts left no lock held
    run.unlock()


def test_resume_on_a_really_read_only_file_system(reference, small_fs):
    copy = small_fs / "run"
    shutil.copytree(reference.path, copy)
    done = subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only here")
    proc = cli("run", "--resume", copy, "--samples", 4, "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "read-only file system" in proc.stderr
    solved = cli("solve", copy, "--bits", 3)             # reading it still works
    assert solved.returncode == 0 and "Traceback" not in solved.stderr, solved.stderr


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
def test_an_export_onto_a_really_full_disk(reference, small_fs, backend):
    """safetensors (quanto) and torch's zip writer (hqq) each fail their own way."""
    proc = cli("export", reference.path, "--bits", 3, "--backend", backend, "--out",
               small_fs / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "no space left on device" in proc.stderr
    assert list(small_fs.iterdir()) == []            # no partial folder left


def _writer_errors():
    from safetensors import SafetensorError

    return {
        "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device "
                                       "(os error 28)"),
        "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 192704 "
                              "vs 192656"),
        "transformers": OSError(errno.ENOSPC, "No space left on device", "config.json"),
    }


@pytest.mark.parametrize("library", ["safetensors", "torch", "transformers", "tokenizer"])
def test_an_export_whose_writer_fails_is_a_message(reference, tmp_path, monkeypatch, library):
    """Each library's own write error (injected; the tmpfs test above does it for real)."""
    from types import SimpleNamespace

    import core.export.base
    from core.export import export_model
    from core.export.quanto import QuantoExporter

    error = _writer_errors().get(library, OSError(errno.ENOSPC, "No space left on device"))
    if library == "tokenizer":
        from transformers import PreTrainedTokenizerBase

        target = (PreTrainedTokenizerBase, "save_pretrained")
    else:
        target = (QuantoExporter, "write")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(*target, fail)
    monkeypatch.setattr(core.export.base.os, "statvfs",        # torch's error has no errno
                        lambda path: SimpleNamespace(f_bavail=0, f_frsize=4096))
    with pytest.raises(UserError) as e:
        export_model(RunDir.open(reference.path), [4] * 4, "quanto", str(tmp_path / "out"))
    assert f"cannot write the export into {tmp_path}: no space left on device" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_the_embedded_model_with_an_unwritable_cache_names_the_variable(tmp_path, monkeypatch):
    """A read-only HOME (here: a cache path below a file, which root cannot write either):
    the message names IMPQ_TUI_CACHE, before the GGUF is read (25 s on a CPU)."""
    import core.models

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("IMPQ_TUI_CACHE", str(tmp_path / "file" / "cache"))

    def not_now(*args):
        raise AssertionError("the GGUF was read before the cache was found unwritable")

    monkeypatch.setattr(core.models, "_load_gguf", not_now)
    with pytest.raises(UserError, match="cannot be written: a component of the path is not a "
                                        "folder. Set IMPQ_TUI_CACHE .or XDG_CACHE_HOME."):
        core.models.embedded_checkpoint()


def test_an_absurd_micro_batch_is_a_message(tmp_path):
    proc = cli("run", "--micro-batch", "99999999999999999999999", "--run-dir", tmp_path / "run",
               "--samples", 1, "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--micro-batch 99999999999999999999999 is more than 1,000,000" in proc.stderr
    assert not (tmp_path / "run").exists()


def _broken_copy(model_dir, path, edit):
    shutil.copytree(model_dir, path)
    edit(path)
    return str(path)


def test_damaged_or_mismatched_checkpoints_are_messages(tiny_model_dir, tmp_path):
    """A weight file cut short, a config.json whose sizes are not the weights', one that
    asks for more layers than the weights hold (transformers would make them up with
    random values, silently), one that does not validate."""
    def truncate(p):
        os.truncate(p / "model.safetensors", 400_000)

    def config(**changes):
        def edit(p):
            data = json.loads((p / "config.json").read_text())
            (p / "config.json").write_text(json.dumps({**data, **changes}))
        return edit

    cases = {
        "truncated": (truncate, ("a weight file is damaged or cut short (Error while deserializing "
                                 "header")),
        "wider": (config(intermediate_size=256), ("its weights do not have the shapes its "
                  "config.json gives: model.layers.0.mlp.down_proj.weight is [64, 128] in "
                  "model.safetensors, [64, 256] by config.json")),
        "deeper": (config(num_hidden_layers=6), ("its weight files lack 18 tensors that its "
                   "config.json asks for (model.layers.4.")),
        "invalid": (config(num_hidden_layers="four"), ("Validation error for field "
                    "'num_hidden_layers': TypeError: Field 'num_hidden_layers' expected int, got str")),
    }
    for name, (edit, expected) in cases.items():
        path = _broken_copy(tiny_model_dir, tmp_path / name, edit)
        with pytest.raises(UserError) as e:
            load_model(path, torch.device("cpu"))
        assert expected in str(e.value), (name, str(e.value))


def test_an_unreadable_config_is_not_called_damaged(reference, tmp_path, monkeypatch):
    import core.files

    copy = tmp_path / "run"
    shutil.copytree(reference.path, copy)
    real_open = os.open

    def denied(path, flags, *args):
        if str(path).endswith("config.json"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(core.files.os, "open", denied)
    with pytest.raises(UserError) as e:
        RunDir.open(copy)
    assert "permission denied" in str(e.value) and "damaged" not in str(e.value)


# ---------------------------------------------------------------- red team, round two

def _within(seconds: float, fn):
    """fn() on a thread; fails if it is still running after `seconds` (a hang)."""
    import threading

    out, error = [], []

    def call():
        try:
            out.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} still running after {seconds} s"
    if error:
        raise error[0]
    return out[0] if out else None


@pytest.mark.parametrize("name", ["events.log", "run.lock", "control.json", "process.log"])
@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_the_app_and_the_run_process_never_block_on_a_fifo_or_read_a_device(reference, tmp_path,
                                                                          name, kind):
    """The app's follow thread read events.log, run.lock and control.json with plain
    read_text: a FIFO in their place hung it for good, /dev/zero filled its memory. The run
    process's log() blocked on a FIFO events.log; starting a run from the app blocked on a
    FIFO process.log. All are regular-file-only, bounded, non-blocking now."""
    from impq_tui.follow import RunSource, read_snapshot

    copy = tmp_path / "run"
    shutil.copytree(reference.path, copy)
    (copy / name).unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(copy / name)
    else:
        os.symlink("/dev/zero", copy / name)
    run = RunDir.open(copy)
    snapshot = _within(30, lambda: read_snapshot(run))
    assert len(snapshot.D) == 3
    _within(30, lambda: run.log("a line"))
    if name == "process.log":
        with pytest.raises(OSError):
            _within(30, lambda: RunSource(run).start())


def test_an_option_like_run_folder_is_resumed_by_the_app(reference, tmp_path, monkeypatch):
    """The app started `impq-tui run --resume -r` for a folder named -r: argparse took it
    for an option and the run never started."""
    import impq_tui.follow
    from impq_tui.follow import RunSource

    monkeypatch.chdir(tmp_path)
    shutil.copytree(reference.path, tmp_path / "-r")
    started = []

    class Popen:
        def __init__(self, command, **kwargs):
            started.append(command)

        def wait(self):
            return 0

    monkeypatch.setattr(impq_tui.follow.subprocess, "Popen", Popen)
    RunSource(RunDir.open("-r")).start(samples=4)
    command = started[0]
    assert command[3:] == ["run", f"--resume={tmp_path / '-r'}", "--samples", "4"]
    monkeypatch.undo()
    proc = subprocess.run([sys.executable, "-m", *command[2:], "--quiet"], env=ENV, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(RunDir.open(tmp_path / "-r").samples()) == 4


def test_run_files_are_readable_by_others_like_any_written_file(tmp_path):
    """mkstemp makes files private (0600): a colleague following a run in a shared folder
    could not read its config.json or status.json."""
    run = RunDir.create(tmp_path / "run", RunConfig())
    run.write_json("status.json", {"state": "running"})
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "status.json"):
        assert (run.path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_export_force_onto_a_link_replaces_the_link_and_leaves_nothing(reference, tmp_path):
    from core.export import export_model

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_text("precious")
    (tmp_path / "out").symlink_to(keep)
    export_model(RunDir.open(reference.path), [4, 2, 4, 2], "hqq", str(tmp_path / "out"), force=True)
    assert (tmp_path / "out" / "qmodel.pt").is_file() and not (tmp_path / "out").is_symlink()
    assert (keep / "file").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "out"]     # no .out.old-PID


def test_an_over_long_export_name_and_a_file_in_the_way_are_messages(reference, tmp_path):
    """A 250-character --out fits, its hidden partial folder (.OUT.partial-XXXX) does not:
    that was a traceback. A file where a folder should be said "File exists ... make room"."""
    from core.export import export_model
    from core.files import why

    with pytest.raises(UserError, match="file name too long .* Choose a shorter `out`"):
        export_model(RunDir.open(reference.path), [4] * 4, "hqq", str(tmp_path / ("x" * 250)))
    assert list(tmp_path.iterdir()) == []
    assert why(OSError(errno.EEXIST, os.strerror(errno.EEXIST))) == "a file of that name is in the way"
