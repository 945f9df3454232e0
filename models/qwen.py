"""The Qwen family in one file: Qwen2, Qwen2.5 (and its Coder / Math variants), QwQ, DeepSeek-R1-Distill-Qwen,
Qwen3 (dense).

A decoder-only transformer: token embedding -> N x (RMSNorm -> attention -> residual, RMSNorm -> SwiGLU MLP ->
residual) -> RMSNorm -> linear head. Read it top to bottom: Config and presets, RMSNorm, RoPE, the KV cache,
attention, MLP, block, model, the Hugging Face weight mapping, and the quantized linear.

Shapes: B batch, T tokens in this call, S cached positions, C model width (dim), H query heads, K key/value heads,
D head_dim. Weights use the Hugging Face layout (rotate-half RoPE), with q/k/v and gate/up fused into one matmul.

It is Llama's architecture with three changes. Qwen2 / 2.5 give q, k and v (not o) a bias. Qwen3 drops those biases
and instead RMS-normalises each head of q and k before RoPE (QK-norm), with a head_dim of its own (not dim / n_head).
Qwen2 configs can also put a sliding window on the upper layers (off in every published model).
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
HF_MODEL_TYPES = ("qwen2", "qwen3")


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
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_seq_len", "beta_fast", "beta_slow",
                                      #  "attention_factor", "truncate"}, or llama3 / linear as in models/llama.py
    max_seq_len: int = 4096
    sliding_window: int | None = None  # Qwen2's use_sliding_window: each token sees itself and window - 1 before it
    max_window_layers: int = 0       # ... in layers max_window_layers and up; the layers below attend to everything
    tie_embeddings: bool = False     # the head reuses the token embedding matrix
    qkv_bias: bool = True            # Qwen2 / 2.5: q, k and v have biases, o has none
    attn_bias: bool = False          # Qwen3's attention_bias: q/k/v/o biases (off in every published Qwen3)
    qk_norm: bool = False            # Qwen3: RMSNorm over each head of q and k before RoPE

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.qk_norm == self.qkv_bias or self.attn_bias and not self.qk_norm:   # what transformers can load
            raise ValueError("a qwen config is Qwen2 (qkv_bias) or Qwen3 (qk_norm, optionally attn_bias), not a mix")

    @classmethod
    def from_name(cls, name: str) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"unknown qwen preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """From a native config.json (the fields of this dataclass, plus "family")."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {"family": "qwen", **asdict(self)}

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        """From a Hugging Face config.json: Hub style (rope_theta, rope_scaling) or transformers-5 style
        (rope_parameters holding rope_theta and the scaling). Missing keys take transformers' Qwen2/Qwen3 defaults."""
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        max_seq_len = hf.get("max_position_embeddings", 32768)
        if kind == "default":
            scaling = None
        elif kind == "llama3":
            scaling = {"type": "llama3", "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
                       "high_freq_factor": rope["high_freq_factor"],
                       "original_max_seq_len": rope["original_max_position_embeddings"]}
        elif kind == "linear":
            scaling = {"type": "linear", "factor": rope["factor"]}
        elif kind == "yarn":   # the Qwen2.5 / Qwen3 model cards' opt-in for 128K tokens: factor 4 over 32768
            factor = rope["factor"]
            old_len = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
            old_len = old_len or max_seq_len

            def mscale(m):   # YaRN's attention temperature: cos and sin get multiplied by 0.1 m ln(factor) + 1
                return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

            attention_factor = rope.get("attention_factor")
            if attention_factor is None:   # DeepSeek-style configs give mscale and mscale_all_dim; Qwen's neither
                both = rope.get("mscale") and rope.get("mscale_all_dim")
                attention_factor = mscale(rope["mscale"]) / mscale(rope["mscale_all_dim"]) if both else mscale(1)
            scaling = {"type": "yarn", "factor": factor, "original_max_seq_len": old_len,
                       "beta_fast": rope.get("beta_fast") or 32, "beta_slow": rope.get("beta_slow") or 1,
                       "attention_factor": attention_factor, "truncate": rope.get("truncate", True)}
            max_seq_len = max(max_seq_len, int(factor * old_len))        # the context YaRN stretches RoPE to
        else:
            raise ValueError(f"rope type {kind!r} is not supported by models/qwen.py; "
                             f"supported: default, yarn, llama3, linear")
        qwen3 = hf.get("model_type") == "qwen3"
        n_layer, n_head = hf["num_hidden_layers"], hf["num_attention_heads"]
        sliding_window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
        full_layers = hf.get("max_window_layers", 28) if sliding_window else 0
        layer_types = ["sliding_attention" if i >= full_layers else "full_attention" for i in range(n_layer)]
        if sliding_window and hf.get("layer_types", layer_types) != layer_types:
            raise ValueError("layer_types must be max_window_layers full_attention layers, then sliding_attention ones")
        return cls(
            name=hf.get("_name_or_path", "") or "",
            vocab_size=hf["vocab_size"],
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads", 32) or n_head,       # transformers' default is 32, not n_head
            dim=hf["hidden_size"],
            head_dim=hf.get("head_dim") or (128 if qwen3 else hf["hidden_size"] // n_head),  # Qwen3Config's: 128
            intermediate_size=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_base=rope_base,
            rope_scaling=scaling,
            max_seq_len=max_seq_len,
            sliding_window=sliding_window,
            max_window_layers=full_layers,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=not qwen3,
            attn_bias=qwen3 and hf.get("attention_bias", False),
            qk_norm=qwen3,
        )

    def to_hf(self) -> dict:
        """A transformers config.json for this model (Qwen3ForCausalLM with QK-norm, else Qwen2ForCausalLM)."""
        qwen3 = self.qk_norm
        hf = {
            "architectures": ["Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"],
            "model_type": "qwen3" if qwen3 else "qwen2",
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
            "use_sliding_window": self.sliding_window is not None,
            "sliding_window": self.sliding_window,
            "max_window_layers": self.max_window_layers,
        }
        if qwen3:
            hf["attention_bias"] = self.attn_bias
        if self.rope_scaling:
            s = dict(self.rope_scaling)
            hf["rope_scaling"] = {"rope_type": s.pop("type"), **s}
            if "original_max_seq_len" in s:
                hf["rope_scaling"]["original_max_position_embeddings"] = hf["rope_scaling"].pop("original_max_seq_len")
        return hf


# Published sizes. Sources: each model's config.json on the Hugging Face Hub (the base model's where an -Instruct
# repo exists; Coder and Math variants share these shapes, with their own max_seq_len and rope_base: convert their
# config.json). The 0.5B-4B models tie the head to the embedding; rms_norm_eps is 1e-5 from Qwen2.5-14B up.
_QWEN25_0_5B = dict(vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, dim=896, intermediate_size=4864,
                    norm_eps=1e-6, rope_base=1000000.0, max_seq_len=32768, tie_embeddings=True)
_QWEN25_1_5B = dict(_QWEN25_0_5B, n_layer=28, n_head=12, dim=1536, intermediate_size=8960, max_seq_len=131072)
_QWEN25_7B = dict(vocab_size=152064, n_layer=28, n_head=28, n_kv_head=4, dim=3584, intermediate_size=18944,
                  norm_eps=1e-6, rope_base=1000000.0, max_seq_len=131072)
_QWEN25_14B = dict(_QWEN25_7B, n_layer=48, n_head=40, n_kv_head=8, dim=5120, intermediate_size=13824, norm_eps=1e-5)
_QWEN25_32B = dict(_QWEN25_14B, n_layer=64, intermediate_size=27648)
_QWEN3 = dict(vocab_size=151936, n_kv_head=8, head_dim=128, norm_eps=1e-6, rope_base=1000000.0, max_seq_len=40960,
              qkv_bias=False, qk_norm=True)
PRESETS = {
    "Qwen2.5-0.5B": _QWEN25_0_5B,
    "Qwen2.5-1.5B": _QWEN25_1_5B,
    "Qwen2.5-3B": dict(_QWEN25_0_5B, n_layer=36, n_head=16, dim=2048, intermediate_size=11008),
    "Qwen2.5-7B": _QWEN25_7B,
    "Qwen2.5-14B": _QWEN25_14B,
    "Qwen2.5-32B": _QWEN25_32B,
    "Qwen2.5-72B": dict(_QWEN25_14B, n_layer=80, n_head=64, dim=8192, intermediate_size=29568),
    "QwQ-32B": dict(_QWEN25_32B, max_seq_len=40960),       # the repo's current config.json (it said 131072 at first)
    "DeepSeek-R1-Distill-Qwen-1.5B": dict(_QWEN25_1_5B, rope_base=10000.0, tie_embeddings=False),  # from Qwen2.5-Math
    "DeepSeek-R1-Distill-Qwen-7B": dict(_QWEN25_7B, rope_base=10000.0),                            # from Qwen2.5-Math
    "DeepSeek-R1-Distill-Qwen-14B": _QWEN25_14B,
    "DeepSeek-R1-Distill-Qwen-32B": _QWEN25_32B,
    "Qwen3-0.6B": dict(_QWEN3, n_layer=28, n_head=16, dim=1024, intermediate_size=3072, tie_embeddings=True),
    "Qwen3-1.7B": dict(_QWEN3, n_layer=28, n_head=16, dim=2048, intermediate_size=6144, tie_embeddings=True),
    "Qwen3-4B": dict(_QWEN3, n_layer=36, n_head=32, dim=2560, intermediate_size=9728, tie_embeddings=True),
    "Qwen3-8B": dict(_QWEN3, n_layer=36, n_head=32, dim=4096, intermediate_size=12288),
    "Qwen3-14B": dict(_QWEN3, n_layer=40, n_head=40, dim=5120, intermediate_size=17408),
    "Qwen3-32B": dict(_QWEN3, n_layer=64, n_head=64, dim=5120, intermediate_size=25600),
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
#   yarn (Peng et al. 2023; Qwen2.5 / Qwen3 for 128K): channels that turn fewer than beta_slow times within
#     original_len are divided by factor, those that turn more than beta_fast times are kept, a linear ramp over the
#     channel index blends the band between; cos and sin are scaled by attention_factor (0.1 ln(factor) + 1).


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
    if scaling["type"] == "yarn":
        factor, old_len = scaling["factor"], scaling["original_max_seq_len"]

        def channel(turns):   # the (fractional) channel i whose wavelength fits `turns` times into old_len
            return D * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(config.rope_base))

        low, high = channel(scaling["beta_fast"]), channel(scaling["beta_slow"])
        if scaling["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, D - 1)
        ramp = ((torch.arange(D // 2, device=device).float() - low) / ((high - low) or 0.001)).clamp(0, 1)
        return inv_freq / factor * ramp + inv_freq * (1 - ramp)           # ramp 0: kept, 1: interpolated
    raise ValueError(f"unknown rope scaling type {scaling['type']!r}; supported: yarn, linear, llama3")


def rope_attention_factor(config: Config) -> float:
    scaling = config.rope_scaling or {}
    return scaling.get("attention_factor", 1.0)                            # YaRN's; 1 for the other types


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0):
    """cos and sin of every (position, channel) angle, times scale: (T, D). The sin has its first half negated so
    that apply_rope is a roll and two multiplies."""
    angles = positions.float()[:, None] * inv_freq[None, :]                # (T, D/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1) * scale
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1) * scale
    return cos, sin


def apply_rope(x, cos, sin):
    # x: (B, heads, T, D). Pairs (i, i + D/2) rotate together: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    # roll swaps the halves to (x2, x1) and the signed sin supplies the minus: the "rotate half" form of HF.
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


# ----------------------------------------------------------------------------------------------------------------
# KV cache: preallocated key/value buffers. Decoding step t writes its keys and values at input_pos and attends
# to every position written so far; static shapes keep torch.compile and CUDA graphs happy.


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
# Attention: grouped-query attention (Ainslie et al. 2023). H query heads share K key/value heads in groups of
# H/K; SDPA's enable_gqa broadcasts each key/value head over its group without copying it. One fused matmul makes
# q, k and v. Qwen3's QK-norm (as in Dehghani et al. 2023) RMS-normalises every head's q and k over D, with one
# learned weight for all query heads and one for all key heads, which keeps the attention logits bounded.
# explicit_attention spells out softmax(q k^T / sqrt(D) + mask) v with the query heads grouped by the key/value
# head they read; SDPA computes the same in one fused kernel and is what runs, except in generate.py's CPU decoding.


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
    use_sdpa = True     # False: explicit_attention, the same numbers within 1e-5 (generate.py decodes so on a CPU)
    decode_attention = None           # generate.py's CPU decoding: one kernel call for one query per sequence

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        H, K, D = config.n_head, config.n_kv_head, config.head_dim
        self.qkv = nn.Linear(config.dim, (H + 2 * K) * D, bias=config.qkv_bias or config.attn_bias)
        self.o = nn.Linear(H * D, config.dim, bias=config.attn_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(D, config.norm_eps)
            self.k_norm = RMSNorm(D, config.norm_eps)
        self.kv_cache: KVCache | None = None

    def heads(self, x, cos, sin):
        # x: (B, T, C) -> q, k, v split into heads, with RoPE applied to q and k (not without cos and sin)
        B, T, _ = x.shape
        H, K, D = self.config.n_head, self.config.n_kv_head, self.config.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * K, D).transpose(1, 2)          # (B, H + 2K, T, D)
        qk = qkv[:, : H + K]
        if self.config.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)
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
        self.gate_up = nn.Linear(config.dim, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.dim, bias=False)

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
        if isinstance(module, RMSNorm):                                    # q_norm and k_norm too
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
        cos, sin = rope_cos_sin(rope_inv_freq(c, device), positions, rope_attention_factor(c))
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
            cos, sin = rope_cos_sin(rope_inv_freq(self.config, idx.device), positions,
                                    rope_attention_factor(self.config))
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            mask = window_mask = None                                      # SDPA's is_causal
            if window is not None and T > window:
                window_mask = sliding_causal_mask(positions, positions, window, x.dtype)
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # (T, D) or (B, T, D)
            mask = window_mask = sliding_causal_mask(input_pos, self.cache_positions, None, x.dtype)  # (T, S)
            if window is not None:
                window_mask = sliding_causal_mask(input_pos, self.cache_positions, window, x.dtype)
            if input_pos.dim() == 2:
                # A ragged batch: every row is a sequence of its own, at its own positions, in its own cache row.
                # Its RoPE angles and masks come from its own positions and broadcast over the heads alone, so no
                # row can see another. Cache entries past a row's position are masked, never read: a slot can take
                # a new sequence without being cleared.
                cos, sin = cos[:, None], sin[:, None]                      # (B, 1, T, D)
                mask, window_mask = mask[:, None], window_mask[:, None]    # (B, 1, T, S)
        for i, block in enumerate(self.layers):                            # the window starts at max_window_layers
            layer_mask = window_mask if i >= self.config.max_window_layers else mask
            x = block(x, cos, sin, layer_mask, input_pos, cache_rows)
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
        for p in ["weight", "bias"] if config.qkv_bias or config.attn_bias else ["weight"]:
            m[n + f"attn.qkv.{p}"] = [h + f"self_attn.{x}_proj.{p}" for x in "qkv"]
        for p in ["weight", "bias"] if config.attn_bias else ["weight"]:
            m[n + f"attn.o.{p}"] = [h + f"self_attn.o_proj.{p}"]
        if config.qk_norm:
            m[n + "attn.q_norm.weight"] = [h + "self_attn.q_norm.weight"]
            m[n + "attn.k_norm.weight"] = [h + "self_attn.k_norm.weight"]
        m[n + "mlp.gate_up.weight"] = [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"]
        m[n + "mlp.down.weight"] = [h + "mlp.down_proj.weight"]
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
            raise ValueError(f"unexpected weight {hf_name!r} for a qwen checkpoint with this config.json")
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
            raise ValueError(f"unexpected native weight {native!r} for this qwen config")
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
