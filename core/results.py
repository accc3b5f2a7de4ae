"""What a comparison (core.compare) produced, read and written without torch: the
methods and their labels, one row per method and budget, the whole result and the saved
compare/<backend>.json. The app reads saved comparisons through this module, so that
showing one never waits for torch to import."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from core.errors import UserError
from core.runs import RunDir

IMPQ, IMPQ_LOCAL, IMPQ_FIT = "impq", "impq-local", "impq-fit"
RUN_METHODS = (IMPQ, IMPQ_LOCAL, IMPQ_FIT)   # the paper's, and our two extensions
# Our third extension (core.checked): candidates measured on the calibration windows; it
# needs the model, so the CLI and compare offer it, the app's re-solving panes do not.
IMPQ_CHECKED = "impq-checked"
CLI_METHODS = (*RUN_METHODS, IMPQ_CHECKED)
BASELINES = ("sensitivity", "lim", "zscore", "activation")

DEFAULT_BITS = (2.25, 2.5, 3.0, 3.5)
UNIFORM_LOW, UNIFORM_HIGH = "uniform-2", "uniform-4"
METHODS = (*CLI_METHODS, *BASELINES)
LABELS = {IMPQ: "IMPQ", IMPQ_LOCAL: "IMPQ-local", IMPQ_FIT: "IMPQ-fit", IMPQ_CHECKED: "IMPQ-fit, checked", "sensitivity": "Sensitivity", "lim": "LIM", "zscore": "Z-score",
          "activation": "Activation", UNIFORM_LOW: "all 2-bit", UNIFORM_HIGH: "all 4-bit"}
COMPARE_DIR = "compare"
# The version of each model whose allocations changed since comparisons were first saved:
# a saved row of an older one is not what `compare` gives now. IMPQ-fit: 1 the quadratic
# alone, 2 with the size term f(n), 3 spending the budget (core.solver.solve_fit).
MODEL_VERSIONS = {IMPQ_FIT: 3}


@dataclass(frozen=True)
class MethodResult:
    method: str
    target_bits: float            # the budget asked for (2.0 / 4.0 for the uniform references)
    avg_bits: float               # effective bits per weight, scales and zeros included
    weight_bits: float            # bits per weight without metadata
    bytes: int
    budget_bytes: int
    layers_high: int              # layers at 4 bits
    bits_per_layer: tuple[int, ...]
    predicted_delta_nll: float    # the run's quadratic model's prediction, over all-4-bit
    nll: float                    # measured mean NLL on the evaluation tokens (nats/token)
    ppl: float                    # exp(nll), real backend modules
    eval_tokens: int              # tokens predicted
    eval_tokens_sha256: str       # of the [windows, T] token ids the evaluation ran on

    @classmethod
    def from_json(cls, d: dict) -> "MethodResult":
        d = {**d, "bits_per_layer": tuple(d["bits_per_layer"])}
        if d.get("predicted_delta_nll") is None:
            d["predicted_delta_nll"] = math.nan
        return cls(**d)

    def to_json(self) -> dict:
        d = asdict(self)
        d["bits_per_layer"] = list(self.bits_per_layer)
        if math.isnan(self.predicted_delta_nll):
            d["predicted_delta_nll"] = None   # JSON has no nan
        return d


@dataclass(frozen=True)
class CompareResult:
    results: tuple[MethodResult, ...]
    bits: tuple[float, ...]
    ppl_original: float           # the unquantized model on the same tokens
    scores: dict                  # baseline -> per-layer scores
    model: str
    backend: str
    group_size: int
    samples: int                  # SPQE samples behind IMPQ
    alpha: float
    costs_source: str             # "run" (the run's costs.json) or "measured" (other backend)
    calib: dict                   # text, windows, window_tokens, seed (the run's)
    eval: dict                    # text, windows, window_tokens, tokens, tokens_sha256
    timings: dict                 # seconds per phase, evaluations done
    device: str
    warnings: tuple[str, ...] = ()
    files: tuple[str, ...] = field(default=())
    versions: dict = field(default_factory=dict)   # MODEL_VERSIONS when it was made; {} before

    def outdated(self) -> tuple[str, ...]:
        """The methods with rows made by an earlier version of their model (MODEL_VERSIONS)."""
        return tuple(m for m, v in MODEL_VERSIONS.items()
                     if m in self.methods and self.versions.get(m) != v)

    def row(self, method: str, bits: float) -> MethodResult:
        for r in self.results:
            if r.method == method and r.target_bits == bits:
                return r
        raise KeyError((method, bits))

    @property
    def methods(self) -> tuple[str, ...]:
        """METHODS that have rows (a comparison saved before IMPQ-local lacks its rows)."""
        present = {r.method for r in self.results}
        return tuple(m for m in METHODS if m in present)

    def uniform(self) -> list[tuple[str, MethodResult]]:
        """The references with every layer at the lowest and at the highest level, labelled
        by their precision ("all 2-bit", "all 4-bit" with the paper's levels)."""
        return [(f"all {r.target_bits:g}-bit", r) for m in (UNIFORM_LOW, UNIFORM_HIGH)
                for r in self.results if r.method == m]

    def best_baseline(self, bits: float) -> MethodResult:
        return min((self.row(m, bits) for m in BASELINES), key=lambda r: r.ppl)

    def versus_best_baseline(self, method: str = IMPQ) -> list[dict]:
        """IMPQ's (or IMPQ-local's) perplexity over the best baseline's at each budget
        (< 1: it wins). The keys keep the impq_ names for either."""
        if method not in self.methods:
            return []
        out = []
        for b in self.bits:
            impq, best = self.row(method, b), self.best_baseline(b)
            out.append({"target_bits": b, "impq_ppl": impq.ppl, "best_baseline": best.method,
                        "best_baseline_ppl": best.ppl, "ratio": impq.ppl / best.ppl})
        return out

    def to_json(self) -> dict:
        return {
            "results": [r.to_json() for r in self.results],
            "bits": list(self.bits), "ppl_original": self.ppl_original,
            "impq_vs_best_baseline": self.versus_best_baseline(),
            "impq_local_vs_best_baseline": self.versus_best_baseline(IMPQ_LOCAL),
            "impq_fit_vs_best_baseline": self.versus_best_baseline(IMPQ_FIT),
            "impq_checked_vs_best_baseline": self.versus_best_baseline(IMPQ_CHECKED),
            "scores": {k: list(map(float, v)) for k, v in self.scores.items()},
            "model": self.model, "backend": self.backend, "group_size": self.group_size,
            "samples": self.samples, "alpha": self.alpha, "costs_source": self.costs_source,
            "calib": self.calib, "eval": self.eval, "timings": self.timings,
            "device": self.device, "warnings": list(self.warnings), "files": list(self.files),
            "versions": dict(self.versions),
        }

    @classmethod
    def from_json(cls, d: dict) -> "CompareResult":
        """The inverse of to_json (a saved compare/<backend>.json)."""
        return cls(results=tuple(MethodResult.from_json(r) for r in d["results"]),
                   bits=tuple(d["bits"]), ppl_original=d["ppl_original"], scores=d["scores"],
                   model=d["model"], backend=d["backend"], group_size=d["group_size"],
                   samples=d["samples"], alpha=d["alpha"], costs_source=d["costs_source"],
                   calib=d["calib"], eval=d["eval"], timings=d["timings"], device=d["device"],
                   warnings=tuple(d.get("warnings", ())), files=tuple(d.get("files", ())),
                   versions=dict(d.get("versions") or {}))


def load_saved(run: RunDir, backend: str) -> CompareResult | None:
    """The comparison saved in the run's compare/ folder for `backend`, if any. A file
    that does not parse is reported as a UserError rather than shown as empty."""
    path = run.path / COMPARE_DIR / f"{backend}.json"
    if not path.is_file():
        return None
    try:
        return CompareResult.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} cannot be read as a saved comparison ({e}); run "
                        f"`impq-tui compare {run.path}` again to rewrite it.") from None
