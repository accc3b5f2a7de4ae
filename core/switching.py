"""Per-layer precision switching and the loss evaluation behind v(S) and perplexity.

LayerSwitch quantizes every decoder layer once per precision and changes a layer's
precision by swapping module references. PrefixEvaluator caches the hidden states
entering every layer, so after a change at layer j only layers j..L-1 run again; it is
also the one perplexity measurement (`nll`), and chunked_nll the one NLL.
"""
from __future__ import annotations

import contextlib
import gc
import math
from typing import Callable, Collection, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.backends.base import linear_holding
from core.errors import UserError
from core.layerwise import StreamedLayers
from core.models import LoadedModel, final_norm

LOW, HIGH = 2, 4


class LayerSwitch:
    """Every decoder layer's linear modules at each precision, put in place by reference.

    This is the one way a layer changes precision, for SPQE, eval, compare and export:
    nothing is re-quantized after construction. `real` keeps the backend's quantized
    modules (what an export holds); otherwise each is an nn.Linear holding the weight that
    module computes with (what SPQE swaps in: a plain matmul, same values). `levels` lists,
    per layer, the precisions to build (default both); `keep_original` keeps the
    unquantized linears so that apply(None per layer) puts them back (baselines, the
    unquantized perplexity). Real modules are built under inference mode, the mode every
    evaluation runs in (quanto's weight subclass fails there otherwise: "Cannot set
    version_counter for inference tensor"); SPQE's plain weights stay ordinary tensors.
    `stream` (with `real`) lists the layers whose modules are kept in host memory and
    brought to the device only for a pass over the layer (core.layerwise.StreamedLayers):
    the model then holds their host modules, usable only inside `unpacked`."""

    def __init__(self, loaded: LoadedModel, backend, *, real: bool = False,
                 levels: Sequence[Sequence[int]] | None = None, keep_original: bool = False,
                 on_layer: Callable[[int, int], None] | None = None,
                 stream: Collection[int] = ()):
        self.model, self.names = loaded.model, loaded.linear_names
        self.L = len(self.names)
        self.backend, self.real = backend, real
        if stream and not real:
            raise ValueError("only packed (real) modules are streamed from host memory")
        self.streamed = StreamedLayers(loaded.device) if stream else None
        stream = set(stream)
        # the streamed layer a pass over layer i reaches next (passes run up to the last layer)
        self._next_streamed = {i: min((k for k in stream if k > i), default=None)
                               for i in range(self.L)}
        levels = levels or [(LOW, HIGH)] * self.L
        originals = [[self.model.get_submodule(n) for n in layer] for layer in self.names]
        self.params = [sum(lin.weight.numel() for lin in layer) for layer in originals]
        # modules[i][bits] = layer i's linears at bits (None: the unquantized ones)
        self.modules: list[dict[int | None, list[nn.Module]]] = []
        # nbytes[bits][i]: bytes of layer i's modules at bits (0 where not built)
        self.levels = tuple(sorted({b for layer in levels for b in layer}))   # every precision built
        self.nbytes: dict[int, list[int]] = {b: [0] * self.L for b in self.levels}
        self.bits: list[int | None] = [None] * self.L
        with torch.inference_mode() if real else torch.no_grad():
            for i, layer in enumerate(originals):
                if loaded.materialize is not None:    # built layer by layer (core.layerwise)
                    loaded.materialize(i)
                built: dict[int | None, list[nn.Module]] = {}
                for bits in levels[i]:
                    quantized = [backend.quantize_linear(lin, bits) for lin in layer]
                    self.nbytes[bits][i] = sum(backend.module_nbytes(m) for m in quantized)
                    built[bits] = quantized if real else [
                        linear_holding(backend.dequantize(m).to(lin.weight.dtype), lin.bias)
                        for m, lin in zip(quantized, layer)]
                    if i in stream:      # only its host copy is kept, once measured
                        built[bits] = self.streamed.store(i, bits, built[bits])
                        del quantized
                if keep_original:
                    built[None] = layer
                originals[i] = None     # else freed once replaced below: never two full copies
                self.modules.append(built)
                self.set(i, max(levels[i]))   # every layer starts at its highest precision
                if on_layer:
                    on_layer(i + 1, self.L)

    def costs(self):
        """core.solver.Costs of the modules built: bytes per layer at every level."""
        from core.solver import Costs

        lv = self.levels
        return Costs(m_lo=self.nbytes[lv[0]], m_hi=self.nbytes[lv[-1]], params=self.params,
                     levels=lv, mid=[self.nbytes[b] for b in lv[1:-1]])

    @property
    def m_lo(self) -> list[int]:
        return self.nbytes[self.levels[0]]

    @property
    def m_hi(self) -> list[int]:
        return self.nbytes[self.levels[-1]]

    def set(self, i: int, bits: int | None) -> None:
        for name, module in zip(self.names[i], self.modules[i][bits]):
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, module)
        self.bits[i] = bits

    def apply(self, bits_per_layer: Sequence[int | None]) -> int | None:
        """Set every layer's precision (None: unquantized); return the first layer that
        changed (None if none did)."""
        changed = [i for i, b in enumerate(bits_per_layer) if b != self.bits[i]]
        for i in changed:
            self.set(i, bits_per_layer[i])
        return changed[0] if changed else None

    @contextlib.contextmanager
    def unpacked(self, i: int):
        """Layer i computing with plain linears holding the weights its real modules compute
        with, for the duration of one pass over every micro-batch: packed modules (SPQE of
        models too large for de-quantized copies) are then de-quantized once per layer pass,
        not once per micro-batch. A streamed layer's modules at its level are copied to the
        device for the pass (prefetched during the layer before where it can), and the copy
        of the next streamed layer starts. Does nothing when the modules are plain already."""
        bits = self.bits[i]
        if not self.real or bits is None:
            yield
            return
        streamed = self.streamed is not None and i in self.streamed.layers
        with (self.streamed.fetched(i, bits) if streamed
              else contextlib.nullcontext(self.modules[i][bits])) as real:
            following = self._next_streamed[i] if self.streamed is not None else None
            if following is not None and self.bits[following] is not None:
                self.streamed.prefetch(following, self.bits[following])
            # (a streamed layer's device copy is needed only until it is de-quantized)
            plain = [linear_holding(self.backend.dequantize(m), _bias(m, copy=streamed))
                     for m in real]
        held = self.modules[i][bits]
        self.modules[i][bits] = plain
        self.set(i, bits)
        try:
            yield
        finally:
            self.modules[i][bits] = held
            self.set(i, bits)

    def restore_original(self) -> None:
        self.apply([None] * self.L)

    def module(self, name: str, bits: int | None) -> nn.Module:
        """The linear called `name` at `bits`."""
        for i, layer in enumerate(self.names):
            if name in layer:
                return self.modules[i][bits][layer.index(name)]
        raise KeyError(name)


