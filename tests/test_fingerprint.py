"""A run is tied to the files it measured, not to the path as typed (issue 13, bug 2):
the model path is stored absolute, and a fingerprint of the weights, model config,
tokenizer, calibration tokens and library versions is checked by `run --resume`, `eval`
and `export`. Real runs of tiny real checkpoints; each case below broke a run before."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from test_cli import ENV, TINY_RUN

from core import fingerprint
from core.engine import run_spqe
from core.errors import UserError
from core.runs import CONFIG, COSTS, SAMPLES, RunConfig, RunDir


def cli_in(cwd, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "impq_tui", *map(str, args)], env=ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


def tiny(model, samples: int = 3, **kw) -> RunConfig:
    return RunConfig(model=str(model), samples=samples, windows=4, window_tokens=32,
                     device="cpu", micro_batch=4, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """Two checkpoints of one architecture and size, different weights (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("models")
    return (save_tiny_model(root / "a", tiny_tokenizer, seed=0),
            save_tiny_model(root / "b", tiny_tokenizer, seed=1))


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    run = RunDir.create(tmp_path_factory.mktemp("ref") / "run", tiny(models[0]))
    assert run_spqe(run.config, run) == "completed"
    run.unlock()
    return run


def frozen(run: RunDir) -> dict[str, bytes]:
    """The files a refused command must leave exactly as they were."""
    return {name: (run.path / name).read_bytes() for name in (CONFIG, COSTS, SAMPLES)}


def test_the_run_records_the_resolved_model_and_a_fingerprint(reference, models):
    config = reference.config
    assert config.model == str(models[0]) and config.fingerprint["path"] == str(models[0])
    fp = config.fingerprint
    assert set(fp["weights"]) == {"model.safetensors"}
    assert set(fp["tokenizer"]) >= {"tokenizer.json", "tokenizer_config.json"}
    assert set(fp["model_config"]) == {"config.json"}
    assert fp["calibration"].startswith("4x32 sha256 ")
    assert fp["versions"]["torch"] == torch.__version__
    assert set(fp["versions"]) == {"torch", "transformers", "optimum-quanto", "impq-tui"}


def test_resume_from_another_folder_with_a_relative_path(models, tmp_path, reference):
    """The run was made in a/ with `--model model`; b/ has a folder `model` too, holding
    another checkpoint. Resuming from b/ continues with a/'s model (the vectors are the
    reference's), and naming b/'s `model` there is refused."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copytree(models[0], a / "model")
    shutil.copytree(models[1], b / "model")
    made = cli_in(a, "run", "--model", "model", "--samples", 2, "--run-dir", "run", *TINY_RUN)
    assert made.returncode == 0, made.stderr
    run = RunDir.open(a / "run")
    assert run.config.model == str(a / "model")
    resumed = cli_in(b, "run", "--resume", a / "run", "--samples", 3, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    np.testing.assert_array_equal(RunDir.open(a / "run").D(), reference.D())
    before = frozen(run)
    mixed = cli_in(b, "run", "--resume", a / "run", "--samples", 4, "--model", "model", "--quiet")
    assert mixed.returncode == 2 and "Traceback" not in mixed.stderr
    assert f"model: '{a / 'model'}' there, '{b / 'model'}' now" in mixed.stderr, mixed.stderr
    assert frozen(run) == before


def test_a_missing_path_is_never_taken_for_a_hub_id(tmp_path):
    for typed in ("./no-such-model", "~/no-such-model", "no/such/model"):
        proc = cli_in(tmp_path, "run", "--model", typed, "--samples", 1, *TINY_RUN)
        assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr
        assert "hub" not in proc.stderr.split("does not exist")[0]
        if not typed.startswith("~"):
            assert f"relative paths start from {tmp_path}" in proc.stderr
    assert list(tmp_path.iterdir()) == []            # no run folder was left


def test_a_checkpoint_replaced_at_the_same_path_is_refused(reference, models, tmp_path):
    """Same path, same size, same mtime, other weights: resume, eval, export and compare
    refuse, say which file changed (then and now), and write nothing."""
    model = tmp_path / "model"
    shutil.copytree(models[0], model)
    run = RunDir.create(tmp_path / "run", tiny(model, samples=2))
    run_spqe(run.config, run)
    run.unlock()
    weights = model / "model.safetensors"
    stat = weights.stat()
    shutil.copyfile(models[1] / "model.safetensors", weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))      # size and mtime as before
    before = frozen(run)
    old = run.config.fingerprint["weights"]["model.safetensors"]
    for args in (("run", "--resume", run.path, "--samples", 3, "--quiet"),
                 ("eval", run.path, "--bits", 3),
                 ("export", run.path, "--bits", 3, "--out", tmp_path / "out"),
                 ("compare", run.path, "--bits", 3, "--quiet")):
        proc = cli_in(tmp_path, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "weights: model.safetensors" in proc.stderr and old in proc.stderr, proc.stderr
        assert "nothing was written" in proc.stderr
        assert frozen(run) == before
    assert not (tmp_path / "out").exists()
    assert not (run.path / "evals").exists() and not (run.path / "compare").exists()
    shutil.copyfile(models[0] / "model.safetensors", weights)       # put back: it goes on
    assert run_spqe(replace_samples(run.config, 3), run) == "completed"


def replace_samples(config: RunConfig, samples: int) -> RunConfig:
    from dataclasses import replace

    return replace(config, samples=samples)


def test_a_changed_calibration_text_is_refused(models, tmp_path):
    from pydoc_data.topics import topics

    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:60]))
    run = RunDir.create(tmp_path / "run", tiny(models[0], samples=2, calib_text=str(text)))
    run_spqe(run.config, run)
    run.unlock()
    before = frozen(run)
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[60:120]))
    proc = cli_in(tmp_path, "run", "--resume", run.path, "--samples", 3, "--quiet")
    assert proc.returncode == 2 and "calibration tokens: 4x32 sha256" in proc.stderr, proc.stderr
    assert frozen(run) == before


def test_other_library_versions_refuse_a_resume_but_not_an_eval(reference, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(reference.path, copy)
    data = json.loads((copy / CONFIG).read_text())
    data["fingerprint"]["versions"]["torch"] = "1.0.0"
    (copy / CONFIG).write_text(json.dumps(data))
    before = frozen(RunDir(copy))
    proc = cli_in(tmp_path, "run", "--resume", copy, "--samples", 4, "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert f"library versions: torch 1.0.0 then, {torch.__version__} now" in proc.stderr.replace("'", "")
    assert frozen(RunDir(copy)) == before
    # The model an eval quantizes is the same: it goes on.
    assert cli_in(tmp_path, "eval", copy, "--bits", 3, "--eval-windows", 2).returncode == 0


def test_an_old_run_without_a_fingerprint_still_opens(reference, tmp_path):
    """Runs made before fingerprints: solve and eval as before; resume says the run
    cannot be checked, records the fingerprint and goes on."""
    copy = tmp_path / "run"
    shutil.copytree(reference.path, copy)
    data = json.loads((copy / CONFIG).read_text())
    del data["fingerprint"]
    (copy / CONFIG).write_text(json.dumps(data))
    assert cli_in(tmp_path, "solve", copy, "--bits", 3).returncode == 0
    evaluated = cli_in(tmp_path, "eval", copy, "--bits", 3, "--eval-windows", 2)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "warning: this run does not record its model's files" in evaluated.stderr
    assert "cannot be checked" in evaluated.stderr and "(--resume) records it" in evaluated.stderr
    proc = cli_in(tmp_path, "run", "--resume", copy, "--samples", 4, "--quiet")
    assert proc.returncode == 0, proc.stderr
    log = (copy / "events.log").read_text()
    assert "cannot be checked" in log
    assert RunDir.open(copy).config.fingerprint == reference.config.fingerprint


def test_a_damaged_fingerprint_is_reported(reference, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(reference.path, copy)
    data = json.loads((copy / CONFIG).read_text())
    data["fingerprint"] = "edited"
    (copy / CONFIG).write_text(json.dumps(data))
    with pytest.raises(UserError, match="fingerprint was edited or is damaged"):
        RunDir.open(copy)


# ---------------------------------------------------------------- the digest itself

def _safetensors(path, seed: int, edit: int | None = None):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(6)}
    if edit is not None:
        tensors[f"layer{edit}.weight"][512:520] += 1.0       # eight rows of one tensor
    save_file(tensors, str(path))


def test_a_large_weight_file_is_sampled_in_every_tensor(tmp_path):
    """24 MiB of tensors: read in samples, not whole, yet any changed tensor changes it."""
    _safetensors(tmp_path / "a.safetensors", 0)
    _safetensors(tmp_path / "b.safetensors", 0, edit=3)
    a, b = fingerprint.digest(tmp_path / "a.safetensors"), fingerprint.digest(tmp_path / "b.safetensors")
    assert "sampled sha256" in a and a != b
    assert a.split(" sha")[0] == b.split(" sha")[0]                       # same size
    _safetensors(tmp_path / "c.safetensors", 0)
    assert fingerprint.digest(tmp_path / "c.safetensors") == a            # deterministic
    fd = os.open(tmp_path / "a.safetensors", os.O_RDONLY)
    try:
        ranges = fingerprint._safetensors_samples(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert sum(n for _, n in ranges) < 200_000                           # of 25 MB


def test_other_large_files_are_sampled_evenly(tmp_path):
    data = bytearray(np.random.default_rng(0).bytes(20 << 20))
    (tmp_path / "a.gguf").write_bytes(data)
    step = ((20 << 20) - (1 << 20)) // fingerprint.STRIDES
    data[(1 << 20) + 5 * step + 10] ^= 0xFF                 # a byte in a sample
    (tmp_path / "b.gguf").write_bytes(data)
    assert fingerprint.digest(tmp_path / "a.gguf") != fingerprint.digest(tmp_path / "b.gguf")


def test_the_app_refuses_to_evaluate_a_replaced_model(models, tmp_path):
    """The app's evaluation runs in a worker thread; the same check stops it there and the
    app shows the message."""
    from test_app import SIZE, pilot_test, text_of, until
    from test_app_jobs import dashboard_settled

    from impq_tui.app import ImpqApp
    from impq_tui.screens.modals import ErrorModal

    model = tmp_path / "model"
    shutil.copytree(models[0], model)
    run = RunDir.create(tmp_path / "run", tiny(model, samples=2))
    run_spqe(run.config, run)
    run.unlock()
    shutil.copyfile(models[1] / "model.safetensors", model / "model.safetensors")

    @pilot_test
    async def evaluate():
        app = ImpqApp(str(run.path), bits=3.0, cursor_blink=False)
        async with app.run_test(size=SIZE) as pilot:
            await dashboard_settled(pilot)
            await pilot.press("e")
            await pilot.press("f6")
            await until(pilot, lambda: isinstance(app.screen, ErrorModal), "the error")
            await pilot.pause()
            message = text_of(app.screen.query_one("#error-message"))
            assert "is not the one the run measured" in message and "Traceback" not in message

    evaluate()
    assert not (run.path / "evals").exists()


def test_json_settings_are_compared_by_content_not_by_how_they_were_saved(tmp_path):
    """The embedded model converted again offline wrote "local_files_only": true into
    tokenizer_config.json: the same tokenizer, and it must not refuse a resume."""
    (tmp_path / "a.json").write_text(json.dumps({"model_max_length": 4096, "local_files_only": False}))
    (tmp_path / "b.json").write_text(json.dumps({"local_files_only": True, "model_max_length": 4096},
                                                indent=2))
    (tmp_path / "c.json").write_text(json.dumps({"model_max_length": 2048}))
    a, b, c = (fingerprint.digest(tmp_path / f"{n}.json") for n in "abc")
    assert a == b != c
