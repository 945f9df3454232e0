"""The Gemma family in one file: Gemma 1 (2B, 7B), Gemma 2 (2B, 9B, 27B) and the text decoder of Gemma 3 (270M,
1B, 4B, 12B, 27B).

A decoder-only transformer: token embedding * sqrt(dim) -> N x (RMSNorm -> attention -> [RMSNorm] -> residual,
RMSNorm -> GeGLU MLP -> [RMSNorm] -> residual) -> RMSNorm -> tied linear head [-> soft-cap]. Read it top to bottom:
Config and presets, RMSNorm, RoPE, the KV cache, attention, MLP, block, model, the Hugging Face weight mapping, and
the quantized linear. It is models/llama.py with Google's changes (those of Gemma 2 and 3 switched by Config fields):
  all:     embeddings scaled by sqrt(dim); RMSNorm scales by (1 + weight); GeGLU (tanh GELU) in place of SwiGLU;
           head_dim set on its own (7B: 16 heads x 256 = 4096 wide, dim 3072); the head shares the embedding.
  Gemma 2: norms after attention and MLP too (post_norms); attention and final logits soft-capped, cap * tanh(x / cap);
           attention scale query_pre_attn_scalar ** -0.5; sliding-window (local) layers alternate with global ones.
  Gemma 3: soft-capping gives way to an RMSNorm on every query and key head (qk_norm); five local layers per global
           one; local layers have their own RoPE base, and only global layers get the long-context RoPE scaling.

Shapes: B batch, T tokens in this call, S cached positions, C model width (dim), H query heads, K key/value heads,
D head_dim. Weights use the Hugging Face layout (rotate-half RoPE), with q/k/v and gate/up fused into one matmul.
"""

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Config

# The Hugging Face config.json model_type values that Config.from_hf reads (gemma3: the text decoder of the
# multimodal model). models.family_of_hf finds this file by them.
HF_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")


