"""Mixture-of-experts models as per-expert nn.Linear modules.

transformers 5 keeps a MoE layer's experts as fused 3-D parameters (Qwen3-MoE's
`experts.gate_up_proj` is [experts, 2 x intermediate, hidden]), which no per-module
quantizer can take. `unfuse` splits them in place, with defuser (the library GPTQModel
uses for the same purpose), into one nn.Linear per expert and projection:
`mlp.experts.<e>.gate_proj/up_proj/down_proj`, computed by the same routing (its
"linear_loop" experts implementation registered with transformers). A layer's experts
are then ordinary linears of that layer: they take the layer's precision and every one
of them counts in its bytes.

The router (`mlp.gate`, a TopKRouter in transformers 5) is not an nn.Linear and stays
as it is; a gate that is one (Qwen2-MoE's `shared_expert_gate`, a [1, hidden] linear) is
left out of quantization by `is_router`, as GPTQModel and llm-compressor leave routers
out: tiny, and the expert choice is sensitive to it.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import re
import sys

from torch import nn

from core.errors import UserError

DISTRIBUTION = "defuser"
# A per-expert linear as `unfuse` names it: model.layers.3.mlp.experts.7.up_proj
_EXPERT = re.compile(r"\.experts\.(\d+)\.([^.]+)$")


def fused_parameters(layers) -> list[str]:
    """Names of weights kept as 3-D (or higher) tensors in the decoder layers: fused experts."""
    return [f"{i}.{name}" for i, layer in enumerate(layers)
            for name, p in layer.named_parameters() if p.ndim >= 3]


def unfuse(model: nn.Module, layers) -> bool:
    """Split the fused experts of `model` (its decoder `layers`) into per-expert nn.Linear
    modules, in place; a meta model stays on the meta device. True when something was
    split; a model without fused experts is left untouched (defuser would also split the
    dense gate_up_proj of Phi-3 and GLM, which are nn.Linear already). Experts defuser
    does not know stay fused: check_structure then says why."""
    if not fused_parameters(layers):
        return False
    with contextlib.redirect_stdout(io.StringIO()):   # see _quiet
        try:
            import defuser.defuser  # noqa: F401  (its modules and loggers, to quiet them first)
            from defuser import convert_model
        except ImportError:
            return False
        _quiet()
        return bool(convert_model(model))


def refusal(model: nn.Module, fused: list[str]) -> UserError:
    """Why a model whose experts are still fused cannot be quantized here."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    where = ", ".join(fused[:3])
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return UserError(
            f"{type(model).__name__}'s decoder layers keep their mixture-of-experts weights as "
            f"fused 3-D tensors ({where}); impq-tui splits them into per-expert nn.Linear modules "
            f"with the package {DISTRIBUTION}, which is not installed. Install it with "
            f"`pip install {DISTRIBUTION}` (impq-tui's install does).")
    with contextlib.redirect_stdout(io.StringIO()):   # see _quiet
        from defuser.model_registry import MODEL_CONFIG
    if kind in MODEL_CONFIG:     # a path that builds the model without load_model's split
        return UserError(
            f"{type(model).__name__}'s experts are still fused 3-D tensors ({where}) in this way "
            "of loading the model, which does not split them into per-expert nn.Linear modules; "
            "load it whole (it is split then).")
    return UserError(
        f"{type(model).__name__}'s decoder layers keep weights as fused 3-D tensors ({where}), "
        f"and {DISTRIBUTION} {version}, which splits mixture-of-experts layers into per-expert "
        f"nn.Linear modules, does not handle model type {kind!r}: impq-tui quantizes nn.Linear "
        "projections only. Dense models, and MoE families such as Qwen2/3-MoE, Mixtral and "
        "OLMoE, work.")


def expert_of(name: str) -> int | None:
    """The expert a linear is (`unfuse`'s ...experts.<e>.<projection>), None for a dense
    linear."""
    found = _EXPERT.search(name)
    return None if found is None else int(found[1])


def is_router(model: nn.Module, name: str) -> bool:
    """A routing gate: an nn.Linear that is a direct child of a block holding `experts`
    (the experts themselves and a shared expert's projections sit one level deeper)."""
    parent, _, _ = name.rpartition(".")
    block = model.get_submodule(parent) if parent else model
    return isinstance(getattr(block, "experts", None), nn.Module)


def split(model: nn.Module) -> bool:
    """The model's experts were split by `unfuse`: a loader of its export must split them
    the same way (the export snippets call defuser's convert_model too)."""
    return any(getattr(m, "_unfused_experts", False) for m in model.modules())


def _quiet() -> None:
    """defuser logs through LogBar, which prints to stdout (over the app's screen, into
    --json output; importing it prints an empty line): keep its errors only, and keep
    stdout for our own output while it runs."""
    for name, module in list(sys.modules.items()):
        if name == DISTRIBUTION or name.startswith(DISTRIBUTION + "."):
            logger = getattr(module, "logger", None)
            if isinstance(logger, logging.Logger):
                logger.setLevel(logging.ERROR)


# What an export's loading snippet adds after building the model from config.json: the
# same split, so that the per-expert quantized weights find their modules.
SNIPPET = (
    "# Mixture of experts: the experts were quantized one nn.Linear per expert and projection;\n"
    "# defuser (the library GPTQModel uses for MoE models) splits the fused experts the same way.\n"
    "from defuser import convert_model\n"
    "convert_model(model)\n")
