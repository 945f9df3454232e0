"""The Llama family in one file: Llama 2 / 3 / 3.1 / 3.2 / 3.3, Mistral, TinyLlama, SmolLM2, CodeLlama,
DeepSeek-R1-Distill-Llama.

A decoder-only transformer: token embedding -> N x (RMSNorm -> attention -> residual, RMSNorm -> SwiGLU MLP ->
residual) -> RMSNorm -> linear head. Read it top to bottom: Config and presets, RMSNorm, RoPE, the KV cache,
attention, MLP, block, model, the Hugging Face weight mapping, and the quantized linear.

Shapes: B batch, T tokens in this call, S cached positions, C model width (dim), H query heads, K key/value heads,
D head_dim. Weights use the Hugging Face layout (rotate-half RoPE), with q/k/v and gate/up fused into one matmul.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Config

# The Hugging Face config.json model_type values that Config.from_hf reads. models.family_of_hf finds this
# file by them.
HF_MODEL_TYPES = ("llama", "mistral")


@dataclass
class Config:
    name: str = ""
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32                 # query heads (H)
    n_kv_head: int = 32              # key/value heads (K): K == H is MHA, 1 < K < H is GQA, K == 1 is MQA
    dim: int = 4096                  # model width (C)
    head_dim: int = 0                # D; 0 means dim // n_head
    intermediate_size: int = 11008   # MLP hidden width
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
                                      #  "original_max_seq_len"} or {"type": "linear", "factor"}
    max_seq_len: int = 4096
    sliding_window: int | None = None  # Mistral v0.1: each token sees itself and the 4095 before it
    tie_embeddings: bool = False     # the head reuses the token embedding matrix
    attn_bias: bool = False          # q/k/v/o biases (off in every published Llama; HF allows them)
    mlp_bias: bool = False

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    @classmethod
    def from_name(cls, name: str) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"unknown llama preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """From a native config.json (the fields of this dataclass, plus "family")."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {"family": "llama", **asdict(self)}

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        """From a Hugging Face config.json: Hub style (rope_theta, rope_scaling) or transformers-5 style
        (rope_parameters holding rope_theta and the scaling)."""
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind == "llama3":
            scaling = {"type": "llama3", "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
                       "high_freq_factor": rope["high_freq_factor"],
                       "original_max_seq_len": rope["original_max_position_embeddings"]}
        elif kind == "linear":
            scaling = {"type": "linear", "factor": rope["factor"]}
        else:
            raise ValueError(f"rope type {kind!r} is not supported by models/llama.py; "
                             f"supported: default, llama3, linear")
        sliding_window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        n_head = hf["num_attention_heads"]
        return cls(
            name=hf.get("_name_or_path", "") or "",
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            dim=hf["hidden_size"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
            intermediate_size=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_base=rope_base,
            rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 4096),
            sliding_window=sliding_window,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            attn_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
        )

    def to_hf(self) -> dict:
        """A transformers config.json for this model (LlamaForCausalLM, or MistralForCausalLM with a window)."""
        mistral = self.sliding_window is not None
        hf = {
            "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
            "model_type": "mistral" if mistral else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_base,
            "tie_word_embeddings": self.tie_embeddings,
        }
        if mistral:
            hf["sliding_window"] = self.sliding_window
        else:
            hf.update(attention_bias=self.attn_bias, mlp_bias=self.mlp_bias)
        if self.rope_scaling:
            s = dict(self.rope_scaling)
            hf["rope_scaling"] = {"rope_type": s.pop("type"), **s}
            if "original_max_seq_len" in s:
                hf["rope_scaling"]["original_max_position_embeddings"] = hf["rope_scaling"].pop("original_max_seq_len")
        return hf


# Published sizes. Sources: each model's config.json on the Hugging Face Hub (and the Llama 2 / 3 / 3.1 papers).
_LLAMA31_SCALING = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_seq_len": 8192}
_LLAMA32_SCALING = {**_LLAMA31_SCALING, "factor": 32.0}
_LLAMA2_7B = dict(vocab_size=32000, n_layer=32, n_head=32, n_kv_head=32, dim=4096, intermediate_size=11008,
                  rope_base=10000.0, max_seq_len=4096)
