"""The Phi family in one file: Phi-1.5 / Phi-2 (Hugging Face PhiForCausalLM) and Phi-3 / 3.5 / 4 / 4-mini
(Phi3ForCausalLM).

Two block layouts share everything else:
  Phi-1.5/2:  x + attn(ln(x)) + mlp(ln(x)), one LayerNorm with bias feeding attention and a GELU MLP side by side
              (parallel residual, as GPT-J), biases on every linear and the head, RoPE on part of each head.
  Phi-3/4:    Llama's block: x + attn(rmsnorm(x)), then x + swiglu(rmsnorm(x)); LongRoPE for long contexts,
              partial rotary and tied embeddings in Phi-4-mini.
Read it top to bottom: Config and presets, norms, RoPE (with LongRoPE), the KV cache, attention, MLP, block, model,
the Hugging Face weight mapping, and the quantized linear.

Shapes: B batch, T tokens in this call, S cached positions, C model width (dim), H query heads, K key/value heads,
D head_dim, R rotated channels per head (rope_dim <= D). Weights use the Hugging Face layout (rotate-half RoPE),
with q/k/v and gate/up fused into one matmul.
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
HF_MODEL_TYPES = ("phi", "phi3")


@dataclass
class Config:
    name: str = ""
    vocab_size: int = 32064
    n_layer: int = 32
    n_head: int = 32                 # query heads (H)
    n_kv_head: int = 32              # key/value heads (K): K == H is MHA, 1 < K < H is GQA
    dim: int = 3072                  # model width (C)
    head_dim: int = 0                # D; 0 means dim // n_head
    rope_dim: int = 0                # R: channels of each head that RoPE rotates, the first R; 0 means all (D)
    intermediate_size: int = 8192    # MLP hidden width
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "longrope", "short_factor", "long_factor", "original_max_seq_len",
                                      #  "attention_factor"}
    max_seq_len: int = 4096
    sliding_window: int | None = None  # Phi-3-mini-4k: each token sees itself and the 2046 before it
    tie_embeddings: bool = False     # the head reuses the token embedding matrix (Phi-4-mini)
    # The Phi-1.5/2 layout (PhiForCausalLM); all False is the Phi-3/4 layout (Phi3ForCausalLM).
    parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm(x)) with one norm, instead of two steps
    layer_norm: bool = False         # LayerNorm with bias instead of RMSNorm
    gelu_mlp: bool = False           # down(gelu_tanh(up(x))) instead of SwiGLU
    bias: bool = False               # biases on q/k/v, the output projection, the MLP and the head

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_head
        if not self.rope_dim:
            self.rope_dim = self.head_dim
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"rope_dim ({self.rope_dim}) must be even and at most head_dim ({self.head_dim})")
        s = self.rope_scaling
        if s is not None:
            if s["type"] != "longrope":
                raise ValueError(f"unknown rope scaling type {s['type']!r}; supported: longrope")
            for key in ("short_factor", "long_factor"):
                if len(s[key]) != self.rope_dim // 2:
                    raise ValueError(f"LongRoPE {key} has {len(s[key])} values; rope_dim {self.rope_dim} needs "
                                     f"{self.rope_dim // 2}")

    @classmethod
    def from_name(cls, name: str) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"unknown phi preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """From a native config.json (the fields of this dataclass, plus "family")."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {"family": "phi", **asdict(self)}

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        """From a Hugging Face config.json, model_type "phi" (Phi-1/1.5/2) or "phi3" (Phi-3/3.5/4/4-mini): Hub style
        (rope_theta, rope_scaling, partial_rotary_factor at the top) or transformers-5 style (rope_parameters)."""
        phi3 = hf.get("model_type") == "phi3"
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        n_head = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
        # HF's defaults when the file says nothing: PhiConfig rotates half of each head, Phi3Config all of it.
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0 if phi3 else 0.5))
        max_seq_len = hf.get("max_position_embeddings", 4096 if phi3 else 2048)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if phi3 and kind in ("su", "yarn"):      # early Phi-3 configs' names for LongRoPE; HF renames them too
            kind = "longrope"
        if kind == "default":
            scaling = None
        elif kind == "longrope":
            # Phi3Config keeps original_max_position_embeddings at the top level (default 4096) and prefers it.
            original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
            original = original or (4096 if phi3 else max_seq_len)
            factor = rope.get("factor")
            factor = max_seq_len / original if factor is None else factor
            attention_factor = rope.get("attention_factor")
            if attention_factor is None:
                attention_factor = longrope_attention_factor(factor, original)
            scaling = {"type": "longrope", "short_factor": list(rope["short_factor"]),
                       "long_factor": list(rope["long_factor"]), "original_max_seq_len": original,
                       "attention_factor": attention_factor}
        else:
            raise ValueError(f"rope type {kind!r} is not supported by models/phi.py; supported: default, longrope")
        act = hf.get("hidden_act", "silu" if phi3 else "gelu_new")
        if act not in (("silu",) if phi3 else ("gelu_new", "gelu_pytorch_tanh")):
            raise ValueError(f"hidden_act {act!r} is not supported for model_type {hf.get('model_type')!r}")
        if hf.get("qk_layernorm"):
            raise ValueError("qk_layernorm=True (LayerNorm on each query and key head) is not supported by "
                             "models/phi.py: no published Phi checkpoint uses it")
        return cls(
            name=hf.get("_name_or_path", "") or "",
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            dim=hf["hidden_size"],
            head_dim=head_dim,
            rope_dim=int(head_dim * partial),    # as HF rounds it
            intermediate_size=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps" if phi3 else "layer_norm_eps", 1e-5),
            rope_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=max_seq_len,
            sliding_window=hf.get("sliding_window") if phi3 else None,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            parallel_residual=not phi3, layer_norm=not phi3, gelu_mlp=not phi3, bias=not phi3,
        )

    def to_hf(self) -> dict:
        """A transformers config.json for this model: PhiForCausalLM for the Phi-1.5/2 layout, Phi3ForCausalLM for
        the Phi-3/4 one."""
        phi3 = self.hf_model_type() == "phi3"
        partial = self.rope_dim / self.head_dim
        if int(self.head_dim * partial) != self.rope_dim:
            raise ValueError(f"rope_dim {self.rope_dim} is not a partial_rotary_factor of head_dim {self.head_dim}")
        hf = {
            "architectures": ["Phi3ForCausalLM" if phi3 else "PhiForCausalLM"],
            "model_type": "phi3" if phi3 else "phi",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "hidden_act": "silu" if phi3 else "gelu_new",
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_base,
            "partial_rotary_factor": partial,
            "tie_word_embeddings": self.tie_embeddings,
        }
        if self.head_dim != self.dim // self.n_head:
            hf["head_dim"] = self.head_dim
        if phi3:
            hf.update(rms_norm_eps=self.norm_eps, sliding_window=self.sliding_window)
        else:
            hf.update(layer_norm_eps=self.norm_eps, qk_layernorm=False)
        if self.rope_scaling:
            s = self.rope_scaling
            hf["original_max_position_embeddings"] = s["original_max_seq_len"]
            hf["rope_scaling"] = {"type": "longrope", "short_factor": s["short_factor"],
                                  "long_factor": s["long_factor"], "attention_factor": s["attention_factor"]}
        return hf

    def hf_model_type(self) -> str:
        """"phi" (PhiForCausalLM) for the Phi-1.5/2 layout, "phi3" (Phi3ForCausalLM) for the Phi-3/4 one."""
        phi2_layout = (self.parallel_residual, self.layer_norm, self.gelu_mlp, self.bias)
        if all(phi2_layout):
            return "phi"
        if not any(phi2_layout):
            return "phi3"
        raise ValueError("transformers has no architecture for this mix of the Phi-1.5/2 and Phi-3 layouts")


