"""Parameter-efficient finetuning: LoRA, QLoRA and LLaMA-Adapter layers; saving, loading and merging adapters.

    python finetune_lora.py RECIPE.yaml [key=value ...]      # = python train.py RECIPE.yaml method=lora ...
    python finetune_lora.py merge CHECKPOINT ADAPTER OUT     # fold a LoRA adapter into the base weights

Python:

    model = models.load("checkpoints/HuggingFaceTB/SmolLM2-135M", dtype=torch.float32)
    apply_lora(model, r=8, alpha=16)          # QLoRA: models.quantize(model, "nf4") first, then apply_lora
    ...                                       # train the parameters that require grad (only the LoRA ones)
    save_adapter(model, "out/adapter.safetensors", base="checkpoints/HuggingFaceTB/SmolLM2-135M")
    load_adapter(models.load(...), "out/adapter.safetensors")                    # back onto a fresh base
    merge_checkpoint("checkpoints/HuggingFaceTB/SmolLM2-135M", "out/adapter.safetensors", "checkpoints/merged")

Every method here freezes the base model and adds a few trainable tensors that start as an exact no-op, so
finetuning begins from the pretrained model's outputs. Adapters are saved alone (safetensors, a few MB) with the
settings that rebuild their layers in the file's metadata.

Shapes: B batch, T tokens, C model width, H query heads, K key/value heads, D head_dim, P prompt length, r rank.
"""

import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import models

# ----------------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"). A frozen weight W (out, in) gets a
# trainable low-rank update: y = W x + (alpha / r) * B A x, with A (r, in) and B (out, r). B starts at zero, so
# the update starts at zero; alpha / r keeps the update's scale steady when r changes (section 4.1). After
# training, B A * alpha / r folds into W and inference costs nothing extra.

LORA_TARGETS = ("qkv", "o", "gate_up", "up", "down")   # linears of attn / mlp across the model files (up: phi-2)


