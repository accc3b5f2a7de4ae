"""Settings every command shares: dtypes, sizes that fit the device, and the one set of
evaluation defaults that eval, compare, export and the app all use.

Perplexity is only comparable between two commands when they measure the same model on
the same tokens in the same dtype; so the evaluation text, its windows and the dtype are
decided here, once, from the run and the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EVAL_TEXT = "builtin"
# On a GPU the builtin evaluation half holds 28 windows of 2,048 tokens, and all of them
# are used (core.data.eval_tokens takes what a shorter text holds): the README's quality
# figures. On a CPU, 32 windows of 128 tokens.
EVAL_WINDOWS = 32


# Backends whose GPU runs calibrate on 4 windows by default instead of 16: measured on the
# embedded model (README, "Fewer calibration windows"), the paper's allocations at 4
# windows were those at 16 at 6 of 8 budgets and better at the other 2, for a quarter of
# the time a sample takes. GPTQ's Hessians and GGUF's importance matrix come from the same
# windows, and were not measured with fewer tokens: they keep 16.
FEW_WINDOWS_BACKENDS = ("quanto", "hqq")
FEW_WINDOWS = 4


def device_defaults(device: torch.device, backend: str | None = None) -> dict:
    """Calibration sizes that finish a first run quickly where it runs.

    CPU: 8 windows of 128 tokens (1,024 tokens per evaluation) and 10 samples, since a
    sample of the embedded model takes about half a minute on 2 cores (100 would be most
    of an hour). GPU: 16 windows of 2,048 tokens (32,768 per evaluation), the size the
    speed targets are set for, and the paper's 100 samples; for a quanto or HQQ run
    (`backend`) 4 windows (FEW_WINDOWS_BACKENDS). Without a backend: the 16 of the
    studies."""
    if device.type == "cuda":
        windows = FEW_WINDOWS if backend in FEW_WINDOWS_BACKENDS else 16
        return {"windows": windows, "window_tokens": 2048, "micro_batch": 4, "dtype": "bfloat16",
                "samples": 100}
    return {"windows": 8, "window_tokens": 128, "micro_batch": 8, "dtype": "float32",
            "samples": 10}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class EvalSettings:
    """What a perplexity is measured on: text, windows x tokens, seed and dtype."""
    text: str
    windows: int
    window_tokens: int
    seed: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def eval_settings(config, device: torch.device, *, text: str | None = None,
                  windows: int | None = None, window_tokens: int | None = None,
                  dtype: str | None = None) -> EvalSettings:
    """The evaluation of a run's model on `device`; None takes the default.

    The dtype is the run's where the evaluation runs on the run's kind of device (so the
    model evaluated is the model SPQE measured), else the device's default."""
    defaults = device_defaults(device)
    if dtype is None:
        same_kind = device.type == torch.device(config.device).type
        dtype = config.dtype if same_kind else defaults["dtype"]
    return EvalSettings(text=text or EVAL_TEXT, windows=windows or EVAL_WINDOWS,
                        window_tokens=window_tokens or defaults["window_tokens"],
                        seed=config.seed, dtype=dtype)