@dataclass
class Config:
    name: str = ""
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32                 # query heads (H)
    n_kv_head: int = 32              # key/value heads (K): K == H is MHA, 1 < K < H is GQA, K == 1 is MQA
    dim: int = 4096                  # model width (C)
    head_dim: int = 0                # D; 0 means dim // n_head (Gemma sets it: 256, or 128 in the 27Bs)
    intermediate_size: int = 11008   # MLP hidden width
    norm_eps: float = 1e-6
    rope_base: float = 10000.0       # global (full-attention) layers
    rope_scaling: dict | None = None  # {"type": "linear", "factor"}, on global layers only (Gemma 3 4B and up)
    rope_local_base: float = 10000.0  # sliding-window layers (Gemma 3: 10k, while global layers use 1M)
    max_seq_len: int = 4096
    sliding_window: int | None = None  # local layers: each token sees itself and the window - 1 before it
    layer_types: list[str] = field(default_factory=list)  # per layer "full_attention" or "sliding_attention";
                                                          # empty means all full (Gemma 1)
    query_pre_attn_scalar: int = 0   # attention scale is query_pre_attn_scalar ** -0.5; 0 means head_dim
    attn_softcap: float | None = None   # Gemma 2: attention logits -> cap * tanh(logits / cap) before the softmax
    final_softcap: float | None = None  # Gemma 2: output logits likewise
    post_norms: bool = False         # Gemma 2 / 3: attention and MLP outputs are normalised before the residual add
    qk_norm: bool = False            # Gemma 3: each query and key head is RMS-normalised before RoPE
    tie_embeddings: bool = True      # the head reuses the token embedding matrix (every published Gemma)
    attn_bias: bool = False          # q/k/v/o biases (off in every published Gemma; HF allows them)

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_head
        if not self.query_pre_attn_scalar:
            self.query_pre_attn_scalar = self.head_dim
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.n_layer
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        kinds = {"full_attention", "sliding_attention"}
        if len(self.layer_types) != self.n_layer or not set(self.layer_types) <= kinds:
            raise ValueError(f"layer_types: full_attention or sliding_attention for each of the {self.n_layer} layers")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")

    @classmethod
    def from_name(cls, name: str) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"unknown gemma preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """From a native config.json (the fields of this dataclass, plus "family")."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {"family": "gemma", **asdict(self)}

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        """From a Hugging Face config.json of Gemma (model_type gemma), Gemma 2 (gemma2), Gemma 3 text (gemma3_text),
        or the text decoder of multimodal Gemma 3 (gemma3: nested in text_config). Hub style (rope_theta,
        rope_scaling, rope_local_base_freq, sliding_window_pattern) or transformers-5 style (rope_parameters, for
        Gemma 3 one per layer type; layer_types)."""
        name = hf.get("_name_or_path", "") or ""
        tie = hf.get("tie_word_embeddings", True)
        kind = hf.get("model_type")
        if kind == "gemma3":                                               # vision weights are skipped by from_hf
            hf, kind = hf.get("text_config") or {}, "gemma3_text"
        if kind not in HF_DEFAULTS:
            raise ValueError(f"model_type {kind!r} is not supported by models/gemma.py; supported: gemma, gemma2, "
                             f"gemma3_text, gemma3 (its text decoder)")
        hf = {**HF_DEFAULTS[kind], **hf}
        act = hf["hidden_act"] if kind == "gemma" else hf["hidden_activation"]
        if act != "gelu_pytorch_tanh" and not (kind == "gemma" and act == "gelu"):   # Gemma 1's "gelu" meant tanh
            raise ValueError(f"activation {act!r} is not supported by models/gemma.py; supported: gelu_pytorch_tanh")
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention (an encoder) is not supported by models/gemma.py")

        # RoPE: Hub style keeps rope_theta (global), rope_local_base_freq (Gemma 3 local) and rope_scaling (global)
        # at the top level; transformers 5 moves them into rope_parameters, for Gemma 3 one dict per layer type.
        rope = hf.get("rope_parameters") or {}
        if kind == "gemma3_text":
            full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
        else:
            full, local = dict(rope), {}
        full.update(hf.get("rope_scaling") or {})
        rope_base = full.get("rope_theta", hf["rope_theta"])
        rope_local_base = local.get("rope_theta", hf["rope_local_base_freq"]) if kind == "gemma3_text" else rope_base
        scaling, local_scaling = _hf_rope_scaling(full), _hf_rope_scaling(local)
        n_layer = hf["num_hidden_layers"]
        if hf.get("layer_types"):
            layer_types = list(hf["layer_types"])
        elif kind == "gemma":
            layer_types = ["full_attention"] * n_layer
        else:   # every pattern-th layer global: Gemma 2 alternates (2), Gemma 3 has five local per global (6)
            layer_types = every_nth_global(n_layer, hf.get("sliding_window_pattern") or hf["_sliding_window_pattern"])
        if local_scaling or (scaling and kind == "gemma2" and "sliding_attention" in layer_types):
            raise ValueError("rope scaling on sliding-window layers is not supported by models/gemma.py "
                             "(no published Gemma uses it)")
        n_head = hf["num_attention_heads"]
        head_dim = hf["head_dim"] or hf["hidden_size"] // n_head
        return cls(
            name=name,
            vocab_size=hf["vocab_size"],
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            dim=hf["hidden_size"],
            head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            norm_eps=hf["rms_norm_eps"],
            rope_base=rope_base,
            rope_scaling=scaling,
            rope_local_base=rope_local_base,
            max_seq_len=hf["max_position_embeddings"],
            sliding_window=hf.get("sliding_window") if "sliding_attention" in layer_types else None,
            layer_types=layer_types,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") or head_dim,
            attn_softcap=hf.get("attn_logit_softcapping"),
            final_softcap=hf.get("final_logit_softcapping"),
            post_norms=kind != "gemma",
            qk_norm=kind == "gemma3_text",
            tie_embeddings=tie,
            attn_bias=hf["attention_bias"],
        )

    def to_hf(self) -> dict:
        """A transformers config.json for this model: GemmaForCausalLM, Gemma2ForCausalLM (post-norms) or
        Gemma3ForCausalLM (q/k norms)."""
        kind = "gemma3_text" if self.qk_norm else "gemma2" if self.post_norms else "gemma"
        arch = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[kind]
        sliding = "sliding_attention" in self.layer_types
        inexact = {"gemma": sliding or self.attn_softcap or self.final_softcap
                   or self.query_pre_attn_scalar != self.head_dim,
                   "gemma2": sliding and (self.rope_local_base != self.rope_base or self.rope_scaling),
                   "gemma3_text": not self.post_norms}[kind]
        if inexact:
            raise ValueError(f"this config has no exact {arch} equivalent")
        hf = {
            "architectures": [arch],
            "model_type": kind,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_base,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attn_bias,
        }
        if not self.post_norms:
            hf["hidden_act"] = "gelu_pytorch_tanh"
        else:
            hf.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=self.query_pre_attn_scalar,
                      sliding_window=self.sliding_window, layer_types=self.layer_types,
                      attn_logit_softcapping=self.attn_softcap, final_logit_softcapping=self.final_softcap)
        if self.qk_norm:
            hf["rope_local_base_freq"] = self.rope_local_base
        if self.rope_scaling:
            hf["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_scaling["factor"]}
        return hf


def _hf_rope_scaling(rope: dict) -> dict | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": rope["factor"]}
    raise ValueError(f"rope type {kind!r} is not supported by models/gemma.py; supported: default, linear")


def every_nth_global(n_layer: int, n: int) -> list[str]:
    """Layers n-1, 2n-1, ... attend globally, the rest locally (HF's sliding_window_pattern)."""
    return ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(n_layer)]


