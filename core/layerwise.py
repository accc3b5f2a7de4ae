"""Models built one decoder layer at a time, for models whose bf16 weights do not fit at once.

The model is built on the meta device; the embeddings, the final norm and the head are put
on the device at once, and each decoder layer only when core.switching.LayerSwitch is
about to quantize it (LoadedModel.materialize). LayerSwitch then keeps the layer's
quantized modules and drops its full-precision weights, so neither the GPU nor the host
ever holds the whole full-precision model: at most one layer of it.

Weights come from a safetensors checkpoint (only the tensors of the layer in hand are
read; the file's key names must be the model's own) or, for `random:<shape>` models,
from a seeded normal draw per layer (speed and scale work: the values do not matter).

When even the quantized modules of every layer do not fit the GPU, StreamedLayers keeps
those of some layers in host memory and copies a layer's modules to the GPU for each pass
over it (core.engine.plan_memory decides how many).
"""
from __future__ import annotations

import contextlib
import json
import weakref
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

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



ALIGN = 256     # bytes: every tensor in a flat buffer starts at a multiple (any dtype's alignment)


class StreamedLayers:
    """The packed modules of the decoder layers that do not fit the GPU, kept in host memory
    (pinned where the driver allows) and copied to the device for one layer pass at a time.

    Each (layer, level) is one flat host buffer holding all the tensors of that layer's
    modules at that level, so bringing it over is a single copy of exactly its bytes, and a
    layer pass copies only the level it computes at (a pass computes at one level; the copy
    is dropped after it, so copying the other level too would only double the traffic).
    `prefetch` starts that copy on a side CUDA stream, so it overlaps the computation of the
    layer before; the copies alternate between two device buffers. The device copies are
    modules of the same classes sharing everything but their tensors with the host ones; on
    a CPU device the copy is a real copy all the same."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.host: dict[tuple[int, int], tuple[torch.Tensor, list[nn.Module]]] = {}
        self.layers: set[int] = set()
        # the copy in flight: ((layer, bits), its buffer (CPU) or slot index (CUDA), its event)
        self.pending: tuple[tuple[int, int], object, object] | None = None
        self.slots: list[torch.Tensor] = []       # CUDA: the two device buffers copies go to
        self.freed: list[object] = []             # per slot: when its last copy was used
        self.turn = 0
        self.host_bytes = 0          # held in host memory
        self.slot = 0                # bytes of the largest (layer, level) buffer
        self.pinned = True           # every buffer is page-locked (False: some could not be)
        self.copied_bytes = 0        # copied to the device so far, and in how many copies
        self.copies = 0

    def store(self, i: int, bits: int, modules: list[nn.Module]) -> list[nn.Module]:
        """Layer i's modules at `bits` with their tensors on the device moved into one host
        buffer: the modules to keep (their device tensors go once the caller drops them)."""
        leaves: dict[int, torch.Tensor] = {}
        for module in modules:
            map_tensors(module, lambda t: leaves.setdefault(id(t), t))
        leaves = {k: t for k, t in leaves.items()
                  if t.device == self.device and t.numel() > 0}
        offsets, size = {}, 0
        for key, t in leaves.items():
            offsets[key] = size
            size += -(-_span_bytes(t) // ALIGN) * ALIGN
        buffer = torch.empty(size, dtype=torch.uint8)
        self._pin(buffer)
        views = {key: _strided_in(buffer, offsets[key], t) for key, t in leaves.items()}
        for key, t in leaves.items():
            views[key].copy_(t)
        kept = [map_tensors(m, lambda t: views.get(id(t), t)) for m in modules]
        self.host[(i, bits)] = (buffer, kept)
        self.layers.add(i)
        self.host_bytes += size
        self.slot = max(self.slot, size)
        return kept

    def _pin(self, buffer: torch.Tensor) -> None:
        """Page-lock the buffer in place (cudaHostRegister: PyTorch's pinned allocator rounds
        each block up to a power of two, up to twice the memory); pageable where that fails."""
        if self.stream is None or buffer.numel() == 0:
            return
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)) != 0:
            self.pinned = False
            return
        storage = buffer.untyped_storage()
        # unpinned when the buffer is freed (PyTorch's own pattern for staged checkpoints)
        weakref.finalize(storage, cudart.cudaHostUnregister, storage.data_ptr()).atexit = False

    def prefetch(self, i: int, bits: int) -> None:
        """Start copying layer i's modules at `bits` to the device (on the side stream)."""
        if (i, bits) not in self.host or (self.pending and self.pending[0] == (i, bits)):
            return
        self.pending = None          # one copy in flight at a time: an unused one is dropped
        host = self.host[(i, bits)][0]
        if self.stream is None:
            self.pending = ((i, bits), host.to(self.device, copy=True), None)
        else:
            # Two device buffers of the largest copy's size, taken in turn: the copy into one
            # waits (on the GPU) until the layer last copied there was de-quantized. No
            # allocation per copy, so no memory held while the CPU runs ahead of the GPU.
            if not self.slots:
                self.slots = [torch.empty(self.slot, dtype=torch.uint8, device=self.device)
                              for _ in range(2)]
                self.freed = [None, None]
                # their memory may be the main stream's until its work queued so far is done
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self.turn = 1 - self.turn
            slot, freed = self.slots[self.turn], self.freed[self.turn]
            with torch.cuda.stream(self.stream):
                if freed is not None:
                    self.stream.wait_event(freed)
                slot[:host.numel()].copy_(host, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
            self.pending = ((i, bits), self.turn, done)
        self.copied_bytes += host.numel()
        self.copies += 1

    @contextlib.contextmanager
    def fetched(self, i: int, bits: int):
        """Layer i's modules at `bits` on the device, from the prefetched copy when there is
        one, for use (de-quantizing them) inside the block."""
        self.prefetch(i, bits)
        (_, copy, done), self.pending = self.pending, None
        if done is not None:
            turn, copy = copy, self.slots[copy]
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
        host, modules = self.host[(i, bits)]
        base, end = host.data_ptr(), host.data_ptr() + host.numel()

        def on_device(t: torch.Tensor) -> torch.Tensor:
            if t.numel() == 0 or t.device.type != "cpu" or not base <= t.data_ptr() < end:
                return t
            return _strided_in(copy, t.data_ptr() - base, t)
        try:
            yield [map_tensors(m, on_device) for m in modules]
        finally:
            if done is not None:     # the buffer may take another copy once this work is done
                self.freed[turn] = torch.cuda.Event()
                self.freed[turn].record(current)


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to its last, in its own strides."""
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def _strided_in(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A tensor of like's dtype, shape and strides in the uint8 buffer `flat` at `offset`."""
    part = flat[offset:offset + _span_bytes(like)].view(like.dtype)
    return part.as_strided(like.shape, like.stride())


def map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """obj with every plain tensor t inside it replaced by fn(t): modules (parameters, buffers,
    attributes), dicts and lists (HQQ's meta), tensor subclasses (quanto's packed weights)
    are rebuilt around the new tensors. What holds no changed tensor is returned as it is."""
    if isinstance(obj, torch.Tensor):
        if is_traceable_wrapper_subclass(obj):
            names, context = obj.__tensor_flatten__()
            inner = {n: map_tensors(getattr(obj, n), fn) for n in names}
            if all(inner[n] is getattr(obj, n) for n in names):
                return obj
            new = type(obj).__tensor_unflatten__(inner, context, obj.size(), obj.stride())
        else:
            new = fn(obj)
            if new is obj:
                return obj
        if isinstance(obj, nn.Parameter) or getattr(obj, "_is_param", False):
            new = nn.Parameter(new, requires_grad=False)
        return new
    if isinstance(obj, nn.Module):
        state = {k: map_tensors(v, fn) for k, v in obj.__dict__.items()}
        if all(state[k] is v for k, v in obj.__dict__.items()):
            return obj
        new = obj.__class__.__new__(obj.__class__)
        new.__dict__.update(state)
        return new
    if isinstance(obj, dict) or type(obj) in (list, tuple):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        mapped = {k: map_tensors(v, fn) for k, v in items}
        original = obj if isinstance(obj, dict) else dict(enumerate(obj))
        if all(mapped[k] is original[k] for k in mapped):
            return obj
        return type(obj)(mapped) if isinstance(obj, dict) else type(obj)(mapped.values())
    return obj