class LoRALinear(nn.Module):
    """A linear-like module (nn.Linear, a model file's Int8Linear, bitsandbytes Linear4bit / Linear8bitLt) plus
    a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, dtype=None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout)
        # Trainable weights take the dtype of the base's float weight; over a quantized base, the given dtype.
        weight = base.weight
        dtype = weight.dtype if weight.is_floating_point() else (dtype or torch.float32)
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, device=weight.device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, r, device=weight.device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        # A as nn.Linear initialises a weight (kaiming-uniform), as the reference loralib does; B = 0: a no-op.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x):
        # x: (..., in) -> (..., out). The low-rank path runs in x's dtype: (x A^T) is (rows, r), then B^T.
        shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features)                                # (rows, in): every leading dim as rows
        y = self.base(x)                                                   # (rows, out)
        x_a = F.linear(self.dropout(x) if self.dropout.p else x, self.lora_a.to(x.dtype))   # (rows, r)
        # One addmm_ adds scale * (x A^T) B^T into the base's output in place (its backward does not read it): no
        # (rows, out) temporaries for the product, its scaling and the sum, in forward or backward.
        return y.addmm_(x_a, self.lora_b.to(y.dtype).t(), alpha=self.scale).view(*shape, self.out_features)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}"


def apply_lora(model, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets=LORA_TARGETS, head: bool = False):
    """Wrap the linears named in targets inside each block's attn and mlp (and lm_head if head) with LoRALinear,
    in place. Every base parameter is frozen: only lora_a and lora_b train."""
    if isinstance(targets, str):                         # "qkv,o" from a recipe or an adapter's metadata
        targets = tuple(t for t in targets.split(",") if t)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(map(repr, unknown))}; valid: {', '.join(LORA_TARGETS)} "
                         f"(and head=True for lm_head)")
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers")
    if head and model.lm_head.weight is model.tok_embeddings.weight:
        raise ValueError("lm_head is tied to the token embeddings (tie_embeddings): a LoRA on it could not be merged "
                         "without changing the embeddings too; use head=False")
    model.requires_grad_(False)
    dtype = model.tok_embeddings.weight.dtype            # the model's dtype (the embedding is never quantized)
    wrapped = 0
    for block in model.layers:
        for parent in (block.attn, block.mlp):
            for name in targets:
                child = getattr(parent, name, None)
                if isinstance(child, nn.Module) and hasattr(child, "in_features"):
                    setattr(parent, name, LoRALinear(child, r, alpha, dropout, dtype))
                    wrapped += 1
    if head:
        model.lm_head = LoRALinear(model.lm_head, r, alpha, dropout, dtype)
    elif not wrapped:
        raise ValueError(f"no linear layer named {', '.join(targets)} in this model's blocks")
    return model


def quantization_of(linear: nn.Module) -> str:
    """The models.quantize mode that made this linear: int8, nf4, fp4 or bnb.int8."""
    kind = type(linear).__name__
    if kind == "Linear4bit":
        return linear.weight.quant_type
    return {"Int8Linear": "int8", "Linear8bitLt": "bnb.int8"}.get(kind, kind)


def merge_lora(model):
    """Fold each LoRA update into its base weight, W <- W + B A * alpha / r, and put the plain base back in place of
    the wrapper. The merged model computes what the wrapped one did, in one matmul per layer."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not wrapped:
        raise ValueError("the model has no LoRA layers to merge")
    for name, m in wrapped:                              # check them all before changing any
        if type(m.base) is not nn.Linear:
            raise ValueError(f"cannot merge the LoRA of {name} into its {quantization_of(m.base)}-quantized base: the "
                             f"update would be rounded away; merge into the full-precision checkpoint instead: "
                             f"python finetune_lora.py merge CHECKPOINT ADAPTER OUT (merge_checkpoint)")
    with torch.no_grad():
        for name, m in wrapped:
            w = m.base.weight
            delta = (m.lora_b.float() @ m.lora_a.float()) * m.scale          # (out, r) @ (r, in) = (out, in)
            w.data = (w.float() + delta).to(w.dtype)     # a new tensor: W may be memory-mapped read-only
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, m.base)
    return model


# ----------------------------------------------------------------------------------------------------------------
# QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") is LoRA over a frozen 4-bit NF4
# base: models.quantize(model, "nf4"), then apply_lora(model). Gradients flow through the dequantized base weights
# to the inputs of each layer; only the LoRA weights (in the model's dtype) are updated. Quantize first: quantize
# swaps plain nn.Linear children and would not see a base already inside a LoRALinear.


# ----------------------------------------------------------------------------------------------------------------
# LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
# Attention"). In each of the top layers, P learnable prompt vectors become extra keys and values. The tokens'
# queries attend to them in a softmax of their own, scaled by a gate per head that starts at zero ("zero-init
# attention"), so training starts from the unchanged model and the prompts fade in:
#     y = attn(x) + o_weight @ concat_heads(gate[h] * softmax(q k_p^T / sqrt(D)) v_p)
# The prompts have no position: RoPE does not rotate their keys. The KV cache holds only the tokens; the prompt's
# keys and values are recomputed each call (P rows, cheap).