def longrope_attention_factor(factor: float, original_max_seq_len: int) -> float:
    # LongRoPE (Ding et al. 2024) multiplies cos and sin by sqrt(1 + ln(factor) / ln(original)) for a context
    # stretched by `factor` (max / original length), so q.k grows by its square and attention stays as sharp over
    # the longer context; 1 when nothing is stretched.
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max_seq_len))


# Published sizes. Sources: each model's config.json on the Hugging Face Hub (microsoft/<name>).
_PHI2_LAYOUT = dict(parallel_residual=True, layer_norm=True, gelu_mlp=True, bias=True)
_PHI3_MINI = dict(vocab_size=32064, n_layer=32, n_head=32, n_kv_head=32, dim=3072, intermediate_size=8192,
                  rope_base=10000.0, max_seq_len=4096)

# LongRoPE rescale factors, one per rotated channel pair: config.json rope_scaling of microsoft/Phi-3.5-mini-instruct
# and microsoft/Phi-4-mini-instruct (each checked against two independent copies of the file).
_PHI35_MINI_LONG = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062]
_PHI35_MINI_SHORT = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979,
    1.0999999046325684, 1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662,
    1.2899998426437378, 1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083,
    1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0199997425079346, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0799996852874756, 2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
    2.729999542236328, 2.749999523162842, 2.8399994373321533]
