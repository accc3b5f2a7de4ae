"""IMPQ-fit, checked (core.checked, our extension): candidates from the run's samples,
measured on the calibration windows, the least loss kept; on games whose answer is known,
and on a real tiny run through compare and the CLI."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from test_cli import TINY_RUN, cli
from test_fit import quadratic_game, spends_budget, walks

from core.checked import candidates, choose, spends
from core.errors import UserError
from core.evaluate import allocate, solve_fit
from core.fit import fit_states
from core.runs import RunDir
from core.solver import Costs, budget_bytes


def test_the_next_best_allocations_are_the_brute_force_ranking():
    """solve(exclude=) gives the fitted model's 2nd, 3rd, ... best allocation among those
    that spend the budget: each the brute force's next one."""
    L = 8
    u, W, v = quadratic_game(L, seed=5)
    D, perms = walks(v, L, M=40, seed=6)
    fitted = fit_states(D, perms)
    costs = Costs(m_lo=[10] * L, m_hi=[30 + 3 * i for i in range(L)], params=[80] * L)
    B = budget_bytes(costs, 2.7)
    ranked = sorted((q for q in itertools.product((0, 1), repeat=L) if spends_budget(q, costs, B)),
                    key=lambda q: fitted.predict(np.array([q], dtype=float))[0])
    got = []
    for _ in range(5):
        got.append(solve_fit(fitted, costs, budget=B, exclude=got).q)
    values = fitted.predict(np.array(got, dtype=float))
    expected = fitted.predict(np.array(ranked[:5], dtype=float))
    assert len(set(got)) == 5
    assert np.allclose(values, expected, atol=1e-6)


def test_the_candidate_with_the_least_measured_loss_is_kept():
    """On a game the fit cannot represent (a cubic term), every candidate spends the
    budget, the measured losses are the game's, and the choice is their minimum; at a
    budget where the fit's own optimum is not the best candidate, checked beats it."""
    L = 9
    u, W, quad = quadratic_game(L, seed=7)
    v = lambda x: quad(x) + 1.5 * x[0] * x[4] * x[8] - 1.2 * x[1] * x[2] * x[3]   # noqa: E731
    D, perms = walks(v, L, M=24, seed=8)
    costs = Costs(m_lo=[10] * L, m_hi=[30] * L, params=[80] * L)
    calls = []

    def measure(wanted):
        calls.append(list(wanted))
        return {b: v(np.array([x == 2 for x in b], dtype=float)) for b in wanted}

    beaten = 0
    for bits in (2.4, 2.7, 3.0, 3.3, 3.6):
        B = budget_bytes(costs, bits)
        cands, fitted, _ = candidates(D, perms, costs, bits=bits)
        assert {"impq", "local", "fit", "fit-next1", "fit-h1", "fit-h2", "visited1", "swap1"} <= set(cands)
        assert all(spends(costs, q, B) for q in cands.values())
        checked = choose(D, perms, costs, measure, bits=bits, descent=False)
        assert len(calls[-1]) == len(set(calls[-1]))                 # each measured once
        truth = {lab: v(np.array(q, dtype=float)) for lab, q in cands.items()}
        assert checked.measured == pytest.approx(truth)
        assert checked.measured[checked.label] == min(truth.values())
        assert checked.allocation.bits_per_layer == costs.bits_of(cands[checked.label])
        assert checked.allocation.bytes <= B
        beaten += truth[checked.label] < truth["fit"] - 1e-9
    assert beaten >= 1


def test_the_descent_takes_measured_steps_to_a_lower_loss():
    """From the least candidate, the descent measures the fit's best one-swap neighbours
    that spend the budget, not measured before, and moves while one measures lower: its
    allocation is never worse than the candidates' choice, every step is one swap from
    where it stood, and it beats the candidates' choice on this game somewhere."""
    from core.checked import DESCENT_NEIGHBOURS, DESCENT_STEPS

    L = 10
    u, W, quad = quadratic_game(L, seed=28)
    v = lambda x: (quad(x) + 2.0 * x[0] * x[5] * x[9] - 1.5 * x[1] * x[2] * x[3]   # noqa: E731
                   + 1.0 * x[4] * x[6] * x[7])
    D, perms = walks(v, L, M=8, seed=29)
    costs = Costs(m_lo=[10] * L, m_hi=[30] * L, params=[80] * L)
    truth = lambda b: v(np.array([x == 2 for x in b], dtype=float))   # noqa: E731
    seen = []

    def measure(wanted):
        seen.extend(wanted)
        return {b: truth(b) for b in wanted}

    improved = 0
    for bits in (2.6, 3.0, 3.4):
        B = budget_bytes(costs, bits)
        first = choose(D, perms, costs, measure, bits=bits, descent=False)
        seen.clear()
        checked = choose(D, perms, costs, measure, bits=bits)
        assert len(seen) == len(set(seen))                          # nothing measured twice
        assert checked.measured == pytest.approx({lab: truth(b) for lab, b in checked.candidates.items()})
        assert checked.measured[checked.label] == min(checked.measured.values())
        assert checked.allocation.bits_per_layer == tuple(checked.candidates[checked.label])
        assert checked.allocation.bytes <= B
        steps = sorted({lab.split(".")[0] for lab in checked.measured if lab.startswith("step")})
        assert len(steps) <= DESCENT_STEPS
        at = np.array(checked.candidates[first.label])
        for step in steps:
            mine = [lab for lab in checked.measured if lab.startswith(step + ".")]
            assert 1 <= len(mine) <= DESCENT_NEIGHBOURS
            for lab in mine:                                        # one swap from where it stood
                b = np.array(checked.candidates[lab])
                assert (b != at).sum() == 2 and b.sum() == at.sum()
            at = np.array(checked.candidates[min(mine, key=checked.measured.get)])
        improved += checked.measured[checked.label] < first.measured[first.label] - 1e-9
    assert improved >= 1
    # layers of unequal sizes: some one-swap neighbours do not spend the budget; none is measured
    from core.checked import _neighbours, spends
    costs = Costs(m_lo=[10] * L, m_hi=[30 + (i % 3) * 4 for i in range(L)], params=[80] * L)
    for bits in (2.6, 3.0):
        B = budget_bytes(costs, bits)
        checked = choose(D, perms, costs, measure, bits=bits)
        start = np.array(costs.drops_of(checked.candidates[checked.label]))
        assert any(not spends(costs, z, B) for z in _neighbours(costs, start))
        steps = [lab for lab in checked.measured if lab.startswith("step")]
        assert steps and all(spends(costs, costs.drops_of(checked.candidates[lab]), B) for lab in steps)


