"""The backends against the real quanto and HQQ modules, on CPU.

The weight is 256 x 128 (out x in) with group size 64: 512 groups, small enough that
HQQ's iterative optimizer takes milliseconds.
"""
import pytest
import torch
from hqq.core.quantize import HQQLinear
from optimum.quanto import QLinear
from torch import nn

from core.backends import BACKENDS, get_backend
from core.errors import UserError

OUT_FEATURES, IN_FEATURES, GROUP_SIZE = 256, 128, 64


@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param, group_size=GROUP_SIZE)


def seeded_linear(dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN_FEATURES, OUT_FEATURES).to(dtype)


def quantized_copy(backend, linear: nn.Linear, bits: int) -> nn.Module:
    return backend.quantize_linear(linear, bits)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


@pytest.mark.parametrize("bits", [2, 4])
def test_real_module_computes_with_the_simulated_weight(backend, bits):
    linear = seeded_linear()
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    simulated = backend.quantize_weight(weight, bits).weight
    module = quantized_copy(backend, linear, bits)
    x = torch.randn(3, 5, IN_FEATURES)

    with torch.no_grad():
        real_output = module(x)
    simulated_output = x @ simulated.T + bias

    scale = simulated_output.abs().max()
    assert (real_output - simulated_output).abs().max() <= 1e-5 * scale


def test_real_modules_are_the_libraries_own(backend):
    module_2bit = quantized_copy(backend, seeded_linear(), 2)
    module_4bit = quantized_copy(backend, seeded_linear(), 4)
    if backend.name == "quanto":
        assert isinstance(module_2bit, QLinear) and module_2bit.frozen
        assert (module_2bit.weight.qtype.bits, module_4bit.weight.qtype.bits) == (2, 4)
        assert module_4bit.weight_group_size == GROUP_SIZE
    else:
        assert isinstance(module_2bit, HQQLinear)
        assert (module_2bit.meta["nbits"], module_4bit.meta["nbits"]) == (2, 4)
        assert module_4bit.meta["group_size"] == GROUP_SIZE


@pytest.mark.parametrize("bits", [2, 4])
def test_nbytes_is_the_real_modules_storage(backend, bits):
    linear = seeded_linear()
    quantized = backend.quantize_weight(linear.weight, bits)
    assert quantized.nbytes == backend.module_nbytes(quantized_copy(backend, linear, bits))