class AdapterAttention(nn.Module):
    def __init__(self, attn: nn.Module, prompt_len: int = 10, dtype=None, device=None):
        super().__init__()
        # The frozen attention of this block, named `base` as LoRALinear names the linear it wraps: its tensors are
        # layers.i.attn.base.* here and layers.i.attn.* in the checkpoint (base_name maps one to the other).
        self.base = attn
        c = attn.config
        self.prompt = nn.Parameter(torch.empty(prompt_len, c.dim, dtype=dtype, device=device))  # (P, C)
        self.gate = nn.Parameter(torch.empty(c.n_head, dtype=dtype, device=device))             # (H,)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.prompt, std=0.02)
        nn.init.zeros_(self.gate)                                          # zero-init attention: a no-op

    # The KV cache belongs to the wrapped attention, which reads it in its forward; but a model file's setup_cache()
    # and clear_cache() assign block.attn.kv_cache, and generate.py reads it, on whatever block.attn is. So reading
    # kv_cache here reads the base's, and assigning it assigns the base's. (Not a property setter: nn.Module's
    # __setattr__ registers a Module value, a KVCache, as a child of this wrapper before a setter could run.)
    @property
    def kv_cache(self):
        return self.base.kv_cache

    def __setattr__(self, name, value):
        if name == "kv_cache":
            setattr(self.base, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x, cos, sin, mask, input_pos=None, cache_rows=None):
        y = self.base(x, cos, sin, mask, input_pos, cache_rows)            # (B, T, C), the cache updated as usual
        B, T, _ = x.shape
        c = self.base.config
        H, K, D = c.n_head, c.n_kv_head, c.head_dim
        q, _, _ = self.base.heads(x, cos, sin)                             # (B, H, T, D)
        P = self.prompt.size(0)
        no_rotation = cos.new_ones(P, cos.size(-1)), sin.new_zeros(P, sin.size(-1))  # cos 1, sin 0: identity
        prompt = self.prompt.to(x.dtype).expand(B, P, -1)                  # (B, P, C)
        _, k_p, v_p = self.base.heads(prompt, *no_rotation)                # (B, K, P, D) x 2
        # Every token sees every prompt vector: no mask. Gemma scales scores by its own attn.scale (Gemma 2's
        # soft-cap is left to the tokens' own scores).
        y_p = F.scaled_dot_product_attention(q, k_p, v_p, scale=getattr(self.base, "scale", None),
                                             enable_gqa=H != K)            # (B, H, T, D)
        y_p = y_p * self.gate.to(x.dtype).view(1, H, 1, 1)
        y_p = y_p.transpose(1, 2).reshape(B, T, H * D)                     # heads side by side
        return y + self.project(y_p)

    def project(self, y_p):
        # attn.o's weight without its bias: the bias is already in y, once.
        o = self.base.o
        if type(o) is nn.Linear:
            return F.linear(y_p, o.weight)
        out = o(y_p)                                                       # a quantized o adds its bias: take it off
        return out if o.bias is None else out - o.bias


def apply_adapter(model, prompt_len: int = 10, n_layers: int = 2):
    """Wrap the attention of the top n_layers blocks with AdapterAttention, in place. Every base parameter is
    frozen: only the prompts and gates train."""
    if not 1 <= n_layers <= len(model.layers):
        raise ValueError(f"n_layers must be between 1 and the model's {len(model.layers)} layers, got {n_layers}")
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    if any(isinstance(m, AdapterAttention) for m in model.modules()):
        raise ValueError("the model already has LLaMA-Adapter layers")
    model.requires_grad_(False)
    like = model.tok_embeddings.weight                                     # the model's dtype and device
    for block in model.layers[-n_layers:]:
        block.attn = AdapterAttention(block.attn, prompt_len, like.dtype, like.device)
    return model


def base_name(name: str) -> str:
    """The name in the base checkpoint of a wrapped model's tensor: LoRALinear and AdapterAttention both call what
    they wrap `base`, so layers.0.attn.qkv.base.weight (LoRA) and layers.1.attn.base.qkv.weight (adapter) are
    layers.0.attn.qkv.weight and layers.1.attn.qkv.weight there."""
    return name.replace(".base.", ".")


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading adapters: the trainable tensors under their names in model.state_dict(), and the settings
# that rebuild their layers as safetensors metadata (strings):
#   kind "lora":          r, alpha, dropout, targets ("qkv,o,..."), head ("true" / "false")
#   kind "llama-adapter": prompt_len, n_layers
#   both:                 merged ("true" once folded into the weights of the checkpoint beside it), and whatever
#                         the caller adds (base checkpoint, step, ...)


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The LoRA and LLaMA-Adapter parameters of a model, by name."""
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = m.lora_a, m.lora_b
        elif isinstance(m, AdapterAttention):
            tensors[f"{name}.prompt"], tensors[f"{name}.gate"] = m.prompt, m.gate
    return tensors


def adapter_settings(model) -> dict[str, str]:
    """The metadata that apply_lora / apply_adapter need to rebuild this model's adapter layers."""
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    adapters = [m for m in model.modules() if isinstance(m, AdapterAttention)]
    if lora and adapters:
        raise ValueError("the model has both LoRA and LLaMA-Adapter layers; an adapter file holds one kind")
    if lora:
        m = next(iter(lora.values()))
        wrapped = {name.rpartition(".")[2] for name in lora}
        return {"kind": "lora", "r": str(m.r), "alpha": str(m.alpha), "dropout": str(m.dropout.p),
                "targets": ",".join(t for t in LORA_TARGETS if t in wrapped),
                "head": "true" if "lm_head" in lora else "false"}
    if adapters:
        return {"kind": "llama-adapter", "prompt_len": str(adapters[0].prompt.size(0)),
                "n_layers": str(len(adapters))}
    raise ValueError("the model has no LoRA or LLaMA-Adapter layers to save")


