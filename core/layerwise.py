"""Models built one decoder layer at a time, for models whose bf16 weights do not fit at once.

The model is built on the meta device; the embeddings, the final norm and the head are put
on the device at once, and each decoder layer only when core.switching.LayerSwitch is
about to quantize it (LoadedModel.materialize). LayerSwitch then keeps the layer's
quantized modules and drops its full-precision weights, so neither the GPU nor the host
ever holds the whole full-precision model: at most one layer of it.

Weights come from a safetensors checkpoint (only the tensors of the layer in hand are
read; the file's key names must be the model's own) or, for `random:<shape>` models,
from a seeded normal draw per layer (speed and scale work: the values do not matter).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from core.errors import UserError


def _empty(config, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def _owners(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Every parameter's owners by its first qualified name (tied weights have several)."""
    first: dict[int, str] = {}
    owners: dict[str, list[tuple[nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is None:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            key = first.setdefault(id(param), name)
            owners.setdefault(key, []).append((module, attr))
    return owners


class LayerwiseBuilder:
    """Puts parameters on the device when they are needed, from a source of tensors."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype,
                 fetch: Callable[[str, torch.Size], torch.Tensor], layer_prefixes: list[str]):
        self.model, self.device, self.dtype, self.fetch = model, device, dtype, fetch
        self.owners = _owners(model)
        self.prefixes = layer_prefixes
        for module in model.modules():          # buffers (rotary frequencies) are real already
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(device)
        in_layers = [n for n in self.owners if any(n.startswith(p) for p in layer_prefixes)]
        self._put([n for n in self.owners if n not in set(in_layers)])

    def materialize(self, i: int) -> None:
        """Put layer i's weights on the device, once; the builder then forgets the layer's
        modules, so that its full-precision weights go as soon as LayerSwitch replaces them."""
        names = [n for n in self.owners if n.startswith(self.prefixes[i])]
        self._put(names)
        for name in names:
            del self.owners[name]

    def _put(self, names: Iterable[str]) -> None:
        for name in names:
            module, attr = self.owners[name][0]
            old = module._parameters[attr]
            value = self.fetch(name, old.shape).to(device=self.device, dtype=self.dtype)
            param = nn.Parameter(value, requires_grad=False)
            for owner, key in self.owners[name]:
                owner._parameters[key] = param


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of config with meta parameters and real (non-persistent) buffers:
    rotary frequencies are computed, weights are not allocated."""
    return _empty(config, dtype)


def random_weights(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """fetch(name, shape) for random weights: one seeded draw per parameter name, normal
    with the config's initializer range (norm weights 1, biases 0), the same in every process."""
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    base = torch.Generator(device="cpu").manual_seed(seed)
    offset = int(torch.randint(0, 2 ** 31 - 1, (), generator=base))

    def fetch(name: str, shape: torch.Size) -> torch.Tensor:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            return torch.zeros(shape, device=device)
        if "norm" in name.lower() or len(shape) == 1:
            return torch.ones(shape, device=device)
        generator = torch.Generator(device=device).manual_seed(offset + _stable_hash(name))
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=generator)

    return fetch


def checkpoint_weights(source: str, model: nn.Module):
    """fetch(name, shape) reading one tensor at a time from a safetensors checkpoint folder
    whose tensor names are the model's own parameter names; a UserError names what does not
    match."""
    from safetensors import safe_open

    folder = Path(source)
    files = _shard_map(folder)
    missing = [n for n in _owners(model) if n not in files]
    if missing:
        raise UserError(
            f"{source} cannot be loaded layer by layer: {len(missing)} of the model's tensors "
            f"are not stored under their own names (e.g. {missing[0]}). It is loaded whole "
            "when it fits; this one needs more memory than the device has.")
    handles: dict[str, object] = {}

    def fetch(name: str, shape: torch.Size) -> torch.Tensor:
        file = files[name]
        if file not in handles:
            handles[file] = safe_open(str(folder / file), framework="pt", device="cpu")
        tensor = handles[file].get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise UserError(f"{name} in {folder / file} has shape {tuple(tensor.shape)}; the "
                            f"config says {tuple(shape)}.")
        return tensor

    return fetch


def _shard_map(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index or the one file's header."""
    from core.files import read_text

    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            return dict(json.loads(read_text(index, "the checkpoint's index"))["weight_map"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{index} is not a safetensors index: {exc}.") from None
    single = folder / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{folder} has no model.safetensors or model.safetensors.index.json: "
                        "layer-by-layer loading reads safetensors checkpoints only.")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt", device="cpu") as f:
        return {name: single.name for name in f.keys()}


def _stable_hash(name: str) -> int:
    """A hash of a name that is the same in every process (Python's hash() is salted)."""
    value = 0
    for byte in name.encode():
        value = (value * 131 + byte) % 1_000_000_007
    return value


def host_available() -> int | None:
    """Bytes of host memory available now (Linux), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None