_LLAMA3_8B = dict(vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, dim=4096, intermediate_size=14336,
                  rope_base=500000.0, max_seq_len=8192)
_LLAMA3_70B = dict(_LLAMA3_8B, n_layer=80, n_head=64, dim=8192, intermediate_size=28672)
_LLAMA31_8B = dict(_LLAMA3_8B, rope_scaling=_LLAMA31_SCALING, max_seq_len=131072)
_LLAMA31_70B = dict(_LLAMA3_70B, rope_scaling=_LLAMA31_SCALING, max_seq_len=131072)
_MISTRAL_7B = dict(vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, dim=4096, intermediate_size=14336,
                   rope_base=10000.0, max_seq_len=32768, sliding_window=4096)
PRESETS = {
    "Llama-2-7b": _LLAMA2_7B,
    "Llama-2-13b": dict(_LLAMA2_7B, n_layer=40, n_head=40, n_kv_head=40, dim=5120, intermediate_size=13824),
    "Llama-2-70b": dict(_LLAMA2_7B, n_layer=80, n_head=64, n_kv_head=8, dim=8192, intermediate_size=28672),
    "CodeLlama-7b": dict(_LLAMA2_7B, vocab_size=32016, rope_base=1000000.0, max_seq_len=16384),
    "Llama-3-8B": _LLAMA3_8B,
    "Llama-3-70B": _LLAMA3_70B,
    "Llama-3.1-8B": _LLAMA31_8B,
    "Llama-3.1-70B": _LLAMA31_70B,
    "Llama-3.1-405B": dict(_LLAMA31_8B, n_layer=126, n_head=128, dim=16384, intermediate_size=53248),
    "Llama-3.2-1B": dict(_LLAMA31_8B, n_layer=16, n_head=32, dim=2048, head_dim=64, intermediate_size=8192,
                         rope_scaling=_LLAMA32_SCALING, tie_embeddings=True),
    "Llama-3.2-3B": dict(_LLAMA31_8B, n_layer=28, n_head=24, dim=3072, head_dim=128, intermediate_size=8192,
                         rope_scaling=_LLAMA32_SCALING, tie_embeddings=True),
    "Llama-3.3-70B": _LLAMA31_70B,
    "Mistral-7B-v0.1": _MISTRAL_7B,
    "Mistral-7B-v0.3": dict(_MISTRAL_7B, vocab_size=32768, rope_base=1000000.0, sliding_window=None),
    "TinyLlama-1.1B": dict(vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4, dim=2048, intermediate_size=5632,
                           rope_base=10000.0, max_seq_len=2048),
    "SmolLM2-135M": dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, dim=576, intermediate_size=1536,
                         rope_base=100000.0, max_seq_len=8192, tie_embeddings=True),
    "SmolLM2-360M": dict(vocab_size=49152, n_layer=32, n_head=15, n_kv_head=5, dim=960, intermediate_size=2560,
                         rope_base=100000.0, max_seq_len=8192, tie_embeddings=True),
    "SmolLM2-1.7B": dict(vocab_size=49152, n_layer=24, n_head=32, n_kv_head=32, dim=2048, intermediate_size=8192,
                         rope_base=130000.0, max_seq_len=8192, tie_embeddings=True),
    "DeepSeek-R1-Distill-Llama-8B": _LLAMA31_8B,
    "DeepSeek-R1-Distill-Llama-70B": _LLAMA31_70B,
}


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight. Half-precision inputs are normalised in
# fp32 and cast back before the weight multiplies, as HF does.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:                                        # one fused kernel
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype) * self.weight