# transformers' defaults for what a config.json may leave out. Hub configs of multimodal Gemma 3 keep only the
# text_config keys that differ from Gemma3TextConfig's defaults, so those are needed to read them.
HF_DEFAULTS = {
    "gemma": dict(head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
                  hidden_act="gelu_pytorch_tanh", attention_bias=False),
    "gemma2": dict(head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
                   hidden_activation="gelu_pytorch_tanh", attention_bias=False, query_pre_attn_scalar=256,
                   sliding_window=4096, _sliding_window_pattern=2, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                        rope_theta=1000000.0, rope_local_base_freq=10000.0, max_position_embeddings=131072,
                        hidden_activation="gelu_pytorch_tanh", attention_bias=False, query_pre_attn_scalar=256,
                        sliding_window=4096, _sliding_window_pattern=6, attn_logit_softcapping=None,
                        final_logit_softcapping=None),
}


# Published sizes. Sources: each model's config.json on the Hugging Face Hub (google/gemma-2b, gemma-2-9b,
# gemma-3-27b-it, ...) and the Gemma, Gemma 2 and Gemma 3 technical reports.
_GEMMA_7B = dict(vocab_size=256000, n_layer=28, n_head=16, n_kv_head=16, dim=3072, head_dim=256,
                 intermediate_size=24576, rope_base=10000.0, max_seq_len=8192)
_GEMMA2 = dict(vocab_size=256000, head_dim=256, query_pre_attn_scalar=256, rope_base=10000.0, max_seq_len=8192,
               sliding_window=4096, attn_softcap=50.0, final_softcap=30.0, post_norms=True)
_GEMMA3 = dict(vocab_size=262208, head_dim=256, query_pre_attn_scalar=256, rope_base=1000000.0,
               rope_scaling={"type": "linear", "factor": 8.0}, rope_local_base=10000.0, max_seq_len=131072,
               sliding_window=1024, post_norms=True, qk_norm=True)
