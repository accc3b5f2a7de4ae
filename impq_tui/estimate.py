"""How long an SPQE run will take, said before it starts, and how that was found out.

A sample walks the L layers from all-4-bit to all-2-bit, evaluating the loss at each
of its L+1 states; the first state is the one the previous sample ended in, so a sample
costs L evaluations. PrefixEvaluator re-runs only the layers from the one that changed,
on average (L+1)/2 of them, then the final norm, the LM head and the loss. So

    seconds per sample = L * (head_s + layer_s * (L + 1) / 2)

with layer_s and head_s the time of one decoder layer and of the head over the whole
calibration set. They come from, in order of trust:
  1. history: the seconds per sample that a run of the same model on the same device
     measured (its samples.jsonl), scaled to this calibration size;
  2. a probe: PrefixEvaluator timed on a four-layer model of the chosen model's shape
     with random weights (speed does not depend on the values), on the chosen device.
Loading the model and quantizing its layers come on top of either.

With more levels (README, "More than two levels") a sample takes each layer down
S = levels - 1 steps in a random interleaving: L x S evaluations, each again re-running
about half the layers, so S times the seconds above (Estimate.sample_for).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

PROBE_LAYERS = 4
PROBE_REPEATS = 3
PROBE_VOCAB = 32_768          # the head is timed on at most this many rows, then scaled
PROBE_MAX_BYTES = 3 * 2**30   # a probe model larger than this is not built
# With "Stop when settled" (core.settle's default rule) the duration above is a maximum.
# bench/results/early_stop.json measured how much of it runs take: re-orderings of real
# 100- and 96-sample runs of the embedded SmolLM2-135M (hqq, quanto) stopped on average at
# 78.9 of 100 and 81.8 of 96 samples, 79% and 85% of the maximum (82% on average); 33% and
# 38% of them ran to it. One
# small model only: said as such on the form (impq_tui.screens.setup).
SETTLED_SHARE = 0.82


@dataclass(frozen=True)
class Estimate:
    """A sample's duration with the paper's two levels, and how it was found out. With
    more levels a sample walks each layer down S = levels - 1 steps, L x S evaluations
    (plus the first state, shared with the previous sample): S times as long."""
    sample_s: float
    layers: int
    how: str

    def sample_for(self, steps: int = 1) -> float:
        """A sample's seconds with `steps` steps a layer (levels - 1)."""
        return self.sample_s * steps

    def run_s(self, samples: int, steps: int = 1) -> float:
        return self.sample_for(steps) * samples


def earliest_stop() -> int:
    """The fewest samples after which core.settle's default rule can stop a run: at least
    min_samples, and K + 1 allocations to compare (the first sample's included)."""
    from core.settle import SettleRule

    rule = SettleRule()
    return max(rule.min_samples, rule.K + 1)


@dataclass(frozen=True)
class Shape:
    """What a probe needs of a model: its config (None for a GGUF) and its layer count."""
    config: object
    layers: int


def model_shape(model: str) -> Shape | None:
    """The model's transformers config read from local files only (the form must not
    wait on the network); None where that is not possible (a hub id not cached, an
    unreadable file). A GGUF's comes from its header alone (milliseconds)."""
    from core.errors import UserError
    from core.models import EMBEDDED, RANDOM_PREFIX, gguf_config, shape_config

    model = model or EMBEDDED
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            return None
        try:
            config = gguf_config(path)
        except (UserError, OSError, ValueError, KeyError):
            return None
    elif model == EMBEDDED:
        config = shape_config("smollm2-135m")      # the embedded model's exact shape
    elif model.startswith(RANDOM_PREFIX):
        config = shape_config(model.removeprefix(RANDOM_PREFIX))
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(Path(model).expanduser())
                                                if Path(model).expanduser().exists() else model,
                                                local_files_only=True)
        except (OSError, ValueError, KeyError):
            return None
    layers = getattr(config, "num_hidden_layers", None)
    return Shape(config, int(layers)) if layers else None


