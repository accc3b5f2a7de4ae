"""Streaming the packed modules of the layers that do not fit the GPU from host memory
(core.layerwise.StreamedLayers): the memory plan that picks it, and SPQE's values with it."""
from __future__ import annotations

import collections

import pytest
import torch

from core.backends import get_backend
from core.engine import GPU_MEMORY_ENV, gpu_memory_cap, parse_memory, plan_memory
from core.errors import UserError
from core.models import from_config, tiny_config
from core.runs import RunConfig
from core.spqe import Sampler
from core.switching import LayerSwitch, PrefixEvaluator

GiB = 2 ** 30
CUDA = torch.device("cuda")
SEVENTY = RunConfig(model="random:llama-3.1-70b", dtype="bfloat16", windows=8,
                    window_tokens=1024, micro_batch=2)


def test_plan_streams_only_what_does_not_fit_and_says_so():
    hqq = get_backend("hqq")
    # 78 GiB hold every layer's packed modules: nothing streamed
    assert plan_memory(SEVENTY, CUDA, hqq, free=78 * GiB, host=120 * GiB).streamed == 0
    plan = plan_memory(SEVENTY, CUDA, hqq, free=40 * GiB, host=120 * GiB)
    assert (plan.packed, plan.by_layer, plan.streamed) == (True, True, 49)
    # 49 of the 80 layers' share of the 55.8 GiB of 2- and 4-bit packed modules
    assert plan.host_bytes / GiB == pytest.approx(55.8 * 49 / 80, abs=0.1)
    assert "31 of 80 layers resident on cuda (21.6 GiB), 49 streamed from pinned host memory " \
           "(34.2 GiB of 120.0 GiB available)" in plan.summary
    # less GPU memory, more layers streamed
    assert plan_memory(SEVENTY, CUDA, hqq, free=30 * GiB, host=120 * GiB).streamed > 49
    # a cap on a card with room: the same plan, and the summary says why
    capped = plan_memory(SEVENTY, CUDA, hqq, free=139 * GiB, host=120 * GiB, cap=40 * GiB)
    assert capped.streamed == 49 and "capped by IMPQ_TUI_GPU_MEMORY" in capped.summary


def test_plan_refuses_when_the_host_cannot_hold_the_streamed_layers():
    with pytest.raises(UserError, match=r"needs 34\.2 GiB of host memory .* 49 of 80 layers .*"
                                        r"10\.0 GiB available"):
        plan_memory(SEVENTY, CUDA, get_backend("hqq"), free=40 * GiB, host=10 * GiB)
    # nor when even the layer in hand does not fit beside the cached hidden states
    with pytest.raises(UserError, match=r"needs about 18\.1 GiB .* every layer's packed .*"
                                        r"10\.0 GiB cached hidden states.* 12\.0 GiB free"):
        plan_memory(SEVENTY, CUDA, get_backend("hqq"), free=12 * GiB, host=120 * GiB)


def test_gpu_memory_sizes_read_as_accelerate_writes_them(monkeypatch):
    assert parse_memory("40") == 40 * GiB
    assert parse_memory("40GiB") == parse_memory("40 gib") == 40 * GiB
    assert parse_memory("42GB") == 42 * 10 ** 9
    assert parse_memory("512MiB") == 512 * 2 ** 20
    for bad in ("forty", "40 parsecs", "-3", "0"):
        with pytest.raises(UserError):
            parse_memory(bad)
    monkeypatch.delenv(GPU_MEMORY_ENV, raising=False)
    assert gpu_memory_cap() is None
    monkeypatch.setenv(GPU_MEMORY_ENV, "24GiB")
    assert gpu_memory_cap() == 24 * GiB


def _spqe(device, dtype, backend: str, stream, samples: int = 2):
    """SPQE samples of a tiny model with packed modules, `stream` layers kept on the host;
    also how often each layer was passed over."""
    loaded = from_config(tiny_config(layers=5, vocab=500), device, dtype, seed=0)
    switch = LayerSwitch(loaded, get_backend(backend, 32), real=True, stream=stream)
    passes = collections.Counter()

    def scope(j):
        passes[j] += 1
        return switch.unpacked(j)

    windows = torch.randint(0, 500, (3, 24), generator=torch.Generator().manual_seed(0))
    evaluator = PrefixEvaluator(loaded, windows, micro_batch=2, layer_scope=scope)
    sampler = Sampler(switch, evaluator, seed=0)
    sampler.start()
    return [sampler.sample(m) for m in range(samples)], switch, passes


def _holds(module_list, buffer) -> bool:
    """Whether every tensor of these modules lies in `buffer`."""
    from core.layerwise import map_tensors

    base, end, inside = buffer.data_ptr(), buffer.data_ptr() + buffer.numel(), []
    for module in module_list:
        map_tensors(module, lambda t: inside.append(base <= t.data_ptr() < end) or t)
    return bool(inside) and all(inside)


@pytest.mark.parametrize("backend", ["hqq", "quanto"])
def test_streamed_layers_give_the_resident_losses_bit_for_bit(backend):
    cpu = torch.device("cpu")
    resident, _, _ = _spqe(cpu, torch.float32, backend, stream=())
    streamed, switch, passes = _spqe(cpu, torch.float32, backend, stream=[0, 1, 3])
    for a, b in zip(resident, streamed):
        assert a.d == b.d and (a.v_high, a.v_low) == (b.v_high, b.v_low)
    assert len(set(resident[0].d)) == 5           # real, differing marginals
    store = switch.streamed
    assert store.layers == {0, 1, 3}
    for (i, bits), (buffer, kept) in store.host.items():
        # the streamed layer's modules (and the model, between passes) hold the host copy
        assert kept is switch.modules[i][bits] and _holds(kept, buffer)
        # a pass gets a copy of its own, not the host tensors
        with store.fetched(i, bits) as copy:
            assert not _holds(copy, buffer)
    assert store.host_bytes == sum(b.numel() for b, _ in store.host.values()) > 0
    # exactly one copy per pass over a streamed layer, prefetched or not (none thrown away),
    # plus the fetches just above; each of one level only
    assert store.copies == sum(passes[j] for j in (0, 1, 3)) + len(store.host)
    assert store.copied_bytes < store.copies * max(b.numel() for b, _ in store.host.values()) * 1.01


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["hqq", "quanto"])
def test_streamed_layers_on_cuda_give_the_resident_losses(backend):
    resident, _, _ = _spqe(CUDA, torch.bfloat16, backend, stream=())
    streamed, switch, _ = _spqe(CUDA, torch.bfloat16, backend, stream=[0, 1, 2, 4])
    for a, b in zip(resident, streamed):
        assert a.d == b.d and (a.v_high, a.v_low) == (b.v_high, b.v_low)
    store = switch.streamed
    assert store.pinned and all(buffer.is_pinned() for buffer, _ in store.host.values())
    # between passes no streamed layer keeps anything on the GPU
    from core.layerwise import map_tensors

    devices = set()
    for (i, bits), (_, kept) in store.host.items():
        for module in kept:
            map_tensors(module, lambda t: devices.add(t.device.type) or t)
    assert devices == {"cpu"}


def test_run_takes_a_gpu_memory_cap_and_refuses_a_wrong_one(capsys):
    from impq_tui.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "--gpu-memory", "40GiB"]).gpu_memory == "40GiB"
    assert parser.parse_args(["run"]).gpu_memory is None
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--gpu-memory", "lots"])
    assert "not a memory size" in capsys.readouterr().err
