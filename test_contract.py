"""The model-file contract written at the top of models/__init__.py, checked for every registered family: each check
exercises what a shared script does with a model file (on a tiny model) and fails naming the piece that is missing
or wrong. The fork tests follow the README's "Add a model family" steps with a renamed copy of models/llama.py."""

import dataclasses
import inspect
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import finetune_lora
import models
from conftest import assert_batched_decoding_matches_alone, assert_meta_init_equals_plain_build

# Only the sizes: every other Config field keeps its default, and the result is a small working model.
TINY = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, dim=32, intermediate_size=48, max_seq_len=64)
CONFIG_FIELDS = ("name", "vocab_size", "n_layer", "n_head", "n_kv_head", "dim", "head_dim", "intermediate_size",
                 "norm_eps", "max_seq_len", "tie_embeddings")
QUANTIZE_MODES = ("int8", "int4", "nf4", "fp4", "bnb.int8")


def need(ok, m, piece: str):
    """Fail naming the model file and the piece of the contract it breaks."""
    assert ok, f"models/{family_name(m)}.py breaks the model-file contract: {piece} (see models/__init__.py)"


def family_name(m) -> str:
    return m.__name__.rpartition(".")[2]


def has_params(fn, *names) -> bool:
    return callable(fn) and all(n in inspect.signature(fn).parameters for n in names)


def raises(error, fn, *args) -> bool:
    try:
        fn(*args)
    except error:
        return True
    except Exception:
        return False
    return False


def holds(assertion, *args, **kwargs) -> bool:
    """Whether a conftest assert_* helper passes."""
    try:
        assertion(*args, **kwargs)
    except AssertionError:
        return False
    return True


def close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= atol


