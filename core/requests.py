"""What a command is asked to do, checked before any model is loaded.

A request holds the values a face (the CLI, the app's setup form) collected, under
core's names for them; `validate()` raises core.errors.InvalidField naming the first
field that is wrong, and each face shows that field under its own name (a flag, a form
label). What needs the run itself (a budget below the all-2-bit size, a config that
differs from the saved one) is checked where the run is read.

    RunRequest       SPQE into a new run directory, or continuing one (`resume`)
    SolveRequest     a run's allocation at a budget: `bits` or `budget_bytes`
    Evaluation       the evaluation fields that eval, compare and export share
    EvalRequest      that allocation's perplexity on evaluation text
    CompareRequest   IMPQ against the baselines at several budgets
    ExportRequest    an allocation written as a quantized model
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from core.errors import InvalidField, UserError

BITS_MIN, BITS_MAX = 2.0, 4.0   # every layer at 2 bits ... every layer at 4 (the paper's levels)
LEVELS_MAX = 8.0                # the highest level any backend offers (`levels`)
MAX_SAMPLES = 1_000_000         # each sample is L+1 evaluations: far beyond any real run
MAX_SEED = 2**63 - 1            # numpy and torch generators take 0 ... 2**63-1 everywhere
MAX_MICRO_BATCH = 1_000_000     # windows per forward pass; above the run's windows it means all
MAX_BUDGET_BYTES = 10**18       # an exabyte: beyond any model's weights (and a sane file name)
WINDOW_TOKENS_WHY = ": a window needs one token to predict from and one to predict"


def _shown(value) -> str:
    """A value for a message, cut short when it is very long (a pasted 400-digit number)."""
    text = str(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _at_least(field: str, value: int | None, minimum: int, why: str = "") -> None:
    if value is not None and value < minimum:
        raise InvalidField(field, f"must be at least {minimum} (got {_shown(value)}){why}.")


def _bits(field: str, value: float) -> None:
    """Within the widest range any run's levels allow; the run's own levels (2 to 4 by
    default) are checked where the run is read (core.solver.budget_bytes)."""
    if not BITS_MIN <= value <= LEVELS_MAX:     # also NaN
        raise InvalidField(field, f"{_shown(value)} is outside [2, {LEVELS_MAX:g}], the widest "
                                  "range of any run: choose an average precision between 2 and 4 "
                                  "(the paper's levels), or within the run's `levels`.")


def _alpha(value: float) -> None:
    if not 0 <= value <= 1:
        raise InvalidField("alpha", f"must lie in [0, 1] (got {value}): it shrinks the "
                                    "covariance toward its diagonal, 0 not at all, 1 fully.")


def _method(value: str) -> None:
    from core.results import CLI_METHODS

    if value not in CLI_METHODS:
        raise InvalidField("method", f"{_shown(value)} is not one of {', '.join(CLI_METHODS)}.")


def _text(field: str, spec: str | None, role: str) -> None:
    """Read a local text file now, so that a missing, empty or undecodable file is
    reported before minutes of model loading (the hub corpora need the network: checked
    when they are loaded)."""
    from core.data import TEXT_CHOICES, load_text

    if spec is None or spec in TEXT_CHOICES:
        return
    try:
        load_text(spec, role)
    except UserError as exc:
        raise InvalidField(field, f"is not usable: {exc}") from None


def _folder_named(field: str, value: str | None) -> None:
    if value is not None and not value.strip():      # e.g. an unset "$DIR"
        raise InvalidField(field, "is empty: name the run directory.")


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """`None` takes the default (a new run) or the run's own value (`resume`)."""
    model: str | None = None
    calib_text: str | None = None
    backend: str | None = None
    gguf_types: str | None = None    # gguf backend: "LOW,HIGH" (default Q2_K,Q4_K)
    levels: tuple[int, ...] | None = None   # precisions to step through (default 2 and 4)
    group_size: int | None = None
    samples: int | None = None
    windows: int | None = None
    window_tokens: int | None = None
    seed: int | None = None
    antithetic: bool | None = None
    device: str | None = None
    micro_batch: int | None = None
    compile: bool | None = None
    until_settled: tuple[float, ...] | None = None   # budgets to settle (bits); () runs all samples
    gpus: int = 1
    run_dir: str | None = None
    resume: str | None = None

    def validate(self) -> None:
        _folder_named("run_dir", self.run_dir)
        _folder_named("resume", self.resume)
        if self.resume is not None and self.run_dir is not None:
            raise InvalidField("resume", "and a new run directory are both given: continue a run "
                                         "or start one, not both.")
        _at_least("samples", self.samples, 1, ": SPQE needs one or more sampled permutations")
        if self.samples is not None and self.samples > MAX_SAMPLES:
            raise InvalidField("samples", f"{_shown(self.samples)} is more than {MAX_SAMPLES:,}: "
                                          "each sample costs one evaluation per layer; a few "
                                          "hundred are plenty.")
        _at_least("group_size", self.group_size, 1)
        _gguf_types(self.backend, self.gguf_types, self.levels)
        _levels(self.backend, self.levels)
        _at_least("windows", self.windows, 1)
        _at_least("window_tokens", self.window_tokens, 2, WINDOW_TOKENS_WHY)
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidField("seed", f"must lie between 0 and 2**63-1 (got {_shown(self.seed)}).")
        _at_least("micro_batch", self.micro_batch, 1)
        for b in self.until_settled or ():
            _bits("until_settled", b)
        if self.micro_batch is not None and self.micro_batch > MAX_MICRO_BATCH:
            raise InvalidField("micro_batch", f"{_shown(self.micro_batch)} is more than "
                                              f"{MAX_MICRO_BATCH:,} windows per forward pass; any "
                                              "number above the run's windows passes them all at once.")
        self._check_gpus()
        _text("calib_text", self.calib_text, "calibration")

    def _check_gpus(self) -> None:
        from core.distributed import torchrun_env

        _at_least("gpus", self.gpus, 1)
        if self.gpus > 1 and not torchrun_env():     # under torchrun, one process per rank
            import torch

            visible = torch.cuda.device_count()
            if self.gpus > visible:
                raise InvalidField("gpus", f"{self.gpus} asks for more GPUs than the {visible} "
                                           "visible here.")

    def config_values(self) -> dict:
        """The RunConfig fields this request sets (the others keep their defaults)."""
        from core.runs import RunConfig

        names = {f.name for f in fields(RunConfig)} - {"device"}   # a device is resolved first
        values = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name in names and getattr(self, f.name) is not None}
        if self.backend == "gguf":      # the pair, spelled one way (its default when not given)
            from core.backends.gguf import parse_types

            values["gguf_types"] = ",".join(parse_types(self.gguf_types, self.levels))
        return values


