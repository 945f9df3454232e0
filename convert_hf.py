"""Convert Hugging Face checkpoints to FlatLM's native format and back.

    python convert_hf.py HF_DIR OUT_DIR [--dtype bfloat16]
    python convert_hf.py --to-hf NATIVE_DIR HF_OUT_DIR [--dtype ...]
    python convert_hf.py MODEL.gguf OUT_DIR          # GGUF, dequantized by transformers (needs transformers, gguf)

Tensors stream one at a time from the memory-mapped input into output shards no larger than the largest input
file, so peak memory stays near one shard however large the model. Everything is written into a temporary
directory that is renamed to OUT_DIR only when complete.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import models

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# Reading: (name, tensor) pairs from safetensors (single or sharded) or pytorch_model*.bin, one at a time.


def input_files(d: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = d / index_name
        if index.is_file():
            files = [d / f for f in dict.fromkeys(sorted(json.loads(index.read_text())["weight_map"].values()))]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{f} is listed in {index} but missing")
            return files
        if (d / single).is_file():
            return [d / single]
    raise FileNotFoundError(f"no weights in {d}: looked for model.safetensors[.index.json] and "
                            f"pytorch_model.bin[.index.json]")


def read_tensors(files: list[Path]):
    for path in files:
        if path.suffix == ".safetensors":
            try:
                f = safe_open(path, framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path} is truncated or not a safetensors file ({e})") from None
            for name in f.keys():
                yield name, f.get_tensor(name)
        else:   # a pickle: weights_only refuses anything but tensors; mmap avoids reading it all at once
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ValueError(f"{path} is truncated or not a PyTorch checkpoint ({e})") from None
            for name in list(state):
                yield name, state.pop(name)


def cast(tensors, dtype):
    for name, t in tensors:
        yield name, t.to(dtype) if dtype is not None and t.is_floating_point() else t


def expected_shapes(m, config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = m.Transformer(config)
    return {k: v.shape for k, v in model.state_dict(keep_vars=True).items()
            if not (config.tie_embeddings and k == "lm_head.weight")}


# ----------------------------------------------------------------------------------------------------------------
# The two directions


def hf_to_native(hf_dir, out_dir, dtype=None):
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} is not a directory")
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir / 'config.json'} not found: is {hf_dir} a Hugging Face model dir?")
    hf_config = json.loads((hf_dir / "config.json").read_text())
    family = models.family_of_hf(hf_config)
    m = models.module(family)
    config = m.Config.from_hf(hf_config)
    config.name = config.name or hf_dir.name
    files = input_files(hf_dir)

    def fill(tmp: Path):
        max_bytes = max(f.stat().st_size for f in files)
        writer = models.ShardWriter(tmp, max_bytes, expected_shapes(m, config))
        for name, tensor in m.from_hf(cast(read_tensors(files), dtype), config):
            writer.add(name, tensor)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        models.copy_tokenizer_files(hf_dir, tmp)

    models.atomic_dir(out_dir, fill)
    return config


def native_to_hf(native_dir, out_dir, dtype=None):
    native_dir, out_dir = Path(native_dir), Path(out_dir)
    m, config = models.read_config(native_dir)
    files = models.weight_files(native_dir)

    def fill(tmp: Path):
        native_shapes = expected_shapes(m, config)
        max_bytes = max(f.stat().st_size for f in files)
        hf_shapes = {k: v.shape for name, shape in native_shapes.items()
                     for k, v in m.to_hf([(name, torch.empty(shape, device="meta"))], config)}
        writer = models.ShardWriter(tmp, max_bytes, hf_shapes)
        first_dtype = None
        for name, tensor in m.to_hf(cast(read_tensors(files), dtype), config):
            first_dtype = first_dtype or tensor.dtype
            writer.add(name, tensor)
        writer.close()
        hf_config = config.to_hf()
        hf_config["torch_dtype"] = str(first_dtype).removeprefix("torch.")
        gen = native_dir / "generation_config.json"
        if gen.is_file():   # token ids transformers reads from config.json
            g = json.loads(gen.read_text())
            hf_config.update({k: g[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in g})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        models.copy_tokenizer_files(native_dir, tmp)

    models.atomic_dir(out_dir, fill)
    return config


def gguf_to_hf(gguf_path, out_dir):
    """Dequantize a GGUF file into a Hugging Face model dir (weights in fp32, tokenizer, chat template), using
    transformers' GGUF reader."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path} not found")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ValueError("reading GGUF needs transformers and gguf: pip install transformers gguf") from None
    kwargs = dict(gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    model.hf_quantizer = None                    # the weights are dequantized now: save them as plain tensors
    del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)

    def fill(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    models.atomic_dir(Path(out_dir), fill)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="HF model dir (or, with --to-hf, a native FlatLM checkpoint dir)")
    p.add_argument("out", help="output dir (replaced only once the conversion is complete)")
    p.add_argument("--to-hf", action="store_true", help="convert a native checkpoint to Hugging Face format")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: keep)")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.to_hf:
            config = native_to_hf(args.src, args.out, dtype)
        elif args.src.endswith(".gguf"):
            with tempfile.TemporaryDirectory() as tmp:
                hf_dir = Path(tmp) / Path(args.out).name          # the model's name: the output dir's
                gguf_to_hf(args.src, hf_dir)
                config = hf_to_native(hf_dir, args.out, dtype)
        else:
            config = hf_to_native(args.src, args.out, dtype)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out} ({config.name or 'model'}, {config.n_layer} layers)", file=sys.stderr)


if __name__ == "__main__":
    main()
