"""Which model file a checkpoint belongs to, and loading one.

A native checkpoint dir holds config.json ({"family": ..., Config fields}) and model.safetensors (or shards with
model.safetensors.index.json). Loading builds the model on the meta device and then assigns the memory-mapped
tensors, so a model costs its weights once.
"""

import importlib
import json
import sys
from pathlib import Path

import torch

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


def load_state_dict(checkpoint_dir, device="cpu", dtype=None) -> dict:
    """Every tensor of a native checkpoint, memory-mapped from its safetensors files."""
    from safetensors import safe_open
    state = {}
    for path in weight_files(checkpoint_dir):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():
                t = f.get_tensor(name)
                state[name] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
    return state


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(checkpoint_dir, device=None, dtype=None):
    """Build the model of a native checkpoint dir with its weights, in eval mode."""
    m, config = read_config(checkpoint_dir)
    device = torch.device(device) if device else default_device()
    with torch.device("meta"):
        model = m.Transformer(config)
    state = load_state_dict(checkpoint_dir, device, dtype)
    if config.tie_embeddings:                    # stored once; both names point at the same tensor
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:                    # assign=True made two Parameters: share one again
        model.lm_head.weight = model.tok_embeddings.weight
    return model.eval()


def quantize(model, mode: str):
    """Swap the model's linear layers for its own model file's quantized linear (int8, nf4, fp4, bnb.int8)."""
    return sys.modules[type(model).__module__].quantize(model, mode)
