"""`impq-tui run` under torchrun: several ranks draw their own samples, rank 0 merges
them into the one run directory, and the vectors are the ones a single process computes.

On a host without CUDA the ranks talk over gloo and compute on the CPU, so this runs
the real torchrun launcher, rendezvous and merge on a CI machine. The GPU path (NCCL,
one GPU per rank) is measured by bench/multi_gpu.sh.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_cli import ENV, ROOT, TINY_RUN, cli

from core.runs import RunDir

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="with CUDA present each rank takes a GPU: see bench/multi_gpu.sh")


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "impq_tui", *map(str, args)]
    return subprocess.run(command, env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_torchrun_ranks_merge_into_one_run_with_the_single_process_vectors(tiny_model_dir, tmp_path):
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    cli("run", "--model", tiny_model_dir, "--samples", 5, "--seed", 3, "--run-dir", single,
        *TINY_RUN, check=True)
    done = torchrun(2, "run", "--model", tiny_model_dir, "--samples", 5, "--seed", 3,
                    "--run-dir", ranks, *TINY_RUN)
    assert done.returncode == 0, done.stderr[-3000:]

    one, many = RunDir.open(single), RunDir.open(ranks)
    records = many.samples()
    assert [r["m"] for r in records] == [0, 1, 2, 3, 4]          # each index once, in order
    np.testing.assert_array_equal(many.D(), one.D())              # bit-identical vectors
    assert [r["perm"] for r in records] == [r["perm"] for r in one.samples()]
    status = json.loads((ranks / "status.json").read_text())
    assert status["state"] == "completed"
    assert "completed on 2 CPU processes" in (ranks / "events.log").read_text()
    assert sorted(p.name for p in ranks.iterdir() if p.name.startswith("samples")) == ["samples.jsonl"]

    # Resume under torchrun: more samples, the same vectors as one process continuing.
    more = torchrun(2, "run", "--resume", ranks, "--samples", 8, "--quiet")
    assert more.returncode == 0, more.stderr[-3000:]
    cli("run", "--resume", single, "--samples", 8, "--quiet", check=True)
    np.testing.assert_array_equal(RunDir.open(ranks).D(), RunDir.open(single).D())
    assert RunDir.open(ranks).D().shape[0] == 8


def test_torchrun_stops_when_settled_as_rank_0_decides(tiny_model_dir, tmp_path):
    """--until-settled under torchrun: rank 0 applies the rule to the samples in index
    order, the ranks stop after that round, and the rule held at the sample it names."""
    from core.settle import DEFAULT_BITS, SettleRule, Settler

    run_dir, most = tmp_path / "ranks", 150
    done = torchrun(2, "run", "--model", tiny_model_dir, "--samples", most, "--windows", "2",
                    "--window-tokens", "32", "--device", "cpu", "--run-dir", run_dir,
                    "--until-settled", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    run = RunDir.open(run_dir)
    n = len(run.samples())
    log = (run_dir / "events.log").read_text()
    said = re.search(r"settled after (\d+) samples", log)
    assert said and "completed (settled) on 2 CPU processes" in log, log[-2000:]
    m = int(said.group(1))
    assert m <= n <= m + 1 < most            # the round in flight (2 ranks) is kept
    settler, D = Settler(run.costs(), SettleRule(bits=DEFAULT_BITS)), run.D()
    first = next(k for k in range(1, n + 1) if settler.observe(D[:k]))
    assert first == m
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
