"""The parity tests on an accelerator, which bench_gpu.sh runs first: every family against HF transformers on the same
device (fp32 logits within 1e-4), compiled greedy decoding (CUDA graphs on a GPU) against HF generate there, and the
device's int8 / int4 kernels against the CPU's. The device is $FLATLM_TEST_DEVICE, default cuda: without a GPU these
skip (`bash bench_gpu.sh --cpu`, and test_bench_gpu.py, run them on the CPU)."""

import os

import pytest
import torch

import convert_hf
import generate
import models
from conftest import assert_logits_close, perturb_
from test_generate import family_models

DEVICE = os.environ.get("FLATLM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device (FLATLM_TEST_DEVICE=cpu runs these on the CPU)")
# Compiling on a CPU takes minutes, on a GPU seconds: there, every family; here, the one with the most going on.
COMPILED = list(family_models()) if DEVICE != "cpu" else ["gemma2"]


def hf_and_ours(family: str, tmp_path):
    """A tiny random HF model of the family (eager attention: HF's SDPA drops Gemma 2's soft-cap) and FlatLM's
    conversion of it, both on DEVICE in fp32."""
    torch.manual_seed(0)
    hf = perturb_(family_models()[family]().eval(), scale=0.5)
    hf.set_attn_implementation("eager")
    hf.save_pretrained(tmp_path / "hf")
    convert_hf.hf_to_native(tmp_path / "hf", tmp_path / "native")
    return hf.to(DEVICE), models.load(tmp_path / "native", device=DEVICE, dtype=torch.float32)


@pytest.mark.parametrize("family", list(family_models()))
def test_logits_match_hf_on_the_device(family, tmp_path):
    hf, ours = hf_and_ours(family, tmp_path)
    idx = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        assert_logits_close(ours(idx), hf(idx).logits)


@pytest.mark.parametrize("family", COMPILED)
def test_compiled_greedy_decoding_matches_hf_generate_on_the_device(family, tmp_path):
    hf, ours = hf_and_ours(family, tmp_path)
    llm = generate.LLM(generate.prepare_for_inference(ours), None, compile=True)
    ids = list(range(5, 17))
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids], device=DEVICE), max_new_tokens=30, do_sample=False,
                               eos_token_id=None)[0, len(ids):].tolist()
    llm.setup_cache(len(ids) + 30)
    with torch.inference_mode():
        got = list(generate.generate_tokens(llm.model, ids, 30, generate.Sampling(), (), None, llm.decode_fn))
    assert got == expected


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_linears_on_the_device_match_the_cpu(mode):
    # The packed int4 layout differs between the CUDA kernel (tinygemm) and the CPU one: the same weights quantized
    # on either device must multiply alike.
    llama = models.module("llama")
    make = {"int8": llama.Int8Linear, "int4": llama.Int4Linear}[mode]
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 320, bias=True)
    x = torch.randn(3, 576)
    with torch.no_grad():
        on_cpu = make(linear)(x)
        on_device = make(linear.to(DEVICE))(x.to(DEVICE)).cpu()
        torch.testing.assert_close(on_device, on_cpu, rtol=2e-2, atol=2e-2)   # bf16 arithmetic in either
        assert (on_device - linear.cpu()(x)).norm() / on_cpu.norm() < 0.1
