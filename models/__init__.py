"""Model families: which model file a checkpoint belongs to, the contract every model file keeps, and loading and
saving native checkpoint dirs.

A native checkpoint dir holds config.json ({"family": ..., Config fields}), model.safetensors (or shards with
model.safetensors.index.json) and the tokenizer files. Loading builds the model on the meta device and then
assigns the memory-mapped tensors, so a model costs its weights once. Saving writes into a temporary directory
that is renamed into place only when complete.

The model-file contract
-----------------------
This is the authoritative list of what a model file, models/<family>.py, defines because the shared scripts
(convert_hf.py, generate.py, train.py, finetune_lora.py, evaluate.py and this file) rely on it. test_contract.py
checks it for every family in FAMILIES and names the piece that is missing. Everything else in a model file is its
own business. A model file imports only torch (and bitsandbytes inside quantize) and never the shared scripts.

Registration
  HF_MODEL_TYPES     the Hugging Face config.json model_type values its Config.from_hf reads, e.g. ("llama",
                     "mistral"); family_of_hf finds the file by them (each type belongs to one family)
  FAMILIES           (below, in this file) lists <family>; with HF_MODEL_TYPES that is all registration takes

Config, a dataclass with a default for every field
  fields             name, vocab_size, n_layer, n_head, n_kv_head, dim, head_dim (0 = dim // n_head),
                     intermediate_size, norm_eps, max_seq_len, tie_embeddings; Config(...) setting only the sizes
                     is a small working model
  PRESETS            {preset name: fields} for the published sizes, with the published values
  Config.from_name(preset), a ValueError that lists PRESETS for an unknown one
  Config.from_dict(d) / .to_dict()   the native config.json; to_dict() is {"family": "<family>", every field}
  Config.from_hf(hf) / .to_hf()      a transformers config.json (Hub style and transformers-5 style) and back

Transformer(config), an nn.Module built on the current device (`with torch.device(...)`, meta included)
  .config
  .tok_embeddings    nn.Embedding (vocab_size, dim); its weight's dtype and device are the model's
  .layers            nn.ModuleList of the blocks (FSDP shards each; activation checkpointing wraps block.forward)
  .norm              the final norm
  .lm_head           nn.Linear dim -> vocab_size; the same Parameter as tok_embeddings.weight if tie_embeddings
  .forward(idx, input_pos=None, cache_rows=None) -> logits (B, T, vocab_size), for idx (B, T) token ids
                     input_pos None: causal over positions 0..T-1, no cache (training, scoring)
                               (T,): these cache positions in every row
                               (B, T): row b at positions input_pos[b] in its own cache row, attending causally
                               (and within its sliding window) to that row alone; cache entries past a row's
                               position are masked, so a slot is reused without clearing
                     cache_rows slice(start, stop): the cache rows of these B rows, a view; None: rows 0..B-1
                     A row's logits do not depend on what the other rows hold.
                     hidden=True: the final norm's output (B, T, dim) instead of the logits
  .output(h) -> logits (..., vocab_size) of final hidden states h (..., dim): lm_head and whatever follows it
                     (Gemma 2's soft cap); output(forward(idx, hidden=True)) == forward(idx). train.py's loss
                     applies it a chunk of rows at a time
  .setup_cache(batch_size, max_seq_len, device=None, dtype=None)   gives every block's attn a KV cache of
                     batch_size rows (.kv_cache.k and .v: (batch_size, n_kv_head, max_seq_len, head_dim));
                     a ValueError past config.max_seq_len
  .clear_cache()     every block's attn.kv_cache back to None
  ._init_weights(module)   pretraining init of that module's own parameters: model.apply(model._init_weights)
                     sets every parameter (a model holds no buffers until setup_cache), so that building on
                     meta, to_empty and applying it from a seed gives bitwise what a plain build from that seed
                     gives (train.py's FSDP pretraining; to_empty unties a tied head, FSDP2 ties it again)
  state_dict()       names are hf_weight_map(config)'s keys (plus lm_head.weight when tied: saved once)

Each block, model.layers[i]
  .attn, .mlp        attention and MLP; forward(x, cos, sin, mask, input_pos=None, cache_rows=None) on the block
                     and on attn (LLaMA-Adapter wraps attn and calls it so)
  attn.heads(x, cos, sin) -> q (B, H, T, D), k and v (B, K, T, D), RoPE applied; cos and sin (T, R) broadcast
  attn.config        the Config;  attn.o  the output projection (H * D -> dim);  attn.scale  optional score scale
                     where it is not head_dim ** -0.5 (Gemma);  attn.kv_cache  None or setup_cache's cache
  linear layers      the nn.Linear children of attn and mlp are named from finetune_lora.LORA_TARGETS (qkv, o,
                     gate_up, up, down), which LoRA wraps and quantize swaps
  norms              the final one is `norm`; one feeding a sublayer is <sublayer>_norm (attn_norm, mlp_norm); one
                     on a sublayer's output is post_<sublayer>_norm (post_attn_norm, post_mlp_norm); the norms
                     of q and k in attention are q_norm and k_norm

Weights (convert_hf.py)
  hf_weight_map(config) -> {native name: [HF names, in the order they are concatenated]}
  hf_split_sizes(config, native name) -> the rows of each HF tensor inside a fused native one
  from_hf(pairs, config) / to_hf(pairs, config)   stream (name, tensor) pairs HF -> native and back, yielding a
                     fused tensor as soon as its parts are in; a ValueError for a missing or unexpected name

Quantization
  quantize(model, mode) for mode in QUANTIZE_MODES = ("int8", "int4", "nf4", "fp4", "bnb.int8"), in place; int8
                     swaps the linears for the file's Int8Linear, int4 for its Int4Linear (Int8Linear where the
                     int4 kernel cannot take the shape); a ValueError for any other mode

A new family starts as a copy of the closest model file: see "Add a model family" in README.md.
"""

