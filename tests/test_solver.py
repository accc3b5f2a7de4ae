import json
import math
import time

import numpy as np
import pytest

from core import solver
from core.errors import UserError
from core.interactions import predicted_delta, quadratic_model
from core.solver import Allocation, Costs, budget_bytes, frontier, solve, solve_knapsack


def all_q(L):
    """Every q in {0, 1}^L, one per row."""
    return (np.arange(2 ** L)[:, None] >> np.arange(L)) & 1


def brute_force(values, costs, B):
    """The best of `values` (one per q of all_q) over the q whose exact byte count fits B."""
    used = costs.B_lo + (1 - all_q(costs.L)) @ costs.c  # int64: exact at these sizes
    return values[used <= B].min()


def brute_force_delta(a, K, costs, B):
    Q = all_q(costs.L).astype(np.float64)
    return brute_force(Q @ a + np.einsum("mi,ij,mj->m", Q, K, Q), costs, B)


def random_costs(rng, L, scale=10 ** 6):
    params = rng.integers(scale, 4 * scale, L)
    m_lo = params // 4 + rng.integers(0, scale // 100, L)   # 2 bits plus some metadata
    m_hi = params // 2 + rng.integers(0, scale // 100, L)
    return Costs(m_lo, m_hi, params)


def random_model(rng, L, kind):
    if kind == "spqe":  # K from sample covariances, as SPQE produces it
        m = quadratic_model(rng.normal(rng.uniform(0, 1, L), 0.3, (20, L)))
        return m.a, m.K
    A = rng.normal(0, 0.5, (L, L))  # indefinite, off-diagonals of both signs
    return rng.uniform(-0.2, 1.0, L), (A + A.T) / 2


def assert_optimal(alloc, a, K, costs, B):
    best = brute_force_delta(a, K, costs, B)
    assert alloc.budget_bytes == B
    assert alloc.bytes == costs.bytes_used(alloc.q) <= B
    assert alloc.predicted_delta_nll == pytest.approx(predicted_delta((a, K), alloc.q), abs=1e-12)
    assert abs(alloc.predicted_delta_nll - best) <= 1e-9 * max(1.0, abs(best))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kind", ["spqe", "indefinite"])
def test_matches_brute_force(seed, kind):
    rng = np.random.default_rng(seed)
    L = 5 + seed  # 5..12
    costs = random_costs(rng, L)
    a, K = random_model(rng, L, kind)
    if kind == "indefinite":
        assert (K[np.triu_indices(L, 1)] < 0).any()
    for bits in (2.2, 2.5, 3.0, 3.5, 3.9):
        alloc = solve(a, K, costs, bits=bits)
        assert_optimal(alloc, a, K, costs, budget_bytes(costs, bits))
        assert alloc.target_bits == bits and alloc.status == "optimal"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("samples", [2, 3, 6])
def test_the_compact_form_of_few_samples_matches_brute_force(seed, samples):
    """With fewer samples than layers, the solver writes q.K.q as d.q + |F q|^2 (the
    factor of the quadratic model): the same optimum as the brute force over every q."""
    rng = np.random.default_rng(100 + seed)
    L = 8 + seed % 4
    costs = random_costs(rng, L)
    m = quadratic_model(rng.normal(rng.uniform(0, 1, L), 0.4, (samples, L)), alpha=0.3)
    d, F = m.factor
    assert F.shape == (samples, L)
    q = rng.integers(0, 2, (50, L)).astype(float)
    assert np.allclose(q @ d + ((q @ F.T) ** 2).sum(axis=1), np.einsum("ni,ij,nj->n", q, m.K, q))
    for bits in (2.2, 2.6, 3.0, 3.4, 3.8):
        alloc = solve(m.a, m.K, costs, bits=bits, factor=m.factor)
        assert_optimal(alloc, m.a, m.K, costs, budget_bytes(costs, bits))
        assert alloc.status == "optimal"