def save_adapter(model, path, **metadata):
    """Write only the adapter tensors and their settings to path (safetensors), atomically."""
    save_adapter_state(adapter_state_dict(model), path, **{**metadata, **adapter_settings(model)})


ADAPTER_TENSORS = {"lora": (".lora_a", ".lora_b"), "llama-adapter": (".prompt", ".gate")}
ADAPTER_SETTINGS = {"lora": ("r", "alpha", "targets", "head"), "llama-adapter": ("prompt_len", "n_layers")}


def save_adapter_state(state: dict, path, kind: str, **metadata):
    """save_adapter from the adapter tensors by name, e.g. gathered from a sharded model onto one process; the
    settings that rebuild the layers (ADAPTER_SETTINGS[kind]) come as keywords, with anything else to record."""
    if kind not in ADAPTER_TENSORS:
        raise ValueError(f"unknown adapter kind {kind!r}; valid: {', '.join(ADAPTER_TENSORS)}")
    missing = [k for k in ADAPTER_SETTINGS[kind] if k not in metadata]
    if missing:
        raise ValueError(f"a {kind} adapter needs its settings {', '.join(ADAPTER_SETTINGS[kind])}; "
                         f"missing {', '.join(missing)}")
    if not state:
        raise ValueError("no adapter tensors to save")
    others = [name for name in state if not name.endswith(ADAPTER_TENSORS[kind])]
    if others:
        raise ValueError(f"{others[0]!r} is not a {kind} tensor (names end in {', '.join(ADAPTER_TENSORS[kind])}): "
                         f"an adapter file holds the adapter only")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    strings = {k: metadata_string(v) for k, v in metadata.items()}
    write_safetensors(tensors, Path(path), {**strings, "kind": kind, "merged": "false"})