def test_visited_states_are_candidates_with_their_walk_losses():
    """The best visited states of the budget's size are candidates, least walk loss first."""
    L = 6
    _, _, v = quadratic_game(L, seed=2)
    D, perms = walks(v, L, M=10, seed=3)
    costs = Costs(m_lo=[10] * L, m_hi=[30] * L, params=[80] * L)
    cands, _, _ = candidates(D, perms, costs, bits=3.0)
    visited = [cands[f"visited{k}"] for k in range(1, 6) if f"visited{k}" in cands]
    losses = [v(np.array(q, dtype=float)) for q in visited]
    assert visited and all(sum(q) == 3 for q in visited)
    assert losses == sorted(losses) and len(set(visited)) == len(visited)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("checked") / "run"
    cli("run", "--model", tiny_model_dir, "--samples", 4, "--run-dir", path, *TINY_RUN, check=True)
    return RunDir.open(path)


def test_checked_measures_what_an_independent_evaluation_measures(tiny_run):
    """checked_allocation loads the model and measures the candidates: each measured loss is
    the calibration loss of a model with that allocation's real modules on 16 windows of the
    run's calibration text (the run has 4), computed here afresh, minus all-4-bit's; the
    kept one has the least."""
    from core.compare import _load, check_windows, checked_allocation
    from core.switching import LayerSwitch, nll

    checked = checked_allocation(tiny_run, bits=3.0, device="cpu")
    with pytest.raises(UserError, match="with the model loaded"):
        allocate(tiny_run, bits=3.0, method="impq-checked")     # no model here: said, not guessed
    config = tiny_run.config
    loaded, backend, _ = _load(tiny_run, "cpu", None, None, None, None, lambda *a, **k: None)
    real = LayerSwitch(loaded, backend, real=True, levels=[config.levels] * len(loaded.layers))
    windows = check_windows(loaded, config)
    assert config.windows == 4 and windows.shape == (16, 32) and checked.windows == 16
    real.apply([4] * len(loaded.layers))
    high = nll(loaded, windows, config.micro_batch)
    for label in ("fit", checked.label, "impq"):
        real.apply(checked.candidates[label])
        assert nll(loaded, windows, config.micro_batch) - high == pytest.approx(
            checked.measured[label], abs=1e-5)
    assert checked.measured[checked.label] == min(checked.measured.values())
    assert list(checked.allocation.bits_per_layer) == checked.candidates[checked.label]


def test_compare_and_the_cli_give_the_same_checked_allocation(tiny_run):
    """compare's IMPQ-fit, checked rows are `solve --checked`'s allocations, saved under
    their own name, and the row of its ratio is in the table."""
    from core.compare import compare
    from impq_tui.report import compare_rows

    result = compare(tiny_run, [2.5, 3.0], windows=2, window_tokens=32, save=False)
    for b in (2.5, 3.0):
        row = result.row("impq-checked", b)
        proc = cli("solve", tiny_run.path, "--bits", b, "--checked", "--json", check=True)
        record = json.loads(proc.stdout)
        assert record["method"] == "impq-checked"
        assert tuple(record["bits_per_layer"]) == row.bits_per_layer
        assert row.bytes <= row.budget_bytes == result.row("impq", b).budget_bytes
        assert "IMPQ-fit, checked" in proc.stderr and "kept" in proc.stderr
    assert (tiny_run.path / "allocations" / "bits-3.00-checked.json").is_file()
    assert "IMPQ-fit, checked / best baseline" in [r[0] for r in compare_rows(result)[1]]
    assert [r["target_bits"] for r in result.to_json()["impq_checked_vs_best_baseline"]] == [2.5, 3.0]


def test_checked_refuses_a_run_with_one_sample(tiny_run, tmp_path):
    import shutil

    path = tmp_path / "one"
    shutil.copytree(tiny_run.path, path)
    lines = (path / "samples.jsonl").read_text().splitlines(keepends=True)
    (path / "samples.jsonl").write_text(lines[0])
    saved = path / "allocations" / "bits-3.00-checked.json"      # from the test above
    before = saved.read_bytes() if saved.exists() else None
    proc = cli("solve", path, "--bits", "3", "--checked")
    assert proc.returncode == 2 and "at least 2 SPQE samples" in proc.stderr
    assert (saved.read_bytes() if saved.exists() else None) == before   # earlier work kept