# ----------------------------------------------------------------------------------------------------------------
# RoPE (rotary position embedding, Su et al. 2021). Channel pair (i, i + D/2) of q and k is rotated by the angle
# pos * inv_freq[i], inv_freq[i] = base^(-2i/D), so q.k depends only on the distance between the two positions.
# Long-context variants stretch the slow (long-wavelength) frequencies:
#   linear (Chen et al. 2023): every frequency / factor.
#   llama3 (Llama 3.1): wavelengths longer than original_len / low_freq_factor are divided by factor, shorter
#     than original_len / high_freq_factor are kept, and the band between is interpolated smoothly.


def rope_inv_freq(config: Config, device=None) -> torch.Tensor:
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, D, 2, device=device).float() / D))  # (D/2,)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["type"] == "llama3":
        factor, old_len = scaling["factor"], scaling["original_max_seq_len"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)                 # 0 at the slow edge, 1 at the fast edge
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(in_band, smoothed, scaled)
    raise ValueError(f"unknown rope scaling type {scaling['type']!r}; supported: linear, llama3")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor):
    """cos and sin of every (position, channel) angle: (T, D). The sin has its first half negated so that
    apply_rope is a roll and two multiplies."""
    angles = positions.float()[:, None] * inv_freq[None, :]                # (T, D/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1)
    return cos, sin


def apply_rope(x, cos, sin):
    # x: (B, heads, T, D). Pairs (i, i + D/2) rotate together: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    # roll swaps the halves to (x2, x1) and the signed sin supplies the minus: the "rotate half" form of HF.
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


# ----------------------------------------------------------------------------------------------------------------
# KV cache: preallocated key/value buffers, one row per sequence (a "slot" when serving). Decoding step t writes
# its keys and values at input_pos and attends to every position written so far; static shapes keep torch.compile
# and CUDA graphs happy.


class KVCache(nn.Module):
    def __init__(self, batch_size, n_kv_head, max_seq_len, head_dim, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)             # (rows, K, S, D)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos, k, v, rows: slice):
        # k, v: (B, K, T, D) written into the cache rows `rows` (a view: no cache memory is copied), at input_pos:
        # (T,), the same positions in every row, or (B, T), row b at its own positions. -> those rows (B, K, S, D)
        cache_k, cache_v = self.k[rows], self.v[rows]
        if cache_k.size(0) != k.size(0):
            raise ValueError(f"cache_rows {rows} selects {cache_k.size(0)} of the cache's {self.k.size(0)} rows "
                             f"for a batch of {k.size(0)}")
        if input_pos.dim() == 1:
            cache_k.index_copy_(2, input_pos, k)
            cache_v.index_copy_(2, input_pos, v)
        else:
            index = input_pos[:, None, :, None].expand_as(k)               # (B, K, T, D): row b's positions
            cache_k.scatter_(2, index, k)
            cache_v.scatter_(2, index, v)
        return cache_k, cache_v


# ----------------------------------------------------------------------------------------------------------------
# Attention (Vaswani et al. 2017): each query takes a weighted mean of the values, weighted by how well it matches
# each key: softmax(q k^T / sqrt(D) + mask) v, where the mask adds -inf wherever a query may not look (the future;
# beyond a sliding window). explicit_attention spells that out; F.scaled_dot_product_attention (SDPA) computes the
# same in one fused kernel that never holds the (T, S) score matrix, and is what runs (but in generate.py's CPU
# decoding: for one query per sequence the explicit ops are faster there, and the engine needs their row-invariance).
# Grouped-query attention (Ainslie et al. 2023): H query heads share K key/value heads in groups of H/K; SDPA's
# enable_gqa broadcasts each key/value head over its group without copying it. One fused matmul makes q, k and v.