def _levels(backend: str | None, levels) -> None:
    """At least two distinct precisions the backend quantizes to (checked again against
    the run's backend when a run is resumed or its backend is the default)."""
    if levels is None:
        return
    from core.backends import BITS_OF

    levels = list(levels)
    if len(set(levels)) < 2:
        raise InvalidField("levels", f"need at least two different precisions (got {_shown(levels)}), "
                                     "e.g. 2 3 4.")
    if backend in BITS_OF and not set(levels) <= set(BITS_OF[backend]):
        raise InvalidField("levels", f"{_shown(levels)} are not all precisions {backend} quantizes to; "
                                     f"choose among {' '.join(map(str, BITS_OF[backend]))}.")


def _gguf_types(backend: str | None, types: str | None, levels) -> None:
    if types is not None:
        if backend != "gguf":
            raise InvalidField("gguf_types", "are the gguf backend's llama.cpp types, one per "
                                             "level: give them with the gguf `backend`.")
        from core.backends.gguf import parse_types

        parse_types(types, levels)
    if backend == "gguf":
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            from core.backends.gguf import INSTALL_HINT

            raise InvalidField("backend", f"gguf quantizes with llama.cpp, through "
                                          f"llama-cpp-python, which is not installed. {INSTALL_HINT}")


@dataclass(frozen=True, kw_only=True)
class SolveRequest:
    """Exactly one of `bits` (average bits per weight) and `budget_bytes`."""
    run_dir: str
    bits: float | None = None
    budget_bytes: int | None = None
    alpha: float = 0.5
    method: str = "impq"             # impq, impq-local or impq-fit (core.evaluate)

    def validate(self) -> None:
        if (self.bits is None) == (self.budget_bytes is None):
            raise InvalidField("bits", "and a byte budget are both given, or neither: give "
                                       "exactly one.")
        if self.bits is not None:
            _bits("bits", self.bits)
        _at_least("budget_bytes", self.budget_bytes, 1)
        if self.budget_bytes is not None and self.budget_bytes > MAX_BUDGET_BYTES:
            raise InvalidField("budget_bytes", f"{_shown(self.budget_bytes)} is more than 10**18 "
                                               "(an exabyte): give the memory budget in bytes, "
                                               "e.g. 150000000.")
        _alpha(self.alpha)
        _method(self.method)


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Where and on what a model's perplexity is measured; `None` takes core's evaluation
    defaults and the run's backend and device."""
    eval_text: str | None = None
    eval_windows: int | None = None
    eval_window_tokens: int | None = None
    backend: str | None = None
    device: str | None = None

    def validate_evaluation(self, read_text: bool = True) -> None:
        _at_least("eval_windows", self.eval_windows, 1)
        _at_least("eval_window_tokens", self.eval_window_tokens, 2, WINDOW_TOKENS_WHY)
        if read_text:
            _text("eval_text", self.eval_text, "evaluation")


