"""IMPQ-fit (core.fit, our extension): the quadratic model fitted to the states SPQE's
walks visit, on games whose answer is known."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from core.errors import UserError
from core.evaluate import solve_fit
from core.fit import fit_states, visited_states
from core.interactions import predicted_delta, quadratic_model
from core.solver import Costs, solve


def quadratic_game(L: int, seed: int = 0):
    """v(S) - v({}) = u.x + sum_{i<j} w_ij x_i x_j with interactions of both signs."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.2, 2.0, L)
    W = np.triu(rng.normal(0.0, 0.6, (L, L)), 1)
    W = W + W.T
    return u, W, lambda x: float(x @ u + 0.5 * x @ W @ x)


def walks(v, L: int, M: int, seed: int = 1):
    """M SPQE samples of the game v: permutations and marginal vectors, as the engine
    records them."""
    rng = np.random.default_rng(seed)
    perms = np.array([rng.permutation(L) for _ in range(M)])
    D = np.zeros((M, L))
    for m, perm in enumerate(perms):
        x = np.zeros(L)
        for i in perm:
            before = v(x)
            x[i] = 1.0
            D[m, i] = v(x) - before
    return D, perms


def test_visited_states_are_the_walks_prefixes():
    D = np.array([[1.0, 2.0, 4.0]])
    X, y, walk = visited_states(D, np.array([[2, 0, 1]]))
    assert X.tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1]]
    assert y.tolist() == [0.0, 4.0, 5.0, 7.0]
    assert walk.tolist() == [0, 0, 0, 0]


def test_an_exactly_quadratic_game_is_recovered_with_its_signs():
    L = 7
    u, W, v = quadratic_game(L)
    D, perms = walks(v, L, M=30)
    fitted = fit_states(D, perms)
    assert np.allclose(fitted.u, u, atol=1e-4)
    assert np.allclose(fitted.W, W, atol=1e-4)
    assert np.array_equal(np.sign(fitted.W), np.sign(W))
    assert fitted.cv_rmse < 1e-3 and fitted.samples == 30 and fitted.states == 30 * (L + 1)
    # the paper's covariance model loses the signs: its off-diagonal K is never positive here
    K = quadratic_model(D).K
    assert (W > 0).any() and not np.array_equal(np.sign(K[np.triu_indices(L, 1)]),
                                                 np.sign(W[np.triu_indices(L, 1)]))


def spends_budget(q, costs: Costs, B: int) -> bool:
    """No layer's last drop taken would fit back within B (solve's `maximal`)."""
    S, used = costs.steps, costs.bytes_used(q)
    last = [j for j in range(costs.n_drops) if q[j] and ((j + 1) % S == 0 or not q[j + 1])]
    return used <= B and all(used + int(costs.c[j]) > B for j in last)


def test_the_solver_finds_the_brute_force_optimum_of_the_fitted_model():
    L = 8
    u, W, v = quadratic_game(L, seed=3)
    D, perms = walks(v, L, M=40, seed=4)
    fitted = fit_states(D, perms)
    costs = Costs(m_lo=[10] * L, m_hi=[30 + 3 * i for i in range(L)], params=[80] * L)
    for bits in (2.3, 2.8, 3.4):
        alloc = solve_fit(fitted, costs, bits=bits)
        best = min((q for q in itertools.product((0, 1), repeat=L)
                    if spends_budget(q, costs, alloc.budget_bytes)),
                   key=lambda q: v(np.array(q, dtype=float)))
        assert alloc.q == best
        assert alloc.bytes <= alloc.budget_bytes


def test_noise_is_regularized_by_cross_validation_over_walks():
    L = 6
    u, W, v = quadratic_game(L, seed=5)
    rng = np.random.default_rng(6)
    noisy = lambda x: v(x) + (0.3 * rng.normal() if x.any() else 0.0)   # noqa: E731
    D, perms = walks(noisy, L, M=25)
    fitted = fit_states(D, perms)
    assert fitted.lam > 0 and fitted.cv_rmse > 0.05
    assert np.corrcoef(fitted.u, u)[0, 1] > 0.8


def saturating_game(L: int, seed: int = 0):
    """The quadratic game plus h(n), a loss that saturates along the number n of low layers
    (h(0) = h(1) = h(2) = 0), as a model near collapse does: no pairwise W can fit it."""
    u, W, v = quadratic_game(L, seed)
    n = np.arange(L + 1)
    h = -0.4 * np.maximum(n - 2, 0) ** 1.5
    return u, W, h, lambda x: v(x) + h[int(x.sum())]


def test_the_size_term_takes_the_saturation_and_w_keeps_the_interactions():
    L = 7
    u, W, h, v = saturating_game(L, seed=2)
    D, perms = walks(v, L, M=40, seed=5)
    fitted = fit_states(D, perms)
    assert np.allclose(fitted.f, h, atol=1e-3)
    assert np.allclose(fitted.u, u, atol=1e-3) and np.allclose(fitted.W, W, atol=1e-3)
    X = np.array(list(itertools.product((0, 1), repeat=L)), dtype=float)
    assert np.allclose(fitted.predict(X), [v(x) for x in X], atol=1e-3)
    assert fitted.cv_rmse < 1e-3


