"""More than two precisions per layer (our extension; README, "Levels"): SPQE over
interleavings of per-layer steps, the program over drop variables, the baselines'
multiple-choice knapsack, and a run, solve and export of a real tiny model at 2/3/4 bits."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from core.backends import get_backend
from core.errors import UserError
from core.interactions import drop_order, quadratic_model
from core.models import from_config, tiny_config
from core.runs import RunDir
from core.solver import Costs, budget_bytes, solve, solve_knapsack
from core.spqe import Sampler, permutation
from core.switching import LayerSwitch, PrefixEvaluator

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (2, 3, 4)


def test_two_levels_draw_exactly_the_papers_permutations():
    for m in range(5):
        p = permutation(3, m, 30)
        assert list(p) == list(np.random.default_rng([3, m]).permutation(30))
        assert list(drop_order(p, 1)) == list(p)


def test_a_sample_is_an_order_keeping_interleaving_of_every_step():
    seen = Counter()
    for m in range(2700):
        p = permutation(0, m, 3, steps=2)
        assert Counter(p.tolist()) == {0: 2, 1: 2, 2: 2}
        drops = drop_order(p, 2)
        assert sorted(drops.tolist()) == list(range(6))
        for i in range(3):                       # layer i's first step comes before its second
            assert list(drops).index(2 * i) < list(drops).index(2 * i + 1)
        seen[tuple(p.tolist())] += 1
    assert len(seen) == 90          # 6! / (2! 2! 2!) interleavings, all of them drawn,
    assert 10 < min(seen.values()) and max(seen.values()) < 60    # about 30 times each


def _tiny(L: int = 3):
    loaded = from_config(tiny_config(layers=L), torch.device("cpu"), torch.float32, seed=0)
    windows = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    switch = LayerSwitch(loaded, get_backend("hqq", 64), levels=[LEVELS] * L)
    return switch, PrefixEvaluator(loaded, windows, 2)


@pytest.fixture(scope="module")
def game():
    return _tiny()


def test_walks_end_where_they_should_from_either_end(game):
    switch, evaluator = game
    sampler = Sampler(switch, evaluator, seed=1, levels=LEVELS)
    sampler.start()
    first = [sampler.sample(m) for m in range(3)]   # sample 1 is walked up from all-2-bit
    for s in first:
        assert len(s.d) == 6 and sum(s.d) == pytest.approx(s.v_low - s.v_high, abs=1e-12)
    again = Sampler(*_tiny(), seed=1, levels=LEVELS)
    again.start()
    assert again.sample(1).d == first[1].d          # the same vector walked down from all-4-bit
    assert first[0].v_low > first[0].v_high


def test_all_interleavings_give_the_exact_shapley_value_of_every_step(game):
    """The mean marginal of each drop over all 90 interleavings equals its value from the
    states: sum over states s of P(a uniform interleaving passes s and takes that drop
    next) x (v(after) - v(s)), with every v(s) evaluated afresh."""
    switch, evaluator = game
    L, S = 3, 2
    sampler = Sampler(switch, evaluator, seed=0, levels=LEVELS)
    sampler.start()
    orders = sorted(set(itertools.permutations([0, 0, 1, 1, 2, 2])))
    D = np.array([sampler.walk(m, np.array(p)).d for m, p in enumerate(orders)])

    def v(taken) -> float:
        first = switch.apply([LEVELS[S - t] for t in taken])
        return evaluator.evaluate(first or 0)

    def count(taken) -> int:     # interleavings of the given numbers of steps per layer
        return math.factorial(sum(taken)) // math.prod(math.factorial(t) for t in taken)

    values = {t: v(t) for t in itertools.product(range(S + 1), repeat=L)}
    total = count((S,) * L)
    exact = np.zeros(L * S)
    for taken, v_s in values.items():
        reach = count(taken) * count(tuple(S - t for t in taken)) / total
        left = L * S - sum(taken)
        for i in range(L):
            if taken[i] < S:
                after = tuple(t + (j == i) for j, t in enumerate(taken))
                exact[i * S + taken[i]] += reach * (S - taken[i]) / left * (values[after] - v_s)
    np.testing.assert_allclose(D.mean(axis=0), exact, rtol=0, atol=1e-12)
    assert exact.sum() == pytest.approx(values[(S,) * L] - values[(0,) * L], abs=1e-12)
    assert np.all(np.abs(exact) > 0)


def _costs3(L: int) -> Costs:
    rng = np.random.default_rng(L)
    params = rng.integers(1, 4, L) * 4096
    return Costs(m_lo=params // 4 + params // 32, m_hi=params // 2 + params // 32, params=params,
                 levels=LEVELS, mid=[(3 * params) // 8 + params // 32])


def _brute(objective, costs: Costs, B: int):
    best = None
    for bits in itertools.product(LEVELS, repeat=costs.L):
        q = costs.drops_of(bits)
        if costs.bytes_used(q) <= B:
            value = objective(np.array(q, dtype=float))
            if best is None or value < best[0] - 1e-12:
                best = (value, bits)
    return best


@pytest.mark.parametrize("bits", [2.3, 2.75, 3.2, 3.8])
def test_the_program_over_drops_finds_the_brute_force_optimum(bits):
    L = 5
    costs = _costs3(L)
    rng = np.random.default_rng(int(bits * 100))
    D = rng.normal(0.1, 0.1, (12, L * 2)) + rng.normal(0, 0.05, (1, L * 2))
    model = quadratic_model(D)
    alloc = solve(model.a, model.K, costs, bits=bits)
    B = budget_bytes(costs, bits)
    value, best = _brute(lambda q: model.a @ q + q @ model.K @ q, costs, B)
    assert alloc.bytes <= B and alloc.predicted_delta_nll == pytest.approx(value, abs=1e-9)
    assert list(alloc.q) == costs.drops_of(alloc.bits_per_layer)   # steps taken in order
    assert set(alloc.bits_per_layer) <= set(LEVELS)


def test_with_two_levels_the_drops_are_the_papers_layers():
    costs = Costs(m_lo=[10, 20, 30], m_hi=[20, 40, 60], params=[40, 80, 120])
    assert costs.steps == 1 and costs.n_drops == 3 and list(costs.c) == [10, 20, 30]
    assert costs.bits_of([1, 0, 1]) == (2, 4, 2) and costs.drops_of([2, 4, 2]) == [1, 0, 1]
    assert costs.bytes_used([1, 0, 1]) == 10 + 40 + 30


@pytest.mark.parametrize("bits", [2.4, 3.0, 3.6])
def test_baselines_take_a_multiple_choice_knapsack(bits):
    """Maximize sum_i s_i g(bits_i) under the budget, g(2) = 0, g(3) = 0.8, g(4) = 1."""
    L = 6
    costs = _costs3(L)
    scores = np.random.default_rng(7).uniform(0, 1, L)
    alloc = solve_knapsack(scores, costs, bits=bits)
    B = budget_bytes(costs, bits)
    g = {2: 0.0, 3: 0.8, 4: 1.0}
    kept = lambda b: sum(s * g[x] for s, x in zip(scores, b))   # noqa: E731
    _, best = _brute(lambda q: -kept(costs.bits_of(q)), costs, B)
    assert kept(alloc.bits_per_layer) == pytest.approx(kept(best), abs=1e-9)
    if bits == 3.0:
        assert 3 in alloc.bits_per_layer      # the middle level is used where it pays


def test_budget_range_follows_the_levels():
    costs = Costs(m_lo=[10], m_hi=[30], params=[8], levels=(4, 8))
    assert budget_bytes(costs, 6.0) == 20
    with pytest.raises(UserError, match=r"outside \[4, 8\]"):
        budget_bytes(costs, 3.0)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "impq_tui", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_run_solve_export_at_three_levels(tiny_model_dir, tmp_path):
    """run --levels 2 3 4 on a real tiny model (HQQ): 2L + 1 evaluations a sample, costs at
    every level, allocations with 3-bit layers, an export whose files hold those bits and
    whose reloaded perplexity equals the in-memory one."""
    run_dir = tmp_path / "run"
    proc = cli("run", "--model", tiny_model_dir, "--backend", "hqq", "--levels", "4", "2", "3",
               "--samples", "3", "--windows", "2", "--window-tokens", "48", "--device", "cpu",
               "--run-dir", run_dir, "--quiet")
    assert proc.returncode == 0, proc.stderr
    run = RunDir.open(run_dir)
    assert run.config.levels == LEVELS
    costs = run.costs()
    L = costs.L
    assert costs.levels == LEVELS and all(lo < mid < hi for lo, mid, hi in zip(*costs.sizes))
    assert run.D().shape == (3, 2 * L)
    assert all(Counter(r["perm"]) == {i: 2 for i in range(L)} for r in run.samples())
    evals = [line for line in (run_dir / "events.log").read_text().splitlines() if "sample 1 done" in line]
    assert evals
    # a two-level run of the same model keeps its config hash; this one has its own
    assert run.config.identity_hash() != type(run.config)(**{**run.config.__dict__, "levels": (2, 4)}).identity_hash()

    proc = cli("solve", run_dir, "--bits", "3.0", "--json")
    assert proc.returncode == 0, proc.stderr
    alloc = json.loads(proc.stdout)
    assert set(alloc["bits_per_layer"]) <= set(LEVELS) and alloc["bytes"] <= alloc["budget_bytes"]
    assert alloc["bytes"] == costs.bytes_of(alloc["bits_per_layer"])

    out = tmp_path / "export"
    proc = cli("export", run_dir, "--bits", "3.0", "--out", out, "--verify")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "allocation.json").read_text())
    assert record["bits_per_layer"] == alloc["bits_per_layer"]
    assert record["run"]["levels"] == list(LEVELS)
    assert record["run_bytes"] == alloc["bytes"]
    card = (out / "README.md").read_text()
    top = sum(b == max(LEVELS) for b in alloc["bits_per_layer"])
    assert f"mixed {'/'.join(map(str, LEVELS))}-bit" in card       # the run's levels, not 2/4
    assert f"{top} of {L} layers at {max(LEVELS)} bits" in card

    proc = cli("run", "--resume", run_dir, "--samples", "4", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert RunDir.open(run_dir).D().shape == (4, 2 * L)


def test_levels_a_backend_cannot_do_are_refused(tiny_model_dir, tmp_path):
    proc = cli("run", "--model", tiny_model_dir, "--backend", "quanto", "--levels", "2", "3", "4",
               "--samples", "1", "--run-dir", tmp_path / "r", "--quiet")
    assert proc.returncode == 2
    assert "--levels" in proc.stderr and "2 4 8" in proc.stderr
    assert not (tmp_path / "r").exists()
    proc = cli("run", "--model", tiny_model_dir, "--levels", "4", "--samples", "1",
               "--run-dir", tmp_path / "r", "--quiet")
    assert proc.returncode == 2 and "at least two" in proc.stderr


def test_quanto_up_to_eight_bits(tiny_model_dir, tmp_path):
    """quanto's levels 2/4/8: qint8 has no groups (one scale per row); an export at the top of
    the range holds every layer at 8 bits and loads back to the same perplexity."""
    run_dir = tmp_path / "run"
    proc = cli("run", "--model", tiny_model_dir, "--backend", "quanto", "--levels", "2", "4", "8",
               "--samples", "2", "--windows", "2", "--window-tokens", "48", "--device", "cpu",
               "--run-dir", run_dir, "--quiet")
    assert proc.returncode == 0, proc.stderr
    costs = RunDir.open(run_dir).costs()
    assert costs.levels == (2, 4, 8) and all(a < b < c for a, b, c in zip(*costs.sizes))
    proc = cli("solve", run_dir, "--bits", "9")
    assert proc.returncode == 2 and "outside [2, 8]" in proc.stderr
    out = tmp_path / "export"
    proc = cli("export", run_dir, "--bits", "8", "--out", out, "--verify")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "allocation.json").read_text())
    assert record["bits_per_layer"] == [8] * costs.L and record["run_bytes"] == costs.B_hi
    assert "loaded back" in proc.stdout