def metadata_string(value) -> str:
    # safetensors metadata is str -> str: booleans as true / false, lists as a,b,c
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def write_safetensors(tensors: dict, path: Path, metadata: dict[str, str]):
    """save_file through models.atomic_file (a temporary beside path, renamed over it): never half a file."""
    models.atomic_file(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def adapter_metadata(path) -> dict[str, str]:
    """The metadata of an adapter file: kind, its settings, merged, and what the trainer added."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} not found")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a safetensors file ({e})") from None
    if metadata.get("kind") not in ("lora", "llama-adapter"):
        raise ValueError(f"{path} is not an adapter file: its metadata has no kind 'lora' or 'llama-adapter'")
    return metadata


def load_adapter(model, path):
    """Rebuild the adapter layers recorded in path's metadata on model (apply_lora / apply_adapter) and load their
    weights. Strict: a name missing from the file, or one the model lacks, is an error."""
    meta = adapter_metadata(path)
    try:
        if meta["kind"] == "lora":
            apply_lora(model, r=int(meta["r"]), alpha=float(meta["alpha"]), dropout=float(meta.get("dropout", 0)),
                       targets=meta["targets"], head=meta["head"] == "true")
        else:
            apply_adapter(model, prompt_len=int(meta["prompt_len"]), n_layers=int(meta["n_layers"]))
    except KeyError as e:
        raise ValueError(f"{path}: the {meta['kind']} metadata lacks {e}") from None
    params = adapter_state_dict(model)
    tensors = load_file(path)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {', '.join(missing[:3]) or 'none'}; "
                         f"unexpected {', '.join(unexpected[:3]) or 'none'}")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, this model needs "
                                 f"{tuple(p.shape)}")
            p.copy_(tensors[name])                                         # cast to the model's dtype and device
    return model


# ----------------------------------------------------------------------------------------------------------------
# Merging into a checkpoint: base + LoRA -> a native checkpoint dir with the merged weights, which generate.py,
# train.py and convert_hf.py --to-hf read like any other. The adapter travels with it as adapter.safetensors.


def merge_checkpoint(checkpoint_dir, adapter_path, out_dir) -> Path:
    """Load the full-precision base, apply and merge the adapter, and write out_dir (replaced only on success).
    A LLaMA-Adapter cannot be folded into plain weights: out_dir then holds the base weights and the adapter,
    merged=false, to be applied at load time."""
    checkpoint_dir, adapter_path, out_dir = Path(checkpoint_dir), Path(adapter_path), Path(out_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint dir {checkpoint_dir} not found")
    meta = adapter_metadata(adapter_path)
    _, config = models.read_config(checkpoint_dir)
    model = models.load(checkpoint_dir, device="cpu")                     # the checkpoint's own dtype
    load_adapter(model, adapter_path)                                      # also checks that the adapter fits
    mergeable = meta["kind"] == "lora"
    if mergeable:
        merge_lora(model)
    # The one checkpoint writer (models.save), with shards no larger than the base's. A LLaMA-Adapter leaves the
    # base weights as they are.
    state = model.state_dict() if mergeable else models.load_state_dict(checkpoint_dir)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter.safetensors"
        write_safetensors(load_file(adapter_path), adapter, {**meta, "merged": "true" if mergeable else "false"})
        shard_bytes = models.largest_file_bytes(models.weight_files(checkpoint_dir))
        models.save(state, config, out_dir, checkpoint_dir, shard_bytes, extra_files={"adapter.safetensors": adapter})
    if not mergeable:
        print(f"note: a LLaMA-Adapter cannot be folded into plain weights; {out_dir} holds the base weights and "
              f"adapter.safetensors (merged=false), which finetune_lora.load_adapter applies at load time",
              file=sys.stderr)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Command line

USAGE = "python finetune_lora.py RECIPE.yaml [key=value ...] | python finetune_lora.py merge CHECKPOINT ADAPTER OUT"
PEFT_METHODS = ("lora", "qlora", "adapter")


def run_train(recipe, overrides: list[str]):
    """train.py's main on the recipe, with method=lora unless an override names another PEFT method. train.py owns
    the training loop and builds on this file, so it is imported here, when a recipe is run, not at the top."""
    for o in overrides:
        key, eq, value = o.partition("=")
        if not eq:
            raise ValueError(f"overrides are key=value, got {o!r}")
        if key == "method" and value not in PEFT_METHODS:
            raise ValueError(f"finetune_lora.py runs method={'|'.join(PEFT_METHODS)}, got method={value}; "
                             f"for other methods run train.py")
    method = [] if any(o.startswith("method=") for o in overrides) else ["method=lora"]
    import train
    train.main([str(recipe), *method, *overrides])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.split("\n\n")[1])
        return
    try:
        if not argv:
            raise ValueError(f"no arguments; usage: {USAGE}")
        if argv[0] == "merge":
            if len(argv) != 4:
                raise ValueError(f"merge takes 3 arguments, CHECKPOINT ADAPTER OUT; got {len(argv) - 1}")
            out = merge_checkpoint(*argv[1:])
            print(f"wrote {out}", file=sys.stderr)
        else:
            run_train(argv[0], argv[1:])
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