def test_the_size_term_is_solved_exactly_under_the_budget():
    """Unequal costs, so the budget does not fix the number of low layers: f decides."""
    L = 8
    u, W, h, v = saturating_game(L, seed=3)
    D, perms = walks(v, L, M=50, seed=6)
    fitted = fit_states(D, perms)
    costs = Costs(m_lo=[10 + i for i in range(L)], m_hi=[30 + 5 * i for i in range(L)], params=[80] * L)
    for bits in (2.3, 2.8, 3.4):
        alloc = solve_fit(fitted, costs, bits=bits)
        feasible = [q for q in itertools.product((0, 1), repeat=L) if spends_budget(q, costs, alloc.budget_bytes)]
        best = min(feasible, key=lambda q: v(np.array(q, dtype=float)))
        assert alloc.q == best
        assert alloc.predicted_delta_nll == pytest.approx(v(np.array(best, dtype=float)), abs=1e-3)
        # the same model without its size term chooses otherwise somewhere (the control)
        plain = solve(fitted.a, fitted.K, costs, bits=bits)
        assert plain.predicted_delta_nll == pytest.approx(predicted_delta((fitted.a, fitted.K), plain.q))
    assert any(solve(fitted.a, fitted.K, costs, bits=b).q != solve_fit(fitted, costs, bits=b).q
               for b in (2.3, 2.5, 2.8, 3.1, 3.4, 3.7))


def test_the_allocation_spends_the_budget_where_the_fit_predicts_a_gain():
    """Two layers whose interaction outweighs their main effects: the fitted model
    predicts a gain from lowering both. With room for one low layer only, the program
    without `maximal` lowers both (and leaves a layer's worth of bytes unused); IMPQ-fit's
    lowers exactly one, the best single one."""
    L = 5
    u = np.array([1.0, 1.2, 0.8, 0.5, 0.9])
    W = np.zeros((L, L))
    W[1, 3] = W[3, 1] = -3.0
    fitted = fit_states(*walks(lambda x: x @ u + 0.5 * x @ W @ x, L, M=30, seed=2))
    assert np.allclose(fitted.W, W, atol=1e-4)
    costs = Costs(m_lo=[10] * L, m_hi=[30] * L, params=[80] * L)
    B = costs.B_hi - 20                       # one layer must go low, two need not
    free = solve(fitted.a, fitted.K, costs, budget=B, size=fitted.f)
    assert free.q == (0, 1, 0, 1, 0) and free.bytes == B - 20
    alloc = solve_fit(fitted, costs, budget=B)
    assert alloc.q == (0, 0, 0, 1, 0) and alloc.bytes == B
    assert alloc.predicted_delta_nll == pytest.approx(0.5, abs=1e-4)


def test_spending_the_budget_is_exact_with_more_levels():
    """Three levels, unequal costs: solve(maximal=True) is the brute-force optimum over
    allocations that could raise no layer's last drop within the budget."""
    L, levels = 4, (2, 3, 4)
    costs = Costs(m_lo=[10, 12, 9, 15], m_hi=[30, 40, 28, 35], params=[80] * L, levels=levels,
                  mid=[[21, 25, 17, 26]])
    rng = np.random.default_rng(7)
    n = costs.n_drops
    a = rng.normal(0.5, 1.0, n)
    K = rng.normal(0, 1.0, (n, n))
    K = (K + K.T) / 2
    np.fill_diagonal(K, 0)
    allocations = [costs.drops_of(b) for b in itertools.product(levels, repeat=L)]
    for bits in (2.4, 2.9, 3.5):
        alloc = solve(a, K, costs, bits=bits, maximal=True)
        kept = [q for q in allocations if spends_budget(q, costs, alloc.budget_bytes)]
        best = min(kept, key=lambda q: predicted_delta((a, K), q))
        assert list(alloc.q) == best
        assert spends_budget(alloc.q, costs, alloc.budget_bytes)
    assert any(solve(a, K, costs, bits=b).q != solve(a, K, costs, bits=b, maximal=True).q
               for b in (2.4, 2.9, 3.5))


def test_predicted_delta_adds_the_size_term():
    a, K, f = np.array([1.0, 2.0, 4.0]), np.zeros((3, 3)), np.array([0.0, 0.0, 0.0, -0.5])
    assert predicted_delta((a, K, f), [1, 1, 1]) == pytest.approx(6.5)
    assert predicted_delta((a, K, f), [1, 0, 1]) == pytest.approx(5.0)


@pytest.mark.parametrize("M", [0, 1])
def test_too_few_samples_are_refused(M):
    u, W, v = quadratic_game(5)
    D, perms = walks(v, 5, M=max(M, 1))
    with pytest.raises(UserError, match="at least 2 SPQE samples"):
        fit_states(D[:M], perms[:M])
