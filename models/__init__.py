"""Which model file a checkpoint belongs to, and loading and saving native checkpoint dirs.

A native checkpoint dir holds config.json ({"family": ..., Config fields}), model.safetensors (or shards with
model.safetensors.index.json) and the tokenizer files. Loading builds the model on the meta device and then
assigns the memory-mapped tensors, so a model costs its weights once. Saving writes into a temporary directory
that is renamed into place only when complete.
"""

import importlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

FAMILIES = ("llama", "gemma", "qwen", "phi")
# HF config.json model_type -> family
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama",
                  "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma", "gemma3": "gemma",
                  "qwen2": "qwen", "qwen3": "qwen",
                  "phi": "phi", "phi3": "phi"}


def module(family: str):
    """The model file (models/<family>.py) for a family name."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}")
    return importlib.import_module(f"models.{family}")


def family_of_hf(hf_config: dict) -> str:
    model_type = hf_config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; "
                         f"supported: {', '.join(sorted(HF_MODEL_TYPES))}")
    return HF_MODEL_TYPES[model_type]


def read_config(checkpoint_dir):
    """(model file, Config) of a native checkpoint dir."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {checkpoint_dir} a converted checkpoint? "
                                f"(convert one with: python convert_hf.py HF_DIR OUT_DIR)")
    config = json.loads(path.read_text())
    if "family" not in config:
        raise ValueError(f"{path} has no 'family': it looks like a Hugging Face config; "
                         f"convert the dir first with: python convert_hf.py {checkpoint_dir} OUT_DIR")
    m = module(config["family"])
    return m, m.Config.from_dict(config)


def weight_files(checkpoint_dir) -> list[Path]:
    d = Path(checkpoint_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [d / f for f in files]
    else:
        paths = [d / "model.safetensors"]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found")
    return paths


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


def load(checkpoint_dir, device=None, dtype=None, mmap: bool = True):
    """Build the model of a native checkpoint dir with its weights, in eval mode."""
    m, config = read_config(checkpoint_dir)
    device = torch.device(device) if device else default_device()
    with torch.device("meta"):
        model = m.Transformer(config)
    state = load_state_dict(checkpoint_dir, device, dtype, mmap)
    if config.tie_embeddings:                    # stored once; both names point at the same tensor
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:                    # assign=True made two Parameters: share one again
        model.lm_head.weight = model.tok_embeddings.weight
    return model.eval()


def quantize(model, mode: str):
    """Swap the model's linear layers for its own model file's quantized linear (int8, nf4, fp4, bnb.int8)."""
    return sys.modules[type(model).__module__].quantize(model, mode)


# Tokenizer and generation files travel with the weights unchanged.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")

# ----------------------------------------------------------------------------------------------------------------
# Writing: shards of at most max_bytes, then a rename of the whole directory.


class ShardWriter:
    def __init__(self, out_dir: Path, max_bytes: int, expected: dict[str, torch.Size]):
        self.out_dir, self.max_bytes, self.expected = out_dir, max_bytes, expected
        self.buffer, self.buffered, self.shards, self.weight_map = {}, 0, [], {}

    def add(self, name: str, tensor: torch.Tensor):
        if name not in self.expected:
            raise ValueError(f"unexpected weight {name!r}")
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
        save_file(self.buffer, self.out_dir / name, metadata={"format": "pt"})
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


def atomic_dir(out_dir: Path, fill):
    """Call fill(tmp_dir), then rename tmp_dir to out_dir (replacing an old out_dir only on success)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                # mkdtemp makes it private; the result should not be
    try:
        fill(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / out_dir.name)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer_files(src: Path, dst: Path):
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def save(state_dict: dict, config, out_dir, tokenizer_dir=None, max_shard_bytes: int = 4 * 2**30):
    """Write a native checkpoint dir: weights (a tied head stored once), config.json, and the tokenizer and
    generation files of tokenizer_dir."""
    m = module(config.to_dict()["family"])
    with torch.device("meta"):
        expected = {k: v.shape for k, v in m.Transformer(config).state_dict(keep_vars=True).items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")

    def fill(tmp: Path):
        writer = ShardWriter(tmp, max_shard_bytes, expected)
        for name, tensor in state_dict.items():
            if name in expected:
                writer.add(name, tensor.detach().cpu())
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)

    atomic_dir(Path(out_dir), fill)