PRESETS = {
    "gemma-2b": dict(_GEMMA_7B, n_layer=18, n_head=8, n_kv_head=1, dim=2048, intermediate_size=16384),
    "gemma-7b": _GEMMA_7B,
    "gemma-2-2b": dict(_GEMMA2, n_layer=26, n_head=8, n_kv_head=4, dim=2304, intermediate_size=9216,
                       layer_types=every_nth_global(26, 2)),
    "gemma-2-9b": dict(_GEMMA2, n_layer=42, n_head=16, n_kv_head=8, dim=3584, intermediate_size=14336,
                       layer_types=every_nth_global(42, 2)),
    "gemma-2-27b": dict(_GEMMA2, n_layer=46, n_head=32, n_kv_head=16, dim=4608, head_dim=128,
                        intermediate_size=36864, query_pre_attn_scalar=144, layer_types=every_nth_global(46, 2)),
    "gemma-3-270m": dict(_GEMMA3, vocab_size=262144, n_layer=18, n_head=4, n_kv_head=1, dim=640,
                         intermediate_size=2048, rope_scaling=None, max_seq_len=32768, sliding_window=512,
                         layer_types=every_nth_global(18, 6)),
    "gemma-3-1b": dict(_GEMMA3, vocab_size=262144, n_layer=26, n_head=4, n_kv_head=1, dim=1152,
                       intermediate_size=6912, rope_scaling=None, max_seq_len=32768, sliding_window=512,
                       layer_types=every_nth_global(26, 6)),
    "gemma-3-4b": dict(_GEMMA3, n_layer=34, n_head=8, n_kv_head=4, dim=2560, intermediate_size=10240,
                       layer_types=every_nth_global(34, 6)),
    "gemma-3-12b": dict(_GEMMA3, n_layer=48, n_head=16, n_kv_head=8, dim=3840, intermediate_size=15360,
                        layer_types=every_nth_global(48, 6)),
    "gemma-3-27b": dict(_GEMMA3, n_layer=62, n_head=32, n_kv_head=16, dim=5376, head_dim=128,
                        intermediate_size=21504, query_pre_attn_scalar=168, layer_types=every_nth_global(62, 6)),
}


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * (1 + weight). Gemma stores the weight as an offset
# from 1 (zero-initialised). Half-precision inputs are normalised and scaled in fp32 and only then cast back, as HF
# does for Gemma (Llama casts before the weight multiplies).


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        if x.dtype == torch.float32:                                        # one fused kernel
            return F.rms_norm(x, (x.size(-1),), 1 + self.weight, self.eps)
        return (F.rms_norm(x.float(), (x.size(-1),), eps=self.eps) * (1 + self.weight.float())).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# RoPE (rotary position embedding, Su et al. 2021). Channel pair (i, i + D/2) of q and k is rotated by the angle
# pos * inv_freq[i], inv_freq[i] = base^(-2i/D), so q.k depends only on the distance between the two positions.
# Gemma 3 keeps two tables: global layers use base 1M, stretched by linear scaling (Chen et al. 2023: every
# frequency / factor) in the 128K-context sizes; local layers, which never look far, use base 10k unscaled.


def rope_inv_freq(config: Config, device=None, local: bool = False) -> torch.Tensor:
    D = config.head_dim
    base = config.rope_local_base if local else config.rope_base
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, device=device).float() / D))  # (D/2,)
    scaling = None if local else config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["type"] == "linear":
        return inv_freq / scaling["factor"]
    raise ValueError(f"unknown rope scaling type {scaling['type']!r}; supported: linear")


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
# KV cache: preallocated key/value buffers. Decoding step t writes its keys and values at input_pos and attends
# to every position written so far; static shapes keep torch.compile and CUDA graphs happy. Local layers keep the
# full length too and mask by window.


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
# q, k and v. Scores are scaled by query_pre_attn_scalar ** -0.5 (head_dim ** -0.5 but in Gemma 2 / 3 27B).
# Soft-capping (Gemma 2) bends the scores through cap * tanh(scores / cap) before the softmax, which SDPA cannot
# do: those models take the explicit path below, the others the fused kernel (but in generate.py's CPU decoding).


class Attention(nn.Module):
    use_sdpa = True     # False: the explicit path for every layer (generate.py decodes so on a CPU)
    decode_attention = None   # generate.py's CPU decoding: one kernel call for one query per sequence

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        H, K, D = config.n_head, config.n_kv_head, config.head_dim
        self.qkv = nn.Linear(config.dim, (H + 2 * K) * D, bias=config.attn_bias)
        self.o = nn.Linear(H * D, config.dim, bias=config.attn_bias)
        if config.qk_norm:                                                 # over each head's D channels
            self.q_norm = RMSNorm(D, config.norm_eps)
            self.k_norm = RMSNorm(D, config.norm_eps)
        self.scale = config.query_pre_attn_scalar ** -0.5
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
        cap = self.config.attn_softcap
        if T == 1 and self.decode_attention is not None and self.kv_cache is not None and input_pos is not None:
            # decoding on a CPU (generate.py): what the lines below compute for one query per sequence (RoPE, the
            # cache write, attention), in one kernel call from q, k and v before RoPE
            y = self.decode_attention(*self.heads(x, None, None), cos, sin, self.kv_cache, input_pos, rows, mask,
                                      self.scale, cap)
            return self.o(y.view(B, T, H * D))                             # y (B, H, 1, D): heads side by side
        q, k, v = self.heads(x, cos, sin)                                  # (B, H, T, D), (B, K, T, D) x 2
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, rows)             # (B, K, S, D)
        if self.use_sdpa and cap is None and mask is None:                 # plain causal over these T tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale, enable_gqa=H != K)
        elif self.use_sdpa and cap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=H != K)
        else:   # the same attention spelled out, with the cap (if any) between the scores and the softmax
            G = H // K                                                     # query heads per key/value head
            scores = q.reshape(B, K, G * T, D) @ k.transpose(-2, -1)       # (B, K, G*T, S): k is not copied per group
            if cap is None:
                scores = scores * self.scale
            else:
                scores = cap * torch.tanh(scores * (self.scale / cap))     # scaled, then squashed into (-cap, cap)
            if mask is None:                                               # causal among these T tokens (S == T)
                mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            scores = scores.view(B, K, G, T, -1) + mask.unsqueeze(-3)      # mask (T, S) or (B, 1, T, S)
            probs = F.softmax(scores.float(), dim=-1).to(q.dtype)          # softmax in fp32, as HF does
            y = (probs.view(B, K, G * T, -1) @ v).view(B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)                         # heads side by side again
        return self.o(y)