def test_budget_edges():
    rng = np.random.default_rng(1)
    L = 8
    costs = random_costs(rng, L)
    a, K = random_model(rng, L, "indefinite")
    lowest = solve(a, K, costs, budget=costs.B_lo)
    assert lowest.q == (1,) * L and lowest.bytes == costs.B_lo and lowest.avg_bits < 2.5
    highest = solve(a, K, costs, budget=costs.B_hi)
    assert highest.q == (0,) * L and highest.bytes == costs.B_hi and highest.predicted_delta_nll == 0
    assert solve(a, K, costs, bits=4.0).q == (0,) * L
    for B in (costs.B_hi - 1, costs.B_lo + int(costs.c.min()) - 1, costs.B_lo + int(costs.c.min())):
        assert_optimal(solve(a, K, costs, budget=B), a, K, costs, B)


def test_just_below_an_items_cost():
    costs = Costs(m_lo=[100, 100, 100], m_hi=[150, 160, 170], params=[400, 400, 400])  # c = 50, 60, 70
    a, K = np.array([1.0, 2.0, 4.0]), np.zeros((3, 3))
    assert solve(a, K, costs, budget=300 + 49).q == (1, 1, 1)
    assert solve(a, K, costs, budget=300 + 69).q == (1, 0, 1)
    assert solve(a, K, costs, budget=300 + 70).q == (1, 1, 0)
    assert solve(a, K, costs, budget=300 + 50 + 70 - 1).q == (1, 1, 0)
    assert solve(a, K, costs, budget=300 + 50 + 70).q == (0, 1, 0)


def test_large_byte_counts_never_exceed_the_budget():
    # Layers of about 1e9 bytes: SCIP's relative tolerance (1e-6) is then thousands of bytes.
    # Budgets sit one byte below, and exactly at, the cost of the most valuable sets.
    rng = np.random.default_rng(7)
    L = 10
    c = rng.integers(10 ** 8, 10 ** 9, L)
    params = 8 * c
    costs = Costs(m_lo=2 * c + 12345, m_hi=3 * c + 12345, params=params)
    a = rng.uniform(0.5, 1.0, L)
    K = np.diag(rng.uniform(0, 0.1, L))
    for _ in range(12):
        raised = rng.random(L) < 0.5
        for B in (costs.B_lo + int(c[raised].sum()) - 1, costs.B_lo + int(c[raised].sum())):
            if B < costs.B_lo:
                continue
            alloc = solve(a, K, costs, budget=B)
            assert_optimal(alloc, a, K, costs, B)


def test_exact_check_cuts_off_a_solution_scip_accepts_within_tolerance():
    c = [10 ** 9 + 1, 10 ** 9, 3 * 10 ** 8]
    costs = Costs(m_lo=[10 ** 9] * 3, m_hi=[10 ** 9 + x for x in c], params=[4 * 10 ** 9] * 3)
    B = costs.B_lo + 2 * 10 ** 9  # raising layers 0 and 1 costs one byte more than this
    model, q = solver._model_with_budget(costs, B, objective=[10.0, 10.5, 1.0])
    over = model.createSol()
    for x, v in zip(q, (0, 0, 1)):
        model.setSolVal(over, x, v)
    assert model.addSol(over)  # SCIP takes it as feasible: 1 byte in 3e9
    q_val, status = solver._optimize(model, q, costs, B, time_limit=None)
    assert costs.bytes_used(q_val) <= B
    assert q_val == [1, 0, 0]  # the best that fits: raise layers 1 and 2
    assert status == "optimal"


def test_bits_outside_range_are_user_errors():
    costs = Costs([100, 100], [200, 200], [400, 400])
    a, K = np.ones(2), np.zeros((2, 2))
    for bits in (1.99, 4.01, math.nan):
        with pytest.raises(UserError, match=r"outside \[2, 4\]"):
            solve(a, K, costs, bits=bits)
        with pytest.raises(UserError, match=r"outside \[2, 4\]"):
            budget_bytes(costs, bits)


def test_budget_below_all_low_is_a_user_error():
    costs = Costs([1_000_000, 2_000_000], [3_000_000, 4_000_000], [8_000_000, 8_000_000])
    with pytest.raises(UserError, match=r"2,999,999 bytes is below 3,000,000 bytes.*2 bits"):
        solve(np.ones(2), np.zeros((2, 2)), costs, budget=2_999_999)
    with pytest.raises(UserError, match="either"):
        solve(np.ones(2), np.zeros((2, 2)), costs, bits=3.0, budget=5_000_000)
    with pytest.raises(UserError, match="either"):
        solve_knapsack([1.0, 2.0], costs)


