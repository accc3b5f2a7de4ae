"""SPQE: Shapley-based Progressive Quantization Estimation (METHOD.md).

One sample m draws a permutation p of the L layers, starts from S_0 = {} (all layers at
4 bits) and lowers p_1, p_2, ... to 2 bits one at a time; d_m[p_k] = v(S_k) - v(S_{k-1}).

With more than two levels (our extension; README, "Levels") every layer starts at the
highest level and steps down one level at a time: a sample is a uniformly random
interleaving of all L x S drops (S = levels - 1) that keeps each layer's steps in order,
drawn as a random permutation of the multiset in which every layer appears S times (its
k-th appearance is its k-th step). d_m[i*S + k] is the marginal of layer i's (k+1)-th
step. With two levels this is the sample above, draw for draw.

A sample's states are the same whichever end it is walked from, so when the model is
left at all-low by one sample the next is walked backwards (raising layers p_L..p_1):
every evaluation changes exactly one layer, and no sample pays a full forward pass to
return to all-high. Permutation m depends only on (seed, m), so samples can be
computed in any order, resumed, or spread over processes with identical results.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from core.errors import Cancelled  # noqa: F401  (raised here; callers import it from here too)
from core.interactions import drop_order
from core.switching import HIGH, LOW, LayerSwitch, PrefixEvaluator


def permutation(seed: int, m: int, L: int, antithetic: bool = False, steps: int = 1) -> np.ndarray:
    """The order of sample m's drops, as the layer each one lowers (each layer `steps`
    times). With antithetic pairs, sample 2j+1 is 2j reversed."""
    def draw(rng):
        return rng.permutation(L) if steps == 1 else rng.permutation(np.repeat(np.arange(L), steps))
    if antithetic:
        p = draw(np.random.default_rng([seed, m // 2]))
        return p[::-1].copy() if m % 2 else p
    return draw(np.random.default_rng([seed, m]))


@dataclass(frozen=True)
class Sample:
    m: int
    permutation: list[int]
    d: list[float]
    v_high: float
    v_low: float
    seconds: float
    # Set when some state's loss was NaN or infinite: {"value", "low_layers"} of the first
    # such state met on the walk. Such a sample is kept on disk, flagged, and left out of
    # every estimate (its marginals are undefined).
    nonfinite: dict | None = None

    def to_record(self) -> dict:
        record = {"m": self.m, "perm": self.permutation, "d": [_json_number(x) for x in self.d],
                  "v_high": _json_number(self.v_high), "v_low": _json_number(self.v_low),
                  "seconds": round(self.seconds, 3)}
        if self.nonfinite is not None:
            record["nonfinite"] = self.nonfinite
        return record


def _json_number(x: float | None) -> float | None:
    """JSON has no NaN or infinity: such values are written as null."""
    return x if x is not None and math.isfinite(x) else None


class Sampler:
    """Walks SPQE samples over a LayerSwitch, evaluating v(S) with a PrefixEvaluator."""

    def __init__(self, switch: LayerSwitch, evaluator: PrefixEvaluator, seed: int,
                 antithetic: bool = False,
                 on_eval: Callable[[int, int, int], None] | None = None,
                 cancel: threading.Event | None = None,
                 pause: threading.Event | None = None,
                 levels: tuple[int, ...] = (LOW, HIGH)):
        self.switch, self.evaluator = switch, evaluator
        self.L = switch.L
        self.levels = tuple(sorted(levels))
        self.S = len(self.levels) - 1
        self.top, self.bottom = self.levels[-1], self.levels[0]
        self.seed, self.antithetic = seed, antithetic
        self.on_eval = on_eval or (lambda step, steps, from_layer: None)
        self.cancel = cancel or threading.Event()
        self.pause = pause
        self.v_high: float | None = None
        self.v_low: float | None = None
        self.v_now: float | None = None    # v of the state the model is in now
        self._nonfinite: dict | None = None  # the first non-finite state of this sample

    def _check(self) -> None:
        while self.pause is not None and self.pause.is_set() and not self.cancel.is_set():
            time.sleep(0.05)
        if self.cancel.is_set():
            raise Cancelled

    def _set_all(self, bits: int) -> None:
        first = self.switch.apply([bits] * self.L)
        if first is not None or self.v_now is None:
            self.v_now = self.evaluator.evaluate(first or 0)
            self._watch(self.v_now)
            self.on_eval(0, self.L * self.S, first or 0)

    def start(self) -> None:
        """Bring the model to a known end state (all-high, or all-low if already there)."""
        if all(b == self.bottom for b in self.switch.bits) and self.v_now is not None:
            return
        self._set_all(self.top)
        self.v_high = self.v_now

    def sample(self, m: int) -> Sample:
        """Evaluate sample m; raises Cancelled (model left mid-way) if the caller cancels."""
        return self.walk(m, permutation(self.seed, m, self.L, self.antithetic, self.S))

    def walk(self, m: int, p: np.ndarray) -> Sample:
        """The marginal vector of permutation p, from whichever end the model is at."""
        t0 = time.perf_counter()
        self._nonfinite = None
        self._watch(self.v_now)
        if all(b == self.bottom for b in self.switch.bits):
            d = self._walk_down_from_low(p)
        else:
            if any(b != self.top for b in self.switch.bits):
                self._set_all(self.top)
            d = self._walk_up_from_high(p)
        return Sample(m=m, permutation=[int(i) for i in p], d=[float(x) for x in d],
                      v_high=self.v_high, v_low=self.v_low, seconds=time.perf_counter() - t0,
                      nonfinite=self._nonfinite)

    def _watch(self, v: float | None) -> None:
        """Note the first state of this sample whose loss is NaN or infinite."""
        if self._nonfinite is None and v is not None and not math.isfinite(v):
            self._nonfinite = {"value": repr(v),
                               "low_layers": [i for i, b in enumerate(self.switch.bits) if b == self.bottom]}

    def nonfinite_alone(self) -> list[int]:
        """The layers whose 2-bit version alone (every other layer at 4 bits) gives a NaN or
        infinite loss: L evaluations, made only to tell the user what broke. Leaves the
        model at all-high with v_now measured."""
        self._set_all(self.top)
        bad = []
        for i in range(self.L):
            self._check()
            if i:
                self.switch.set(i - 1, self.top)
            self.switch.set(i, self.bottom)
            if not math.isfinite(self.evaluator.evaluate(max(0, i - 1))):
                bad.append(i)
        self.switch.set(self.L - 1, self.top)
        self.v_now = self.v_high = self.evaluator.evaluate(self.L - 1)
        return bad

    def _walk_up_from_high(self, p: np.ndarray) -> np.ndarray:
        """Lower the drops of p in order (from the highest level down)."""
        d, n = np.zeros(self.L * self.S), len(p)
        level = [self.S] * self.L          # index into levels, per layer
        self.v_high = self.v_now
        for k, (layer, drop) in enumerate(zip(p, drop_order(p, self.S)), 1):
            self._check()
            level[layer] -= 1
            self.switch.set(layer, self.levels[level[layer]])
            v = self.evaluator.evaluate(layer)
            self._watch(v)
            d[drop], self.v_now = v - self.v_now, v
            self.on_eval(k, n, layer)
        self.v_low = self.v_now
        return d

    def _walk_down_from_low(self, p: np.ndarray) -> np.ndarray:
        """Undo the drops of p in reverse order (from the lowest level up)."""
        d, n = np.zeros(self.L * self.S), len(p)
        level = [0] * self.L
        self.v_low = self.v_now
        for k, (layer, drop) in enumerate(zip(p[::-1], drop_order(p, self.S)[::-1]), 1):
            self._check()
            level[layer] += 1
            self.switch.set(layer, self.levels[level[layer]])
            v = self.evaluator.evaluate(layer)
            self._watch(v)
            d[drop], self.v_now = self.v_now - v, v
            self.on_eval(k, n, layer)
        self.v_high = self.v_now
        return d
