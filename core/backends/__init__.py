"""PTQ libraries behind one small interface (see base.Backend)."""
from __future__ import annotations

from core.backends.base import Backend, QuantizedWeight
from core.errors import UserError

BACKENDS = ("quanto", "hqq")

__all__ = ["BACKENDS", "Backend", "QuantizedWeight", "get_backend"]


def get_backend(name: str, group_size: int = 64) -> Backend:
    # Imported on demand: each library takes seconds to import and only one is used per run.
    if name == "quanto":
        from core.backends.quanto import QuantoBackend

        return QuantoBackend(group_size)
    if name == "hqq":
        from core.backends.hqq import HqqBackend

        return HqqBackend(group_size)
    raise UserError(f"Unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}.")