_PHI4_MINI_LONG = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23,
    32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]
_PHI4_MINI_SHORT = [1.0] * 48


def _longrope(short_factor, long_factor, original_max_seq_len=4096, max_seq_len=131072) -> dict:
    return {"type": "longrope", "short_factor": short_factor, "long_factor": long_factor,
            "original_max_seq_len": original_max_seq_len,
            "attention_factor": longrope_attention_factor(max_seq_len / original_max_seq_len, original_max_seq_len)}


PRESETS = {
    "phi-1_5": dict(vocab_size=51200, n_layer=24, n_head=32, n_kv_head=32, dim=2048, rope_dim=32,
                    intermediate_size=8192, rope_base=10000.0, max_seq_len=2048, **_PHI2_LAYOUT),
    "phi-2": dict(vocab_size=51200, n_layer=32, n_head=32, n_kv_head=32, dim=2560, rope_dim=32,
                  intermediate_size=10240, rope_base=10000.0, max_seq_len=2048, **_PHI2_LAYOUT),
    "Phi-3-mini-4k-instruct": dict(_PHI3_MINI, sliding_window=2047),
    # The 128k model's LongRoPE factor lists are left out: no copy of its config.json could be checked here. A
    # converted checkpoint reads them from its own config.json; this preset serves shapes and parameter counts.
    "Phi-3-mini-128k-instruct": dict(_PHI3_MINI, max_seq_len=131072, sliding_window=262144),
    "Phi-3.5-mini-instruct": dict(_PHI3_MINI, max_seq_len=131072, sliding_window=262144,
                                  rope_scaling=_longrope(_PHI35_MINI_SHORT, _PHI35_MINI_LONG)),
    "phi-4": dict(vocab_size=100352, n_layer=40, n_head=40, n_kv_head=10, dim=5120, intermediate_size=17920,
                  rope_base=250000.0, max_seq_len=16384),
    "Phi-4-mini-instruct": dict(vocab_size=200064, n_layer=32, n_head=24, n_kv_head=8, dim=3072, rope_dim=96,
                                intermediate_size=8192, rope_base=10000.0, max_seq_len=131072,
                                sliding_window=262144, tie_embeddings=True,
                                rope_scaling=_longrope(_PHI4_MINI_SHORT, _PHI4_MINI_LONG)),
}


# ----------------------------------------------------------------------------------------------------------------
# Norms. RMSNorm (Zhang & Sennrich 2019, Phi-3/4): x / sqrt(mean(x^2) + eps) * weight; half-precision inputs are
# normalised in fp32 and cast back before the weight multiplies, as HF does. Phi-1.5/2 use the classic LayerNorm
# (Ba et al. 2016): (x - mean) / std * weight + bias.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:                                        # one fused kernel
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype) * self.weight


def make_norm(config: Config) -> nn.Module:
    return nn.LayerNorm(config.dim, eps=config.norm_eps) if config.layer_norm else RMSNorm(config.dim, config.norm_eps)