def explicit_attention(q, k, v, mask):
    # q: (B, H, T, D); k, v: (B, K, S, D); mask: additive, broadcasting to (B, H, T, S), or None for causal
    # attention among these T tokens (S == T). -> (B, H, T, D)
    B, H, T, D = q.shape
    K, S = k.size(1), k.size(2)
    q = q.reshape(B, K, H // K * T, D)           # query head h reads key/value head h // (H/K): group them by it
    scores = (q @ k.transpose(-2, -1) / math.sqrt(D)).view(B, H, T, S)    # sqrt(D) keeps the scores O(1)
    if mask is None:
        mask = torch.full((T, S), float("-inf"), dtype=q.dtype, device=q.device).triu(1)  # -inf above the diagonal
    probs = F.softmax((scores + mask).float(), dim=-1).to(q.dtype)         # each query's weights, summing to 1
    return (probs.view(B, K, H // K * T, S) @ v).view(B, H, T, D)


class Attention(nn.Module):
    use_sdpa = True                   # False: explicit_attention instead (the same numbers within 1e-5)
    decode_attention = None           # generate.py's CPU decoding: one kernel call for one query per sequence

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        H, K, D = config.n_head, config.n_kv_head, config.head_dim
        self.qkv = nn.Linear(config.dim, (H + 2 * K) * D, bias=config.attn_bias)
        self.o = nn.Linear(H * D, config.dim, bias=config.attn_bias)
        self.kv_cache: KVCache | None = None

    def heads(self, x, cos, sin):
        # x: (B, T, C) -> q, k, v split into heads, with RoPE applied to q and k (not without cos and sin)
        B, T, _ = x.shape
        H, K, D = self.config.n_head, self.config.n_kv_head, self.config.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * K, D).transpose(1, 2)          # (B, H + 2K, T, D)
        qk = qkv[:, : H + K]
        if cos is not None:
            qk = apply_rope(qk, cos, sin)                                  # rotate q and k in one go
        return qk[:, :H], qk[:, H:], qkv[:, H + K:]                       # q (B, H, T, D); k, v (B, K, T, D)

    def forward(self, x, cos, sin, mask, input_pos=None, cache_rows=None):
        B, T, _ = x.shape
        H, K, D = self.config.n_head, self.config.n_kv_head, self.config.head_dim
        rows = slice(0, B) if cache_rows is None else cache_rows           # the cache rows of this batch
        if T == 1 and self.decode_attention is not None and self.kv_cache is not None and input_pos is not None:
            # decoding on a CPU (generate.py): what the lines below compute for one query per sequence (RoPE, the
            # cache write, attention), in one kernel call from q, k and v before RoPE
            y = self.decode_attention(*self.heads(x, None, None), cos, sin, self.kv_cache, input_pos, rows, mask,
                                      1 / math.sqrt(D))
            return self.o(y.view(B, T, H * D))                             # y (B, H, 1, D): heads side by side
        q, k, v = self.heads(x, cos, sin)                                  # (B, H, T, D), (B, K, T, D) x 2
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, rows)             # (B, K, S, D)
        if not self.use_sdpa:
            y = explicit_attention(q, k, v, mask)
        elif mask is None:                                                 # plain causal over these T tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=H != K)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != K)
        y = y.transpose(1, 2).reshape(B, T, H * D)                         # heads side by side again
        return self.o(y)


# ----------------------------------------------------------------------------------------------------------------
# MLP: SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)), with gate and up fused into one matmul.


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_up = nn.Linear(config.dim, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


# ----------------------------------------------------------------------------------------------------------------
# Block: pre-norm residual, x + attn(norm(x)), then x + mlp(norm(x)).


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, input_pos=None, cache_rows=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos, cache_rows)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        # Built the way train.py builds a sharded model: shapes on the meta device (no memory, no values), then
        # memory on the caller's device (a `with torch.device(...)` block, else the CPU), then every value from
        # _init_weights. So a plain build and FSDP's meta + to_empty + _init_weights make the same model.
        device = torch.empty(0).device
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
            self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
            self.norm = RMSNorm(config.dim, config.norm_eps)
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.to_empty(device=device)
        if config.tie_embeddings:                                          # after to_empty, which unties them
            self.lm_head.weight = self.tok_embeddings.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # Pretraining init (as GPT-2 / Llama): N(0, 0.02) weights, zero biases, RMSNorm weights 1. Applied to every
        # module (model.apply), it sets every parameter the model has: nothing keeps a value from its constructor.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)
        if isinstance(module, RMSNorm):
            torch.nn.init.ones_(module.weight)

    def setup_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        """Preallocate each layer's KV cache for max_seq_len positions, and the RoPE table for them."""
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context of {self.config.max_seq_len}")
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or self.norm.weight.dtype
        c = self.config
        for block in self.layers:
            block.attn.kv_cache = KVCache(batch_size, c.n_kv_head, max_seq_len, c.head_dim, device, dtype)
        positions = torch.arange(max_seq_len, device=device)
        cos, sin = rope_cos_sin(rope_inv_freq(c, device), positions)
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)  # (S, D)
        self.register_buffer("rope_sin", sin.to(dtype), persistent=False)
        self.register_buffer("cache_positions", positions, persistent=False)

    def clear_cache(self):
        for block in self.layers:
            block.attn.kv_cache = None

    def forward(self, idx, input_pos=None, cache_rows=None, hidden=False):
        # idx: (B, T) token ids. input_pos: None for a plain causal forward over positions 0..T-1 without the cache
        # (training, scoring); (T,), the positions of these tokens in the KV cache, the same for every row; or
        # (B, T), each row at positions of its own (batched serving, below). cache_rows: the cache rows these B
        # rows use, a slice(start, start + B); None means rows 0..B-1. hidden: return the final norm's output
        # (B, T, C), to which output() applies the head, instead of the logits.
        B, T = idx.shape
        x = self.tok_embeddings(idx)                                       # (B, T, C)
        window = self.config.sliding_window
        if input_pos is None:
            positions = torch.arange(T, device=idx.device)
            cos, sin = rope_cos_sin(rope_inv_freq(self.config, idx.device), positions)
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            mask = None                                                    # SDPA's is_causal
            if window is not None and T > window:
                mask = sliding_causal_mask(positions, positions, window, x.dtype)
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # (T, D) or (B, T, D)
            mask = sliding_causal_mask(input_pos, self.cache_positions, window, x.dtype)  # (T, S) or (B, T, S)
            if input_pos.dim() == 2:
                # A ragged batch: every row is a sequence of its own, at its own positions, in its own cache row.
                # Its RoPE angles and its mask come from its own positions and broadcast over the heads alone, so
                # no row can see another. Cache entries past a row's position are masked, never read: a slot can
                # take a new sequence without being cleared.
                cos, sin, mask = cos[:, None], sin[:, None], mask[:, None]  # (B, 1, T, D) x 2, (B, 1, T, S)
        for block in self.layers:
            x = block(x, cos, sin, mask, input_pos, cache_rows)
        x = self.norm(x)                                                   # (B, T, C)
        return x if hidden else self.output(x)                             # (B, T, vocab)

    def output(self, x):
        # The final hidden states (..., C) -> logits (..., vocab). train.py's loss calls it on a few rows at a time
        # (forward(idx, hidden=True), then output), so the whole batch's logits never exist at once.
        return self.lm_head(x)