# ----------------------------------------------------------------------------------------------------------------
# MLP: GeGLU (Shazeer 2020): down(gelu(gate(x)) * up(x)), GELU in its tanh approximation, with gate and up fused
# into one matmul.


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_up = nn.Linear(config.dim, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.gelu(gate, approximate="tanh") * up)


# ----------------------------------------------------------------------------------------------------------------
# Block: pre-norm residual, x + attn(norm(x)), then x + mlp(norm(x)). Gemma 2 / 3 also normalise what attention and
# the MLP return: x + post_norm(attn(norm(x))) ("sandwich" norms). Each block is a global or a local layer.


class Block(nn.Module):
    def __init__(self, config: Config, layer_type: str):
        super().__init__()
        self.layer_type = layer_type                                       # "full_attention" or "sliding_attention"
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.dim, config.norm_eps) if config.post_norms else nn.Identity()
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)
        self.post_mlp_norm = RMSNorm(config.dim, config.norm_eps) if config.post_norms else nn.Identity()

    def forward(self, x, cos, sin, mask, input_pos=None, cache_rows=None):
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin, mask, input_pos, cache_rows))
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))


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
            self.layers = nn.ModuleList(Block(config, layer_type) for layer_type in config.layer_types)
            self.norm = RMSNorm(config.dim, config.norm_eps)
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.to_empty(device=device)
        if config.tie_embeddings:                                          # after to_empty, which unties them
            self.lm_head.weight = self.tok_embeddings.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # Pretraining init (as GPT-2 / Llama): N(0, 0.02) weights, zero biases, RMSNorm weights 0. Applied to every
        # module (model.apply), it sets every parameter the model has: nothing keeps a value from its constructor.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)
        if isinstance(module, RMSNorm):                                    # every norm, q_norm and k_norm too
            torch.nn.init.zeros_(module.weight)                            # a scale of 1 + 0

    def setup_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        """Preallocate each layer's KV cache for max_seq_len positions, and the two RoPE tables for them."""
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
        cos, sin = rope_cos_sin(rope_inv_freq(c, device, local=True), positions)
        self.register_buffer("rope_local_cos", cos.to(dtype), persistent=False)
        self.register_buffer("rope_local_sin", sin.to(dtype), persistent=False)
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
        c = self.config
        x = self.tok_embeddings(idx)                                       # (B, T, C)
        x = x * torch.tensor(c.dim ** 0.5, dtype=x.dtype)                  # sqrt(C) rounded to x's dtype, as HF does
        per_type = {}                                                      # layer type -> its (cos, sin, mask)
        for layer_type in dict.fromkeys(c.layer_types):                    # masks and RoPE once, not per layer
            local = layer_type == "sliding_attention"
            window = c.sliding_window if local else None
            if input_pos is None:
                positions = torch.arange(T, device=idx.device)
                cos, sin = rope_cos_sin(rope_inv_freq(c, idx.device, local), positions)
                mask = None                                                # SDPA's is_causal
                if c.attn_softcap is not None or (window is not None and T > window):
                    mask = sliding_causal_mask(positions, positions, window, x.dtype)
                per_type[layer_type] = (cos.to(x.dtype), sin.to(x.dtype), mask)
            else:
                cos, sin = (self.rope_local_cos, self.rope_local_sin) if local else (self.rope_cos, self.rope_sin)
                cos, sin = cos[input_pos], sin[input_pos]                  # (T, D) or (B, T, D)
                mask = sliding_causal_mask(input_pos, self.cache_positions, window, x.dtype)  # (T, S) or (B, T, S)
                if input_pos.dim() == 2:
                    # A ragged batch: every row is a sequence of its own, at its own positions, in its own cache
                    # row. Its RoPE angles and its mask come from its own positions and broadcast over the heads
                    # alone, so no row can see another. Cache entries past a row's position are masked, never
                    # read: a slot can take a new sequence without being cleared.
                    cos, sin, mask = cos[:, None], sin[:, None], mask[:, None]  # (B, 1, T, D) x 2, (B, 1, T, S)
                per_type[layer_type] = (cos, sin, mask)
        for block in self.layers:
            x = block(x, *per_type[block.layer_type], input_pos, cache_rows)
        x = self.norm(x)                                                   # (B, T, C)
        return x if hidden else self.output(x)                             # (B, T, vocab)

    def output(self, x):
        # The final hidden states (..., C) -> logits (..., vocab). train.py's loss calls it on a few rows at a time
        # (forward(idx, hidden=True), then output), so the whole batch's logits never exist at once.
        logits = self.lm_head(x)
        cap = self.config.final_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)  # Gemma 2's soft cap


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
        if config.post_norms:   # Gemma 2 reuses the name post_attention_layernorm for the norm after attention
            m[n + "post_attn_norm.weight"] = [h + "post_attention_layernorm.weight"]
            m[n + "mlp_norm.weight"] = [h + "pre_feedforward_layernorm.weight"]
            m[n + "post_mlp_norm.weight"] = [h + "post_feedforward_layernorm.weight"]
        else:
            m[n + "mlp_norm.weight"] = [h + "post_attention_layernorm.weight"]
        if config.qk_norm:
            m[n + "attn.q_norm.weight"] = [h + "self_attn.q_norm.weight"]
            m[n + "attn.k_norm.weight"] = [h + "self_attn.k_norm.weight"]
        params = ["weight", "bias"] if config.attn_bias else ["weight"]
        for p in params:
            m[n + f"attn.qkv.{p}"] = [h + f"self_attn.{x}_proj.{p}" for x in "qkv"]
            m[n + f"attn.o.{p}"] = [h + f"self_attn.o_proj.{p}"]
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


