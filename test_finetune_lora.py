"""finetune_lora.py: LoRA, QLoRA and LLaMA-Adapter on tiny random models of every model file. The oracles are the
model itself: the unwrapped model (adapters start as exact no-ops), the unmerged model (merging changes nothing),
a full forward (KV-cache decoding), and the model before saving (a saved adapter loads back exactly)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import finetune_lora
import models
from conftest import assert_logits_close, cached_decode_logits, perturb_
from finetune_lora import (AdapterAttention, LoRALinear, adapter_metadata, adapter_state_dict, apply_adapter,
                           apply_lora, load_adapter, merge_checkpoint, merge_lora, save_adapter)
from models import gemma, llama, phi, qwen

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, n_layer=2, dim=32, intermediate_size=48, max_seq_len=64)
FAMILIES = {
    "llama": (llama, dict(n_head=4, n_kv_head=2)),
    "qwen": (qwen, dict(n_head=4, n_kv_head=2)),                             # Qwen2: q/k/v biases
    "gemma": (gemma, dict(n_head=4, n_kv_head=1, head_dim=16, qk_norm=True, post_norms=True,
                          query_pre_attn_scalar=24)),                           # tied head, own attention scale
    "phi2": (phi, dict(n_head=4, n_kv_head=4, rope_dim=4, parallel_residual=True, layer_norm=True,
                       gelu_mlp=True, bias=True)),                              # GELU MLP (up), partial RoPE, biases
    "phi3": (phi, dict(n_head=4, n_kv_head=2)),
}


def tiny(family: str, seed: int = 0, **extra):
    m, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    return perturb_(m.Transformer(m.Config(**{**COMMON, **kwargs, **extra})).eval(), seed)


def tiny_meta(family: str):
    """tiny(family)'s architecture, unperturbed: for building on the meta device."""
    m, kwargs = FAMILIES[family]
    return m.Transformer(m.Config(**{**COMMON, **kwargs}))


def tokens(seed: int = 0, shape=(2, 12)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, idx):
    with torch.no_grad():
        return model(idx)


