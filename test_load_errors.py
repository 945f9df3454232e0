"""Hostile checkpoints and generation inputs: a config.json that is impossible or disagrees with the weights, a
model past memory, a device this machine lacks, an unknown dtype, a broken generation_config.json, a chat message
longer than the context. Each gets one line naming the file or the value and what to do, before anything is
allocated."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import convert_hf
import generate
import models
from conftest import cli_error, preset_parameter_count
from models import llama


@pytest.fixture
def native(tmp_path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "hf")
    convert_hf.hf_to_native(tmp_path / "hf", tmp_path / "native")
    return tmp_path / "native"


def edit_json(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def load_error(checkpoint_dir, **kwargs) -> str:
    with pytest.raises(ValueError) as e:
        generate.LLM.load(checkpoint_dir, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("changes, says", [
    (dict(n_layer=100000), "disagrees with the weights: n_layer is 100000, the weights hold 2 layers"),
    (dict(dim=1000000, head_dim=0), "disagrees with the weights: vocab_size x dim is 96 x 1000000"),
    (dict(vocab_size=1e12), "vocab_size must be of type int, got 1000000000000.0"),
    (dict(n_head=0), "n_head must be a positive integer, got 0"),
    (dict(head_dim=-1), "head_dim must be a non-negative integer, got -1"),
    (dict(n_layer=-1), "n_layer must be a positive integer, got -1"),
    (dict(intermediate_size=256), "disagrees with the weights: layers.0.mlp.gate_up.weight is (256, 64)"),
    (dict(rope_base="10000"), "rope_base must be of type float"),
])
def test_an_impossible_or_disagreeing_config_is_refused_before_anything_is_built(native, changes, says):
    edit_json(native / "config.json", **changes)
    message = load_error(native, device="cpu")
    assert message.startswith(str(native / "config.json")) and says in message, message


def test_unknown_fields_in_a_native_config_are_named(native):
    edit_json(native / "config.json", rope_theta=500000.0, qk_norm=True)   # an HF name; a Qwen3 field
    message = load_error(native, device="cpu")
    assert "unknown fields qk_norm, rope_theta" in message and "rope_base" in message, message


def test_a_preset_past_memory_is_refused_with_the_figure():
    config = llama.Config.from_name("Llama-3.1-405B")
    n = preset_parameter_count(llama, "Llama-3.1-405B")
    with pytest.raises(ValueError) as e:
        models.check_fits(config, torch.float32, "cpu", copies=4)       # weights, gradients, AdamW's two moments
    figure = re.search(r"needs about ([\d.]+) GiB", str(e.value))
    assert figure and float(figure.group(1)) == round(n * 4 * 4 / 2**30, 1), str(e.value)
    models.check_fits(llama.Config(n_layer=2, dim=64, n_head=4, n_kv_head=2, vocab_size=96, intermediate_size=128),
                      torch.float32, "cpu", copies=4)


@pytest.mark.parametrize("device, says", [
    pytest.param("cuda", "'cuda' is not available", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                              reason="this machine has CUDA")),
    pytest.param("cuda:7", "is not available", marks=pytest.mark.skipif(torch.cuda.device_count() > 7,
                                                                         reason="this machine has 8 GPUs")),
    pytest.param("mps", "'mps' is not available", marks=pytest.mark.skipif(torch.backends.mps.is_available(),
                                                                            reason="this machine has MPS")),
    ("gpu", "unknown device 'gpu'"),
])
def test_a_device_this_machine_lacks_is_one_line(native, device, says):
    assert says in cli_error(generate.main, native, "--device", device, "--prompt", "hi")


def test_an_unknown_dtype_lists_the_valid_ones(native):
    message = load_error(native, dtype="float64")
    assert "'float64'" in message and all(name in message for name in ("float32", "bfloat16", "float16"))


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "tiny"))


def test_invalid_generation_config_json_is_named(tiny_copy):
    (tiny_copy / "generation_config.json").write_text('{"do_sample": true,')
    message = load_error(tiny_copy, device="cpu")
    assert str(tiny_copy / "generation_config.json") in message and "not valid JSON" in message


def test_a_bad_temperature_from_generation_config_is_blamed_on_the_file(tiny_copy):
    edit_json(tiny_copy / "generation_config.json", do_sample=True, temperature=-1)
    message = load_error(tiny_copy, device="cpu")
    assert message.startswith(str(tiny_copy / "generation_config.json")) and "temperature" in message


def test_an_over_long_chat_message_is_refused_and_the_conversation_goes_on(tiny_dir, monkeypatch, capsys):
    # tiny_dir's context is 64 tokens: "hi" fits with its answer, 100 words do not
    lines = iter(["hi", "word " * 100, "hi", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    llm = generate.LLM.load(tiny_dir, device="cpu")
    generate.interactive_chat(llm, None, max_new_tokens=4, temperature=0)
    err = capsys.readouterr().err
    assert len(re.findall(r"^error: the message does not fit", err, re.M)) == 1, err
    first, second = map(int, re.findall(r"prompt (\d+) tokens", err))
    history = len(llm.tokenizer.encode_chat([{"role": "user", "content": "hi"}]))
    assert first == history and second > history     # the second "hi" came after the first exchange, kept


def test_a_chat_template_that_raises_is_one_line_from_the_command_line_and_the_repl(tiny_copy, monkeypatch, capsys):
    # The template raises for a system message (as Gemma's does): --chat names the template; the REPL says so and
    # goes on, its next message answered.
    template = tiny_copy / "chat_template.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    message = cli_error(generate.main, tiny_copy, "--chat", "--system", "Be brief.", "--prompt", "hi",
                        "--max_new_tokens", "2")
    assert "chat template" in message and "System role not supported" in message
    lines = iter(["hi", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    llm = generate.LLM.load(tiny_copy, device="cpu")
    generate.interactive_chat(llm, "Be brief.", max_new_tokens=2, temperature=0)
    err = capsys.readouterr().err
    assert "System role not supported" in err and "Traceback" not in err