@pytest.mark.parametrize("dtype, metadata_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_nbytes_counts_packed_bits_and_group_metadata(backend, dtype, metadata_bytes):
    # Both libraries keep one scale and one zero/shift per group, in the weight's dtype.
    weight = seeded_linear(dtype).weight
    groups = OUT_FEATURES * IN_FEATURES // GROUP_SIZE
    metadata = groups * 2 * metadata_bytes
    nbytes_2bit = backend.quantize_weight(weight, 2).nbytes
    nbytes_4bit = backend.quantize_weight(weight, 4).nbytes

    assert nbytes_2bit == OUT_FEATURES * IN_FEATURES // 4 + metadata
    assert nbytes_4bit == OUT_FEATURES * IN_FEATURES // 2 + metadata
    # By hand: 32768 weights, 512 groups.
    assert metadata == {torch.float32: 4096, torch.bfloat16: 2048}[dtype]
    assert nbytes_2bit == 8192 + metadata and nbytes_4bit == 16384 + metadata


def test_2bit_error_is_larger_and_neither_is_a_no_op(backend):
    weight = seeded_linear().weight.detach()
    error_2bit = relative_error(backend.quantize_weight(weight, 2).weight, weight)
    error_4bit = relative_error(backend.quantize_weight(weight, 4).weight, weight)
    # Uniform weights rounded to 4 or 16 levels over each group's range: about 1/3 and 1/15.
    assert 0.2 < error_2bit < 0.45
    assert 0.04 < error_4bit < 0.1
    assert error_2bit > 2 * error_4bit


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_weight_is_deterministic_and_leaves_input_alone(backend, bits):
    weight = seeded_linear().weight.detach()
    original = weight.clone()
    first, second = backend.quantize_weight(weight, bits), backend.quantize_weight(weight.clone(), bits)
    assert torch.equal(first.weight, second.weight) and first.nbytes == second.nbytes
    assert torch.equal(weight, original)


def test_draws_no_random_numbers(backend):
    # SPQE draws its permutations from the global generator; quantizing must not shift it.
    weight = seeded_linear().weight.detach()
    model = nn.Sequential(seeded_linear(seed=2))
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    backend.quantize_weight(weight, 2)
    backend.quantize_linear(model[0], 4)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("group_size", [GROUP_SIZE, 128])  # quanto uses tinygemm at 128
def test_bfloat16_keeps_dtype_and_matches_real_module(backend, group_size):
    backend = get_backend(backend.name, group_size)
    check_bfloat16_real_module_matches_simulation(backend, seeded_linear(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bfloat16_on_cuda_stays_on_cuda(backend):
    check_bfloat16_real_module_matches_simulation(backend, seeded_linear(torch.bfloat16).cuda())


def check_bfloat16_real_module_matches_simulation(backend, linear: nn.Linear):
    quantized = backend.quantize_weight(linear.weight, 4)  # a parameter that requires grad
    assert quantized.weight.dtype == torch.bfloat16 and not quantized.weight.requires_grad
    assert quantized.weight.shape == linear.weight.shape and quantized.weight.device == linear.weight.device
    assert relative_error(quantized.weight, linear.weight.detach()) < 0.15

    bias = linear.bias.detach().clone()
    module = quantized_copy(backend, linear, 4)
    x = torch.randn(4, IN_FEATURES, dtype=torch.bfloat16, device=linear.weight.device)
    with torch.no_grad():
        real_output = module(x)
    assert real_output.dtype == torch.bfloat16 and real_output.device == x.device
    simulated_output = x @ quantized.weight.T + bias
    # bf16 rounding only: tinygemm accumulates in another order than x @ W.T.
    assert (real_output.float() - simulated_output.float()).abs().max() <= 1e-2 * simulated_output.float().abs().max()


def test_quantize_linear_leaves_the_linear_intact(backend):
    linear = seeded_linear()
    weight = linear.weight.detach().clone()
    module = backend.quantize_linear(linear, 2)
    assert type(module) is not nn.Linear
    assert torch.equal(linear.weight, weight)   # HQQ empties the linear it is given
    assert module(torch.randn(2, IN_FEATURES)).shape == (2, OUT_FEATURES)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        backend.quantize_linear(nn.ReLU(), 2)


def test_unknown_backend_names_the_choices():
    with pytest.raises(UserError, match="quanto, hqq"):
        get_backend("awq")


def test_group_size_that_does_not_divide_in_features(backend):
    misfit = get_backend(backend.name, group_size=48)  # 128 input features
    with pytest.raises(UserError, match="does not divide the 128 input features"):
        misfit.quantize_weight(seeded_linear().weight, 4)
    with pytest.raises(UserError, match="does not divide"):
        misfit.quantize_linear(seeded_linear(), 2)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_unsupported_bits(backend, bits):
    """Each backend lists the precisions it quantizes to (`levels`): quanto 2/4/8, HQQ 2/3/4/8."""
    if bits in backend.BITS:
        q = backend.quantize_weight(seeded_linear().weight, bits)
        assert q.weight.shape == seeded_linear().weight.shape and q.nbytes > 0
        return
    with pytest.raises(UserError, match="choose among"):
        backend.quantize_weight(seeded_linear().weight, bits)


def test_more_bits_cost_more_bytes_and_err_less(backend):
    W = seeded_linear().weight
    out = [backend.quantize_weight(W, b) for b in backend.BITS]
    assert [q.nbytes for q in out] == sorted(q.nbytes for q in out)
    errors = [float((q.weight - W).pow(2).mean()) for q in out]
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("group_size", [0, -64])
def test_group_size_must_be_positive(group_size):
    with pytest.raises(UserError):
        get_backend("quanto", group_size=group_size)


def test_hqq_rejects_what_it_cannot_pack():
    with pytest.raises(UserError, match="multiple of 8"):
        get_backend("hqq", group_size=12)
    # 3 x 64 with group size 64 is 3 groups: HQQ's 4-bit packing needs an even count.
    with pytest.raises(UserError, match="cannot pack"):
        get_backend("hqq", group_size=64).quantize_weight(torch.randn(3, 64), 4)
