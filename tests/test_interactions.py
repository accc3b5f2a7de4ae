import numpy as np
import pytest

from core.interactions import QuadraticModel, predicted_delta, quadratic_model

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