def tiny_model(m, seed: int = 0, **extra):
    """A tiny model with every parameter moved off its init (norms off 1, biases off 0), in eval mode."""
    torch.manual_seed(seed)
    model = m.Transformer(m.Config(**TINY, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    return model


def tokens(shape=(2, 12), seed: int = 0):
    return torch.randint(0, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# The checks, in the order of the contract


def check_registration(m):
    family = family_name(m)
    need(family in models.FAMILIES and models.module(family) is m, m, f"{family!r} listed in models.FAMILIES")
    types = getattr(m, "HF_MODEL_TYPES", None)
    need(isinstance(types, tuple) and types and all(isinstance(t, str) for t in types), m,
         "HF_MODEL_TYPES, a tuple of the Hugging Face model_type values Config.from_hf reads")
    for t in types:
        need(models.family_of_hf({"model_type": t}) == family, m, f"HF model_type {t!r} read by this family alone")


def check_config(m):
    Config = getattr(m, "Config", None)
    need(Config is not None and dataclasses.is_dataclass(Config), m, "Config, a dataclass")
    names = {f.name for f in dataclasses.fields(Config)}
    for name in CONFIG_FIELDS:
        need(name in names, m, f"Config.{name}")
    presets = getattr(m, "PRESETS", None)
    need(isinstance(presets, dict) and presets, m, "PRESETS, {preset name: Config fields}")
    for method in ("from_name", "from_dict", "to_dict", "from_hf", "to_hf"):
        need(callable(getattr(Config, method, None)), m, f"Config.{method}")
    for name in presets:
        need(Config.from_name(name).name == name, m, f"Config.from_name({name!r}) naming its preset")
    need(raises(ValueError, Config.from_name, "no-such-preset"), m, "Config.from_name(unknown) raising a ValueError")
    config = Config(**TINY)
    d = config.to_dict()
    need(d.get("family") == family_name(m), m, f'Config.to_dict() holding "family": "{family_name(m)}"')
    need(Config.from_dict(d) == config, m, "Config.from_dict(config.to_dict()) == config")
    need(Config.from_hf(config.to_hf()) == config, m, "Config.from_hf(config.to_hf()) == config")


def check_transformer(m):
    model = tiny_model(m)
    c = model.config
    need(isinstance(getattr(model, "tok_embeddings", None), nn.Embedding), m, "Transformer.tok_embeddings, an "
         "nn.Embedding")
    need(isinstance(getattr(model, "lm_head", None), nn.Linear) and model.lm_head.out_features == c.vocab_size, m,
         "Transformer.lm_head, an nn.Linear dim -> vocab_size")
    need(isinstance(getattr(model, "layers", None), nn.ModuleList) and len(model.layers) == c.n_layer, m,
         "Transformer.layers, an nn.ModuleList of n_layer blocks")
    need(isinstance(getattr(model, "norm", None), nn.Module), m, "Transformer.norm, the final norm")
    tied = m.Transformer(m.Config(**TINY, tie_embeddings=True))
    need(tied.lm_head.weight is tied.tok_embeddings.weight, m, "lm_head.weight is tok_embeddings.weight when tied")
    need(has_params(type(model).forward, "idx", "input_pos", "cache_rows"), m,
         "Transformer.forward(idx, input_pos=None, cache_rows=None)")
    need(has_params(getattr(model, "setup_cache", None), "batch_size", "max_seq_len", "device", "dtype"), m,
         "Transformer.setup_cache(batch_size, max_seq_len, device=None, dtype=None)")
    need(callable(getattr(model, "clear_cache", None)), m, "Transformer.clear_cache()")
    need(callable(getattr(model, "_init_weights", None)), m, "Transformer._init_weights(module)")
    with torch.no_grad():
        out = model(tokens())
    need(out.shape == (2, 12, c.vocab_size), m, "forward(idx (B, T)) -> logits (B, T, vocab_size)")
    need(has_params(type(model).forward, "hidden") and callable(getattr(model, "output", None)), m,
         "Transformer.forward(idx, hidden=True) and Transformer.output(h)")
    with torch.no_grad():
        h = model(tokens(), hidden=True)
    need(h.shape == (2, 12, c.dim), m, "forward(idx, hidden=True) -> the final norm's output (B, T, dim)")
    need(torch.equal(model.output(h), out), m, "output(forward(idx, hidden=True)) == forward(idx)")


def check_blocks(m):
    model = tiny_model(m)
    c = model.config
    for i, block in enumerate(model.layers):
        for name in ("attn", "mlp"):
            need(isinstance(getattr(block, name, None), nn.Module), m, f"layers[{i}].{name}")
        need(has_params(block.forward, "x", "cos", "sin", "mask", "input_pos", "cache_rows"), m,
             "block.forward(x, cos, sin, mask, input_pos=None, cache_rows=None)")
        attn = block.attn
        need(has_params(attn.forward, "x", "cos", "sin", "mask", "input_pos", "cache_rows"), m,
             "attn.forward(x, cos, sin, mask, input_pos=None, cache_rows=None)")
        need(getattr(attn, "config", None) is c, m, "attn.config, the model's Config")
        need(isinstance(getattr(attn, "o", None), nn.Linear) and attn.o.out_features == c.dim, m,
             "attn.o, the output projection to dim")
        need(hasattr(attn, "kv_cache") and attn.kv_cache is None, m, "attn.kv_cache, None until setup_cache")
        need(has_params(getattr(attn, "heads", None), "x", "cos", "sin"), m, "attn.heads(x, cos, sin) -> q, k, v")
        for parent in ("attn", "mlp"):
            for name, child in getattr(block, parent).named_children():
                need(not isinstance(child, nn.Linear) or name in finetune_lora.LORA_TARGETS, m,
                     f"layers[{i}].{parent}.{name}: a linear named from finetune_lora.LORA_TARGETS")
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            last = name.rpartition(".")[2]
            need(name == "norm" or last.endswith("_norm") and last != "final_norm", m,
                 f"{name}: norms are named norm (the final one), <sublayer>_norm, post_<sublayer>_norm, q_norm, "
                 f"k_norm")


def check_kv_cache(m):
    model = tiny_model(m)
    c = model.config
    idx = tokens((2, 20))
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(2, 24)
        for i, block in enumerate(model.layers):
            cache = block.attn.kv_cache
            need(cache is not None and cache.k.shape == cache.v.shape == (2, c.n_kv_head, 24, c.head_dim), m,
                 f"setup_cache gives layers[{i}].attn.kv_cache .k and .v of (batch, n_kv_head, max_seq_len, "
                 f"head_dim)")
        decoded = [model(idx[:, :5], torch.arange(5))] + [model(idx[:, t:t + 1], torch.tensor([t]))
                                                          for t in range(5, 20)]
    need(close(torch.cat(decoded, dim=1), full, 1e-5), m, "forward(idx, input_pos (T,)) through the KV cache "
         "giving the logits of a full forward")
    model.clear_cache()
    need(all(block.attn.kv_cache is None for block in model.layers), m, "clear_cache() sets every kv_cache to None")
    need(raises(ValueError, model.setup_cache, 1, c.max_seq_len + 1), m, "setup_cache past config.max_seq_len "
         "raising a ValueError")
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, c.vocab_size, (n,), generator=g) for n in (14, 9)]
    need(holds(assert_batched_decoding_matches_alone, model, sequences, [4, 2], first_slot=1, n_slots=3), m,
         "forward(idx, input_pos (B, T), cache_rows=slice) decoding each row as if alone, other slots untouched")


def check_init_weights(m):
    need(holds(assert_meta_init_equals_plain_build, m, m.Config(**TINY)), m, "model.apply(model._init_weights) "
         "setting every parameter: meta + to_empty + _init_weights from a seed equals a plain build")


def check_weight_mapping(m):
    for name in ("hf_weight_map", "hf_split_sizes", "from_hf", "to_hf"):
        need(callable(getattr(m, name, None)), m, f"{name}()")
    model = tiny_model(m)
    config = model.config
    state = {k: v for k, v in model.state_dict().items() if not (config.tie_embeddings and k == "lm_head.weight")}
    need(set(m.hf_weight_map(config)) == set(state), m, "hf_weight_map(config) keys == the state_dict names")
    hf = list(m.to_hf(state.items(), config))
    back = dict(m.from_hf(reversed(hf), config))                        # any order
    need(back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state), m,
         "from_hf(to_hf(state)) == state")
    need(raises(ValueError, list, m.from_hf(hf[1:], config)), m, "from_hf raising a ValueError for a missing weight")
    need(raises(ValueError, list, m.from_hf(hf + [("model.no_such.weight", torch.zeros(1))], config)), m,
         "from_hf raising a ValueError for an unexpected weight")


