import numpy as np
import pytest

from core.interactions import (
    QuadraticModel,
    budget_local_model,
    budget_local_weights,
    positions,
    predicted_delta,
    quadratic_model,
)

# Three samples over three layers; every number below is worked out by hand.
D3 = np.array([[1.0, 2.0, 0.0],
               [3.0, 0.0, 1.0],
               [2.0, 1.0, 2.0]])
C3 = np.array([[1.0, -1.0, 0.5],
               [-1.0, 1.0, -0.5],
               [0.5, -0.5, 1.0]])


def test_hand_checked_model():
    m = quadratic_model(D3)
    np.testing.assert_allclose(m.phi, [2.0, 1.0, 1.0])
    np.testing.assert_allclose(m.se, np.full(3, 1 / np.sqrt(3)))
    np.testing.assert_allclose(m.C, C3)
    np.testing.assert_allclose(m.C, np.cov(D3, rowvar=False))
    np.testing.assert_allclose(m.K, [[1.0, -0.5, 0.25],
                                     [-0.5, 1.0, -0.25],
                                     [0.25, -0.25, 1.0]])
    np.testing.assert_allclose(m.a, [2.25, 1.75, 1.0])  # phi_i - sum_{j != i} K_ij
    assert m.samples == 3


@pytest.mark.parametrize("alpha, K", [(0.0, C3), (1.0, np.diag(np.diag(C3)))])
def test_shrinkage_ends(alpha, K):
    m = quadratic_model(D3, alpha=alpha)
    np.testing.assert_allclose(m.K, K)
    np.testing.assert_allclose(m.a, m.phi - (K.sum(axis=1) - np.diag(K)))


def test_paired_uses_pair_means_and_keeps_odd_row_for_phi():
    D = np.array([[1.0, 3.0], [3.0, 1.0],   # pair mean (2, 2)
                  [0.0, 4.0], [2.0, 2.0],   # pair mean (1, 3)
                  [5.0, 0.0]])              # unpaired: counts for phi only
    m = quadratic_model(D, paired=True)
    np.testing.assert_allclose(m.phi, [2.2, 2.0])
    np.testing.assert_allclose(m.C, [[0.5, -0.5], [-0.5, 0.5]])
    np.testing.assert_allclose(m.se, [0.5, 0.5])  # sqrt(0.5) / sqrt(2 pairs)
    np.testing.assert_allclose(m.K, [[0.5, -0.25], [-0.25, 0.5]])
    np.testing.assert_allclose(m.a, [2.45, 2.25])
    assert m.samples == 5


@pytest.mark.parametrize("paired", [False, True])
def test_single_sample(paired):
    m = quadratic_model([[0.5, -0.25, 1.0]], paired=paired)
    np.testing.assert_allclose(m.phi, [0.5, -0.25, 1.0])
    assert not m.se.any() and not m.C.any() and not m.K.any()
    np.testing.assert_allclose(m.a, m.phi)


def _pairwise_game_samples(u, W, permutations):
    """Marginal vectors d of v(S) = sum_{i in S} u_i + sum_{i<j in S} W_ij."""
    D = np.zeros((len(permutations), len(u)))
    for m, p in enumerate(permutations):
        in_S = np.zeros(len(u), dtype=bool)
        for i in p:
            D[m, i] = u[i] + W[i, in_S].sum()
            in_S[i] = True
    return D


def test_antithetic_pairs_give_the_exact_shapley_value_of_a_pairwise_game():
    rng = np.random.default_rng(0)
    L = 6
    u = rng.uniform(0, 1, L)
    W = np.triu(rng.normal(0, 0.3, (L, L)), 1)
    W = W + W.T
    perms = []
    for _ in range(3):
        p = rng.permutation(L)
        perms += [p, p[::-1]]
    m = quadratic_model(_pairwise_game_samples(u, W, perms), paired=True)
    np.testing.assert_allclose(m.phi, u + W.sum(axis=1) / 2, atol=1e-12)
    np.testing.assert_allclose(m.se, 0, atol=1e-12)
    # efficiency: the estimates add up to v(all low) - v(all high)
    assert m.phi.sum() == pytest.approx(u.sum() + np.triu(W, 1).sum())