def sliding_causal_mask(q_pos, kv_pos, window: int | None, dtype):
    # 0 where the query at q_pos may attend to the key at kv_pos, -inf elsewhere: no looking ahead and (with a
    # window) nothing window or more positions back, as HF's sliding-window masks do. q_pos: (T,) or (B, T);
    # kv_pos: (S,) -> (T, S) or (B, T, S). An additive float mask runs faster in CPU SDPA than a boolean one.
    allowed = kv_pos <= q_pos[..., None]
    if window is not None:
        allowed &= kv_pos > q_pos[..., None] - window
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face weight mapping. Each native tensor is made of one or more HF tensors concatenated along dim 0
# (fused q/k/v and gate/up); going back, it is split by the HF tensors' row counts.


def hf_weight_map(config: Config) -> dict[str, list[str]]:
    """native name -> the HF names it is made of, in concatenation order."""
    m = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not config.tie_embeddings:
        m["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.n_layer):
        n, h = f"layers.{i}.", f"model.layers.{i}."
        m[n + "attn_norm.weight"] = [h + "input_layernorm.weight"]
        m[n + "mlp_norm.weight"] = [h + "post_attention_layernorm.weight"]
        params = ["weight", "bias"] if config.attn_bias else ["weight"]
        for p in params:
            m[n + f"attn.qkv.{p}"] = [h + f"self_attn.{x}_proj.{p}" for x in "qkv"]
            m[n + f"attn.o.{p}"] = [h + f"self_attn.o_proj.{p}"]
        for p in ["weight", "bias"] if config.mlp_bias else ["weight"]:
            m[n + f"mlp.gate_up.{p}"] = [h + f"mlp.gate_proj.{p}", h + f"mlp.up_proj.{p}"]
            m[n + f"mlp.down.{p}"] = [h + f"mlp.down_proj.{p}"]
    return m


def hf_split_sizes(config: Config, native_name: str) -> list[int]:
    """Rows of each HF tensor inside a fused native tensor."""
    if ".attn.qkv." in native_name:
        H, K, D = config.n_head, config.n_kv_head, config.head_dim
        return [H * D, K * D, K * D]
    if ".mlp.gate_up." in native_name:
        return [config.intermediate_size] * 2
    return [-1]


def from_hf(hf_tensors, config: Config):
    """Stream HF (name, tensor) pairs in any order; yield native (name, tensor) pairs as soon as every part of a
    native tensor has arrived. Peak memory: the parts of one fused tensor. Unknown HF names raise."""
    names = hf_weight_map(config)
    wanted = {hf_name: (native, i) for native, parts in names.items() for i, hf_name in enumerate(parts)}
    pending: dict[str, dict[int, torch.Tensor]] = {}                     # native name -> parts seen so far
    done = set()
    for hf_name, tensor in hf_tensors:
        if hf_name not in wanted:
            if hf_name == "lm_head.weight" and config.tie_embeddings:
                continue                                                   # a tied copy some checkpoints store
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue                                                   # a RoPE buffer old checkpoints saved
            raise ValueError(f"unexpected weight {hf_name!r} for a llama checkpoint with this config.json")
        native, i = wanted[hf_name]
        got = pending.setdefault(native, {})
        got[i] = tensor
        if len(got) == len(names[native]):
            done.add(native)
            del pending[native]
            yield native, torch.cat([got[j] for j in range(len(got))], dim=0) if len(got) > 1 else tensor
    missing = [hf_name for native, parts in names.items() if native not in done
               for i, hf_name in enumerate(parts) if i not in pending.get(native, {})]
    if missing:
        raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:5])}")


