"""SPQE on a real (tiny, random-weight) Llama model with a real backend."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from core.backends import get_backend
from core.models import from_config, tiny_config
from core.spqe import Sampler, permutation
from core.switching import HIGH, LOW, LayerSwitch, PrefixEvaluator

L = 4


def _setup(seed: int = 0, micro_batch: int = 2, backend: str = "hqq"):
    loaded = from_config(tiny_config(layers=L), torch.device("cpu"), torch.float32, seed=seed)
    windows = torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(1))
    switch = LayerSwitch(loaded, get_backend(backend, 64))
    evaluator = PrefixEvaluator(loaded, windows, micro_batch)
    return loaded, windows, switch, evaluator


@pytest.fixture(scope="module")
def parts():
    return _setup()


def _full_forward_nll(loaded, windows) -> float:
    with torch.inference_mode():
        return loaded.model(input_ids=windows, labels=windows).loss.item()


def test_prefix_cache_matches_full_forward(parts):
    """After every single-layer change, the cached evaluation from the changed layer equals
    the model's own full forward pass (float32; tolerance 1e-6 relative)."""
    loaded, windows, switch, evaluator = parts
    switch.apply([HIGH] * L)
    evaluator.evaluate(0)
    for layer in (2, 0, 3, 1, 2):
        switch.set(layer, LOW if switch.bits[layer] == HIGH else HIGH)
        cached = evaluator.evaluate(layer)
        assert cached == pytest.approx(_full_forward_nll(loaded, windows), rel=1e-6)
    switch.apply([HIGH] * L)
    evaluator.evaluate(0)


def test_quantization_changes_the_loss(parts):
    _, _, switch, evaluator = parts
    switch.apply([HIGH] * L)
    v_high = evaluator.evaluate(0)
    switch.apply([LOW] * L)
    v_low = evaluator.evaluate(0)
    switch.apply([HIGH] * L)
    evaluator.evaluate(0)
    assert v_low - v_high > 1e-4   # 2-bit hurts more than 4-bit


def test_efficiency_and_fixed_endpoints(parts):
    _, _, switch, evaluator = parts
    sampler = Sampler(switch, evaluator, seed=3)
    sampler.start()
    samples = [sampler.sample(m) for m in range(5)]
    for s in samples:
        assert sum(s.d) == pytest.approx(s.v_low - s.v_high, abs=1e-12)
        assert sorted(s.permutation) == list(range(L))
    assert len({s.v_high for s in samples}) == 1 and len({s.v_low for s in samples}) == 1
    assert samples[0].v_low > samples[0].v_high


def test_same_seed_same_vectors_any_direction():
    """Fresh samplers with one seed give identical vectors, whichever end a sample is
    walked from (sample 1 is walked downwards in the first sampler, upwards in the second)."""
    _, _, switch_a, eval_a = _setup()
    a = Sampler(switch_a, eval_a, seed=7)
    a.start()
    first = [a.sample(m).d for m in range(3)]
    _, _, switch_b, eval_b = _setup()
    b = Sampler(switch_b, eval_b, seed=7)
    b.start()
    assert b.sample(1).d == first[1]
    assert b.sample(0).d == first[0]
    c = Sampler(*_setup()[2:], seed=8)
    c.start()
    assert c.sample(0).permutation != a.sample(0).permutation or c.sample(1).permutation != a.sample(1).permutation


def test_antithetic_pairs_reverse():
    p0, p1 = permutation(5, 0, 10, antithetic=True), permutation(5, 1, 10, antithetic=True)
    assert list(p1) == list(p0[::-1])
    assert list(permutation(5, 2, 10, True)) != list(p0)
    assert list(permutation(5, 3, 10)) == list(permutation(5, 3, 10))


def test_all_permutations_give_the_exact_shapley_value(parts):
    """SPQE over all 4! permutations equals the Shapley value computed from subsets."""
    _, _, switch, evaluator = parts
    sampler = Sampler(switch, evaluator, seed=0)
    sampler.start()
    D = np.array([sampler.walk(m, np.array(p)).d
                  for m, p in enumerate(itertools.permutations(range(L)))])

    def v(S) -> float:
        first = switch.apply([LOW if i in S else HIGH for i in range(L)])
        return evaluator.evaluate(first or 0)

    values = {S: v(S) for r in range(L + 1) for S in itertools.combinations(range(L), r)}
    exact = np.zeros(L)
    for i in range(L):
        for S, vS in values.items():
            if i in S:
                continue
            with_i = tuple(sorted(S + (i,)))
            weight = math.factorial(len(S)) * math.factorial(L - len(S) - 1) / math.factorial(L)
            exact[i] += weight * (values[with_i] - vS)
    np.testing.assert_allclose(D.mean(axis=0), exact, rtol=0, atol=1e-12)
    assert np.all(np.abs(exact) > 0)
