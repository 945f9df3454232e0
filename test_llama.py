"""models/llama.py against transformers' LlamaForCausalLM and MistralForCausalLM: logits within 1e-4 in fp32 on
tiny random configs covering every feature, through the real convert_hf.py + models.load path."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from conftest import (assert_batched_decoding_matches_alone, assert_cache_matches_full_forward, assert_logits_close,
                      assert_meta_init_equals_plain_build, batched_decode_logits, convert_and_load, perturb_,
                      preset_parameter_count, quantization_error, save_hf)
from models import llama

TINY = dict(vocab_size=120, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}

CASES = {
    "mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    "gqa": (LlamaConfig, LlamaForCausalLM, {}),
    "mqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=1)),
    "head_dim": (LlamaConfig, LlamaForCausalLM, dict(head_dim=24)),
    "biases": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama3.1_rope": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=500000.0, rope_scaling=LLAMA31_ROPE)),
    "linear_rope": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral_window": (MistralConfig, MistralForCausalLM, dict(sliding_window=16)),
    "mistral_no_window": (MistralConfig, MistralForCausalLM, dict(sliding_window=None, rope_theta=1e6)),
}


def tiny_hf(case: str, seed: int = 0):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    return perturb_(model_cls(config_cls(**{**TINY, **extra})).eval(), seed)


@pytest.mark.parametrize("style", ["transformers5", "hub"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, style, tmp_path):
    hf = tiny_hf(case)
    hf_dir = save_hf(hf, tmp_path / "hf", style)
    ours = convert_and_load(hf_dir, tmp_path / "native")
    idx = torch.randint(0, TINY["vocab_size"], (2, 80))          # longer than the window and the original RoPE len
    with torch.no_grad():
        assert_logits_close(ours(idx), hf(idx).logits)


@pytest.mark.parametrize("case", ["gqa", "mistral_window", "llama3.1_rope", "biases"])
def test_kv_cache_decoding_equals_full_forward(case, tmp_path):
    ours = convert_and_load(save_hf(tiny_hf(case), tmp_path / "hf"), tmp_path / "native")
    idx = torch.randint(0, TINY["vocab_size"], (2, 40))
    assert_cache_matches_full_forward(ours, idx, prefill=7)


def ragged(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("case", ["gqa", "mistral_window"])
def test_ragged_batch_decodes_each_row_as_if_alone(case, tmp_path):
    # Three sequences of different lengths, in slots that held another sequence before, decoded one token per row
    # per step at positions 7.., 3.., 12..; with a window of 16 the long rows slide past it.
    ours = convert_and_load(save_hf(tiny_hf(case), tmp_path / "hf"), tmp_path / "native")
    assert_batched_decoding_matches_alone(ours, ragged([40, 21, 34]), [7, 3, 12])


def test_ragged_batch_of_several_tokens_per_row(tmp_path):
    # Chunked prefill: every call gives each row 5 tokens at its own offset (input_pos (B, 5)), the window inside.
    ours = convert_and_load(save_hf(tiny_hf("mistral_window"), tmp_path / "hf"), tmp_path / "native")
    assert_batched_decoding_matches_alone(ours, ragged([38, 17, 29]), [4, 9, 1], step=5)


def test_cache_rows_decode_a_run_of_slots_and_leave_the_others_alone(tmp_path):
    ours = convert_and_load(save_hf(tiny_hf("gqa"), tmp_path / "hf"), tmp_path / "native")
    assert_batched_decoding_matches_alone(ours, ragged([19, 26]), [5, 2], first_slot=1, n_slots=4)


@pytest.mark.parametrize("case", ["gqa", "mistral_window"])
def test_explicit_attention_math_equals_sdpa(case, tmp_path, monkeypatch):
    # A causal forward (no mask; past the window, a window mask) and ragged batched decoding (per-row masks).
    ours = convert_and_load(save_hf(tiny_hf(case), tmp_path / "hf"), tmp_path / "native")
    idx = torch.randint(0, TINY["vocab_size"], (2, 40))
    sequences, prompt_lens = ragged([30, 21]), [7, 3]
    with torch.no_grad():
        fused, fused_decoded = ours(idx), batched_decode_logits(ours, sequences, prompt_lens)
    monkeypatch.setattr(llama.Attention, "use_sdpa", False)
    with torch.no_grad():
        assert_logits_close(ours(idx), fused, atol=1e-5)
    for explicit, fused in zip(batched_decode_logits(ours, sequences, prompt_lens), fused_decoded):
        assert_logits_close(explicit, fused, atol=1e-5)


def test_hub_and_transformers5_configs_read_the_same(tmp_path):
    from conftest import hub_style
    hf = tiny_hf("llama3.1_rope")
    new_style = hf.config.to_dict()
    assert "rope_parameters" in new_style
    assert llama.Config.from_hf(new_style) == llama.Config.from_hf(hub_style(new_style))


def test_unsupported_rope_type_is_a_clear_error():
    hf = {**TINY, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported.*supported: default, llama3, linear"):
        llama.Config.from_hf(hf)


# Parameter counts published on each model card / the safetensors index of the Hub repo.
PUBLISHED_PARAMS = {
    "Llama-2-7b": 6_738_415_616,
    "Llama-3-8B": 8_030_261_248,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "Mistral-7B-v0.1": 7_241_732_096,
    "TinyLlama-1.1B": 1_100_048_384,
    "SmolLM2-135M": 134_515_008,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_presets_have_the_published_parameter_count(name):
    assert preset_parameter_count(llama, name) == PUBLISHED_PARAMS[name]


def test_every_preset_builds_on_meta():
    for name in llama.PRESETS:
        with torch.device("meta"):
            model = llama.Transformer(llama.Config.from_name(name))
        assert len(model.layers) == model.config.n_layer


@pytest.mark.parametrize("extra", [dict(attn_bias=True, mlp_bias=True), dict(tie_embeddings=True)])
def test_meta_build_initialised_by_init_weights_equals_a_plain_build(extra):
    config = llama.Config(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, dim=32, intermediate_size=48, **extra)
    assert_meta_init_equals_plain_build(llama, config)


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4", "fp4", "bnb.int8"])
def test_quantized_model_stays_close(mode, tmp_path):
    ours = convert_and_load(save_hf(tiny_hf("gqa"), tmp_path / "hf"), tmp_path / "native")
    rel = quantization_error(ours, mode, TINY["vocab_size"])
    assert rel < {"int8": 0.05, "bnb.int8": 0.05, "int4": 0.5, "nf4": 0.7, "fp4": 0.7}[mode], rel