def test_budget_bytes_is_the_floor_of_the_decimal_target():
    costs = Costs([500, 500], [1500, 1511], [4000, 4000])  # B_lo 1000, B_hi 3011
    assert budget_bytes(costs, 2) == 1000
    assert budget_bytes(costs, 4.0) == 3011
    assert budget_bytes(costs, 3.0) == 1000 + 1005  # floor(2011 / 2)
    small = Costs([500, 500], [510, 510], [4000, 4000])  # B_hi - B_lo = 20
    assert budget_bytes(small, 2.3) == 1000 + 3  # (2.3 - 2) / 2 * 20 is 2.9999999999999982 in floats


def test_allocation_reports_bytes_and_bits():
    costs = Costs(m_lo=[300, 600], m_hi=[550, 1100], params=[1000, 2000])
    alloc = solve(np.array([1.0, 0.1]), np.zeros((2, 2)), costs, budget=900 + 250)
    assert alloc.q == (0, 1) and alloc.bits_per_layer == (4, 2)
    assert alloc.bytes == 1150 and alloc.budget_bytes == 1150 and alloc.target_bits is None
    assert alloc.avg_bits == pytest.approx(8 * 1150 / 3000)
    assert alloc.weight_bits == pytest.approx((4 * 1000 + 2 * 2000) / 3000)
    assert alloc.predicted_delta_nll == pytest.approx(0.1)
    d = json.loads(json.dumps(alloc.to_json()))
    assert d["q"] == [0, 1] and d["bits_per_layer"] == [4, 2] and d["bytes"] == 1150
    assert d["solver"]["status"] == "optimal" and d["solver"]["seconds"] >= 0
    assert d["target_bits"] is None and d["predicted_delta_nll"] == pytest.approx(0.1)


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    L = 9 + seed
    costs = random_costs(rng, L)
    s = rng.uniform(0, 1, L)
    gain = (1 - all_q(L)) @ s  # sum s_i (1 - q_i)
    for bits in (2.3, 3.0, 3.7):
        B = budget_bytes(costs, bits)
        alloc = solve_knapsack(s, costs, bits=bits)
        assert alloc.bytes == costs.bytes_used(alloc.q) <= B
        assert (1 - np.array(alloc.q)) @ s == pytest.approx(-brute_force(-gain, costs, B), rel=1e-9)
        assert math.isnan(alloc.predicted_delta_nll)
        assert alloc.to_json()["predicted_delta_nll"] is None


def test_knapsack_reports_delta_when_given_the_model():
    rng = np.random.default_rng(3)
    costs = random_costs(rng, 6)
    a, K = random_model(rng, 6, "spqe")
    alloc = solve_knapsack(rng.uniform(0, 1, 6), costs, bits=3.0, a=a, K=K)
    assert alloc.predicted_delta_nll == pytest.approx(predicted_delta((a, K), alloc.q))
    impq = solve(a, K, costs, bits=3.0)
    assert impq.predicted_delta_nll <= alloc.predicted_delta_nll + 1e-12


def test_frontier_is_monotone():
    rng = np.random.default_rng(5)
    L = 10
    costs = random_costs(rng, L)
    m = quadratic_model(rng.normal(rng.uniform(0.1, 1, L), 0.3, (30, L)))
    a = np.abs(m.a)  # a >= 0 and K PSD: Delta >= 0, so all-high at 4 bits is also the optimum
    allocs = frontier(a, m.K, costs)
    assert [x.target_bits for x in allocs] == [round(2 + 0.05 * k, 2) for k in range(41)]
    deltas = [x.predicted_delta_nll for x in allocs]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(deltas, deltas[1:]))
    assert deltas[0] > deltas[-1] == 0.0
    assert all(x.bytes <= x.budget_bytes for x in allocs)
    assert [x.budget_bytes for x in allocs] == sorted(x.budget_bytes for x in allocs)


def test_deterministic():
    rng = np.random.default_rng(11)
    costs = random_costs(rng, 10)
    a, K = random_model(rng, 10, "indefinite")
    first, second = solve(a, K, costs, bits=2.7), solve(a, K, costs, bits=2.7)
    assert first.q == second.q
    assert isinstance(first, Allocation)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["spqe", "indefinite"])
