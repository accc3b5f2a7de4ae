"""SPQE: Shapley-based Progressive Quantization Estimation (METHOD.md).

One sample m draws a permutation p of the L layers, starts from S_0 = {} (all layers at
4 bits) and lowers p_1, p_2, ... to 2 bits one at a time; d_m[p_k] = v(S_k) - v(S_{k-1}).

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
from core.switching import HIGH, LOW, LayerSwitch, PrefixEvaluator


def permutation(seed: int, m: int, L: int, antithetic: bool = False) -> np.ndarray:
    """The permutation of sample m. With antithetic pairs, sample 2j+1 is 2j reversed."""
    if antithetic:
        p = np.random.default_rng([seed, m // 2]).permutation(L)
        return p[::-1].copy() if m % 2 else p
    return np.random.default_rng([seed, m]).permutation(L)


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
                 pause: threading.Event | None = None):
        self.switch, self.evaluator = switch, evaluator
        self.L = switch.L
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
            self.on_eval(0, self.L, first or 0)

    def start(self) -> None:
        """Bring the model to a known end state (all-high, or all-low if already there)."""
        if all(b == LOW for b in self.switch.bits) and self.v_now is not None:
            return
        self._set_all(HIGH)
        self.v_high = self.v_now

    def sample(self, m: int) -> Sample:
        """Evaluate sample m; raises Cancelled (model left mid-way) if the caller cancels."""
        return self.walk(m, permutation(self.seed, m, self.L, self.antithetic))

    def walk(self, m: int, p: np.ndarray) -> Sample:
        """The marginal vector of permutation p, from whichever end the model is at."""
        t0 = time.perf_counter()
        self._nonfinite = None
        self._watch(self.v_now)
        if all(b == LOW for b in self.switch.bits):
            d = self._walk_down_from_low(p)
        else:
            if any(b != HIGH for b in self.switch.bits):
                self._set_all(HIGH)
            d = self._walk_up_from_high(p)
        return Sample(m=m, permutation=[int(i) for i in p], d=[float(x) for x in d],
                      v_high=self.v_high, v_low=self.v_low, seconds=time.perf_counter() - t0,
                      nonfinite=self._nonfinite)

    def _watch(self, v: float | None) -> None:
        """Note the first state of this sample whose loss is NaN or infinite."""
        if self._nonfinite is None and v is not None and not math.isfinite(v):
            self._nonfinite = {"value": repr(v),
                               "low_layers": [i for i, b in enumerate(self.switch.bits) if b == LOW]}

    def nonfinite_alone(self) -> list[int]:
        """The layers whose 2-bit version alone (every other layer at 4 bits) gives a NaN or
        infinite loss: L evaluations, made only to tell the user what broke. Leaves the
        model at all-high with v_now measured."""
        self._set_all(HIGH)
        bad = []
        for i in range(self.L):
            self._check()
            if i:
                self.switch.set(i - 1, HIGH)
            self.switch.set(i, LOW)
            if not math.isfinite(self.evaluator.evaluate(max(0, i - 1))):
                bad.append(i)
        self.switch.set(self.L - 1, HIGH)
        self.v_now = self.v_high = self.evaluator.evaluate(self.L - 1)
        return bad

    def _walk_up_from_high(self, p: np.ndarray) -> np.ndarray:
        d = np.zeros(self.L)
        self.v_high = self.v_now
        for k, layer in enumerate(p, 1):
            self._check()
            self.switch.set(layer, LOW)
            v = self.evaluator.evaluate(layer)
            self._watch(v)
            d[layer], self.v_now = v - self.v_now, v
            self.on_eval(k, self.L, layer)
        self.v_low = self.v_now
        return d

    def _walk_down_from_low(self, p: np.ndarray) -> np.ndarray:
        d = np.zeros(self.L)
        self.v_low = self.v_now
        for k, layer in enumerate(p[::-1], 1):
            self._check()
            self.switch.set(layer, HIGH)
            v = self.evaluator.evaluate(layer)
            self._watch(v)
            d[layer], self.v_now = self.v_now - v, v
            self.on_eval(k, self.L, layer)
        self.v_high = self.v_now
        return d