# Multimodal Gemma 3 (Gemma3ForConditionalGeneration) keeps the text decoder under a prefix (Hub files and
# save_pretrained: language_model.model.*; transformers' module tree, which some tools save: model.language_model.*)
# beside a SigLIP vision tower and its projector, which this file does not run.
HF_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                    "language_model.lm_head.": "lm_head."}
HF_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.",
                      "model.vision_tower.", "model.multi_modal_projector.")


def from_hf(hf_tensors, config: Config):
    """Stream HF (name, tensor) pairs in any order; yield native (name, tensor) pairs as soon as every part of a
    native tensor has arrived. Peak memory: the parts of one fused tensor. Unknown HF names raise."""
    names = hf_weight_map(config)
    wanted = {hf_name: (native, i) for native, parts in names.items() for i, hf_name in enumerate(parts)}
    pending: dict[str, dict[int, torch.Tensor]] = {}                     # native name -> parts seen so far
    done = set()
    for hf_name, tensor in hf_tensors:
        if hf_name.startswith(HF_VISION_PREFIXES):
            continue                                                       # the image half of a multimodal Gemma 3
        prefix = next((p for p in HF_TEXT_PREFIXES if hf_name.startswith(p)), None)
        if prefix:
            hf_name = HF_TEXT_PREFIXES[prefix] + hf_name[len(prefix):]
        if hf_name not in wanted:
            if hf_name == "lm_head.weight" and config.tie_embeddings:
                continue                                                   # a tied copy some checkpoints store
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue                                                   # a RoPE buffer old checkpoints saved
            raise ValueError(f"unexpected weight {hf_name!r} for a gemma checkpoint with this config.json")
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
    """Stream native (name, tensor) pairs; yield HF (name, tensor) pairs, splitting fused tensors. A multimodal
    Gemma 3 comes back as its text decoder alone (Gemma3ForCausalLM)."""
    names = hf_weight_map(config)
    for native, tensor in native_tensors:
        if native not in names:
            raise ValueError(f"unexpected native weight {native!r} for this gemma config")
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