# ----------------------------------------------------------------------------------------------------------------
# RoPE (rotary position embedding, Su et al. 2021). Channel pair (i, i + R/2) of q and k is rotated by the angle
# pos * inv_freq[i], inv_freq[i] = base^(-2i/R), so q.k depends only on the distance between the two positions.
# Partial rotary (Phi-1.5/2, Phi-4-mini): only the first R of each head's D channels rotate; the rest pass through.
# LongRoPE (Ding et al. 2024; Phi-3-128k, 3.5, 4-mini): each frequency is divided by its own searched factor, from
# one of two lists: short_factor while the sequence fits original_max_seq_len, long_factor past it. cos and sin are
# also scaled by attention_factor (both lists), which scales q.k by its square.
#   Which list, as HF decides it: a forward whose highest position + 1 exceeds original_max_seq_len uses the long
#   list for all of its tokens, else the short one. So one full forward over T > original tokens is all-long, and
#   HF's generate(), the first time the sequence outgrows the original length, drops its KV cache (short-factor
#   keys) and re-prefills the whole sequence with the long list. Transformer.forward does the same below.


def rope_inv_freq(config: Config, long: bool = False, device=None) -> torch.Tensor:
    R = config.rope_dim
    exponents = torch.arange(0, R, 2, device=device).float() / R              # 2i/R, (R/2,)
    if config.rope_scaling is None:
        return 1.0 / (config.rope_base ** exponents)
    factors = config.rope_scaling["long_factor" if long else "short_factor"]
    return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * config.rope_base ** exponents)


def uses_long_factors(config: Config, seq_len: int) -> bool:
    return config.rope_scaling is not None and seq_len > config.rope_scaling["original_max_seq_len"]