def test_both_linearizations_match_brute_force(seed, kind):
    """A model solved more than once is solved by whichever of its two linearizations
    (one y per pair, Glover's one z per drop) has been faster: each alone is exact."""
    rng = np.random.default_rng(300 + seed)
    L = 6 + seed
    costs = random_costs(rng, L)
    a, K = random_model(rng, L, kind)
    programs = solver._Programs(a, K, costs, None, compact=False)
    for form in (0, 1):
        for bits in (2.1, 2.5, 3.0, 3.5, 3.9):
            B = budget_bytes(costs, bits)
            model, q = programs.copy(form, costs, B)
            q_val, status = solver._optimize(model, q, costs, B, time_limit=None)
            best = brute_force_delta(a, K, costs, B)
            assert status == "optimal" and costs.bytes_used(q_val) <= B
            assert abs(predicted_delta((a, K), q_val) - best) <= 1e-9 * max(1.0, abs(best))


def test_a_model_solved_again_tries_the_other_linearization_then_keeps_the_faster():
    rng = np.random.default_rng(11)
    L = 9
    costs = random_costs(rng, L)
    a, K = random_model(rng, L, "spqe")
    solver._PROGRAMS.clear()
    allocs = [solve(a, K, costs, bits=b) for b in (2.2, 2.6, 3.0, 3.4, 3.8)]
    (programs,) = solver._PROGRAMS.values()
    assert len(programs.seconds[0]) >= 1 and len(programs.seconds[1]) >= 1
    assert sum(map(len, programs.seconds.values())) == 5
    for alloc, b in zip(allocs, (2.2, 2.6, 3.0, 3.4, 3.8)):
        assert_optimal(alloc, a, K, costs, budget_bytes(costs, b))


def test_a_new_model_of_the_same_costs_starts_with_the_form_that_was_faster():
    """The stability check and each new sample bring models solved once or twice: they
    start with the linearization that was faster on the run's previous model."""
    rng = np.random.default_rng(12)
    L = 9
    costs = random_costs(rng, L)
    a, K = random_model(rng, L, "spqe")
    solver._PROGRAMS.clear()
    for b in (2.2, 2.6, 3.0):
        solve(a, K, costs, bits=b)
    (programs,) = solver._PROGRAMS.values()
    faster = programs.faster()
    assert faster is not None
    a2, K2 = a * 1.01, K * 0.99         # the model of one more sample, say
    alloc = solve(a2, K2, costs, bits=2.7)
    newer = list(solver._PROGRAMS.values())[-1]
    assert newer is not programs and newer.first == faster
    assert list(newer.built) == [faster] and len(newer.seconds[faster]) == 1
    assert_optimal(alloc, a2, K2, costs, budget_bytes(costs, 2.7))


def test_solves_of_other_threads_wait_for_the_trial_of_the_other_linearization(monkeypatch):
    """The frontier solves two budgets at once: while one thread tries the second form,
    the other waits for its time rather than taking the first form, which may be the
    slow one."""
    import threading

    rng = np.random.default_rng(13)
    L = 9
    costs = random_costs(rng, L)
    a, K = random_model(rng, L, "spqe")
    solver._PROGRAMS.clear()
    solver._FASTER.clear()
    solve(a, K, costs, bits=2.5)                 # the first form, timed
    (programs,) = solver._PROGRAMS.values()
    optimize, events = solver._optimize, []
    in_trial = threading.Event()

    def recorded(model, q, costs_, B, time_limit):
        trial = time_limit is not None
        events.append(("start", trial))
        if trial:
            in_trial.set()
            time.sleep(0.3)                      # a slow trial: the other thread must wait
        out = optimize(model, q, costs_, B, time_limit)
        events.append(("end", trial))
        return out

    monkeypatch.setattr(solver, "_optimize", recorded)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault(3.0, solve(a, K, costs, bits=3.0)))
    first.start()
    assert in_trial.wait(10)
    second = threading.Thread(target=lambda: results.setdefault(3.4, solve(a, K, costs, bits=3.4)))
    second.start()
    first.join(30)
    second.join(30)
    assert events[:2] == [("start", True), ("end", True)]    # the other solve came after
    assert len(programs.seconds[1]) >= 1 and programs.tried.is_set()
    for b, alloc in results.items():
        assert_optimal(alloc, a, K, costs, budget_bytes(costs, b))