def probe(shape: Shape, device: str, dtype: str, windows: int, window_tokens: int,
          micro_batch: int) -> tuple[float, float]:
    """(layer_s, head_s) over `windows` windows of `window_tokens` tokens, measured by
    PrefixEvaluator on a PROBE_LAYERS-layer random-weight model of `shape`: evaluating from
    the first layer against from the last gives PROBE_LAYERS - 1 layers' time; one
    micro-batch is timed, then scaled to all of them; each time is the best of a few, the
    machine's speed without passing interruptions. Blocks for seconds: run it in a worker."""
    import copy

    import torch

    from core.models import from_config
    from core.settings import DTYPES
    from core.switching import PrefixEvaluator

    config = copy.deepcopy(shape.config)
    config.num_hidden_layers = PROBE_LAYERS
    vocab = config.vocab_size
    config.vocab_size = min(vocab, PROBE_VOCAB)
    torch_dtype = DTYPES[dtype]
    if _probe_bytes(config, torch_dtype) > PROBE_MAX_BYTES:
        raise MemoryError("the model's layers are too large to probe here")
    loaded = from_config(config, torch.device(device), torch_dtype)
    batch = min(micro_batch, windows)
    tokens = torch.randint(0, config.vocab_size, (batch, window_tokens),
                           generator=torch.Generator().manual_seed(0))
    evaluator = PrefixEvaluator(loaded, tokens, batch)
    evaluator.evaluate()                 # the first pass fills the cache (and warms up)
    every, last = [], []
    for _ in range(PROBE_REPEATS):
        every.append(_timed(evaluator.evaluate, 0, device))
        last.append(_timed(evaluator.evaluate, PROBE_LAYERS - 1, device))
    layer_s = max((min(every) - min(last)) / (PROBE_LAYERS - 1), 1e-6)
    head_s = max(min(last) - layer_s, 1e-6) * vocab / config.vocab_size
    scale = windows / batch
    return layer_s * scale, head_s * scale


def _probe_bytes(config, dtype) -> int:
    import torch

    hidden, inter = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    embed = config.vocab_size * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return (PROBE_LAYERS * per_layer + embed) * torch.finfo(dtype).bits // 8


def _timed(fn, arg, device: str) -> float:
    import torch

    start = time.perf_counter()
    fn(arg)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def from_probe(layers: int, layer_s: float, head_s: float, device: str, windows: int,
               window_tokens: int) -> Estimate:
    sample_s = layers * (head_s + layer_s * (layers + 1) / 2)
    how = (f"probed now on {device}: a layer {_short(layer_s)}, head and loss {_short(head_s)} "
           f"at {windows}×{window_tokens} tokens")
    return Estimate(sample_s, layers, how)


def from_history(runs, model: str, device: str, dtype: str, windows: int,
                 window_tokens: int) -> Estimate | None:
    """The seconds per sample measured by the most recent run (of `runs`, RunInfo from the
    picker's scan) of the same model on the same device and dtype, scaled linearly to
    this calibration size. A run's first sample also pays for warming up: it is left out
    when there are others."""
    for info in sorted(runs, key=lambda r: r.updated or 0, reverse=True):
        c = info.config
        if c is None or not info.sample_seconds or (c.model, c.device, c.dtype) != (model, device, dtype):
            continue
        seconds = info.sample_seconds[1:] or info.sample_seconds
        measured = statistics.median(seconds)
        scale = (windows * window_tokens) / (c.windows * c.window_tokens)
        steps = len(getattr(c, "levels", (2, 4))) - 1     # its samples took this many steps a layer
        layers = info.layers or 0
        how = (f"measured by run {info.name} on {c.device}: {_short(measured)} a sample at "
               f"{c.windows}×{c.window_tokens} tokens"
               + ("" if steps == 1 else f" with {steps} steps a layer")
               + ("" if scale == 1 else f", scaled to {windows}×{window_tokens}"))
        return Estimate(measured * scale / steps, layers, how)
    return None


def _short(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"