import ctypes
import errno
import fcntl
import glob
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import typing
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file

FAMILIES = ("llama", "gemma", "qwen", "phi")     # models/<family>.py, each keeping the contract above


def module(family: str):
    """The model file (models/<family>.py) for a family name."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}")
    return importlib.import_module(f"models.{family}")


def family_of_hf(hf_config: dict) -> str:
    """The family whose model file reads this Hugging Face config.json: the one whose HF_MODEL_TYPES holds its
    model_type."""
    model_type = hf_config.get("model_type")
    readers = {t: family for family in FAMILIES for t in module(family).HF_MODEL_TYPES}
    if model_type not in readers:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; "
                         f"supported: {', '.join(sorted(readers))}")
    return readers[model_type]


def read_config(checkpoint_dir):
    """(model file, Config) of a native checkpoint dir, its config.json checked field by field first."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {checkpoint_dir} a converted checkpoint? "
                                f"(convert one with: python convert_hf.py HF_DIR OUT_DIR)")
    config = read_json_object(path)
    if "family" not in config:
        raise ValueError(f"{path} has no 'family': it looks like a Hugging Face config; "
                         f"convert the dir first with: python convert_hf.py {checkpoint_dir} OUT_DIR")
    try:
        m = module(config["family"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    check_config_fields(config, m.Config, path)
    try:
        return m, m.Config.from_dict(config)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        raise ValueError(f"{path} describes an impossible model: {e}") from None


def read_json_object(path) -> dict:
    """The JSON object in a file, or a ValueError that names the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object {{...}}, not a {type(value).__name__}")
    return value


# Sizes that every model file's Config has and that no model can have at 0 (elsewhere 0 means "derive it").
POSITIVE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "dim", "intermediate_size", "max_seq_len")


def check_config_fields(config: dict, Config, path):
    """Every key of a native config.json is a field of Config holding a value of the field's type; no size is
    negative, and POSITIVE_FIELDS are positive. Unknown fields are an error rather than ignored: the writer puts
    exactly Config's fields there, so one more comes from a hand edit or another version of a model file, and
    ignoring it could mean running a different model without a word."""
    types = typing.get_type_hints(Config)
    valid = [f.name for f in fields(Config)]
    unknown = sorted(set(config) - set(valid) - {"family"})
    if unknown:
        raise ValueError(f"{path} has unknown fields {', '.join(unknown)}; a {config['family']} config has: "
                         f"{', '.join(valid)}")
    for name, value in config.items():
        if name == "family":
            continue
        if not value_fits(value, types[name]):
            kind = getattr(types[name], "__name__", str(types[name]))
            raise ValueError(f"{path}: {name} must be of type {kind}, got {value!r}")
        if type(value) is int and (value < 0 or value == 0 and name in POSITIVE_FIELDS):
            raise ValueError(f"{path}: {name} must be a {'positive' if name in POSITIVE_FIELDS else 'non-negative'} "
                             f"integer, got {value}")


def value_fits(value, annotation) -> bool:
    """Whether a JSON value fits a dataclass field's annotation (int, float, bool, str, dict, list[...], X | None)."""
    if typing.get_origin(annotation) in (typing.Union, type(int | None)):
        return any(value_fits(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:                      # JSON writes 10000.0 as 10000 too
        return type(value) in (int, float)
    if annotation is int:                        # not a bool, not 1e12 (a float in JSON)
        return type(value) is int
    kind = typing.get_origin(annotation) or annotation
    return isinstance(value, list if kind is tuple else kind)   # JSON has no tuples: a tuple field reads a list


def weight_files(checkpoint_dir) -> list[Path]:
    d = Path(checkpoint_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map object")
        paths = [d / f for f in sorted(set(weight_map.values()))]
    else:
        paths = [d / "model.safetensors"]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found")
    return paths


def weight_shapes(checkpoint_dir) -> dict[str, tuple]:
    """The name and shape of every tensor in a native checkpoint, from the safetensors headers alone."""
    from safetensors import SafetensorError, safe_open
    shapes = {}
    for path in weight_files(checkpoint_dir):
        try:
            with safe_open(path, framework="pt") as f:
                shapes.update((name, tuple(f.get_slice(name).get_shape())) for name in f.keys())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is truncated or not a safetensors file ({e})") from None
    return shapes


def check_sizes_match(checkpoint_dir, config, shapes: dict[str, tuple]):
    """The layer count and the embedding of config.json against the weights' shapes (weight_shapes): cheap, so
    that an absurd config is refused before a model of its size is built, even on the meta device."""
    layers = {name.split(".")[1] for name in shapes if name.startswith("layers.")}
    if len(layers) != config.n_layer:
        raise config_disagrees(checkpoint_dir, f"n_layer is {config.n_layer}, the weights hold {len(layers)} layers")
    embedding = shapes.get("tok_embeddings.weight")
    if embedding != (config.vocab_size, config.dim):
        found = " x ".join(map(str, embedding)) if embedding else "missing"
        raise config_disagrees(checkpoint_dir, f"vocab_size x dim is {config.vocab_size} x {config.dim}, "
                                               f"tok_embeddings.weight is {found}")


def check_shapes_match(checkpoint_dir, shapes: dict[str, tuple], expected: dict[str, torch.Size]):
    """Every tensor the config implies (expected_shapes) against the weights' shapes, before any tensor is read."""
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise config_disagrees(checkpoint_dir, f"missing {', '.join(missing[:3]) or 'nothing'}; "
                                               f"unexpected {', '.join(unexpected[:3]) or 'nothing'}")
    for name, shape in expected.items():
        if shapes[name] != tuple(shape):
            raise config_disagrees(checkpoint_dir, f"{name} is {shapes[name]} in the weights, the config implies "
                                                   f"{tuple(shape)}")


def config_disagrees(checkpoint_dir, what: str) -> ValueError:
    return ValueError(f"{Path(checkpoint_dir) / 'config.json'} disagrees with the weights: {what}")


def load_state_dict(checkpoint_dir, device="cpu", dtype=None, mmap: bool = True) -> dict:
    """Every tensor of a native checkpoint: memory-mapped from its safetensors files (nothing is read until used),
    or with mmap=False read into fresh memory tensor by tensor (for callers that copy the weights anyway, so that
    the file's pages never count twice)."""
    from safetensors import safe_open
    state = {}
    for path in weight_files(checkpoint_dir):
        if mmap:
            with safe_open(path, framework="pt", device=str(device)) as f:
                tensors = [(name, f.get_tensor(name)) for name in f.keys()]
        else:
            tensors = read_safetensors(path)
        for name, t in tensors:
            state[name] = t.to(device, dtype if dtype is not None and t.is_floating_point() else t.dtype)
    return state


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """(name, tensor) pairs of a safetensors file read with plain file reads: 8 bytes of header length, a JSON
    header of dtype / shape / byte offsets, then the raw little-endian data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            f.seek(8 + n + start)
            if f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
                raise ValueError(f"{path} is truncated: {name} ends past the end of the file")
            yield name, t


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# The dtypes a command line may name (generate.py --dtype, convert_hf.py --dtype, LLM.load(dtype="bfloat16")).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peak_memory_gib(device) -> float:
    """This process's peak memory so far: the CUDA allocator's peak on a GPU, else the peak resident set size."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB on Linux


def check_device(device=None) -> torch.device:
    """The torch.device for a name (default: cuda if there is one, else cpu), or a one-line error when this
    machine has no such device."""
    if device is None or device == "":
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "PyTorch sees no CUDA GPU"
        raise ValueError(f"device {device!r} is not available: {why}; use cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} is not available: this machine has {torch.cuda.device_count()} "
                         f"CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available: Apple's Metal backend needs macOS on Apple silicon; "
                         f"use cpu")
    if d.type not in ("cpu", "cuda", "mps") and not getattr(getattr(torch, d.type, None), "is_available",
                                                             lambda: False)():
        raise ValueError(f"device {device!r} is not available here: use cpu, cuda, cuda:N or mps")
    return d


def load(checkpoint_dir, device=None, dtype=None, mmap: bool = True):
    """Build the model of a native checkpoint dir with its weights, in eval mode. config.json is checked against
    the weights' headers before anything is built or read."""
    m, config = read_config(checkpoint_dir)
    device = check_device(device)
    shapes = weight_shapes(checkpoint_dir)
    check_sizes_match(checkpoint_dir, config, shapes)
    with torch.device("meta"):
        model = m.Transformer(config)
    check_shapes_match(checkpoint_dir, shapes, expected_shapes(config, model))
    state = load_state_dict(checkpoint_dir, device, dtype, mmap)
    if config.tie_embeddings:                    # stored once; both names point at the same tensor
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:                    # assign=True made two Parameters: share one again
        model.lm_head.weight = model.tok_embeddings.weight
    return model.eval()


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on device: free GPU memory, or Linux's MemAvailable (RAM that can be
    had without swapping); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and Path("/proc/meminfo").is_file():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_fits(config, dtype: torch.dtype, device, copies: int = 1, processes: int = 1):
    """Refuse, with the figures, a model whose parameters cannot fit in the memory free on device, before any of
    it is allocated: parameters x bytes per parameter x copies (1 to run it; 4 to train it with AdamW: weights,
    gradients and two moments), split over processes (FSDP shards). Activations come on top: passing is
    necessary, not sufficient."""
    device = torch.device(device)
    n = sum(math.prod(shape) for shape in expected_shapes(config).values())
    need = n * dtype.itemsize * copies / processes
    free = free_memory_bytes(device)
    if free is not None and need > free:
        per = f" / {processes} processes" if processes > 1 else ""
        raise ValueError(f"{config.name or 'the model'} needs about {need / 2**30:.1f} GiB on {device} "
                         f"({n / 1e9:.2f}B parameters x {dtype.itemsize} bytes x {copies}{per}), but only "
                         f"{free / 2**30:.1f} GiB is free: choose a smaller model, or shard it over more devices")


QUANTIZE_MODES = ("int8", "int4", "nf4", "fp4", "bnb.int8")   # int8, int4: plain torch; the others: bitsandbytes


def quantize(model, mode: str):
    """Swap the model's linear layers for its own model file's quantized linear (int8, int4, nf4, fp4, bnb.int8)."""
    return sys.modules[type(model).__module__].quantize(model, mode)


# Tokenizer and generation files travel with the weights unchanged.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")

# ----------------------------------------------------------------------------------------------------------------
# Writing. Every checkpoint (and every file that must never be seen half-written) is written under a temporary
# name beside its target, then put in place in one step, so that no moment loses both the old and the new copy.
# A writer holds an flock on its temporary while it lives; the next write of the same target removes the
# temporaries of writers that were killed.

DEFAULT_SHARD_BYTES = 4 * 2**30
# safetensors metadata of every shard: "format": "pt" as transformers expects, and a mark that this tool wrote it
# (convert_hf.py replaces an existing output dir without --overwrite only when it carries the mark).
SHARD_METADATA = {"format": "pt", "written_by": "flatlm"}
STALE_AFTER_S = 60   # an empty, unlocked temporary this old is a leftover; a younger one may be a writer starting


class ShardWriter:
    """Collects (name, tensor) pairs into safetensors shards of at most max_bytes (one tensor may exceed it),
    checking each against the expected shapes; close() names the shards and writes the index."""

    def __init__(self, out_dir: Path, max_bytes: int, expected: dict[str, torch.Size]):
        self.out_dir, self.max_bytes, self.expected = Path(out_dir), max_bytes, expected
        self.buffer, self.buffered, self.shards, self.weight_map = {}, 0, [], {}

    def add(self, name: str, tensor: torch.Tensor):
        if name not in self.expected:
            raise ValueError(f"unexpected weight {name!r}")
        if name in self.weight_map or name in self.buffer:
            raise ValueError(f"weight {name!r} appears twice")
        if tensor.shape != self.expected[name]:
            raise ValueError(f"shape mismatch for {name}: the checkpoint has {tuple(tensor.shape)}, "
                             f"config.json implies {tuple(self.expected[name])}")
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += nbytes

    def flush(self):
        name = f"shard-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.buffer, self.out_dir / name, metadata=SHARD_METADATA)
        self.weight_map.update(dict.fromkeys(self.buffer, name))
        self.shards.append(name)
        self.buffer, self.buffered = {}, 0

    def close(self):
        """Name the shards model.safetensors, or model-0000i-of-0000n.safetensors plus the index."""
        if self.buffer:
            self.flush()
        missing = set(self.expected) - set(self.weight_map)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(sorted(missing)[:5])}")
        n = len(self.shards)
        final = {s: "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                 for i, s in enumerate(self.shards)}
        for s, f in final.items():
            os.rename(self.out_dir / s, self.out_dir / f)
        if n > 1:
            index = {"metadata": {}, "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def largest_file_bytes(files) -> int:
    """The shard size rule of conversions and merges: output shards no larger than the largest input file, so that
    writing holds about as much memory as reading one input file did."""
    return max(Path(f).stat().st_size for f in files)


def expected_shapes(config, model=None) -> dict[str, torch.Size]:
    """Every tensor a native checkpoint of this config holds, and its shape (a tied head is stored once, as the
    embedding). The model, unless given, is built on the meta device: shapes only, no memory."""
    if model is None:
        with torch.device("meta"):
            model = sys.modules[type(config).__module__].Transformer(config)
    return {name: t.shape for name, t in model.state_dict(keep_vars=True).items()
            if not (config.tie_embeddings and name == "lm_head.weight")}


def write_checkpoint(out_dir, tensors, expected: dict[str, torch.Size], config_json: dict, files_from=None,
                     max_shard_bytes: int | None = None, extra_files: dict | None = None):
    """The one checkpoint writer, for native and Hugging Face layouts alike: tensors ((name, tensor) pairs, checked
    against expected) streamed into shards of at most max_shard_bytes, config.json, the tokenizer and generation
    files of files_from, and extra_files ({name in the checkpoint: file to copy}). All or nothing (atomic_dir)."""

    def fill(tmp: Path):
        writer = ShardWriter(tmp, max_shard_bytes or DEFAULT_SHARD_BYTES, expected)
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        if files_from is not None:
            copy_tokenizer_files(Path(files_from), tmp)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)

    atomic_dir(Path(out_dir), fill)


def save(state_dict, config, out_dir, tokenizer_dir=None, max_shard_bytes: int | None = None,
         extra_files: dict | None = None):
    """Write a native checkpoint dir: the weights of state_dict (a dict, or (name, tensor) pairs streamed one at a
    time; a tied head is stored once), config.json, the tokenizer and generation files of tokenizer_dir, and
    extra_files ({name: file to copy}, e.g. an adapter)."""
    pairs = state_dict.items() if isinstance(state_dict, dict) else state_dict
    tensors = ((name, t.detach().cpu()) for name, t in pairs
               if not (config.tie_embeddings and name == "lm_head.weight"))
    write_checkpoint(out_dir, tensors, expected_shapes(config), config.to_dict(), tokenizer_dir, max_shard_bytes,
                     extra_files)


def copy_tokenizer_files(src: Path, dst: Path):
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def written_by_flatlm(d) -> bool:
    """Whether dir d is a checkpoint that write_checkpoint wrote and nothing else: config.json, weights carrying
    SHARD_METADATA's mark, tokenizer and generation files, and an adapter file at most. Such a dir can be replaced
    without losing anything that a new write would not restore."""
    d = Path(d)
    names = {p.name for p in d.iterdir()}
    ours = {"config.json", "model.safetensors.index.json", "adapter.safetensors", *TOKENIZER_FILES}
    weights = sorted(n for n in names if n.startswith("model") and n.endswith(".safetensors"))
    if "config.json" not in names or not weights or any(n not in ours and n not in weights for n in names):
        return False
    from safetensors import safe_open
    try:
        with safe_open(d / weights[0], framework="pt") as f:
            return (f.metadata() or {}).get("written_by") == SHARD_METADATA["written_by"]
    except Exception:                            # not a readable safetensors file: not ours to replace
        return False


# Putting a finished temporary in place.


def atomic_dir(out_dir: Path, fill):
    """Call fill(tmp) to write a directory beside out_dir, then put it at out_dir in one step. An old out_dir is
    swapped out atomically and removed only after the new one is in place; if fill raises, out_dir is untouched."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise ValueError(f"{out_dir} is a symbolic link: give the directory it points to")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a directory: choose another path or remove it")
    with temporary_beside(out_dir, directory=True) as tmp:
        fill(tmp)
        sync_tree(tmp)
        if out_dir.is_dir():
            swap_dirs(tmp, out_dir)             # tmp now holds the old copy, removed on leaving this block
        else:
            os.rename(tmp, out_dir)
        sync_tree(out_dir.parent, files=False)


def atomic_file(path: Path, write):
    """Call write(tmp) to write a file beside path, then rename it over path (atomic for files everywhere)."""
    path = Path(path)
    with temporary_beside(path, directory=False) as tmp:
        write(tmp)
        sync_tree(tmp)
        os.replace(tmp, path)
        sync_tree(path.parent, files=False)


@contextmanager
def temporary_beside(target: Path, directory: bool):
    """A new temporary file or directory named .<target name>.tmp-XXXX beside target, locked for as long as this
    block runs and removed when it ends (after a rename it is gone; after a swap it holds the old copy)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    prefix = f".{target.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        fd = os.open(tmp, os.O_RDONLY)
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        tmp = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)           # released by the kernel however this process ends
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)   # mkdtemp / mkstemp make it private
        yield tmp
    finally:
        remove(tmp)
        os.close(fd)


def swap_dirs(new: Path, old: Path):
    """Exchange two directories' names. On Linux one renameat2(RENAME_EXCHANGE) call does it atomically. Elsewhere
    (or on a filesystem without it) two renames: old -> .<name>.old-XXXX, new -> old; a process killed between the
    two leaves the old copy under that name, and the next write of the target puts it back."""
    if exchange(new, old):
        return
    hidden = Path(tempfile.mkdtemp(prefix=f".{old.name}.old-", dir=old.parent))
    fd = os.open(old, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)           # the old copy is ours until it is gone: not stale
        os.rename(old, hidden)                   # replaces the empty dir mkdtemp made
        os.rename(new, old)
        os.rename(hidden, new)                   # the old copy where the caller removes it
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) through libc; False where it is not available."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):           # glibc < 2.28, or another libc without it
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):   # this filesystem or kernel cannot exchange
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def remove_stale_temporaries(target: Path):
    """Remove the temporaries that killed writers of target left beside it; put back an old copy that a two-rename
    swap had moved aside when it was killed. A writer locks its temporary before writing into it, so one that holds
    data (or is older than STALE_AFTER_S) and whose lock can be taken belongs to a process that is gone."""
    if not target.name:                          # "." or "/": nothing of ours can be beside it
        return
    for p in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        kind = p.name[len(target.name) + 2:].split("-")[0]
        if kind not in ("tmp", "old") or p.is_symlink():
            continue
        try:
            empty = (not any(os.scandir(p))) if p.is_dir() else p.stat().st_size == 0
            if empty and time.time() - p.stat().st_mtime < STALE_AFTER_S:
                continue                         # a writer may have just created it and not locked it yet
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:                # another process got there first
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:                  # its writer is alive
            continue
        finally:
            os.close(fd)
        if kind == "old" and not os.path.lexists(target):
            os.rename(p, target)
        else:
            remove(p)


def remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)


def sync_tree(path: Path, files: bool = True):
    """fsync path (a file, or a directory with every file below it if files=True), so that a rename that follows
    is not written to disk before the data it names (a power cut would otherwise leave empty files)."""
    if files and path.is_dir():
        for p in path.rglob("*"):
            if p.is_file() and not p.is_symlink():
                sync_tree(p)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
