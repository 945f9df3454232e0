"""models/qwen.py against transformers' Qwen2ForCausalLM and Qwen3ForCausalLM: logits within 1e-4 in fp32 on tiny
random configs covering every feature, through the real convert_hf.py + models.load path."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import convert_hf
from conftest import (assert_batched_decoding_matches_alone, assert_cache_matches_full_forward, assert_logits_close,
                      assert_meta_init_equals_plain_build, convert_and_load, hub_style, perturb_,
                      preset_parameter_count, quantization_error, save_hf)
from models import qwen

TINY = dict(vocab_size=120, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
# YaRN over an original context of 32 positions, so that the 80-token inputs below run past it.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
QWEN2 = (Qwen2Config, Qwen2ForCausalLM)
QWEN3 = (Qwen3Config, Qwen3ForCausalLM)

CASES = {
    "qwen2_gqa": (*QWEN2, {}),
    "qwen2_mqa_tied": (*QWEN2, dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2_mha_head_dim": (*QWEN2, dict(num_key_value_heads=4, head_dim=24)),
    "qwen2_window": (*QWEN2, dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    "qwen2_yarn": (*QWEN2, dict(max_position_embeddings=128, rope_theta=1e6, rope_scaling=YARN)),
    "qwen3_gqa": (*QWEN3, dict(head_dim=24)),                       # head_dim independent of hidden / heads
    "qwen3_mqa_tied": (*QWEN3, dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)),
    "qwen3_mha_bias": (*QWEN3, dict(num_key_value_heads=4, head_dim=32, attention_bias=True)),
    "qwen3_yarn": (*QWEN3, dict(head_dim=16, max_position_embeddings=128,
                                rope_scaling={**YARN, "beta_fast": 16, "truncate": False})),
}


def tiny_hf(case: str, seed: int = 0):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    return perturb_(model_cls(config_cls(**{**TINY, **extra})).eval(), seed)   # biases and q/k norms off 0 and 1


@pytest.mark.parametrize("style", ["transformers5", "hub"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, style, tmp_path):
    hf = tiny_hf(case)
    hf_dir = save_hf(hf, tmp_path / "hf", style)
    if style == "hub":   # Hub files predate layer_types: transformers derives it from max_window_layers
        config = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "layer_types"}))
    ours = convert_and_load(hf_dir, tmp_path / "native")
    idx = torch.randint(0, TINY["vocab_size"], (2, 80))          # longer than the window and YaRN's original context
    with torch.no_grad():
        assert_logits_close(ours(idx), hf(idx).logits)


@pytest.mark.parametrize("case", ["qwen2_gqa", "qwen2_window", "qwen3_gqa", "qwen3_yarn"])
def test_kv_cache_decoding_equals_full_forward(case, tmp_path):
    ours = convert_and_load(save_hf(tiny_hf(case), tmp_path / "hf"), tmp_path / "native")
    idx = torch.randint(0, TINY["vocab_size"], (2, 40))
    assert_cache_matches_full_forward(ours, idx, prefill=7)


@pytest.mark.parametrize("case", ["qwen2_window", "qwen3_gqa"])
def test_ragged_batch_decodes_each_row_as_if_alone(case, tmp_path):
    # Three sequences of different lengths in reused slots, each row at its own positions: the window of 16 on the
    # upper layers slides per row; Qwen3's QK-norm in between.
    ours = convert_and_load(save_hf(tiny_hf(case), tmp_path / "hf"), tmp_path / "native")
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in (40, 21, 34)]
    assert_batched_decoding_matches_alone(ours, sequences, [7, 3, 12])


@pytest.mark.parametrize("case", ["qwen2_window", "qwen3_mqa_tied", "qwen3_yarn"])
def test_hf_native_hf_round_trip_is_exact(case, tmp_path):
    hf = tiny_hf(case)
    convert_hf.hf_to_native(save_hf(hf, tmp_path / "hf"), tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["family"] == "qwen"
    convert_hf.native_to_hf(tmp_path / "native", tmp_path / "back")
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(back) is type(hf)
    idx = torch.randint(0, TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        assert torch.equal(back(idx).logits, hf(idx).logits)


def test_hub_and_transformers5_configs_read_the_same():
    new_style = tiny_hf("qwen3_yarn").config.to_dict()
    assert "rope_parameters" in new_style
    assert qwen.Config.from_hf(new_style) == qwen.Config.from_hf(hub_style(new_style))


# Two config.json files as the Hub serves them (Qwen/Qwen2.5-7B and Qwen/Qwen3-8B), less the token ids.
HUB_CONFIGS = {
    "Qwen2.5-7B": {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "hidden_act": "silu",
                   "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
                   "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2",
                   "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
                   "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
                   "torch_dtype": "bfloat16", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
                   "vocab_size": 152064},
    "Qwen3-8B": {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                 "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
                 "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 36,
                 "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
                 "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
                 "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
                 "use_sliding_window": False, "vocab_size": 151936},
}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_hub_config_reads_as_the_preset(name):
    assert qwen.Config.from_hf(HUB_CONFIGS[name]) == dataclasses.replace(qwen.Config.from_name(name), name="")


@pytest.mark.parametrize("name", ["Qwen2.5-7B", "Qwen3-8B"])
def test_model_card_yarn_matches_transformers_at_full_size(name):
    # The model cards' opt-in for 128K tokens, added to config.json as they say
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    hf = {**HUB_CONFIGS[name], "rope_scaling": yarn}
    ours = qwen.Config.from_hf(hf)
    assert ours.max_seq_len == 131072
    config_cls = Qwen3Config if name.startswith("Qwen3") else Qwen2Config
    theirs = config_cls(**{k: v for k, v in hf.items() if k != "model_type"})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](theirs)
    assert torch.equal(qwen.rope_inv_freq(ours), inv_freq)
    assert qwen.rope_attention_factor(ours) == attention_factor


@pytest.mark.parametrize("config_cls, model_type", [(Qwen2Config, "qwen2"), (Qwen3Config, "qwen3")])
def test_missing_config_keys_take_transformers_defaults(config_cls, model_type):
    minimal = dict(vocab_size=120, hidden_size=2048, intermediate_size=112, num_hidden_layers=2,
                   num_attention_heads=32)
    theirs = config_cls(**minimal)
    ours = qwen.Config.from_hf({**minimal, "model_type": model_type})
    assert ours.head_dim == getattr(theirs, "head_dim", 2048 // 32)        # Qwen3: 128, not hidden / heads
    assert ours.n_kv_head == theirs.num_key_value_heads
    assert ours.norm_eps == theirs.rms_norm_eps
    assert ours.rope_base == theirs.rope_parameters["rope_theta"]
    assert ours.sliding_window is None and theirs.sliding_window is None


def test_config_survives_to_hf_and_back():
    configs = [qwen.Config.from_name(name) for name in qwen.PRESETS]
    configs += [qwen.Config.from_hf({**tiny_hf(case).config.to_dict(), "_name_or_path": ""})
                for case in ("qwen2_window", "qwen2_yarn", "qwen3_mha_bias")]
    for config in configs:
        assert qwen.Config.from_hf(config.to_hf()) == dataclasses.replace(config, name="")


def test_unsupported_rope_type_is_a_clear_error():
    hf = {**TINY, "model_type": "qwen2", "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported.*supported: default, yarn, llama3"):
        qwen.Config.from_hf(hf)


def test_unsupported_window_layout_is_a_clear_error():
    hf = {**TINY, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
          "layer_types": ["sliding_attention", "full_attention", "full_attention"]}
    with pytest.raises(ValueError, match="layer_types must be max_window_layers full_attention layers"):
        qwen.Config.from_hf(hf)


def test_a_mix_of_qwen2_and_qwen3_is_refused():
    with pytest.raises(ValueError, match="Qwen2 .* or Qwen3"):
        qwen.Config(qk_norm=True)                     # Qwen3 has no q/k/v-only biases


# Parameter counts published on each model card / the safetensors index of the Hub repo. The Qwen3-0.6B and -1.7B
# files store their tied head a second time, and the Hub counts it twice.
PUBLISHED_PARAMS = {
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-1.5B": 1_543_714_304,
    "Qwen2.5-3B": 3_085_938_688,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen2.5-14B": 14_770_033_664,
    "Qwen2.5-32B": 32_763_876_352,
    "Qwen2.5-72B": 72_706_203_648,
    "DeepSeek-R1-Distill-Qwen-1.5B": 1_777_088_000,
    "Qwen3-0.6B": 751_632_384,
    "Qwen3-1.7B": 2_031_739_904,
    "Qwen3-4B": 4_022_468_096,
    "Qwen3-8B": 8_190_735_360,
    "Qwen3-14B": 14_768_307_200,
    "Qwen3-32B": 32_762_123_264,
}
HEAD_STORED_TWICE = {"Qwen3-0.6B", "Qwen3-1.7B"}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_presets_have_the_published_parameter_count(name):
    config = qwen.Config.from_name(name)
    stored_head = config.vocab_size * config.dim if name in HEAD_STORED_TWICE else 0
    assert preset_parameter_count(qwen, name) + stored_head == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("extra", [dict(tie_embeddings=True),                                  # Qwen2: q/k/v biases
                                   dict(qkv_bias=False, qk_norm=True, attn_bias=True)])     # Qwen3: QK-norm
def test_meta_build_initialised_by_init_weights_equals_a_plain_build(extra):
    config = qwen.Config(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, dim=32, intermediate_size=48, **extra)
    assert_meta_init_equals_plain_build(qwen, config)


def test_every_preset_builds_on_meta():
    for name in qwen.PRESETS:
        with torch.device("meta"):
            model = qwen.Transformer(qwen.Config.from_name(name))
        assert len(model.layers) == model.config.n_layer


@pytest.mark.parametrize("case", ["qwen2_gqa", "qwen3_mha_bias"])
@pytest.mark.parametrize("mode", ["int8", "int4", "nf4", "fp4", "bnb.int8"])
def test_quantized_model_stays_close(mode, case, tmp_path):
    ours = convert_and_load(save_hf(tiny_hf(case), tmp_path / "hf"), tmp_path / "native")
    rel = quantization_error(ours, mode, TINY["vocab_size"])
    assert rel < {"int8": 0.05, "bnb.int8": 0.05, "int4": 0.5, "nf4": 0.7, "fp4": 0.7}[mode], rel