def test_predicted_delta_from_model_or_pair():
    m = quadratic_model(D3)
    assert predicted_delta(m, [1, 1, 0]) == pytest.approx(2.25 + 1.75 + 1 + 1 - 1.0)
    assert predicted_delta((m.a, m.K), [1, 0, 1]) == pytest.approx(2.25 + 1.0 + 1 + 1 + 0.5)
    assert predicted_delta(m, [0, 0, 0]) == 0.0


def test_model_is_frozen():
    m = quadratic_model(D3)
    assert isinstance(m, QuadraticModel)
    with pytest.raises(AttributeError):
        m.samples = 4


# ------------------------------------------------------------ IMPQ-local (our extension)

def test_weighted_model_by_hand():
    """Weights (1, 1, 0) on D3's first column and (1, 0, 1) elsewhere, worked out by hand."""
    W = np.array([[1.0, 1.0, 1.0],
                  [1.0, 0.0, 0.0],
                  [0.0, 1.0, 1.0]])
    m = quadratic_model(D3, alpha=0.0, weights=W)
    # phi: col0 (1 + 3) / 2 = 2; col1 (2 + 1) / 2 = 1.5; col2 (0 + 2) / 2 = 1
    np.testing.assert_allclose(m.phi, [2.0, 1.5, 1.0])
    # x = d - phi where weighted: col0 (-1, 1, -), col1 (0.5, -, -0.5), col2 (-1, -, 1)
    # C_00 = (1 + 1) / 2 = 1; C_01 = (-1 * 0.5) / 1 (only row 0 has both) = -0.5
    # C_12 = (0.5 * -1 + -0.5 * 1) / 2 = -0.5; C_11 = 0.25; C_22 = 1; C_02 = (-1 * -1) / 1 = 1
    np.testing.assert_allclose(m.C, [[1.0, -0.5, 1.0],
                                     [-0.5, 0.25, -0.5],
                                     [1.0, -0.5, 1.0]])
    np.testing.assert_allclose(m.a, m.phi - (m.K.sum(axis=1) - np.diag(m.K)))
    # Kish: n_eff = (sum w)^2 / sum w^2 = 2 for every column
    np.testing.assert_allclose(m.se, np.sqrt(np.diag(m.C) / 2))


def test_uniform_weights_give_the_shapley_estimates():
    rng = np.random.default_rng(3)
    D = rng.normal(size=(40, 6))
    plain, weighted = quadratic_model(D), quadratic_model(D, weights=np.full(D.shape, 0.3))
    np.testing.assert_allclose(weighted.phi, plain.phi)
    np.testing.assert_allclose(weighted.C, plain.C * 39 / 40)   # 1/M instead of 1/(M - 1)


def test_budget_local_weights_centre_on_the_budget_state():
    perms = np.array([[2, 0, 1, 3], [3, 2, 1, 0]])
    np.testing.assert_array_equal(positions(perms), [[2, 3, 1, 4], [4, 3, 2, 1]])
    # low_share 0.5 of 4 layers: 2 layers at 2 bits, between steps 2 and 3 (centre 2.5)
    W = budget_local_weights(perms, 0.5, width=1.0)
    np.testing.assert_allclose(W[0], np.exp(-0.5 * (np.array([2, 3, 1, 4]) - 2.5) ** 2))
    assert W[0, 0] == W[0, 1] > W[0, 2] == W[0, 3]   # steps 2, 3 beat 1, 4
    with pytest.raises(ValueError, match="low_share"):
        budget_local_weights(perms, 1.5)


def test_budget_local_model_follows_the_marginals_near_the_budget():
    """A saturating game: a layer's marginal is large early in a walk and tiny late, and
    layer 0 matters most early while layer 1 matters most late. The Shapley estimate ranks
    layer 0 first; the model local to an almost all-low budget ranks layer 1 first."""
    rng = np.random.default_rng(0)
    L, M = 6, 400
    P = np.array([rng.permutation(L) for _ in range(M)])
    D = np.zeros((M, L))
    for m in range(M):
        for k, layer in enumerate(P[m], 1):
            early = {0: 3.0, 1: 0.5}.get(layer, 1.0)
            late = {0: 0.05, 1: 0.5}.get(layer, 0.1)
            D[m, layer] = early if k <= L // 2 else late
    shapley = quadratic_model(D)
    local = budget_local_model(D, P, low_share=5 / 6, width=0.75)
    assert np.argmax(shapley.phi) == 0
    assert np.argmax(local.phi) == 1
    with pytest.raises(ValueError, match="perms"):
        budget_local_model(D, P[:, :3], 0.5)