def _bias(module: nn.Module, copy: bool) -> torch.Tensor | None:
    """A module's bias; a copy of it for a streamed module, whose buffer it would keep alive."""
    bias = getattr(module, "bias", None)
    return bias.clone() if copy and bias is not None else bias


def loss_chunk_tokens(vocab: int, budget_elements: int = 1 << 26) -> int:
    """Tokens per loss chunk: at most `budget_elements` float32 logits (256 MiB) at once."""
    return max(16, budget_elements // vocab)


def nll_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
            softcap: float | None = None) -> torch.Tensor:
    """Sum of next-token NLL over all positions, as a float64 tensor (differentiable where
    autograd is on: the Sensitivity baseline's gradient), never holding all tokens x vocab
    logits in float32 at once. hidden: [B, T, H] after the final norm; labels: [B, T]."""
    x = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    chunk = loss_chunk_tokens(head.out_features)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, x.shape[0], chunk):
        logits = head(x[start:start + chunk]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total = total + F.cross_entropy(logits, y[start:start + chunk], reduction="sum").double()
    return total


def chunked_nll(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                softcap: float | None = None) -> float:
    """nll_sum as a number: the one NLL behind v(S) and every perplexity."""
    return float(nll_sum(hidden, labels, head, softcap))


class PrefixEvaluator:
    """v(S) = mean next-token NLL on fixed token windows, recomputing only from a layer on.

    The first call runs the model's own forward once and records, through hooks, the
    hidden states and keyword arguments (masks, rotary embeddings) entering every decoder
    layer; later calls start from the cached input of the first changed layer.
    """

    def __init__(self, loaded: LoadedModel, windows: torch.Tensor, micro_batch: int,
                 compile: bool = False, on_retry: Callable[[str], None] | None = None,
                 layer_scope: Callable[[int], contextlib.AbstractContextManager] | None = None):
        self.model = loaded.model
        self.layers = loaded.layers
        # torch.compile fuses each layer's norms, rotary and activations (one graph serves every
        # layer: weights are graph inputs, so swapping them does not recompile).
        self.run_layer = _compiled_layer_call() if compile else _layer_call
        self.L = len(self.layers)
        self.norm = final_norm(loaded.model)
        self.head = loaded.model.get_output_embeddings()
        self.softcap = getattr(loaded.model.config, "final_logit_softcapping", None)
        self.windows = windows.to(loaded.device)
        self.micro_batch = max(1, micro_batch)
        self.batches = list(self.windows.split(self.micro_batch))
        self.on_retry = on_retry or (lambda message: None)
        # entered around each layer's pass over all micro-batches (LayerSwitch.unpacked)
        self.layer_scope = layer_scope or (lambda j: contextlib.nullcontext())
        self.tokens = windows.numel()
        self.predicted = windows.shape[0] * (windows.shape[1] - 1)
        self.inputs: list[list[torch.Tensor]] | None = None   # [batch][layer] hidden states
        self.kwargs: list[list[dict]] = []

    @torch.inference_mode()
    def evaluate(self, from_layer: int = 0) -> float:
        """v of the layers' current state. Out of GPU memory, the micro-batch halves and the
        cache is rebuilt by a full pass (which measures the same state), down to one window;
        only when even that does not fit does a UserError say so."""
        while True:
            try:
                return self._capture() if self.inputs is None else self._from(from_layer)
            except torch.OutOfMemoryError as exc:
                why = (str(exc).splitlines() or ["out of memory"])[0]
            self._shrink(why)     # outside the except block: the failed pass's tensors are gone

    def _from(self, from_layer: int) -> float:
        # Layer by layer over all micro-batches (each batch's arithmetic is the same in either
        # order), so that a layer's weights are prepared once per pass (layer_scope).
        hs = [self.inputs[b][from_layer] for b in range(len(self.batches))]
        for j in range(from_layer, self.L):
            with self.layer_scope(j):
                for b in range(len(self.batches)):
                    if j > from_layer:
                        self.inputs[b][j] = hs[b]
                    hs[b] = self.run_layer(self.layers[j], hs[b], self.kwargs[b][j])
        total = 0.0
        for h, batch in zip(hs, self.batches):
            total += chunked_nll(self.norm(h), batch, self.head, self.softcap)
        return total / self.predicted

    def _shrink(self, why: str) -> None:
        # The cache may hold states of batches a failed pass did not reach: rebuild it all.
        self.inputs, self.kwargs = None, []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.micro_batch == 1:
            raise UserError(
                f"out of GPU memory even with one window of {self.windows.shape[1]} tokens per "
                f"micro-batch ({why}). Use fewer `window_tokens`, another dtype, or spread the "
                "run over more GPUs (`gpus`).")
        old, self.micro_batch = self.micro_batch, self.micro_batch // 2
        self.batches = list(self.windows.split(self.micro_batch))
        self.on_retry(f"out of GPU memory at micro-batch {old}: continuing with micro-batch "
                      f"{self.micro_batch} ({why})")

    def _capture(self) -> float:
        self.inputs, self.kwargs = [], []
        base = self.model.get_decoder()
        total = 0.0
        scope = contextlib.ExitStack()      # layer_scope around each layer's call, as in _from

        def enter(j: int):
            def hook(_module, _args) -> None:
                scope.enter_context(self.layer_scope(j))
            return hook

        for batch in self.batches:
            inputs: list[torch.Tensor] = [None] * self.L
            kwargs: list[dict] = [None] * self.L
            hooks = [layer.register_forward_pre_hook(_recorder(j, inputs, kwargs), with_kwargs=True)
                     for j, layer in enumerate(self.layers)]
            hooks += [layer.register_forward_pre_hook(enter(j)) for j, layer in enumerate(self.layers)]
            hooks += [layer.register_forward_hook(lambda module, args, out: scope.close())
                      for layer in self.layers]
            try:
                out = base(input_ids=batch, use_cache=False)
            finally:
                scope.close()
                for hook in hooks:
                    hook.remove()
            self.inputs.append(inputs)
            self.kwargs.append(kwargs)
            total += chunked_nll(out.last_hidden_state, batch, self.head, self.softcap)
        return total / self.predicted

    def reset(self) -> None:
        """Forget the cache (after the layers were changed behind the evaluator's back)."""
        self.inputs = None


def nll(loaded: LoadedModel, tokens: torch.Tensor, micro_batch: int) -> float:
    """Mean next-token NLL of the model as it is now on token windows [N, T]: the one
    measurement behind every perplexity (eval, compare, export and its round trip)."""
    return PrefixEvaluator(loaded, tokens, micro_batch).evaluate()


def perplexity(loaded: LoadedModel, tokens: torch.Tensor, micro_batch: int) -> float:
    return math.exp(nll(loaded, tokens, micro_batch))


def _layer_call(layer: nn.Module, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _compiled_layer_call():
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    return torch.compile(_layer_call, dynamic=False)


def _recorder(j: int, inputs: list, kwargs: list):
    def hook(_module, args, kw):
        if args:
            inputs[j] = args[0]
            kwargs[j] = dict(kw)
        else:
            kw = dict(kw)
            inputs[j] = kw.pop("hidden_states")
            kwargs[j] = kw
    return hook