def frozen_state(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every parameter and buffer of the model now, with a copy of its value."""
    return [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]]


def train(model, steps: int = 6, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on one random batch; the losses."""
    idx = tokens(1, (4, 17))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def randomize_(tensors, seed: int = 0, std: float = 0.1):
    """LoRA's B and the adapter's gates start at zero, which would make every comparison trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g) * std)


def write_checkpoint(model, d: Path) -> Path:
    """A native checkpoint dir of an in-memory model, with tokenizer and generation files to be copied along."""
    d.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_embeddings and k == "lm_head.weight")}
    save_file(state, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    (d / "tokenizer.json").write_text("{}")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return d


# ----------------------------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_starts_as_noop_trains_only_lora_and_keeps_base_weights(family):
    model = tiny(family)
    idx = tokens()
    before, base = logits(model, idx), frozen_state(model)
    apply_lora(model, r=4, head=not model.config.tie_embeddings)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith((".lora_a", ".lora_b")) for name in trainable)
    assert torch.equal(logits(model, idx), before)
    losses = train(model)
    assert losses[-1] < losses[0]
    assert all(torch.equal(t, copy) for t, copy in base)


@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 5, 12)])
def test_lora_output_and_gradients_equal_the_formula(shape):
    # The oracle: W x + bias + (alpha / r) B A x written out, differentiated by autograd.
    torch.manual_seed(0)
    lora = LoRALinear(torch.nn.Linear(12, 10), r=3, alpha=6)
    torch.nn.init.normal_(lora.lora_b)                                     # B off zero: the update takes part
    x = torch.randn(shape, requires_grad=True)
    y = lora(x)
    expected = F.linear(x, lora.base.weight, lora.base.bias) + 2.0 * (x @ lora.lora_a.T @ lora.lora_b.T)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    up = torch.randn(y.shape)
    wrt = (x, lora.lora_a, lora.lora_b)
    for g, e in zip(torch.autograd.grad(y, wrt, up), torch.autograd.grad(expected, wrt, up)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_compiled_lora_gives_the_formula_output_and_gradients():
    # compile=true: dynamo traces the in-place addmm_ on the base output into the graph; the numbers stay.
    torch.manual_seed(0)
    lora = LoRALinear(torch.nn.Linear(12, 10), r=3, alpha=6)
    torch.nn.init.normal_(lora.lora_b)
    lora.base.requires_grad_(False)
    x = torch.randn(2, 5, 12, requires_grad=True)
    y = torch.compile(lora, fullgraph=True)(x)
    expected = F.linear(x, lora.base.weight, lora.base.bias) + 2.0 * (x @ lora.lora_a.T @ lora.lora_b.T)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    up = torch.randn(y.shape)
    wrt = (x, lora.lora_a, lora.lora_b)
    for g, e in zip(torch.autograd.grad(y, wrt, up), torch.autograd.grad(expected, wrt, up)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_lora_wraps_the_named_linears_of_each_block():
    model = apply_lora(tiny("phi2"), targets=("qkv", "up", "gate_up"))       # phi-2 has up, no gate_up
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["layers.0.attn.qkv", "layers.0.mlp.up", "layers.1.attn.qkv", "layers.1.mlp.up"]


def test_lora_runs_in_the_activation_dtype():
    model = apply_lora(tiny("llama").to(torch.bfloat16))
    loss = model(tokens()).float().logsumexp(-1).mean()
    loss.backward()
    lora = model.layers[0].attn.qkv
    assert lora.lora_a.dtype == torch.bfloat16 and lora.lora_b.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merged_logits_equal_unmerged(family):
    model = tiny(family)
    apply_lora(model, head=not model.config.tie_embeddings)
    randomize_(p for name, p in model.named_parameters() if name.endswith(".lora_b"))
    idx = tokens()
    unmerged = logits(model, idx)
    assert (unmerged - logits(tiny(family), idx)).abs().max() > 1e-2     # the LoRA does change the model
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.state_dict().keys() == tiny(family).state_dict().keys()
    assert_logits_close(logits(model, idx), unmerged, atol=1e-5)


def test_lora_over_int8_linear_trains():
    model = models.quantize(tiny("llama"), "int8")
    base = frozen_state(model)
    apply_lora(model)
    assert isinstance(model.layers[0].attn.qkv.base, llama.Int8Linear)
    losses = train(model)
    assert losses[-1] < losses[0]
    assert all(torch.equal(t, copy) for t, copy in base)


@pytest.mark.parametrize("mode", ["nf4", "bnb.int8"])
def test_qlora_trains_over_bitsandbytes_base(mode):
    model = models.quantize(tiny("llama"), mode)
    base = frozen_state(model)
    apply_lora(model)
    assert type(model.layers[0].mlp.down.base).__name__ in ("Linear4bit", "Linear8bitLt")
    losses = train(model)
    assert losses[-1] < losses[0]
    assert all(torch.equal(t, copy) for t, copy in base)


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4", "bnb.int8"])
def test_merge_refuses_a_quantized_base(mode):
    model = apply_lora(models.quantize(tiny("llama"), mode))
    with pytest.raises(ValueError, match=rf"into its {mode}-quantized base.*merge into the full-precision checkpoint"):
        merge_lora(model)
    assert isinstance(model.layers[0].attn.qkv, LoRALinear)               # nothing half-merged


def test_unknown_target_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown LoRA target.*'q_proj'.*valid: qkv, o, gate_up, up, down"):
        apply_lora(tiny("llama"), targets=("qkv", "q_proj"))


def test_lora_on_a_tied_head_is_refused():
    with pytest.raises(ValueError, match="lm_head is tied to the token embeddings.*head=False"):
        apply_lora(tiny("gemma"), head=True)


# ----------------------------------------------------------------------------------------------------------------
# LLaMA-Adapter


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_starts_as_exact_noop_and_trains_only_prompts_and_gates(family):
    model = tiny(family)
    idx = tokens()
    before = logits(model, idx)
    apply_adapter(model, prompt_len=5, n_layers=1)
    assert isinstance(model.layers[-1].attn, AdapterAttention) and not isinstance(model.layers[0].attn,
                                                                                     AdapterAttention)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["layers.1.attn.prompt", "layers.1.attn.gate"]
    assert torch.equal(logits(model, idx), before)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_adapter_learns_and_keeps_base_weights(family):
    model = tiny(family)
    base = frozen_state(model)
    apply_adapter(model, prompt_len=5, n_layers=2)
    losses = train(model, steps=8, lr=3e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(t, copy) for t, copy in base)


@pytest.mark.parametrize("family", ["llama", "gemma", "phi2"])
def test_adapter_kv_cache_decoding_equals_full_forward(family):
    model = apply_adapter(tiny(family), prompt_len=5, n_layers=2)
    randomize_([m.gate for m in model.modules() if isinstance(m, AdapterAttention)], std=1.0)
    idx = tokens(shape=(2, 20))
    full = logits(model, idx)
    assert (full - logits(tiny(family), idx)).abs().max() > 1e-2         # the adapter does change the model
    assert_logits_close(cached_decode_logits(model, idx, prefill=7), full, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading


def test_lora_save_load_round_trip(tmp_path):
    model = apply_lora(tiny("llama"), r=2, alpha=4, targets=("qkv", "down"), head=True)
    randomize_(p for p in model.parameters() if p.requires_grad)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, base="checkpoints/tiny", step=100)
    fresh = load_adapter(tiny("llama"), path)
    idx = tokens()
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    assert fresh.layers[0].attn.qkv.r == 2 and isinstance(fresh.lm_head, LoRALinear)
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(adapter_state_dict(model)) and len(f.keys()) == 2 * (2 * 2 + 1)
    assert adapter_metadata(path) == {"kind": "lora", "r": "2", "alpha": "4", "dropout": "0.0",
                                      "targets": "qkv,down", "head": "true", "merged": "false",
                                      "base": "checkpoints/tiny", "step": "100"}
    base_bytes = sum(t.numel() * t.element_size() for t in tiny("llama").state_dict().values())
    assert path.stat().st_size < base_bytes / 5


def test_adapter_save_load_round_trip(tmp_path):
    model = apply_adapter(tiny("qwen"), prompt_len=3, n_layers=2)
    randomize_(p for p in model.parameters() if p.requires_grad)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    fresh = load_adapter(tiny("qwen"), path)
    idx = tokens()
    assert torch.equal(logits(fresh, idx), logits(model, idx))
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"layers.{i}.attn.{p}" for i in (0, 1) for p in ("prompt", "gate"))
    assert adapter_metadata(path) == {"kind": "llama-adapter", "prompt_len": "3", "n_layers": "2", "merged": "false"}


def test_adapter_state_from_a_state_dict_loads_like_save_adapter(tmp_path):
    # train.py gathers the trainable tensors of a sharded model by name and passes the recipe's settings.
    model = apply_lora(tiny("phi3"), r=4, alpha=8)
    randomize_(p for p in model.parameters() if p.requires_grad)
    state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    path = tmp_path / "adapter.safetensors"
    finetune_lora.save_adapter_state(state, path, kind="lora", r=4, alpha=8.0,
                                     targets=["qkv", "o", "gate_up", "up", "down"], head=False)
    assert adapter_metadata(path)["targets"] == "qkv,o,gate_up,up,down"
    idx = tokens()
    assert torch.equal(logits(load_adapter(tiny("phi3"), path), idx), logits(model, idx))
    with pytest.raises(ValueError, match="'tok_embeddings.weight' is not a lora tensor"):
        finetune_lora.save_adapter_state(dict(model.named_parameters()), path, kind="lora", r=4, alpha=8.0,
                                         targets="qkv", head=False)
    with pytest.raises(ValueError, match="llama-adapter adapter needs its settings prompt_len, n_layers"):
        finetune_lora.save_adapter_state(state, path, kind="llama-adapter", prompt_len=4)


@pytest.mark.parametrize("apply", [apply_lora, apply_adapter])
def test_adapters_made_on_meta_reset_to_a_noop(apply):
    # train.py under FSDP: build on the meta device, apply the method, materialise, load the base by
    # base_name, reset the adapters.
    with torch.device("meta"):
        model = apply(tiny_meta("llama"))
    model.to_empty(device="cpu")
    base = tiny("llama")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not name.endswith(tuple(sum(finetune_lora.ADAPTER_TENSORS.values(), ()))):
                t.copy_(base.state_dict()[finetune_lora.base_name(name)])
    for layer in model.modules():                      # what train.py's fresh_values draws for them
        if isinstance(layer, (LoRALinear, AdapterAttention)):
            layer.reset_parameters()
    idx = tokens()
    assert torch.equal(logits(model, idx), logits(base, idx))


def test_load_adapter_is_strict(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_adapter(apply_lora(tiny("llama")), path)
    with pytest.raises(ValueError, match=r"does not fit this model: missing layers\.2\.attn\.o\.lora_a") as e:
        load_adapter(tiny("llama", n_layer=3), path)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.gate_up\.lora_b has shape \(96, 8\), this model needs"):
        load_adapter(tiny("llama", intermediate_size=40), path)
    save_file({"x": torch.zeros(1)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="is not an adapter file"):
        load_adapter(tiny("llama"), tmp_path / "weights.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Merging into a checkpoint, and the command line


@pytest.mark.parametrize("family", ["qwen", "gemma"])                     # untied with biases; tied
def test_merge_checkpoint_loads_and_equals_the_merged_model(family, tmp_path):
    base_dir = write_checkpoint(tiny(family), tmp_path / "base")
    model = apply_lora(models.load(base_dir, device="cpu"))
    randomize_(p for p in model.parameters() if p.requires_grad)
    save_adapter(model, tmp_path / "adapter.safetensors")
    out = merge_checkpoint(base_dir, tmp_path / "adapter.safetensors", tmp_path / "merged")
    idx = tokens()
    assert_logits_close(logits(models.load(out, device="cpu"), idx), logits(merge_lora(model), idx), atol=1e-6)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json",
                                               "generation_config.json", "adapter.safetensors"}
    assert adapter_metadata(out / "adapter.safetensors")["merged"] == "true"


def test_merge_checkpoint_keeps_a_llama_adapter_beside_the_base_weights(tmp_path, capsys):
    base_dir = write_checkpoint(tiny("llama"), tmp_path / "base")
    model = apply_adapter(models.load(base_dir, device="cpu"))
    randomize_(p for p in model.parameters() if p.requires_grad)
    save_adapter(model, tmp_path / "adapter.safetensors")
    out = merge_checkpoint(base_dir, tmp_path / "adapter.safetensors", tmp_path / "out")
    assert "cannot be folded into plain weights" in capsys.readouterr().err
    assert adapter_metadata(out / "adapter.safetensors")["merged"] == "false"
    base, kept = models.load_state_dict(base_dir), models.load_state_dict(out)        # the base weights, as they are
    assert base.keys() == kept.keys() and all(torch.equal(base[k], kept[k]) for k in base)
    reloaded = load_adapter(models.load(out, device="cpu"), out / "adapter.safetensors")
    idx = tokens()
    assert torch.equal(logits(reloaded, idx), logits(model, idx))


def test_merge_cli_writes_a_checkpoint_dir(tmp_path):
    base_dir = write_checkpoint(tiny("phi3"), tmp_path / "base")
    save_adapter(apply_lora(models.load(base_dir, device="cpu")), tmp_path / "a.safetensors")
    finetune_lora.main(["merge", str(base_dir), str(tmp_path / "a.safetensors"), str(tmp_path / "merged")])
    assert models.load(tmp_path / "merged", device="cpu").config == models.read_config(base_dir)[1]


@pytest.mark.parametrize("argv, message", [
    (["merge", "{tmp}/nowhere", "{tmp}/a.safetensors", "{tmp}/out"], "checkpoint dir {tmp}/nowhere not found"),
    (["merge", "{tmp}", "{tmp}/missing.safetensors", "{tmp}/out"], "adapter file {tmp}/missing.safetensors not found"),
    (["merge", "{tmp}"], "merge takes 3 arguments, CHECKPOINT ADAPTER OUT; got 1"),
    (["{tmp}/missing.yaml", "lr=1e-3"], "recipe {tmp}/missing.yaml not found"),
    ([], "no arguments; usage: python finetune_lora.py RECIPE.yaml"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        finetune_lora.main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message.format(tmp=tmp_path) in error[0]


def test_cli_error_exits_with_status_1(tmp_path):
    r = subprocess.run([sys.executable, "finetune_lora.py", "merge", str(tmp_path / "nowhere"), "a", "b"],
                       cwd=Path(__file__).parent, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: checkpoint dir {tmp_path / 'nowhere'} not found"]


def test_recipe_cli_is_train_py_with_method_lora(tiny_dir, tmp_path, capsys):
    recipe = Path(__file__).parent / "recipes" / "smollm2_135m_lora.yaml"
    finetune_lora.main([str(recipe), f"checkpoint_dir={tiny_dir}", "model={}", f"out_dir={tmp_path}", "max_steps=1",
                        "data.max_seq_len=48", "global_batch_size=2", "micro_batch_size=2", "eval_batches=1"])
    assert adapter_metadata(tmp_path / "final" / "adapter.safetensors")["kind"] == "lora"
    assert "method: lora" in (tmp_path / "recipe.yaml").read_text()
    with pytest.raises(SystemExit):
        finetune_lora.main([str(recipe), "method=full"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: finetune_lora.py runs method=lora|qlora|adapter, got method=full; for other methods run train.py"
