"""Stopping when the decision is settled (core.settle; README, "Early stop"): the rule on
hand-made and synthetic samples, and `run --until-settled` on a real tiny model."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from dataclasses import replace

import numpy as np
import pytest

from core.errors import InvalidField
from core.interactions import predicted_delta, quadratic_model
from core.runs import RunDir
from core.settle import (
    DEFAULT_BITS,
    Settler,
    SettleRule,
    State,
    budgets_for,
    settled,
    state,
)
from core.solver import Costs, solve_impq

ROOT = Path(__file__).resolve().parent.parent


def _states(allocs: list[int], rse: list[float]) -> list[State]:
    return [State(m=m, allocations=((a,),), rse=r) for m, (a, r) in enumerate(zip(allocs, rse), 1)]


def _first_stop(history: list[State], rule: SettleRule) -> int | None:
    for k in range(1, len(history) + 1):
        if settled(history[:k], rule):
            return history[k - 1].m
    return None


def test_stops_k_samples_after_the_last_change_once_precise_and_enough():
    rule = SettleRule(K=4, rse=0.3, min_samples=6)
    # stable over samples 1-8 but not precise yet; changes at sample 9, precise from then on
    allocs = [0] * 8 + [1] * 20
    rse = [1.0] * 8 + [0.2] * 20
    assert _first_stop(_states(allocs, rse), rule) == 9 + 4
    # never precise enough: runs to the end
    assert _first_stop(_states(allocs, [0.31] * 28), rule) is None
    # stable from the start: the minimum decides
    assert _first_stop(_states([0] * 28, [0.0] * 28), rule) == 6
    # a missing sample (non-finite, left out) breaks the run of K
    gap = [s for s in _states([0] * 28, [0.0] * 28) if s.m != 5]
    assert _first_stop(gap, rule) == 5 + 1 + 4


def _costs(L: int) -> Costs:
    return Costs(m_lo=(100,) * L, m_hi=(300,) * L, params=(800,) * L)


def test_synthetic_samples_that_settle_stop_at_the_expected_sample():
    """Real solves on marginals whose order is clear from the first sample: the
    allocations never change, se/|phi| is tiny, so the stop is max(min_samples, K + 1)."""
    L, rng = 8, np.random.default_rng(0)
    phi = np.linspace(1.0, 8.0, L)
    D = phi + 0.01 * rng.standard_normal((60, L))
    rule = SettleRule(bits=(2.5, 3.0, 3.5), K=5, rse=0.1, min_samples=12)
    settler = Settler(_costs(L), rule)
    stop = next(m for m in range(1, 61) if settler.observe(D[:m]))
    assert stop == 12
    assert settler.message().startswith("settled after 12 samples: allocations at 2.5/3.0/3.5 bits "
                                        "unchanged for 5 samples")
    # the cheapest layers (smallest phi) are the ones left at 2 bits
    s = state(D, _costs(L), (3.0,))
    assert s.allocations[0] == (2,) * 4 + (4,) * 4 and s.rse < 0.01


def test_noisy_samples_stop_k_samples_after_the_last_change():
    """Layers 4 and 5 are nearly tied and noisy: the allocation at 2.5 bits swaps them
    back and forth until their means part; the stop comes exactly K samples after the
    last swap (the estimates being precise enough by then)."""
    L, rng = 6, np.random.default_rng(3)
    phi = np.array([1.0, 2.0, 3.0, 4.0, 8.0, 8.1])
    D = phi + 0.4 * rng.standard_normal((80, L))
    costs, rule = _costs(L), SettleRule(bits=(2.5,), K=6, rse=0.5, min_samples=5)
    allocs = [state(D[:m], costs, (2.5,)).allocations for m in range(1, 81)]
    settler = Settler(costs, rule)
    stop = next(m for m in range(1, 81) if settler.observe(D[:m]))
    changes = [m for m in range(2, stop + 1) if allocs[m - 1] != allocs[m - 2]]
    assert changes, "the stream should swap the tied layers at least once"
    assert stop == max(rule.min_samples, changes[-1] + rule.K)
    assert allocs[stop - 1] == allocs[-1]       # and it stopped on the 80-sample decision


def _regret_rule_holds(D, costs, m: int, rule: SettleRule) -> bool:
    """The tolerance rule recomputed from scratch at sample m: every allocation of the
    last K samples costs at most tol more predicted loss than the current one, under the
    model of the first m samples."""
    model = quadratic_model(D[:m])
    current = [solve_impq(D[:m], costs, bits=b, model=model) for b in rule.bits]
    for k in range(1, rule.K + 1):
        for b, now in zip(rule.bits, current):
            earlier = solve_impq(D[:m - k], costs, bits=b).bits_per_layer
            gap = (predicted_delta(model, costs.drops_of(earlier)) - now.predicted_delta_nll)
            if earlier != now.bits_per_layer and gap > rule.tol * now.predicted_delta_nll:
                return False
    return True


def test_swaps_of_nearly_tied_layers_within_tol_do_not_hold_the_run():
    """The same noisy stream: with tol the swaps of the tied layers (0.1 apart in an
    increase of about 18) stop holding the run, which stops earlier, at the first sample
    where every allocation of the last K costs at most tol more predicted loss."""
    L, rng = 6, np.random.default_rng(3)
    phi = np.array([1.0, 2.0, 3.0, 4.0, 8.0, 8.1])
    D = phi + 0.4 * rng.standard_normal((80, L))
    costs = _costs(L)
    strict = SettleRule(bits=(2.5,), K=6, rse=0.5, min_samples=5)
    loose = replace(strict, tol=0.05)

    def stop_of(rule):
        settler = Settler(costs, rule)
        m = next(m for m in range(1, 81) if settler.observe(D[:m]))
        return m, settler.message()

    m_strict, _ = stop_of(strict)
    m_loose, message = stop_of(loose)
    assert m_loose < m_strict
    assert "within 5.0% of the predicted loss for 6 samples" in message
    assert _regret_rule_holds(D, costs, m_loose, loose)
    assert not any(_regret_rule_holds(D, costs, m, loose)
                   for m in range(loose.K + 1, m_loose) if m >= loose.min_samples
                   and state(D[:m], costs, loose.bits).rse <= loose.rse)


def test_budgets_follow_the_run_levels():
    assert budgets_for((2, 4), DEFAULT_BITS) == DEFAULT_BITS
    assert budgets_for((4, 8), DEFAULT_BITS) == (6.0,)
    assert budgets_for((2, 3, 4, 8), (3.0, 2.25)) == (2.25, 3.0)
    with pytest.raises(InvalidField) as e:
        budgets_for((2, 4), (3.0, 5.0))
    assert e.value.field == "until_settled" and "5" in str(e.value)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "impq_tui", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_run_until_settled_stops_early_says_why_and_resume_continues(tiny_model_dir, tmp_path):
    run_dir, most = tmp_path / "run", 150
    proc = cli("run", "--model", tiny_model_dir, "--samples", most, "--windows", "2",
               "--window-tokens", "32", "--device", "cpu", "--run-dir", run_dir,
               "--until-settled", "--quiet")
    assert proc.returncode == 0, proc.stderr
    run = RunDir.open(run_dir)
    assert run.config.until_settled == DEFAULT_BITS and run.config.samples == most
    rule = SettleRule()
    m = len(run.samples())
    assert rule.min_samples <= m < most
    log = (run_dir / "events.log").read_text()
    change = "unchanged" if rule.tol <= 0 else rf"within {rule.tol:.1%} of the predicted loss"
    said = re.search(r"settled after (\d+) samples: allocations at 2\.5/3\.0/3\.5 bits "
                     rf"{change} for {rule.K} samples", log)
    assert said and int(said.group(1)) == m, log
    assert "completed (settled)" in log
    # the rule holds at m and did not at m - 1
    D, costs = run.D(), run.costs()
    history = []
    for k in range(1, m + 1):       # each state judges the allocations of the K before it
        earlier = [h.allocations for h in reversed(history[-rule.K:])]
        history.append(state(D[:k], costs, DEFAULT_BITS, previous=earlier))
    assert settled(history, rule) and not settled(history[:-1], rule)

    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"

    # a resume keeps the rule, which starts afresh: at least K new samples before it stops
    proc = cli("run", "--resume", run_dir, "--quiet")
    assert proc.returncode == 0, proc.stderr
    m2 = len(RunDir.open(run_dir).samples())
    assert m + rule.K <= m2 <= most
    # a resume without the rule goes on to --samples
    proc = cli("run", "--resume", run_dir, "--samples", m2 + 3, "--no-until-settled", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert len(RunDir.open(run_dir).samples()) == m2 + 3
    assert RunDir.open(run_dir).config.until_settled == ()


def test_budgets_outside_the_range_are_refused_by_flag(tiny_model_dir, tmp_path):
    proc = cli("run", "--model", tiny_model_dir, "--samples", "3", "--device", "cpu",
               "--run-dir", tmp_path / "r", "--settle-bits", "9", "--quiet")
    assert proc.returncode != 0 and "--settle-bits" in proc.stderr
