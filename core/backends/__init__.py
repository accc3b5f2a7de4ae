"""PTQ libraries behind one small interface (see base.Backend)."""
from __future__ import annotations

from core.backends.base import Backend, QuantizedWeight
from core.errors import UserError

BACKENDS = ("quanto", "hqq")
OPTIONAL_BACKENDS = ("gguf", "gptq")    # extras: llama-cpp-python (impq-tui[gguf]), GPTQModel (impq-tui[gptq])

# The precisions each library quantizes to: the levels a run may step through (`levels`).
BITS_OF = {"quanto": (2, 4, 8), "hqq": (2, 3, 4, 8),
           "gguf": (2, 3, 4, 5, 6, 8),   # gguf: each level stands for a llama.cpp type
           "gptq": (2, 3, 4, 8)}

__all__ = ["BACKENDS", "BITS_OF", "Backend", "QuantizedWeight", "backend_for", "get_backend"]


def backend_for(config, name: str | None = None) -> Backend:
    """The backend a run's config describes (`name` to use another with its settings)."""
    return get_backend(name or config.backend, config.group_size,
                       gguf_types=getattr(config, "gguf_types", None),
                       levels=getattr(config, "levels", None))


def get_backend(name: str, group_size: int = 64, gguf_types: str | None = None,
                levels=None) -> Backend:
    # Imported on demand: each library takes seconds to import and only one is used per run.
    if name == "quanto":
        from core.backends.quanto import QuantoBackend

        return QuantoBackend(group_size)
    if name == "hqq":
        from core.backends.hqq import HqqBackend

        return HqqBackend(group_size)
    if name == "gguf":
        from core.backends.gguf import GgufBackend

        return GgufBackend(group_size, gguf_types, levels)
    if name == "gptq":
        from core.backends.gptq import GptqBackend

        return GptqBackend(group_size)
    raise UserError(f"Unknown backend {name!r}; choose one of: "
                    f"{', '.join(BACKENDS + OPTIONAL_BACKENDS)}.")
