"""models/phi.py against transformers' PhiForCausalLM (Phi-1.5/2) and Phi3ForCausalLM (Phi-3/3.5/4/4-mini): logits
within 1e-4 in fp32 on tiny random configs covering every feature, through the real convert_hf.py + models.load path."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM

import convert_hf
from conftest import (assert_batched_decoding_matches_alone, assert_cache_matches_full_forward, assert_logits_close,
                      assert_meta_init_equals_plain_build, cached_decode_logits, convert_and_load, hub_style, perturb_,
                      preset_parameter_count, quantization_error, save_hf)
from models import phi

# Phi-2-like: head_dim 20 with partial_rotary_factor 0.4 rotates 8 channels, as Phi-2 rotates 32 of 80.
TINY_PHI = dict(vocab_size=120, hidden_size=80, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, partial_rotary_factor=0.4)
TINY_PHI3 = dict(vocab_size=120, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                 eos_token_id=None)
ORIGINAL = 32   # original_max_position_embeddings of the LongRoPE cases: sequences of 24 and 80 fall on each side


def longrope(pairs: int) -> dict:
    # Distinct factors per channel pair, the long ones larger (as published lists are): a swapped or misindexed
    # list changes the logits.
    return {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(pairs)],
            "long_factor": [1.5 + 0.7 * i for i in range(pairs)]}


CASES = {
    "phi2": (PhiConfig, PhiForCausalLM, {}),
    "phi1.5_half_rotary": (PhiConfig, PhiForCausalLM, dict(partial_rotary_factor=0.5)),
    "phi_gqa": (PhiConfig, PhiForCausalLM, dict(num_key_value_heads=2)),
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
    "phi3_window": (Phi3Config, Phi3ForCausalLM, dict(sliding_window=16)),
    "phi3.5_longrope": (Phi3Config, Phi3ForCausalLM, dict(original_max_position_embeddings=ORIGINAL,
                                                          rope_scaling=longrope(8))),
    # Partial rotary (0.75 of head_dim 16 = 12 channels, 6 factor pairs), GQA, tied head, LongRoPE, a window longer
    # than the context, like the published config.json.
    "phi4_mini": (Phi3Config, Phi3ForCausalLM, dict(partial_rotary_factor=0.75, tie_word_embeddings=True,
                                                    original_max_position_embeddings=ORIGINAL,
                                                    rope_scaling=longrope(6), sliding_window=262144)),
}


def tiny_hf(case: str, seed: int = 0):
    config_cls, model_cls, extra = CASES[case]
    tiny = TINY_PHI if model_cls is PhiForCausalLM else TINY_PHI3
    torch.manual_seed(seed)
    return perturb_(model_cls(config_cls(**{**tiny, **extra})).eval(), seed)


def save_phi(model, out_dir, style="transformers5"):
    """conftest.save_hf; in Hub style also put partial_rotary_factor at the top level of config.json, where the
    published phi-2 and Phi-4-mini files have it (conftest.hub_style drops it along with a default rope)."""
    save_hf(model, out_dir, style)
    if style == "hub":
        path = out_dir / "config.json"
        config = json.loads(path.read_text())
        config.get("rope_scaling", {}).pop("partial_rotary_factor", None)
        config["partial_rotary_factor"] = model.config.rope_parameters["partial_rotary_factor"]
        path.write_text(json.dumps(config, indent=2))
    return out_dir


@pytest.mark.parametrize("style", ["transformers5", "hub"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, style, tmp_path):
    hf = tiny_hf(case)
    ours = convert_and_load(save_phi(hf, tmp_path / "hf", style), tmp_path / "native")
    for T in (24, 80):              # within and past ORIGINAL (LongRoPE short / long factors) and the window of 16
        idx = torch.randint(0, 120, (2, T))
        with torch.no_grad():
            assert_logits_close(ours(idx), hf(idx).logits)


def test_longrope_uses_both_factor_lists(tmp_path):
    # The LongRoPE cases above would pass with one list for both sides if the lists had no effect: they do.
    ours = convert_and_load(save_phi(tiny_hf("phi4_mini"), tmp_path / "hf"), tmp_path / "native")
    idx = torch.randint(0, 120, (1, 80))
    with torch.no_grad():
        short_prefix = ours(idx[:, :ORIGINAL])                      # short factors
        long_prefix = ours(idx)[:, :ORIGINAL]                       # the same tokens under the long factors
    assert (short_prefix - long_prefix).abs().max() > 1e-2


@pytest.mark.parametrize("case, T, prefill", [("phi2", 40, 7), ("phi_gqa", 40, 7), ("phi3_window", 40, 7),
                                              ("phi4_mini", ORIGINAL, 7),      # all within the short side
                                              ("phi4_mini", 60, 40)])          # prefill already past it: all long
def test_kv_cache_decoding_equals_full_forward(case, T, prefill, tmp_path):
    ours = convert_and_load(save_phi(tiny_hf(case), tmp_path / "hf"), tmp_path / "native")
    idx = torch.randint(0, 120, (2, T))
    assert_cache_matches_full_forward(ours, idx, prefill=prefill)


@pytest.mark.parametrize("case, step", [("phi2", 1), ("phi3_window", 1), ("phi4_mini", 1), ("phi4_mini", 5)])
def test_ragged_batch_decodes_each_row_as_if_alone(case, step, tmp_path):
    # Three sequences of different lengths in reused slots, each row at its own positions. Phi-2: partial rotary,
    # parallel block; a window of 16; Phi-4-mini: each row switches to the long LongRoPE factors (re-prefilling its
    # own sequence) at its own step, as it crosses the original 32 positions.
    ours = convert_and_load(save_phi(tiny_hf(case), tmp_path / "hf"), tmp_path / "native")
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 120, (n,), generator=g) for n in (50, 21, 44)]
    assert_batched_decoding_matches_alone(ours, sequences, [7, 3, 30], step=step)


@pytest.mark.parametrize("case", ["phi3.5_longrope", "phi4_mini"])
def test_longrope_decoding_across_the_switch_matches_hf_generate(case, tmp_path):
    # What HF does: a forward picks the long factors for all its tokens when its highest position + 1 exceeds
    # original_max_position_embeddings, and Phi3ForCausalLM.prepare_inputs_for_generation drops the KV cache (keys
    # rotated with the short factors) the first time generate() crosses that length, re-prefilling the whole
    # sequence. So each generated token's logits equal a full forward over its prefix. Our cached decode matches
    # generate() step by step: prompt of 20, 24 new tokens, crossing at 33.
    hf = tiny_hf(case)
    ours = convert_and_load(save_phi(hf, tmp_path / "hf"), tmp_path / "native")
    prompt = torch.randint(3, 120, (1, 20))
    out = hf.generate(prompt, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=0)
    assert out.sequences.size(1) == 44 > ORIGINAL
    theirs = torch.stack(out.logits, dim=1)                           # (1, 24, vocab): the logits of each step
    mine = cached_decode_logits(ours, out.sequences, prefill=20)[:, 19:43]
    assert_logits_close(mine, theirs)


@pytest.mark.parametrize("case", ["phi2", "phi3_window", "phi4_mini"])
def test_hf_native_hf_round_trip(case, tmp_path):
    hf = tiny_hf(case)
    hf_dir = save_phi(hf, tmp_path / "hf", "hub")
    convert_hf.hf_to_native(hf_dir, tmp_path / "native")
    convert_hf.native_to_hf(tmp_path / "native", tmp_path / "back")
    before, after = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(reloaded) is type(hf)
    idx = torch.randint(0, 120, (2, 80))
    with torch.no_grad():
        assert torch.equal(reloaded(idx).logits, hf(idx).logits)


@pytest.mark.parametrize("case", list(CASES))
def test_hub_and_transformers5_configs_read_the_same(case):
    hf = tiny_hf(case)
    new_style = hf.config.to_dict()
    assert "rope_parameters" in new_style
    hub = hub_style(new_style)
    hub["partial_rotary_factor"] = new_style["rope_parameters"]["partial_rotary_factor"]
    assert phi.Config.from_hf(new_style) == phi.Config.from_hf(hub)


def test_early_phi3_rope_type_names_read_as_longrope():
    # The first Phi-3-128k config.json files said "su" (HF's Phi3Config renames "su" and "yarn" to longrope).
    hf = {**TINY_PHI3, "model_type": "phi3", "original_max_position_embeddings": ORIGINAL,
          "rope_scaling": {**longrope(8), "type": "su"}}
    assert phi.Config.from_hf(hf).rope_scaling["type"] == "longrope"


def test_unsupported_rope_type_is_a_clear_error():
    hf = {**TINY_PHI3, "model_type": "phi3", "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported.*supported: default, longrope"):
        phi.Config.from_hf(hf)


# Parameter counts published for each Hub repo (safetensors metadata / model card).
PUBLISHED_PARAMS = {
    "phi-1_5": 1_418_270_720,
    "phi-2": 2_779_683_840,
    "Phi-3-mini-4k-instruct": 3_821_079_552,
    "Phi-3-mini-128k-instruct": 3_821_079_552,
    "phi-4": 14_659_507_200,
    "Phi-4-mini-instruct": 3_836_021_760,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_presets_have_the_published_parameter_count(name):
    assert preset_parameter_count(phi, name) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("extra", [dict(phi._PHI2_LAYOUT, rope_dim=4),         # LayerNorms with biases, biased head
                                   dict(tie_embeddings=True)])                   # Phi-3 layout: RMSNorm, tied head
def test_meta_build_initialised_by_init_weights_equals_a_plain_build(extra):
    config = phi.Config(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, dim=32, intermediate_size=48, **extra)
    assert_meta_init_equals_plain_build(phi, config)


def test_every_preset_builds_on_meta_and_round_trips_through_a_transformers_config():
    for name in phi.PRESETS:
        config = phi.Config.from_name(name)
        with torch.device("meta"):
            model = phi.Transformer(config)
        assert len(model.layers) == config.n_layer
        hf = config.to_hf()
        hf_config = AutoConfig.for_model(hf.pop("model_type"), **hf)     # transformers accepts what we write
        back = phi.Config.from_hf(hf_config.to_dict())
        assert back == dataclasses.replace(config, name=back.name), name


@pytest.mark.parametrize("case, mode", [("phi2", "int8"), ("phi2", "nf4"), ("phi2", "fp4"), ("phi2", "bnb.int8"),
                                        ("phi4_mini", "int8"), ("phi4_mini", "nf4"), ("phi4_mini", "int4")])
def test_quantized_model_stays_close(case, mode, tmp_path):
    ours = convert_and_load(save_phi(tiny_hf(case), tmp_path / "hf"), tmp_path / "native")
    rel = quantization_error(ours, mode, 120)
    assert rel < {"int8": 0.05, "bnb.int8": 0.05, "int4": 0.5, "nf4": 0.7, "fp4": 0.7}[mode], rel
