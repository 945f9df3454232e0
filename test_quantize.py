"""int4 weight-only quantization (Int4Linear, the same in every model file): each weight comes back within half a
quantization step of the original, the packed kernel multiplies by exactly those weights, a row's result does not
depend on its batch-mates (the engine's batch invariance), shapes the kernel cannot take fall back to int8, and
gradients flow to the input (LoRA over an int4 base). Agreement with fp32 on the real SmolLM2-135M is measured in
test_generate.py."""

import pytest
import torch
import torch.nn as nn

import models

FAMILIES = models.FAMILIES


def random_linear(out_features=96, in_features=128, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_weights_are_within_half_a_step_of_the_originals(family):
    m = models.module(family)
    linear = random_linear()
    q = m.Int4Linear(linear)
    G = q.group_size
    with torch.no_grad():
        # The kernel applied to the identity matrix is W^T, dequantized: (in, out)
        dequantized = q(torch.eye(linear.in_features)).t()                  # (out, in)
        groups = linear.weight.view(linear.out_features, -1, G)
        step = (groups.amax(-1) - groups.amin(-1)) / 15                    # each group's range over 16 levels
        error = (dequantized - linear.weight).view_as(groups).abs()
    bf16 = 2 ** -8 * groups.abs().amax(-1, keepdim=True)                  # scale and zero are stored in bf16
    assert (error <= step[..., None] / 2 + 2 * bf16).all()
    assert error.mean() > 0.1 * step.mean()                                # it did quantize


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_forward_multiplies_by_the_dequantized_weights(family):
    m = models.module(family)
    linear = random_linear(bias=True)
    q = m.Int4Linear(linear)
    x = torch.randn(5, 3, linear.in_features)
    with torch.no_grad():
        dequantized = q(torch.eye(linear.in_features)).t() - linear.bias[:, None]
        expected = x.bfloat16().float() @ dequantized.t() + linear.bias
        got = q(x)
        assert got.shape == (5, 3, linear.out_features) and got.dtype == x.dtype
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)    # bf16 arithmetic
        rel = (got - linear(x)).norm() / linear(x).norm()
    assert 0.005 < rel < 0.1                                               # 4 bits: a few percent off fp32


def test_int4_rows_do_not_depend_on_their_batch_mates():
    # The engine decodes many sequences in one matmul, as many rows as slots decode: each row must come
    # out bitwise as it does alone or in any other batch.
    q = models.module("llama").Int4Linear(random_linear(out_features=256, in_features=576))
    x = torch.randn(32, 576)
    with torch.no_grad():
        alone = torch.cat([q(x[i:i + 1]) for i in range(32)])
        for M in (2, 3, 4, 5, 7, 8, 16, 17, 32):
            assert torch.equal(q(x[:M]), alone[:M]), f"rows differ in a batch of {M}"


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_int4_falls_back_to_int8_where_the_kernel_cannot_go(family):
    m = models.module(family)
    config = m.Config(vocab_size=120, n_layer=1, n_head=4, n_kv_head=2, dim=64, intermediate_size=112)
    model = m.quantize(m.Transformer(config), "int4")
    kinds = {name: type(module).__name__ for name, module in model.named_modules() if "Linear" in type(module).__name__}
    assert kinds.pop("lm_head") == "Int8Linear"            # the head stays int8 (see quantize)
    assert "Int4Linear" in kinds.values()
    for name, kind in kinds.items():                       # the down projection's 112 inputs: not whole groups
        linear = model.get_submodule(name)
        fits = linear.in_features % 32 == 0 and linear.out_features % 16 == 0
        assert kind == ("Int4Linear" if fits else "Int8Linear"), name


def test_gradients_flow_through_an_int4_linear_to_its_input():
    linear = random_linear()
    q = models.module("llama").Int4Linear(linear)
    x = torch.randn(4, linear.in_features, requires_grad=True)
    q(x).sum().backward()
    with torch.no_grad():
        dequantized = q(torch.eye(linear.in_features))                      # (in, out)
    torch.testing.assert_close(x.grad, dequantized.sum(dim=1).expand_as(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("in_features", [576, 904, 1000, 70])
def test_int8_forward_multiplies_by_the_dequantized_weights(family, in_features):
    # torch's int8 kernel gives wrong numbers (or crashes) on AVX-512 CPUs for some widths that are not a multiple
    # of 64 (904 and 1000: 1e29 off); Int8Linear must give W x there too, whatever the CPU.
    q = models.module(family).Int8Linear(random_linear(out_features=32, in_features=in_features, bias=True))
    x = torch.randn(3, in_features)
    with torch.no_grad():
        expected = x @ (q.weight.float() * q.scale.float()[:, None]).t() + q.bias
        torch.testing.assert_close(q(x), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())   # bf16
