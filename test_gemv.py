"""gemv.c's decoding kernels against float64 references and the model files' explicit attention; row-invariance
(the engine's batch invariance rests on it); and decoding without them (no compiler: torch's kernels)."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gemv
from models.gemma import Config as GemmaConfig
from models import llama, phi
from models.llama import Int4Linear, Int8Linear, KVCache, explicit_attention, sliding_causal_mask

pytestmark = pytest.mark.skipif(not gemv.library(), reason="gemv.c's kernels need an x86-64 CPU with AVX2")

# Shapes: SmolLM2's, the tiny test models', and widths with a tail past the kernels' 32-wide steps
SHAPES = [(960, 576), (576, 1536), (200, 64), (130, 70), (17, 1000)]


def layers(n_out, n_in, dtype):
    torch.manual_seed(n_out * n_in)
    linear = nn.Linear(n_in, n_out, bias=True)
    if dtype == "int8":
        return Int8Linear(linear), torch.bfloat16
    return linear.to(dtype), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_linear_is_as_close_to_float64_as_torch(dtype, shape):
    layer, x_dtype = layers(*shape, dtype)
    fast = gemv.GemvLinear(layer)
    with torch.no_grad():
        w = layer.weight.double() * (layer.scale.double()[:, None] if dtype == "int8" else 1)
        for M in (1, 3, gemv.MAX_ROWS):
            x = torch.randn(M, 1, shape[1]).to(x_dtype)
            exact = x.double() @ w.t() + layer.bias.double()
            ours, torchs = (fast(x).double() - exact).abs().max(), (layer(x).double() - exact).abs().max()
            # fp32 accumulation, one rounding to the output dtype (torch's bf16 rounds the bias sum once more)
            assert ours <= 2 * torchs + 1e-6, (M, ours, torchs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("width", [576, 70])            # (70: a tail past the kernels' 32-wide steps)
def test_a_row_comes_out_the_same_with_any_batch_and_thread_count(dtype, width):
    layer, x_dtype = layers(300, width, dtype)
    fast = gemv.GemvLinear(layer)
    x = torch.randn(gemv.MAX_ROWS, width).to(x_dtype)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            alone = [fast(x[m:m + 1]) for m in range(len(x))]
            for t in {1, 2, threads}:
                torch.set_num_threads(t)
                for M in range(1, len(x) + 1):
                    assert torch.equal(fast(x[:M]), torch.cat(alone[:M])), (t, M)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("N, K, group", [(960, 576, 32), (576, 1536, 32), (64, 256, 64), (48, 256, 128)])
def test_int4_kernel_multiplies_by_the_model_files_int4_weights(N, K, group):
    torch.manual_seed(N + K)
    layer = Int4Linear(nn.Linear(K, N, bias=True), group)
    fast = gemv.GemvLinear(layer)
    assert fast.max_rows == gemv.MAX_ROWS                   # torch's packing read back
    with torch.no_grad():
        # each weight, as the kernel dequantizes it (exactly, in fp32) and as torch's kernel does (rounded to bf16)
        ours = gemv.gemv(torch.eye(K), fast.weight, fast.scale)                         # (K, N): W^T
        torchs = layer(torch.eye(K)) - layer.bias
        assert ((ours - torchs).abs() <= ours.abs() * 2 ** -8 + 1e-6).all()
        for M in (1, 3, gemv.MAX_ROWS):
            x = torch.randn(M, K)
            exact = x.double() @ ours.double() + layer.bias.double()
            torch.testing.assert_close(fast(x).double(), exact, rtol=1e-5, atol=1e-5)
            assert torch.equal(torch.cat([fast(x[m:m + 1]) for m in range(M)]), fast(x))   # each row alone


def test_an_int4_packing_that_does_not_read_back_stays_with_torch(monkeypatch):
    layer = Int4Linear(nn.Linear(64, 32))
    monkeypatch.setattr(gemv, "_int4_orders", lambda N, K: torch.arange(N * K).flip(0))    # a wrong reading
    fast = gemv.GemvLinear(layer)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert fast.max_rows == 0 and torch.equal(fast(x), layer(x))


def test_many_rows_go_to_the_layer_itself():
    layer, _ = layers(64, 64, torch.float32)
    x = torch.randn(gemv.MAX_ROWS + 1, 64)
    with torch.no_grad():
        assert torch.equal(gemv.GemvLinear(layer)(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, "int8"])
def test_a_prompt_goes_to_the_kernel_where_it_is_faster_than_torchs(dtype):
    layer, x_dtype = layers(300, 576, dtype)
    fast = gemv.GemvLinear(layer)
    x = torch.randn(3 * gemv.MAX_ROWS + 1, 576).to(x_dtype)
    with torch.no_grad():
        rows = torch.cat([fast(x[m:m + 1]) for m in range(len(x))])       # one row at a time: the kernel's
        expected = rows if gemv.fast_rows(layer.weight.dtype) else layer(x)
        assert torch.equal(fast(x), expected)


NORMS = {"llama": 0, "qwen": 0, "phi": 0, "gemma": 1}          # model file -> offset: weight * n, (1 + weight) * n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", NORMS)
def test_rms_norm_kernel_computes_each_model_files_norm(family, dtype):
    import importlib
    torch.manual_seed(len(family))
    norm = importlib.import_module(f"models.{family}").RMSNorm(576, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    assert gemv.rms_norm_offset(norm) == NORMS[family]                 # found by trying both against the norm
    fast = gemv.GemvRMSNorm(norm, NORMS[family])
    x = (torch.randn(2, 5, 576) * 3).to(dtype)
    with torch.no_grad():
        ours, theirs = fast(x), norm(x)
        assert ours.dtype == dtype and ours.shape == x.shape
        n = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        w = norm.weight.double() + NORMS[family]
        if dtype == torch.float32:       # fp32 throughout: as close to float64 as torch's ops (the sum's order differs)
            exact = n * w
            assert (ours.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max() + 1e-6
        else:                            # bf16: the model file's roundings, reproduced exactly
            assert torch.equal(ours, theirs)
        rows = x.reshape(10, 576)        # each row alone: the same numbers as in the batch
        assert torch.equal(torch.cat([fast(rows[m:m + 1]) for m in range(10)]), fast(rows))


def test_norms_the_kernel_does_not_compute_stay_as_they_are():
    from models import llama

    class RMSNorm(llama.RMSNorm):       # a forked model file's norm, edited: no longer either formula
        def forward(self, x):
            return super().forward(x) + 1

    edited = RMSNorm(64, 1e-5)
    assert gemv.rms_norm_offset(edited) is None
    assert gemv.rms_norm_offset(nn.LayerNorm(64)) is None              # (Phi-2's; torch's is one kernel already)
    model = nn.Sequential(nn.Linear(64, 64), edited, llama.RMSNorm(64, 1e-5))
    assert gemv.use_for_decoding(model)
    assert isinstance(model[0], gemv.GemvLinear) and model[1] is edited and isinstance(model[2], gemv.GemvRMSNorm)


GLUS = {"llama": gemv.GLU_SILU, "qwen": gemv.GLU_SILU, "phi": gemv.GLU_SILU, "gemma": gemv.GLU_GELU_TANH}


def tiny_mlp(family, dtype, seed=0):
    """A model file's MLP (576 wide, 1536 inside: SmolLM2's), in fp32, bf16, int8 or int4 (fp32 activations), with its
    layers behind the kernels as use_for_decoding leaves them; and the dtype of its activations."""
    import importlib
    module = importlib.import_module(f"models.{family}")
    torch.manual_seed(seed)
    config = module.Config(dim=576, intermediate_size=1536, n_layer=1, n_head=9, n_kv_head=3, vocab_size=100)
    mlp = module.MLP(config)
    if dtype in ("int8", "int4"):
        quantized = module.Int8Linear if dtype == "int8" else module.Int4Linear
        mlp.gate_up, mlp.down, dtype = quantized(mlp.gate_up), quantized(mlp.down), torch.float32
    elif dtype == torch.bfloat16:
        mlp = mlp.to(dtype)
    mlp.gate_up, mlp.down = gemv.GemvLinear(mlp.gate_up), gemv.GemvLinear(mlp.down)
    return mlp, dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8", "int4"])
@pytest.mark.parametrize("family", GLUS)
def test_glu_kernel_computes_each_model_files_mlp(family, dtype):
    mlp, x_dtype = tiny_mlp(family, dtype, seed=len(family))
    assert gemv.glu_activation(mlp) == GLUS[family]                # found by trying both against the MLP
    fast = gemv.GemvGLU(mlp, GLUS[family])
    x = torch.randn(7, 576).to(x_dtype)
    with torch.no_grad():
        ours, theirs = fast(x), mlp(x)
        assert ours.dtype == x_dtype and ours.shape == x.shape
        if x_dtype == torch.bfloat16:     # bf16: the model file's roundings (gate_up's, activation's, product's)
            assert torch.equal(ours, theirs)
        else:                             # fp32: the same up to the activation's last bit
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        assert torch.equal(torch.cat([fast(x[m:m + 1]) for m in range(len(x))]), ours)       # each row alone


def test_mlps_the_kernel_does_not_compute_stay_as_they_are():
    from models import phi

    mlp, _ = tiny_mlp("llama", torch.float32)
    original = type(mlp).forward
    mlp.forward = lambda x: mlp.down(torch.relu(mlp.gate_up(x).chunk(2, dim=-1)[0]))   # a fork's edit: ungated
    assert gemv.glu_activation(mlp) is None
    mlp.forward = lambda x: original(mlp, x)
    assert gemv.glu_activation(mlp) == gemv.GLU_SILU
    config = phi.Config(dim=64, intermediate_size=96, n_layer=1, n_head=4, n_kv_head=4, vocab_size=100,
                        gelu_mlp=True)
    model = nn.Sequential(phi.MLP(config))                              # Phi-2's: gelu(up(x)), no gate
    assert gemv.use_for_decoding(model) and type(model[0]) is phi.MLP and isinstance(model[0].up, gemv.GemvLinear)


def reference_attention(q, k, v, mask, scale, softcap):
    # the model files' explicit path in float64: scores, the cap (Gemma 2), the mask, softmax, weighted values
    G = q.size(1) // k.size(1)
    k, v = k.double().repeat_interleave(G, dim=1), v.double().repeat_interleave(G, dim=1)
    scores = q.double() @ k.transpose(-2, -1) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return torch.softmax(scores + mask.double(), dim=-1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, K, S, D, window, softcap", [
    (1, 9, 3, 256, 64, None, None),         # SmolLM2-135M's heads
    (3, 4, 2, 37, 16, None, None),          # a ragged batch: each row at its own position
    (2, 8, 8, 100, 12, 7, None),            # no grouping, a sliding window, D not a multiple of 8
    (2, 4, 1, 50, 32, 10, GemmaConfig.from_name("gemma-2-2b").attn_softcap),   # Gemma 2's soft-cap
])
def test_attend_one_equals_the_explicit_attention(dtype, B, H, K, S, D, window, softcap):
    torch.manual_seed(S)
    q = torch.randn(B, H, 1, D, dtype=dtype)
    k, v = torch.randn(B, K, S, D, dtype=dtype), torch.randn(B, K, S, D, dtype=dtype)
    positions = torch.randint(window or 0, S, (B, 1))
    mask = sliding_causal_mask(positions, torch.arange(S), window, dtype)[:, None]          # (B, 1, 1, S)
    exact = reference_attention(q, k, v, mask, D ** -0.5, softcap)
    ours = gemv.attend_one(q, k, v, mask, D ** -0.5, softcap)
    assert ours.dtype == dtype and ours.shape == q.shape
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2                 # bf16: the output's rounding
    torch.testing.assert_close(ours.double(), exact, atol=tolerance, rtol=0)
    if softcap is None:                  # and as close as the model files' own explicit path, in their dtype
        theirs = explicit_attention(q, k, v, mask)
        assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max() + 1e-6
    # one mask row for the whole batch (positions shared), and each row alone: the same numbers
    shared = mask[:1, 0]                                                                   # (1, S)
    together = gemv.attend_one(q, k, v, shared, D ** -0.5, softcap)
    for b in range(B):
        assert torch.equal(gemv.attend_one(q[b:b + 1], k[b:b + 1], v[b:b + 1], shared, D ** -0.5, softcap),
                           together[b:b + 1])
    # a cache longer than what is written in it (its masked tail is skipped): the same numbers as one cut to length
    n = int(positions.max()) + 1
    assert torch.equal(gemv.attend_one(q, k[:, :, :n], v[:, :, :n], mask[..., :n], D ** -0.5, softcap), ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, K, D, R, rows, shared", [
    (1, 9, 3, 64, 64, (0, 1), True),         # SmolLM2-135M's heads, one sequence
    (3, 4, 2, 16, 16, (1, 4), False),        # the engine's batch: cache rows 1-3, each at its own position
    (2, 8, 8, 32, 16, (0, 2), False),        # Phi-2's partial rotary: the first R of D channels rotate
    (2, 4, 4, 12, 12, (0, 2), True),         # D not a multiple of 8, one position for all rows
])
def test_rope_attend_equals_rope_cache_write_and_attend_one(dtype, B, H, K, D, R, rows, shared):
    # decode_attention's one call against what it stands in for: the model files' RoPE (gemv.rope, itself checked
    # against their apply_rope), KVCache.update and attend_one. The same bits, in the output and the cache.
    torch.manual_seed(B * H * D)
    S, rows = 40, slice(*rows)
    qkv = torch.randn(B, 1, H + 2 * K, D, dtype=dtype).transpose(1, 2)      # (B, H + 2K, 1, D), as heads() gives
    q, k, v = qkv[:, :H], qkv[:, H:H + K], qkv[:, H + K:]
    positions = torch.tensor([[11]]).expand(B, 1) if shared else torch.randint(0, S, (B, 1))
    angles = positions[..., None] * torch.rand(R // 2) * 0.7                 # (B, 1, R/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)[:, None]  # (B, 1, 1, R), as the models give
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).to(dtype)[:, None]
    input_pos = positions[0] if shared else positions                         # (1,) or (B, 1)
    mask = sliding_causal_mask(input_pos, torch.arange(S), None, dtype)
    mask = mask if shared else mask[:, None]
    if shared:
        cos, sin = cos[0, 0], sin[0, 0]                                       # (1, R)
    earlier = torch.randn(2, 4, K, S, D, dtype=dtype)                        # earlier positions' keys and values
    caches = [KVCache(4, K, S, D, dtype=dtype) for _ in range(2)]
    for cache in caches:
        cache.k.copy_(earlier[0])
        cache.v.copy_(earlier[1])
    ours = gemv.decode_attention(q, k, v, cos, sin, caches[0], input_pos, rows, mask, D ** -0.5)
    k_cache, v_cache = caches[1].update(input_pos, gemv.rope(k, cos, sin), v, rows)
    theirs = gemv.attend_one(gemv.rope(q, cos, sin), k_cache, v_cache, mask, D ** -0.5)
    assert ours.dtype == dtype and torch.equal(ours, theirs)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    # gemv.rope is the model files' RoPE: Llama's (full), Phi's (full or partial)
    if R == D:
        assert torch.equal(gemv.rope(q, cos, sin), llama.apply_rope(q, cos, sin))
    assert torch.equal(gemv.rope(q, cos, sin), phi.apply_rope(q, cos, sin))


def test_a_fork_that_rotates_otherwise_keeps_its_own_attention(tiny_dir):
    # decode_attention computes the model files' RoPE ("rotate half"): a fork whose heads() rotates interleaved pairs
    # (GPT-J's RoPE) is found out by rope_fits and decodes through its own code, with the same numbers as without
    # generate.py's kernels; the model file's own Attention fits.
    import generate
    from generate import LLM

    def interleaved(x, cos, sin):
        pairs = x.unflatten(-1, (-1, 2))                                      # (x0, x1), (x2, x3), ...
        c, s = cos[..., : x.size(-1) // 2], sin[..., x.size(-1) // 2:]          # a cos and a sin per pair
        return torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 1] * c + pairs[..., 0] * s],
                           dim=-1).flatten(-2)

    class Fork(llama.Attention):
        def heads(self, x, cos, sin):
            q, k, v = super().heads(x, None, None)
            return (q, k, v) if cos is None else (interleaved(q, cos, sin), interleaved(k, cos, sin), v)

    model = LLM.load(tiny_dir).model
    assert gemv.rope_fits(model.layers[0].attn)
    for block in model.layers:
        block.attn.__class__ = Fork
    assert not gemv.rope_fits(model.layers[0].attn)
    ids = torch.tensor([list(range(5, 17))])

    def decode(kernel=None):                 # the logits of 4 cached steps after a prompt of 12
        model.setup_cache(1, 32)
        with torch.inference_mode(), generate.explicit_attention(model) if kernel else contextlib.nullcontext():
            if kernel == "forced":
                for block in model.layers:
                    vars(block.attn)["decode_attention"] = gemv.decode_attention
            model(ids, torch.arange(12))
            return torch.cat([model(torch.tensor([[20 + t]]), torch.tensor([12 + t])) for t in range(4)], dim=1)

    with torch.inference_mode(), generate.explicit_attention(model):
        assert all(vars(block.attn)["decode_attention"] is None for block in model.layers)
    own = decode()                           # the fork's own SDPA path, no kernels
    torch.testing.assert_close(decode("generate"), own, atol=1e-4, rtol=0)
    assert (decode("forced") - own).abs().max() > 1e-2                    # (the kernel's RoPE is not the fork's)


@pytest.mark.parametrize("family", ["llama", "mistral", "phi3", "qwen3", "gemma2", "gemma3", "phi"])
def test_decode_block_gives_the_blocks_own_bits(family, tmp_path):
    # Decoding with each block as one call against the same model decoding through its blocks' own forward (with
    # gemv's modules and decode_attention in both): the same logits and KV caches bit for bit, in fp32, bf16 and
    # int8, one sequence and a batch with each row at its own position and cache row (the engine's decoding).
    import convert_hf
    import generate
    import models
    from conftest import perturb_
    from test_generate import family_models
    from transformers import LlamaConfig, LlamaForCausalLM
    make = family_models().get(family) or (lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)))
    torch.manual_seed(0)
    perturb_(make().eval(), scale=0.5).save_pretrained(tmp_path / "hf")
    convert_hf.hf_to_native(tmp_path / "hf", tmp_path / "native")
    for dtype, quantize in [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "int8")]:
        results = []
        for one_call in (True, False):
            model = generate.prepare_for_inference(models.load(tmp_path / "native", device="cpu", dtype=dtype),
                                                   quantize)
            if not one_call:
                for block in model.layers:
                    vars(block)["_decode_block"] = None                   # decode_block: none for this block
            model.setup_cache(4, 64)
            logits = []
            with torch.inference_mode():
                for row, n in enumerate([5, 19, 3]):                       # prompts, each in its own cache row
                    with generate.explicit_attention(model):
                        model(torch.arange(10, 10 + n)[None], torch.arange(n), cache_rows=slice(row, row + 1))
                for t in range(12):                                        # past the sliding windows of 8
                    with generate.explicit_attention(model):
                        logits.append(model(torch.tensor([[7 + t]]), torch.tensor([19 + t]), cache_rows=slice(1, 2)))
                        logits.append(model(torch.tensor([[7], [8], [9]]), torch.tensor([[5 + t], [20 + t], [3 + t]]),
                                            cache_rows=slice(0, 3)))
            caches = [t for block in model.layers for t in (block.attn.kv_cache.k, block.attn.kv_cache.v)]
            results.append((logits, caches, [gemv.decode_block(block) is not None for block in model.layers]))
            assert not any("forward" in vars(block) for block in model.layers)  # the blocks' own forward again
        (ours, our_caches, kept), (theirs, their_caches, _) = results
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), (dtype, quantize)
        assert all(torch.equal(a, b) for a, b in zip(our_caches, their_caches)), (dtype, quantize)
        assert all(kept), (dtype, quantize)                                  # every family's blocks keep it


def test_a_block_edited_otherwise_keeps_its_own_forward(tiny_dir):
    # A fork's block built of the same parts but adding the MLP's output at half weight: DecodeBlock's first call
    # finds the difference, returns the block's own numbers, and the block decodes as written from then on.
    import generate
    from generate import LLM

    class Fork(llama.Block):
        def forward(self, x, cos, sin, mask, input_pos=None, cache_rows=None):
            x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos, cache_rows)
            return x + 0.5 * self.mlp(self.mlp_norm(x))

    model = LLM.load(tiny_dir).model
    ids = torch.tensor([list(range(5, 17))])

    def decode(fork, one_call=True):
        for block in model.layers:
            block.__class__ = Fork if fork else llama.Block
            vars(block).pop("_decode_block", None)
            if not one_call:
                vars(block)["_decode_block"] = None                       # the blocks' own forward throughout
        model.setup_cache(1, 32)
        with torch.inference_mode():
            model(ids, torch.arange(12))
            steps = []
            for t in range(4):
                with generate.explicit_attention(model):
                    steps.append(model(torch.tensor([[20 + t]]), torch.tensor([12 + t])))
        return torch.cat(steps, dim=1), [gemv.decode_block(block) is not None for block in model.layers]

    plain, kept = decode(fork=False)
    assert kept == [True, True]
    forked, kept = decode(fork=True)
    assert kept == [False, False] and (forked - plain).abs().max() > 1e-3      # the fork's numbers, not Block's
    assert torch.equal(decode(fork=True, one_call=False)[0], forked)           # exactly the fork's own


def test_compiled_decoding_leaves_one_call_blocks_to_the_kernel(tiny_dir):
    # --compile on a CPU compiles only the blocks that do not decode as one call (faster than their graphs): for a
    # Llama none, and the same greedy text as eager decoding
    import generate
    from generate import LLM
    compiled = LLM.load(tiny_dir, compile=True)
    blocks = getattr(compiled.decode_fn, "decode_fn", compiled.decode_fn)
    assert isinstance(blocks, generate.CompiledBlocks)
    text = compiled.generate("Once upon a time", max_new_tokens=12, temperature=0)
    assert blocks.graphs == [] and all(gemv.decode_block(block) for block in compiled.model.layers)
    assert text == LLM.load(tiny_dir).generate("Once upon a time", max_new_tokens=12, temperature=0)


def test_without_a_compiler_decoding_uses_torch_and_says_so(tiny_dir, tmp_path):
    # A fresh process whose compiler fails and whose kernel cache is empty: one line on stderr, the same text
    code = ("from generate import LLM; import gemv; "
            f"llm = LLM.load({str(tiny_dir)!r}); "
            "assert not any(isinstance(m, gemv.GemvLinear) for m in llm.model.modules()); "
            "print(llm.generate('Once upon a time', max_new_tokens=12, temperature=0))")
    env = {**os.environ, "CC": "false", "CXX": "false", "FLATLM_CACHE": str(tmp_path)}
    without = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                             cwd=Path(__file__).parent)
    assert without.returncode == 0, without.stderr
    assert "gemv: decoding with torch's kernels" in without.stderr
    from generate import LLM
    llm = LLM.load(tiny_dir)
    assert any(isinstance(m, gemv.GemvLinear) for m in llm.model.modules())
    assert without.stdout.strip() == llm.generate("Once upon a time", max_new_tokens=12, temperature=0).strip()


@pytest.mark.parametrize("tied", [True, False])
def test_bench_counts_each_weight_once_behind_the_kernels(tied):
    # bench_generate's bytes per token: a tied head read once (GemvLinear holds a view of the embedding table), an
    # untied one read whole, and one embedding row; the same before and after the kernels' layers are swapped in.
    import bench_generate
    import generate
    from models.llama import Config, Transformer
    config = Config(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, dim=64, intermediate_size=96, max_seq_len=32,
                    tie_embeddings=tied)
    model = Transformer(config).eval()
    model.setup_cache(1, 32)
    weights = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("tok_embeddings")) * 4
    kv = 2 * 2 * (2 * 16 * 16) * 4                                  # layers x (k, v) x (heads x positions x dim)
    expected = weights + (256 * 64 * 4 if tied else 64 * 4) + kv            # the table, or one row of it
    assert bench_generate.bytes_per_token(model, 16) == expected
    generate.prepare_for_inference(model)
    assert isinstance(model.lm_head, gemv.GemvLinear)
    assert bench_generate.bytes_per_token(model, 16) == expected


def test_bench_counts_what_the_int4_kernel_reads():
    # int4 behind the kernel: its unpacked copy (half a byte a weight, as torch's packing) and fp32 (scale, zero)
    # pairs, 8 bytes per group of 32 (the layer's own are bf16: 4)
    import bench_generate
    import generate
    from models.llama import Config, Transformer
    config = Config(vocab_size=256, n_layer=1, n_head=4, n_kv_head=2, dim=64, intermediate_size=96, max_seq_len=32)
    model = Transformer(config).eval()
    model.setup_cache(1, 32)
    generate.prepare_for_inference(model, "int4")
    int4 = [m for m in model.modules() if isinstance(m, gemv.GemvLinear) and m.weight.dtype == torch.uint8]
    assert int4 and all(m.max_rows for m in int4)
    before = sum(m.layer.weight.numel() + m.layer.scale_zero.numel() * 2 for m in int4)
    after = sum(m.weight.numel() + m.scale.numel() * 4 for m in int4)
    assert after == before + sum(m.layer.scale_zero.numel() * 2 for m in int4)
    swapped = bench_generate.bytes_per_token(model, 16)
    for m in int4:
        m.max_rows = 0                                       # the layers themselves: what torch's kernel reads
    assert swapped == bench_generate.bytes_per_token(model, 16) + after - before
