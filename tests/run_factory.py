"""Run folders written on disk for the app's tests: a synthetic SPQE run of any number of
layers (seeded marginal vectors with a few interacting pairs, real RunDir files, so the
app reads it exactly as it reads a real run), and copies of the frozen fixture in the
states a picker must tell apart."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from core.runs import STATUS, RunConfig, RunDir
from core.spqe import permutation

ROOT = Path(__file__).resolve().parent.parent
FROZEN = ROOT / "tests" / "fixtures" / "run-tiny8"
STAMP = 1_735_732_800.0      # 2025-01-01 12:00 UTC: the mtime every file gets


def synthetic_run(path: Path, layers: int, samples: int, seed: int = 0) -> Path:
    """A finished run of `layers` layers and `samples` samples: phi rising with depth,
    the last layers most sensitive, a few pairs that cost more (or less) together."""
    rng = np.random.default_rng(seed)
    config = RunConfig(model=f"random:synthetic-{layers}", model_name=f"synthetic-{layers}",
                       samples=samples, windows=4, window_tokens=32)
    run = RunDir.create(path, config)
    per_layer = 36_864
    run.write_costs({"m_lo": [13_824] * layers, "m_hi": [23_040] * layers,
                     "params": [per_layer] * layers,
                     "layers": [[f"model.layers.{i}.mlp.down_proj"] for i in range(layers)]})
    phi = 0.002 + 0.01 * np.linspace(0, 1, layers) ** 2
    for m in range(samples):
        p = permutation(config.seed, m, layers)
        d = phi * (1 + 0.6 * rng.standard_normal(layers))
        shared = rng.standard_normal()
        d[::7] += 0.004 * shared          # every seventh layer moves together
        run.append_sample({"m": m, "perm": [int(i) for i in p], "d": [float(x) for x in d],
                           "v_high": 3.0, "v_low": 3.0 + float(d.sum()), "seconds": 60.0})
    run.write_json(STATUS, {"state": "completed", "pid": 0, "time": 0.0, "message": "",
                            "progress": None})
    run.unlock()
    return freeze(path)


def copy_frozen(path: Path, *, samples: int | None = None, status: dict | None = None) -> Path:
    """tests/fixtures/run-tiny8 copied to `path`, cut to its first `samples` samples and
    with `status` written over its status.json."""
    shutil.copytree(FROZEN, path)
    if samples is not None:
        lines = (path / "samples.jsonl").read_text().splitlines(keepends=True)
        (path / "samples.jsonl").write_text("".join(lines[:samples]))
    if status is not None:
        (path / STATUS).write_text(json.dumps(status))
    return freeze(path)


def freeze(path: Path) -> Path:
    """Every file's mtime set to STAMP, so "last update" reads the same on every machine."""
    for file in [path, *path.rglob("*")]:
        os.utime(file, (STAMP, STAMP))
    return path
