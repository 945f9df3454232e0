"""models/gemma.py against transformers' GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM and the text decoder
of Gemma3ForConditionalGeneration: logits within 1e-4 in fp32 on tiny random configs covering every feature, through
the real convert_hf.py + models.load path."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3Config, Gemma3ForCausalLM,
                          Gemma3ForConditionalGeneration, Gemma3TextConfig, GemmaConfig, GemmaForCausalLM)

import convert_hf
from conftest import (assert_batched_decoding_matches_alone, assert_cache_matches_full_forward, assert_logits_close,
                      assert_meta_init_equals_plain_build, convert_and_load, hub_style, perturb_, quantization_error)
from models import gemma

# head_dim 24 is independent of hidden 64 / 4 heads; a window of 16 is far shorter than the test sequences.
TINY = dict(vocab_size=120, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=512, rms_norm_eps=1e-6)
# Caps far below the published 50 / 30, so that soft-capping bends the small logits of a tiny random model.
GEMMA2 = dict(sliding_window=16, query_pre_attn_scalar=20, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
# Global every 3rd layer (local, local, global, local); local RoPE base differs; linear scaling on global layers.
GEMMA3 = dict(sliding_window=16, query_pre_attn_scalar=20, sliding_window_pattern=3, rope_theta=1e6,
              rope_local_base_freq=2e4, rope_scaling={"rope_type": "linear", "factor": 4.0})
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)

CASES = {
    "gemma_mha": (GemmaConfig, GemmaForCausalLM, dict(num_key_value_heads=4)),
    "gemma_mqa": (GemmaConfig, GemmaForCausalLM, dict(num_key_value_heads=1)),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, GEMMA2),
    "gemma2_no_softcap": (Gemma2Config, Gemma2ForCausalLM,
                          dict(GEMMA2, attn_logit_softcapping=None, final_logit_softcapping=None)),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, GEMMA3),
    "gemma3_unscaled_mqa": (Gemma3TextConfig, Gemma3ForCausalLM,
                            dict(GEMMA3, rope_scaling=None, num_key_value_heads=1)),
    "gemma3_multimodal": (Gemma3Config, Gemma3ForConditionalGeneration, None),
}


def tiny_hf(case: str, seed: int = 0):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    if config_cls is Gemma3Config:
        config = Gemma3Config(text_config={**TINY, **GEMMA3}, vision_config=VISION, mm_tokens_per_image=4)
    else:
        config = config_cls(**{**TINY, **extra})
    return perturb_(model_cls(config).eval(), seed)


# ----------------------------------------------------------------------------------------------------------------
# Hub-style files. conftest.hub_style handles one flat rope_parameters; Gemma 3 has one per layer type, and the
# multimodal Hub checkpoints also use other weight names and a text_config that keeps only non-default keys.


def gemma_hub_style(config: dict) -> dict:
    kind = config["model_type"]
    if kind == "gemma3":
        defaults = Gemma3TextConfig().to_dict()
        text = gemma_hub_style(config["text_config"])
        return {**config, "text_config": {k: v for k, v in text.items() if k not in defaults or defaults[k] != v}}
    if kind != "gemma3_text":
        config = hub_style(config)
        config.pop("layer_types", None)                        # Hub Gemma 2 files have none: layers alternate
        return config
    config = dict(config)
    rope = config.pop("rope_parameters")
    full, local = dict(rope["full_attention"]), dict(rope["sliding_attention"])
    config["rope_theta"], config["rope_local_base_freq"] = full.pop("rope_theta"), local.pop("rope_theta")
    config["rope_scaling"] = full if full["rope_type"] != "default" else None
    layer_types = config.pop("layer_types")
    config.pop("_sliding_window_pattern", None)
    config["sliding_window_pattern"] = layer_types.index("full_attention") + 1
    assert gemma.every_nth_global(len(layer_types), config["sliding_window_pattern"]) == layer_types
    return config


# save_pretrained writes Gemma3ForConditionalGeneration under the Hub's names (language_model.model.*,
# vision_tower.*); checkpoints saved by some transformers 4.x releases carry the module tree's names instead.
MODULE_TREE_NAMES = {"language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower.",
                     "multi_modal_projector.": "model.multi_modal_projector."}


def rename(name: str, prefixes: dict) -> str:
    old = next((p for p in prefixes if name.startswith(p)), None)
    return prefixes[old] + name[len(old):] if old else name


def save_hf(model, out_dir, style: str = "transformers5"):
    model.save_pretrained(out_dir)
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    if style == "hub":
        path.write_text(json.dumps(gemma_hub_style(config), indent=2))
    elif config["model_type"] == "gemma3":
        tensors = load_file(out_dir / "model.safetensors")
        tensors = {rename(k, MODULE_TREE_NAMES): v for k, v in tensors.items()}
        save_file(tensors, out_dir / "model.safetensors", {"format": "pt"})
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Logits


@pytest.mark.parametrize("style", ["transformers5", "hub"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, style, tmp_path):
    hf = tiny_hf(case)
    ours = convert_and_load(save_hf(hf, tmp_path / "hf", style), tmp_path / "native")
    idx = torch.randint(0, TINY["vocab_size"], (2, 80))          # 5x the sliding window
    with torch.no_grad():
        assert_logits_close(ours(idx), hf(input_ids=idx).logits)


@pytest.mark.parametrize("case, change", [
    ("gemma2", dict(attn_logit_softcapping=None)), ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(query_pre_attn_scalar=24)), ("gemma2", dict(sliding_window=80)),
    ("gemma3", dict(rope_scaling=None)), ("gemma3", dict(rope_local_base_freq=1e6)),
    ("gemma3", dict(sliding_window_pattern=2))])
def test_tiny_configs_exercise_each_feature(case, change):
    # The parity tests above prove something only if the tiny models are sensitive to every feature: in HF itself,
    # switching one off (same weights) moves the logits far beyond the 1e-4 tolerance.
    config_cls, model_cls, extra = CASES[case]
    hf = tiny_hf(case)
    other = model_cls(config_cls(**{**TINY, **extra, **change})).eval()
    other.load_state_dict(hf.state_dict())
    idx = torch.randint(0, TINY["vocab_size"], (1, 80))
    with torch.no_grad():
        assert (other(idx).logits - hf(idx).logits).abs().max() > 1e-2


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2", "gemma3"])
def test_kv_cache_decoding_equals_full_forward(case, tmp_path):
    ours = convert_and_load(save_hf(tiny_hf(case), tmp_path / "hf"), tmp_path / "native")
    idx = torch.randint(0, TINY["vocab_size"], (2, 40))          # decodes 33 tokens, most past the window of 16
    assert_cache_matches_full_forward(ours, idx, prefill=7)


@pytest.mark.parametrize("case, step", [("gemma2", 1), ("gemma3", 1), ("gemma3", 5)])
def test_ragged_batch_decodes_each_row_as_if_alone(case, step, tmp_path):
    # Three sequences of different lengths in reused slots, each row at its own positions: local layers slide their
    # window of 16 per row, global ones see the whole row; Gemma 2's soft-capped scores take the per-row mask too.
    ours = convert_and_load(save_hf(tiny_hf(case), tmp_path / "hf"), tmp_path / "native")
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in (40, 21, 34)]
    assert_batched_decoding_matches_alone(ours, sequences, [7, 3, 12], step=step)


# ----------------------------------------------------------------------------------------------------------------
# Configs and conversion


@pytest.mark.parametrize("case", ["gemma_mqa", "gemma2", "gemma3", "gemma3_multimodal"])
def test_hub_and_transformers5_configs_read_the_same(case):
    new_style = tiny_hf(case).config.to_dict()
    assert gemma.Config.from_hf(new_style) == gemma.Config.from_hf(gemma_hub_style(new_style))


def test_config_reads_published_layouts():
    text = gemma.Config.from_hf(tiny_hf("gemma3").config.to_dict())
    assert text.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert (text.rope_base, text.rope_local_base, text.rope_scaling) == (1e6, 2e4, {"type": "linear", "factor": 4.0})
    # google/gemma-3-4b-it's config.json: a text_config that leans on Gemma3TextConfig's defaults
    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024}}
    assert gemma.Config.from_hf(hub) == dataclasses.replace(gemma.Config.from_name("gemma-3-4b"), name="")


def test_unsupported_configs_are_clear_errors():
    base = {**TINY, "model_type": "gemma2"}
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported.*supported: default, linear"):
        gemma.Config.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="activation 'gelu' is not supported"):
        gemma.Config.from_hf({**base, "hidden_activation": "gelu"})
    with pytest.raises(ValueError, match="model_type 'gemma3n_text' is not supported"):
        gemma.Config.from_hf({**TINY, "model_type": "gemma3n_text"})


@pytest.mark.parametrize("case", ["gemma_mha", "gemma2", "gemma3", "gemma3_multimodal"])
def test_hf_native_hf_round_trip_is_exact(case, tmp_path):
    hf = tiny_hf(case)
    hf_dir = save_hf(hf, tmp_path / "hf", style="hub")
    convert_hf.hf_to_native(hf_dir, tmp_path / "native")
    convert_hf.native_to_hf(tmp_path / "native", tmp_path / "back")
    original = load_file(hf_dir / "model.safetensors")
    if case == "gemma3_multimodal":                              # the text decoder comes back as Gemma3ForCausalLM
        original = {rename(k, {"language_model.": ""}): v for k, v in original.items()
                    if k.startswith("language_model.")}
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        assert_logits_close(reloaded(idx).logits, hf(input_ids=idx).logits, atol=1e-5 if "multimodal" in case else 0)


# ----------------------------------------------------------------------------------------------------------------
# Presets

# Parameter counts published in the safetensors metadata of the Hub repos and in keras-hub's Gemma presets. The
# Hub's Gemma 3 4B / 12B / 27B also hold a vision tower; keras-hub publishes their text decoders alone, with the
# 262144-token vocabulary of Gemma 3 1B (HF's text_config has 64 more rows, for image tokens).
PUBLISHED_PARAMS = {
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2-27b": 27_227_128_320,
    "gemma-3-270m": 268_098_176,
    "gemma-3-1b": 999_885_952,
}
PUBLISHED_TEXT_ONLY_PARAMS = {
    "gemma-3-4b": 3_880_099_328,
    "gemma-3-12b": 11_765_788_416,
    "gemma-3-27b": 27_009_002_240,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS) + list(PUBLISHED_TEXT_ONLY_PARAMS))
def test_presets_have_the_published_parameter_count(name):
    config = gemma.Config.from_name(name)
    if name in PUBLISHED_TEXT_ONLY_PARAMS:
        config = dataclasses.replace(config, vocab_size=262144)
    with torch.device("meta"):
        model = gemma.Transformer(config)
    published = PUBLISHED_PARAMS.get(name) or PUBLISHED_TEXT_ONLY_PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == published


def test_every_preset_builds_on_meta_and_survives_to_hf_and_back():
    for name in gemma.PRESETS:
        config = gemma.Config.from_name(name)
        with torch.device("meta"):
            model = gemma.Transformer(config)
        assert len(model.layers) == model.config.n_layer
        assert gemma.Config.from_hf(config.to_hf()) == dataclasses.replace(config, name="")


# ----------------------------------------------------------------------------------------------------------------
# Quantization


@pytest.mark.parametrize("extra", [dict(attn_bias=True),                                  # Gemma 1
                                   dict(post_norms=True, qk_norm=True, sliding_window=8,     # Gemma 3
                                        layer_types=["sliding_attention", "full_attention"])])
def test_meta_build_initialised_by_init_weights_equals_a_plain_build(extra):
    config = gemma.Config(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, dim=32, intermediate_size=48, **extra)
    assert_meta_init_equals_plain_build(gemma, config)


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4", "fp4", "bnb.int8"])
def test_quantized_model_stays_close(mode, tmp_path):
    ours = convert_and_load(save_hf(tiny_hf("gemma3"), tmp_path / "hf"), tmp_path / "native")
    rel = quantization_error(ours, mode, TINY["vocab_size"])
    assert rel < {"int8": 0.05, "bnb.int8": 0.05, "int4": 0.5, "nf4": 0.7, "fp4": 0.7}[mode], rel
