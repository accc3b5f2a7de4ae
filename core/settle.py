"""When to stop sampling: the allocation at the budgets the user cares about is settled.

After each finished sample the run's quadratic model (core.interactions, the paper's
IMPQ) is fitted to the samples so far and solved at each budget in `bits`. The run has
settled at sample m when all of

  (a) stable:  over the last K samples no allocation changed by more than `tol`: every
               allocation the run held after samples m-K, ..., m-1 is the current one,
               or costs at most `tol` more predicted loss than it under the current
               model (relative to the current allocation's predicted increase, at each
               budget). Near the cut IMPQ keeps swapping layers whose effects are nearly
               tied; such a swap changes the decision by almost nothing, so it does not
               hold the run (tol = 0 asks for the very same allocations);
  (b) precise: the standard error of every "marginal" drop is at most `rse` times the
               mean |phi| over all drops (a typical layer's effect). The marginal drops
               of a budget are the 2 x `width` drops nearest the cut when the drops are
               ranked by phi: the cut falls after as many drops as the allocation takes
               (with two levels, the number of layers at low precision). Their order is
               what a first-order reading of the estimates rests on; the rest of the
               ranking is far from the decision. Against the mean |phi| rather than each
               drop's own |phi|, so a harmless layer with phi near 0 does not hold the
               run; and se falls as 1/sqrt(m) even where two layers are truly tied (a tie
               costs nothing either way), so this never keeps a run going forever;
  (c) enough:  at least `min_samples` samples.

The run's `samples` stays the hard maximum. The defaults come from bench/early_stop.py
(README, "Early stop"): re-orderings of real 100-sample SPQE runs of SmolLM2-135M.
No torch here: the engine, the bench and the tests share it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.errors import InvalidField
from core.interactions import predicted_delta, quadratic_model
from core.solver import Costs, solve_impq

DEFAULT_BITS = (2.5, 3.0, 3.5)


@dataclass(frozen=True)
class SettleRule:
    bits: tuple[float, ...] = DEFAULT_BITS
    # bench/results/early_stop.json and early_stop_real.json (SmolLM2-135M, 24 seeds): K = 10
    # stops at 79-82 of 100 samples, mean perplexity <= 1.09x the full run's; K = 5 at ~53,
    # up to 1.32x; tol 2-5% at 34-46, 1.18-1.48x (no better than a fixed sample count); rse
    # binds only below 0.5, min_samples not at all past K = 8.
    K: int = 10              # samples over which no allocation may change
    rse: float = 0.5         # the largest se / mean|phi| allowed among marginal drops
    tol: float = 0.0         # the predicted-loss regret (relative) a change may cost
    min_samples: int = 20
    width: int = 2           # marginal drops: this many on each side of the cut


@dataclass(frozen=True)
class State:
    """The decision after m samples: one allocation (bits per layer) per budget, the
    largest se among the marginal drops of all budgets over the mean |phi|, and
    regret[k - 1]: how much more predicted loss, under this state's model, the
    allocations held k samples before cost than these (the largest over budgets,
    relative to these allocations' predicted increase; 0 where they are the same)."""
    m: int
    allocations: tuple[tuple[int, ...], ...]
    rse: float
    regret: tuple[float, ...] = ()


def budgets_for(levels: tuple[int, ...], bits: tuple[float, ...] | None) -> tuple[float, ...]:
    """The budgets to watch: those asked for (each within the run's levels), or the
    defaults that lie within them (the middle of the levels when none does)."""
    lo, hi = min(levels), max(levels)
    if bits and tuple(bits) != DEFAULT_BITS:
        outside = [b for b in bits if not lo <= b <= hi]
        if outside:
            raise InvalidField("until_settled", f"budgets {', '.join(f'{b:g}' for b in outside)} "
                                                f"lie outside this run's levels ({lo} to {hi} bits); "
                                                "choose budgets between them.")
        return tuple(sorted({float(b) for b in bits}))
    return tuple(b for b in DEFAULT_BITS if lo <= b <= hi) or ((lo + hi) / 2,)


def state(D: np.ndarray, costs: Costs, bits: tuple[float, ...], paired: bool = False,
          width: int = SettleRule.width, previous=()) -> State:
    """The allocations at `bits` from the samples D [m, drops], their marginal rse, and
    the regret of the `previous` states' allocations (most recent first)."""
    model = quadratic_model(D, paired=paired)
    allocations, worst = [], 0.0
    order = np.argsort(model.phi, kind="stable")
    scale = float(np.abs(model.phi).mean())
    rel = model.se / scale if scale > 0 else np.zeros_like(model.se)
    for b in bits:
        alloc = solve_impq(D, costs, bits=b, model=model)
        allocations.append(alloc.bits_per_layer)
        cut = int(sum(alloc.q))
        near = order[max(0, cut - width):cut + width]
        worst = max(worst, float(rel[near].max()) if len(near) else 0.0)
    allocations = tuple(allocations)

    def delta(alloc) -> float:
        return predicted_delta(model, costs.drops_of(alloc))

    now = [delta(a) for a in allocations]
    seen: dict = {}

    def regret(earlier) -> float:
        if earlier not in seen:
            seen[earlier] = max(((delta(e) - d) / max(abs(d), 1e-12) if e != a else 0.0)
                                for e, a, d in zip(earlier, allocations, now))
        return seen[earlier]

    return State(m=len(D), allocations=allocations, rse=worst,
                 regret=tuple(regret(earlier) for earlier in previous))


def settled(history: list[State], rule: SettleRule) -> bool:
    """Whether the latest state in `history` (one per sample, in order) ends the run."""
    if not history or history[-1].m < rule.min_samples or len(history) < rule.K + 1:
        return False
    last = history[-rule.K - 1:]
    if last[-1].m - last[0].m != rule.K:        # a gap (a non-finite sample): not K samples
        return False
    now = last[-1]
    if now.rse > rule.rse:
        return False
    return all(s.allocations == now.allocations
               or (k <= len(now.regret) and now.regret[k - 1] <= rule.tol)
               for k, s in enumerate(reversed(last[:-1]), 1))


def describe(history: list[State], rule: SettleRule) -> str:
    s = history[-1]
    change = ("unchanged" if rule.tol <= 0 else
              f"within {rule.tol:.1%} of the predicted loss")
    return (f"settled after {s.m} samples: allocations at {'/'.join(str(float(b)) for b in rule.bits)} "
            f"bits {change} for {rule.K} samples, largest se of the marginal layers / mean |phi| "
            f"{s.rse:.3f} (at most {rule.rse:g})")


@dataclass
class Settler:
    """The rule applied as samples arrive: `observe(D)` after each one; True = stop.
    History starts with this object, so a resumed run takes at least K new samples."""
    costs: Costs
    rule: SettleRule
    paired: bool = False
    history: list[State] = field(default_factory=list)

    def observe(self, D: np.ndarray) -> bool:
        if len(D) == 0 or (self.history and self.history[-1].m == len(D)):
            return False        # nothing new: the sample was non-finite and left out of D
        previous = [s.allocations for s in reversed(self.history[-self.rule.K:])]
        self.history.append(state(D, self.costs, self.rule.bits, self.paired, self.rule.width,
                                  previous))
        del self.history[:-self.rule.K - 1]
        return settled(self.history, self.rule)

    def message(self) -> str:
        return describe(self.history, self.rule)