def rope_cos_sin(config: Config, positions: torch.Tensor, long: bool = False):
    """cos and sin of every (position, channel) angle, times the attention factor: (T, R). The sin has its first
    half negated so that apply_rope is a roll and two multiplies."""
    scale = config.rope_scaling["attention_factor"] if config.rope_scaling else 1.0
    angles = positions.float()[:, None] * rope_inv_freq(config, long, positions.device)[None, :]  # (T, R/2)
    cos, sin = angles.cos() * scale, angles.sin() * scale
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, heads, T, D); cos, sin: (T, R). Pairs (i, i + R/2) rotate together: (x1, x2) -> (x1 cos - x2 sin,
    # x2 cos + x1 sin); roll swaps the halves to (x2, x1) and the signed sin supplies the minus ("rotate half").
    R = cos.size(-1)
    if R == x.size(-1):
        return x * cos + x.roll(R // 2, dims=-1) * sin
    rot, rest = x[..., :R], x[..., R:]                                         # partial: rotate the first R only
    return torch.cat([rot * cos + rot.roll(R // 2, dims=-1) * sin, rest], dim=-1)


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
# q, k and v (Phi-3/4 checkpoints store it fused as qkv_proj; Phi-1.5/2 store q/k/v apart, fused on conversion).
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
        self.qkv = nn.Linear(config.dim, (H + 2 * K) * D, bias=config.bias)
        self.o = nn.Linear(H * D, config.dim, bias=config.bias)
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
# MLP. Phi-3/4: SwiGLU (Shazeer 2020), down(silu(gate(x)) * up(x)), gate and up fused into one matmul.
# Phi-1.5/2: the GPT-2 MLP, down(gelu(up(x))) with biases, GELU in its tanh approximation ("gelu_new").


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gelu = config.gelu_mlp
        if self.gelu:
            self.up = nn.Linear(config.dim, config.intermediate_size, bias=config.bias)
        else:
            self.gate_up = nn.Linear(config.dim, 2 * config.intermediate_size, bias=config.bias)
        self.down = nn.Linear(config.intermediate_size, config.dim, bias=config.bias)

    def forward(self, x):
        if self.gelu:
            return self.down(F.gelu(self.up(x), approximate="tanh"))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


# ----------------------------------------------------------------------------------------------------------------
# Block: pre-norm residual. Phi-3/4 as Llama: x + attn(norm(x)), then x + mlp(norm(x)). Phi-1.5/2 in parallel:
# x + attn(norm(x)) + mlp(norm(x)), both branches reading the same normalised x (so there is no mlp_norm).


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.parallel = config.parallel_residual
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        if not self.parallel:
            self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, input_pos=None, cache_rows=None):
        h = self.attn_norm(x)
        if self.parallel:
            return x + self.attn(h, cos, sin, mask, input_pos, cache_rows) + self.mlp(h)
        x = x + self.attn(h, cos, sin, mask, input_pos, cache_rows)
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
            self.norm = make_norm(config)
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=config.bias)
        self.to_empty(device=device)
        if config.tie_embeddings:                                          # after to_empty, which unties them
            self.lm_head.weight = self.tok_embeddings.weight
        self.register_buffer("cache_tokens", None, persistent=False)       # see setup_cache
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # Pretraining init (as GPT-2 / Llama): N(0, 0.02) weights, zero biases, norm weights 1. Applied to every module
        # (model.apply), it sets every parameter the model has: nothing keeps a value from its constructor.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)
        if isinstance(module, (RMSNorm, nn.LayerNorm)):
            torch.nn.init.ones_(module.weight)
        if isinstance(module, nn.LayerNorm):
            torch.nn.init.zeros_(module.bias)

    def setup_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        """Preallocate each layer's KV cache for max_seq_len positions, and the RoPE tables for them: (1, S, R), or
        with LongRoPE (2, S, R), the short-factor table then the long-factor one."""
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context of {self.config.max_seq_len}")
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or self.norm.weight.dtype
        c = self.config
        for block in self.layers:
            block.attn.kv_cache = KVCache(batch_size, c.n_kv_head, max_seq_len, c.head_dim, device, dtype)
        positions = torch.arange(max_seq_len, device=device)
        tables = [rope_cos_sin(c, positions, long) for long in ((False, True) if c.rope_scaling else (False,))]
        self.register_buffer("rope_cos", torch.stack([cos for cos, _ in tables]).to(dtype), persistent=False)
        self.register_buffer("rope_sin", torch.stack([sin for _, sin in tables]).to(dtype), persistent=False)
        self.register_buffer("cache_positions", positions, persistent=False)
        # A LongRoPE cache that reaches past the original length keeps the tokens too, to re-prefill at the switch.
        crosses = uses_long_factors(c, max_seq_len)
        tokens = torch.zeros(batch_size, max_seq_len, dtype=torch.long, device=device) if crosses else None
        self.register_buffer("cache_tokens", tokens, persistent=False)

    def clear_cache(self):
        for block in self.layers:
            block.attn.kv_cache = None
        self.cache_tokens = None

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
            cos, sin = rope_cos_sin(self.config, positions, long=uses_long_factors(self.config, T))
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            mask = None                                                    # SDPA's is_causal
            if window is not None and T > window:
                mask = sliding_causal_mask(positions, positions, window, x.dtype)
        else:
            cos, sin = self.rope_cos[0, input_pos], self.rope_sin[0, input_pos]  # (T, R) or (B, T, R)
            if self.config.rope_scaling:
                original = self.config.rope_scaling["original_max_seq_len"]
                if self.cache_tokens is not None:
                    rows = slice(0, B) if cache_rows is None else cache_rows
                    self._reprefill_rows_crossing(idx, input_pos, rows, original)
                long = input_pos[..., -1:] >= original                    # (1,) or (B, 1): a tensor, no host sync
                cos = torch.where(long[..., None], self.rope_cos[1, input_pos], cos)
                sin = torch.where(long[..., None], self.rope_sin[1, input_pos], sin)
            mask = sliding_causal_mask(input_pos, self.cache_positions, window, x.dtype)  # (T, S) or (B, T, S)
            if input_pos.dim() == 2:
                # A ragged batch: every row is a sequence of its own, at its own positions, in its own cache row.
                # Its RoPE angles (short or long factors) and its mask come from its own positions and broadcast
                # over the heads alone, so no row can see another. Cache entries past a row's position are masked,
                # never read: a slot can take a new sequence without being cleared.
                cos, sin, mask = cos[:, None], sin[:, None], mask[:, None]  # (B, 1, T, R) x 2, (B, 1, T, S)
        for block in self.layers:
            x = block(x, cos, sin, mask, input_pos, cache_rows)
        x = self.norm(x)                                                   # (B, T, C)
        return x if hidden else self.output(x)                             # (B, T, vocab)

    def output(self, x):
        # The final hidden states (..., C) -> logits (..., vocab). train.py's loss calls it on a few rows at a time
        # (forward(idx, hidden=True), then output), so the whole batch's logits never exist at once.
        return self.lm_head(x)

    def _reprefill_rows_crossing(self, idx, input_pos, rows: slice, original: int):
        """Record this call's tokens in their cache rows. Then, as HF's generate(): for each row whose call is the
        first to reach past the original length (every key in its cache computed with the short factors),
        re-prefill its whole sequence with the long ones, before the call goes on. One host sync per call, and
        only for a LongRoPE cache that can cross. Under torch.compile this data-dependent step cannot be traced: it
        is skipped, and the cached short-factor keys are kept (as a plain HF forward with a cache does)."""
        tokens = self.cache_tokens[rows]                                   # (B, S), a view
        if input_pos.dim() == 1:
            tokens.index_copy_(1, input_pos, idx)
        else:
            tokens.scatter_(1, input_pos, idx)
        if torch.compiler.is_compiling():
            return
        positions = input_pos.expand(idx.shape)                            # (B, T)
        for b, (start, last) in enumerate(zip(positions[:, 0].tolist(), positions[:, -1].tolist())):
            if 0 < start <= original <= last:
                row = (rows.start or 0) + b
                self(tokens[b:b + 1, :last + 1].clone(), torch.arange(last + 1, device=idx.device),
                     slice(row, row + 1))


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
# (Phi-1.5/2's separate q/k/v become one qkv); going back, it is split by the HF tensors' row counts. Phi-3/4
# checkpoints already store qkv_proj and gate_up_proj fused, in our order, so they map one to one.


def hf_weight_map(config: Config) -> dict[str, list[str]]:
    """native name -> the HF names it is made of, in concatenation order."""
    phi3 = config.hf_model_type() == "phi3"
    params = ["weight", "bias"] if config.bias else ["weight"]
    norm_params = ["weight", "bias"] if config.layer_norm else ["weight"]
    final_norm = "model.norm" if phi3 else "model.final_layernorm"
    m = {"tok_embeddings.weight": ["model.embed_tokens.weight"]}
    m.update({f"norm.{p}": [f"{final_norm}.{p}"] for p in norm_params})
    m.update({f"lm_head.{p}": [f"lm_head.{p}"] for p in params if not (p == "weight" and config.tie_embeddings)})
    for i in range(config.n_layer):
        n, h = f"layers.{i}.", f"model.layers.{i}."
        for p in norm_params:
            m[n + f"attn_norm.{p}"] = [h + f"input_layernorm.{p}"]
            if phi3:
                m[n + f"mlp_norm.{p}"] = [h + f"post_attention_layernorm.{p}"]
        for p in params:
            if phi3:
                m[n + f"attn.qkv.{p}"] = [h + f"self_attn.qkv_proj.{p}"]
                m[n + f"attn.o.{p}"] = [h + f"self_attn.o_proj.{p}"]
                m[n + f"mlp.gate_up.{p}"] = [h + f"mlp.gate_up_proj.{p}"]
                m[n + f"mlp.down.{p}"] = [h + f"mlp.down_proj.{p}"]
            else:
                m[n + f"attn.qkv.{p}"] = [h + f"self_attn.{x}_proj.{p}" for x in "qkv"]
                m[n + f"attn.o.{p}"] = [h + f"self_attn.dense.{p}"]
                m[n + f"mlp.up.{p}"] = [h + f"mlp.fc1.{p}"]
                m[n + f"mlp.down.{p}"] = [h + f"mlp.fc2.{p}"]
    return m


def hf_split_sizes(config: Config, native_name: str) -> list[int]:
    """Rows of each HF tensor inside a fused native tensor."""
    if ".attn.qkv." in native_name and config.hf_model_type() == "phi":   # q, k, v stored apart
        H, K, D = config.n_head, config.n_kv_head, config.head_dim
        return [H * D, K * D, K * D]
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
            raise ValueError(f"unexpected weight {hf_name!r} for a phi checkpoint with this config.json")
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
            raise ValueError(f"unexpected native weight {native!r} for this phi config")
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