def check_quantize(m):
    need(callable(getattr(m, "quantize", None)), m, "quantize(model, mode)")
    need(set(QUANTIZE_MODES) <= set(getattr(m, "QUANTIZE_MODES", ())), m, f"QUANTIZE_MODES covering {QUANTIZE_MODES}")
    model = tiny_model(m)
    idx = tokens()
    with torch.no_grad():
        before = model(idx)
        models.quantize(model, "int8")
        after = model(idx)
    swapped = [type(child).__name__ for block in model.layers for parent in (block.attn, block.mlp)
               for child in parent.children() if hasattr(child, "in_features")]
    need(swapped and all(kind == "Int8Linear" for kind in swapped), m, "quantize(model, 'int8') swaps the block "
         "linears for Int8Linear")
    need(((after - before).norm() / before.norm()).item() < 0.05, m, "int8 logits within 5% of the model's")
    need(raises(ValueError, m.quantize, tiny_model(m), "int3"), m, "quantize(model, unknown mode) raising a ValueError")


def check_peft(m):
    # LoRA wraps the linears; LLaMA-Adapter wraps attn and calls attn.forward / attn.heads, decoding through the
    # cache: both start as exact no-ops.
    idx = tokens((2, 10))
    base = tiny_model(m)
    with torch.no_grad():
        expected = base(idx)
    lora = finetune_lora.apply_lora(tiny_model(m), r=2)
    with torch.no_grad():
        need(close(lora(idx), expected, 1e-6), m, "LoRA on the attn / mlp linears, starting as a no-op")
    adapter = finetune_lora.apply_adapter(tiny_model(m), prompt_len=3, n_layers=1)
    adapter.setup_cache(2, 10)
    with torch.no_grad():
        decoded = torch.cat([adapter(idx[:, :4], torch.arange(4))] +
                            [adapter(idx[:, t:t + 1], torch.tensor([t])) for t in range(4, 10)], dim=1)
    need(close(decoded, expected, 1e-5), m, "LLaMA-Adapter around attn (attn.forward, attn.heads, attn.o, "
         "attn.kv_cache), decoding through the cache as a no-op")


CHECKS = [check_registration, check_config, check_transformer, check_blocks, check_kv_cache, check_init_weights,
          check_weight_mapping, check_quantize, check_peft]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("family", models.FAMILIES)
def test_model_file_keeps_the_contract(family, check):
    check(models.module(family))


def test_each_hf_model_type_belongs_to_one_family():
    owners = {}
    for family in models.FAMILIES:
        for t in models.module(family).HF_MODEL_TYPES:
            assert t not in owners, f"HF model_type {t!r} is claimed by both {owners[t]} and {family}"
            owners[t] = family


# ----------------------------------------------------------------------------------------------------------------
# Forking: a copy of models/llama.py registered as README's "Add a model family" says


@pytest.fixture
def register_fork(tmp_path, monkeypatch):
    """fork(name, edit) writes edit(llama.py's text) as models/<name>.py (in a temporary folder added to the models
    package's path), adds name to models.FAMILIES, and returns the imported module."""
    source = Path(models.__path__[0]) / "llama.py"
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])

    def fork(name: str, edit=lambda text: text):
        text = edit(source.read_text())                                          # 1. copy models/llama.py
        text = text.replace('"family": "llama"', f'"family": "{name}"')          # 2. rename the family,
        text = text.replace('HF_MODEL_TYPES = ("llama", "mistral")', f'HF_MODEL_TYPES = ("{name}",)')  # its HF types
        (tmp_path / f"{name}.py").write_text(text)
        monkeypatch.setattr(models, "FAMILIES", (*models.FAMILIES, name))        # 3. list it in FAMILIES
        module = models.module(name)
        monkeypatch.setitem(sys.modules, f"models.{name}", module)               # forgotten after the test
        return module

    return fork


def test_a_renamed_copy_of_llama_registers_and_keeps_the_contract(register_fork):
    fork = register_fork("olmo")
    assert models.family_of_hf({"model_type": "olmo"}) == "olmo"
    for check in CHECKS:
        check(fork)


@pytest.mark.parametrize("name, renamed", [("setup_cache", "setup_caches"), ("tok_embeddings", "embed"),
                                           ("_init_weights", "init_weights"), ("heads(", "split_heads(")])
def test_a_copy_with_a_contract_name_renamed_fails_naming_it(register_fork, name, renamed):
    # Renamed everywhere in the copy, so the copy is a consistent model that merely breaks the contract.
    family = f"broken_{renamed.strip('(')}"                                # one module name per copy
    fork = register_fork(family, lambda text: text.replace(name, renamed))
    message = rf"models/{family}\.py breaks the model-file contract: [^\n]*{re.escape(name.strip('('))}"
    with pytest.raises(AssertionError, match=message):
        for check in CHECKS:
            check(fork)