def to_hf(native_tensors, config: Config):
    """Stream native (name, tensor) pairs; yield HF (name, tensor) pairs, splitting fused tensors."""
    names = hf_weight_map(config)
    for native, tensor in native_tensors:
        if native not in names:
            raise ValueError(f"unexpected native weight {native!r} for this llama config")
        parts = names[native]
        if len(parts) == 1:
            yield parts[0], tensor
        else:
            yield from zip(parts, tensor.split(hf_split_sizes(config, native), dim=0))


# ----------------------------------------------------------------------------------------------------------------
# Quantized linear layers. Decoding one token reads every weight once, so smaller weights decode faster.
#   int8:      weight-only, per output channel: w ~ scale[o] * q[o, :], q in [-127, 127]. Plain torch; on CPU
#              torch._weight_int8pack_mm multiplies bf16 activations by int8 weights without dequantizing.
#   int4:      weight-only, group-wise and asymmetric (as gpt-fast): every INT4_GROUP_SIZE input channels of an
#              output row share a scale and a zero point, w ~ (q - 8) * scale + zero, q in [0, 15]. torch's packed
#              int4 kernels (tinygemm on CUDA, a vectorised one on CPU) multiply bf16 activations by it directly.
#   nf4 / fp4: bitsandbytes 4-bit blocks (NF4 is the QLoRA data type, Dettmers et al. 2023).
#   bnb.int8:  bitsandbytes LLM.int8() (Dettmers et al. 2022), outlier features kept in 16 bit.


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127                  # (out,)
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        # torch's int8 kernel has no backward, and on AVX-512 CPUs it gives wrong numbers (or crashes) for some widths
        # that are not a multiple of 64 (1000, 904; every real model's are)
        if x.device.type == "cpu" and not x.requires_grad and self.in_features % 64 == 0:
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight, self.scale)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