@dataclass(frozen=True, kw_only=True)
class EvalRequest(SolveRequest, Evaluation):
    def validate(self) -> None:
        super().validate()
        self.validate_evaluation()


@dataclass(frozen=True, kw_only=True)
class CompareRequest(Evaluation):
    run_dir: str
    bits: tuple[float, ...]
    alpha: float = 0.5

    def validate(self) -> None:
        if not self.bits:
            raise InvalidField("bits", "is empty: give at least one target, e.g. 2.25 2.5 3.0 3.5.")
        for b in self.bits:
            _bits("bits", b)
        _alpha(self.alpha)
        self.validate_evaluation()


@dataclass(frozen=True, kw_only=True)
class ExportRequest(Evaluation):
    """`evaluate`/`verify`: measure the export's perplexity (in memory / loaded back)."""
    run_dir: str
    bits: float
    out: str
    force: bool = False
    alpha: float = 0.5
    method: str = "impq"             # impq, impq-local or impq-fit (core.evaluate)
    evaluate: bool = False
    verify: bool = False

    def validate(self) -> None:
        _bits("bits", self.bits)
        _alpha(self.alpha)
        _method(self.method)
        self._check_out()
        self.validate_evaluation(read_text=self.evaluate or self.verify)   # read only to evaluate

    def _check_out(self) -> None:
        """Refuse an `out` that would replace the folder the user works in: an empty one
        (an unset "$OUT") or "." is the current directory, which `force` would move aside
        and delete once the export is written."""
        out = self.out
        if not out.strip():
            raise InvalidField("out", "is empty: name the folder to create for the export.")
        if out.startswith("~") and os.path.expanduser(out) == out:
            raise InvalidField("out", f"{out!r}: there is no such user's home folder to expand "
                                      f"{out.split('/')[0]!r} to.")
        target = Path(out).expanduser().resolve()
        cwd = Path.cwd().resolve()
        if target in (cwd, *cwd.parents, Path.home().resolve()):
            raise InvalidField("out", f"{out!r} is {target}, which is or holds the current "
                                      "directory (or is the home folder): the export would "
                                      "replace it. Name a new folder, e.g. exports/my-model.")