# Input channels per int4 scale and zero point. Teacher-forced next-token agreement with fp32 along HF's greedy
# continuations of 12 prompts (576 positions) on SmolLM2-135M, int8 head: groups of 32 agree on 0.98 (as int8
# does), groups of 64 on only 0.78. (The largest that divides its 576-wide rows is 64: 128 does not.)
INT4_GROUP_SIZE = 32


class Int4Linear(nn.Module):
    """Quantize on the device it will run on: the packed layout differs between the CPU and the CUDA kernel."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        w = linear.weight.detach().float()
        N, K = w.shape                                                     # (out, in)
        groups = w.view(N, K // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)              # (N, K / G): each group's range ...
        scale = ((high - low) / 15).clamp(min=1e-6)                        # ... spread over the 16 levels
        q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(N, K)
        zero = low + 8 * scale                                             # the kernels subtract 8 from q
        scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1)   # (K / G, N, 2), as the kernels read it
        self.register_buffer("scale_zero", scale_zero.contiguous().to(torch.bfloat16))
        if w.device.type == "cuda":
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)          # (N, K / 2): two values a byte
            inner_k_tiles = next(t for t in (8, 4, 2) if K % (16 * t) == 0)
            self.register_buffer("weight", torch._convert_weight_to_int4pack(pairs, inner_k_tiles))
        else:
            self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(q, 1))   # (N, K / 2) bytes
        self.bias, self.group_size = linear.bias, group_size
        self.in_features, self.out_features = K, N

    @staticmethod
    def fits(linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
        # The kernels take whole groups of inputs, and outputs in tiles of 16 (CPU) and 8 (CUDA)
        return linear.in_features % group_size == 0 and linear.in_features % 32 == 0 and linear.out_features % 16 == 0

    def matmul(self, rows):
        # rows: (M, in) bf16 -> (M, out) bf16
        if rows.device.type == "cuda":
            return torch._weight_int4pack_mm(rows, self.weight, self.group_size, self.scale_zero)
        return torch._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size, self.scale_zero)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if x.requires_grad:                                                # the kernels have no backward:
            identity = torch.eye(self.in_features, dtype=torch.bfloat16, device=x.device)
            y = rows @ self.matmul(identity)                               # multiply by the dequantized W^T
        else:
            y = self.matmul(rows)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


QUANTIZE_MODES = ("int8", "int4", "nf4", "fp4", "bnb.int8")


def quantize(model: Transformer, mode: str) -> Transformer:
    """Swap the linear layers of the blocks (and, for int8 and int4, the head, in int8) for quantized ones, in place."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    for block in model.layers:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _quantized_linear(child, mode))
    # The head is the largest matrix of a small model: int8 for both (in int4 it costs far more accuracy than all the
    # blocks do: SmolLM2-135M's agreement with fp32 falls from 0.98 to 0.90). bitsandbytes keeps it in 16 bit.
    if mode in ("int8", "int4"):
        model.lm_head = Int8Linear(model.lm_head)
    return model


def _quantized_linear(linear: nn.Linear, mode: str) -> nn.Module:
    if mode == "int4" and Int4Linear.fits(linear):
        return Int4Linear(linear)
    if mode in ("int8", "int4"):                                           # int4 where the kernel takes the shape
        return Int8Linear(linear)
    import bitsandbytes as bnb
    device, bias = linear.weight.device, linear.bias is not None
    if mode in ("nf4", "fp4"):
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                              compute_dtype=linear.weight.dtype, quant_type=mode, device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, quant_type=mode)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
    if bias:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q.to(device)                                                    # bitsandbytes quantizes on .to(device)
