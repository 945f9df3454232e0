"""Convert Hugging Face checkpoints to FlatLM's native format and back; fetch models by their Hub name.

    python convert_hf.py HF_DIR OUT_DIR [--dtype bfloat16] [--overwrite]
    python convert_hf.py --to-hf NATIVE_DIR HF_OUT_DIR [--dtype ...]
    python convert_hf.py MODEL.gguf OUT_DIR          # GGUF, dequantized by transformers (needs transformers, gguf)
    python convert_hf.py org/name [OUT_DIR]          # fetched from the Hub (default OUT_DIR: checkpoints/org/name)

Tensors stream one at a time from the memory-mapped input into output shards no larger than the largest input
file, so peak memory stays near one shard however large the model. Everything is written beside OUT_DIR under a
temporary name and swapped into place only when complete (models.atomic_dir). OUT_DIR is replaced only when it is
empty or a checkpoint this tool wrote; anything else needs --overwrite, and OUT_DIR may never be, contain or lie
inside the source.
"""

import argparse
import os
import pickle
import re
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import models
from models import DTYPES

# ----------------------------------------------------------------------------------------------------------------
# Reading: (name, tensor) pairs from safetensors (single or sharded) or pytorch_model*.bin, one at a time.


def input_files(d: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = d / index_name
        if index.is_file():
            weight_map = models.read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map object")
            files = [d / f for f in sorted(set(weight_map.values()))]
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
        else:
            # A pickle: weights_only refuses anything but tensors. The zip format (torch >= 1.6) is memory-mapped,
            # so it is never read all at once; the legacy format cannot be, and is read whole.
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            except pickle.UnpicklingError as e:     # weights_only met a global it does not allow: never run it
                # torch names what it refused on a line of its own: "... unsupported GLOBAL posix.system whose ..."
                # or "Unsupported global: GLOBAL x.y was not an allowed global ..."
                unsupported = re.search(r"(GLOBAL [\w.]+)", str(e))
                what = unsupported.group(1) if unsupported else "not a plain state dict"
                raise ValueError(f"{path} holds Python objects, not only tensors ({what}): refused, nothing in it "
                                 f"was run; use the repo's safetensors files") from None
            except Exception as e:
                reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise ValueError(f"{path} is truncated or not a PyTorch checkpoint ({reason})") from None
            if not isinstance(state, dict):
                raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
            for name in list(state):
                yield name, state.pop(name)


def tensor_names(files: list[Path]) -> list[str] | None:
    """The tensor names of safetensors inputs, from their headers alone (None for pickles, which must be read)."""
    names = []
    for path in files:
        if path.suffix != ".safetensors":
            return None
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                names += f.keys()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is truncated or not a safetensors file ({e})") from None
    return names


def cast(tensors, dtype):
    for name, t in tensors:
        yield name, t.to(dtype) if dtype is not None and t.is_floating_point() else t


def with_progress(tensors, total: int, what: str, show: bool):
    """A progress bar over the tensors as they are written (on a terminal only, when show)."""
    if not show:
        return tensors
    from tqdm import tqdm
    return tqdm(tensors, total=total, desc=what, unit=" tensors", disable=None, leave=False, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Checking the input before anything is written

# Hugging Face config.json keys that the model files read as sizes (positive integers where set) or as numbers.
HF_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings")
HF_NUMBER_KEYS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "rope_local_base_freq", "partial_rotary_factor",
                  "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar")


def read_hf_config(hf_dir: Path):
    """(model file, Config) of a Hugging Face model dir, with a one-line error naming config.json and the key
    for anything missing or of the wrong type."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {hf_dir} a Hugging Face model dir?")
    hf_config = models.read_json_object(path)
    for section in (hf_config, hf_config.get("text_config")):   # multimodal Gemma 3 nests the decoder's keys
        if not isinstance(section, dict):
            continue
        for key in HF_SIZE_KEYS:
            value = section.get(key)
            if value is not None and not (type(value) is int and value > 0):
                raise ValueError(f"{path}: {key} must be a positive integer, got {value!r}")
        for key in HF_NUMBER_KEYS:
            value = section.get(key)
            if value is not None and type(value) not in (int, float):
                raise ValueError(f"{path}: {key} must be a number, got {value!r}")
    family = models.family_of_hf(hf_config)
    m = models.module(family)
    try:
        config = m.Config.from_hf(hf_config)
    except KeyError as e:
        raise ValueError(f"{path} lacks the key {e} that a {hf_config['model_type']} config needs") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{path}: {e}") from None
    config.name = config.name or hf_dir.name
    models.check_config_fields(config.to_dict(), m.Config, path)
    return m, config


def check_layer_count(config, names: list[str] | None, src: Path):
    """Refuse a config.json with more layers than the weights hold before a model of that many layers is built
    (even on the meta device, 100000 layers take minutes). Fewer is left to the weight mapping, which names what
    it does not expect (a multimodal checkpoint also holds its vision encoder's layers)."""
    if names is None:
        return
    layers = {match.group(1) for name in names for match in [re.search(r"(?:^|\.)layers\.(\d+)\.", name)] if match}
    if config.n_layer > len(layers):
        raise ValueError(f"{src / 'config.json'} disagrees with the weights: it has {config.n_layer} layers, "
                         f"the weights hold {len(layers)}")


def check_sources(src: Path, root: Path):
    """Refuse a source dir holding a symbolic link to something outside root: a link to a private file would
    otherwise be read, and a tokenizer file copied into the output for anyone to read."""
    root = root.resolve()
    for path in src.iterdir():
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise ValueError(f"{path} is a symbolic link to {path.resolve()}, outside {root}; copy the file into "
                             f"{src} if you mean to use it")


def check_output(src: Path, out: Path, overwrite: bool):
    """Never delete what this tool did not write: OUT may not be the source, inside it, or around it, nor the
    current directory or a file; an existing OUT is replaced only when empty, a checkpoint this tool wrote, or
    with --overwrite."""
    models.remove_stale_temporaries(out)        # first put back what a run killed mid-swap had moved aside
    src_r, out_r, cwd = src.resolve(), out.resolve(), Path.cwd().resolve()
    if cwd.is_relative_to(out_r):
        raise ValueError(f"the output {out} is the current directory or contains it: name a new directory, "
                         f"e.g. checkpoints/NAME")
    if out_r == src_r or out_r.is_relative_to(src_r):
        raise ValueError(f"the output {out} is the source {src} or inside it: choose an output dir elsewhere")
    if src_r.is_relative_to(out_r):
        raise ValueError(f"the output {out} contains the source {src}: replacing it would delete the source; "
                         f"choose an output dir elsewhere")
    if out.is_symlink():
        raise ValueError(f"the output {out} is a symbolic link: give the directory it points to")
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {out} is a file, not a directory: choose another path or remove it")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not models.written_by_flatlm(out):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise ValueError(f"the output {out} exists and holds files this tool did not write ({held}, ...): choose "
                         f"a new or empty dir, or pass --overwrite to replace it")


# ----------------------------------------------------------------------------------------------------------------
# The two directions


def hf_to_native(hf_dir, out_dir, dtype=None, overwrite: bool = False, progress: bool = False, trusted_root=None):
    """Convert a Hugging Face model dir into a native checkpoint dir. Symbolic links in hf_dir may point only inside
    trusted_root (default: hf_dir itself; the Hub cache links a snapshot's files to its blobs)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} is not a directory")
    check_output(hf_dir, out_dir, overwrite)
    check_sources(hf_dir, Path(trusted_root or hf_dir))
    m, config = read_hf_config(hf_dir)
    files = input_files(hf_dir)
    check_layer_count(config, tensor_names(files), hf_dir)
    expected = models.expected_shapes(config)
    tensors = with_progress(m.from_hf(cast(read_tensors(files), dtype), config), len(expected),
                            f"converting {hf_dir.name}", progress)
    models.write_checkpoint(out_dir, tensors, expected, config.to_dict(), hf_dir, models.largest_file_bytes(files))
    return config


def native_to_hf(native_dir, out_dir, dtype=None, overwrite: bool = False, progress: bool = False):
    native_dir, out_dir = Path(native_dir), Path(out_dir)
    if not native_dir.is_dir():
        raise FileNotFoundError(f"{native_dir} is not a directory")
    check_output(native_dir, out_dir, overwrite)
    check_sources(native_dir, native_dir)
    m, config = models.read_config(native_dir)
    files = models.weight_files(native_dir)
    models.check_sizes_match(native_dir, config, models.weight_shapes(native_dir))
    hf_shapes = {name: t.shape for native_name, shape in models.expected_shapes(config).items()
                 for name, t in m.to_hf([(native_name, torch.empty(shape, device="meta"))], config)}
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = str(dtype or next(read_tensors(files))[1].dtype).removeprefix("torch.")
    gen = native_dir / "generation_config.json"
    if gen.is_file():   # token ids transformers reads from config.json
        g = models.read_json_object(gen)
        hf_config.update({k: g[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in g})
    tensors = with_progress(m.to_hf(cast(read_tensors(files), dtype), config), len(hf_shapes),
                            f"exporting {native_dir.name}", progress)
    models.write_checkpoint(out_dir, tensors, hf_shapes, hf_config, native_dir, models.largest_file_bytes(files))
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


# ----------------------------------------------------------------------------------------------------------------
# Models by Hub name. An "org/name" that is not an existing directory is fetched with huggingface_hub (weights,
# config, tokenizer and generation files: never code) and converted once into checkpoints/org/name (under
# $FLATLM_CHECKPOINTS instead of ./checkpoints when set), which later calls reuse without the network.

HUB_FILES = ["config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
             *models.TOKENIZER_FILES]
HUB_PICKLE_FILES = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def checkpoints_root() -> Path:
    return Path(os.environ.get("FLATLM_CHECKPOINTS") or "checkpoints")


def is_repo_id(name) -> bool:
    """org/name, and not a path: a missing dir/name under an existing local dir is a mistyped path."""
    return bool(REPO_ID.fullmatch(str(name))) and not os.path.lexists(name) and not Path(name).parent.is_dir()


def resolve_checkpoint(name_or_dir) -> Path:
    """The native checkpoint dir to load for name_or_dir: itself unless it is a Hub repo id (the loader then says
    what is wrong with a path), else the conversion of Hub repo org/name, made on first use."""
    path = Path(name_or_dir)
    if not is_repo_id(name_or_dir):
        return path
    out = checkpoints_root() / str(name_or_dir)
    if (out / "config.json").is_file():          # converted before (atomic_dir never leaves half a dir)
        return out
    snapshot, repo_cache = download(str(name_or_dir))
    print(f"converting {name_or_dir} into {out} (once: later loads use it)", file=sys.stderr)
    hf_to_native(snapshot, out, progress=True, trusted_root=repo_cache)
    return out


def download(repo_id: str) -> tuple[Path, Path]:
    """(snapshot dir, the repo's dir in the Hugging Face cache) of repo_id: safetensors weights, or
    pytorch_model*.bin only when the repo has no safetensors. huggingface_hub shows the download progress and
    honours HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE and HF_TOKEN."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError)
    except ImportError:
        raise ValueError(f"loading {repo_id} by name needs huggingface_hub: pip install huggingface_hub") from None
    print(f"fetching {repo_id} from the Hugging Face Hub (or its local cache)", file=sys.stderr)
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
        if not any(snapshot.glob("model*.safetensors")):
            snapshot = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES + HUB_PICKLE_FILES))
    except GatedRepoError:
        raise ValueError(f"{repo_id} is gated: accept its conditions at https://huggingface.co/{repo_id}, then log "
                         f"in with `hf auth login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id} is neither a directory here nor a model on the Hugging Face Hub (a private "
                         f"one needs `hf auth login`): check the path, or the exact repo id, e.g. "
                         f"HuggingFaceTB/SmolLM2-135M-Instruct") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ValueError(f"{repo_id} is neither a directory here nor a model in the Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set: check the path or the exact "
                             f"repo id, or unset HF_HUB_OFFLINE to download it") from None
        raise ValueError(f"cannot reach the Hugging Face Hub to download {repo_id} (no network?) and it is not in "
                         f"the cache ({constants.HF_HUB_CACHE}): connect, or fetch it elsewhere with "
                         f"`hf download {repo_id}`, copy that cache here and set HF_HUB_OFFLINE=1") from None
    except HfHubHTTPError as e:
        raise ValueError(f"the Hugging Face Hub refused {repo_id}: {str(e).splitlines()[0]}") from None
    except Exception as e:                       # the network fails in many types: proxies, TLS, a cut connection
        raise ValueError(f"fetching {repo_id} from the Hugging Face Hub failed: {type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}") from None
    return snapshot, snapshot.parent.parent


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="HF model dir, MODEL.gguf, a Hub repo id org/name, or (--to-hf) a native dir")
    p.add_argument("out", nargs="?", help="output dir (for org/name, default checkpoints/org/name); replaced only "
                                          "once the conversion is complete")
    p.add_argument("--to-hf", action="store_true", help="convert a native checkpoint to Hugging Face format")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: keep)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output dir that holds files this tool did not write")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    src = Path(args.src)
    by_name = not args.to_hf and is_repo_id(args.src)
    if args.out is None and not by_name:
        sys.exit(f"error: give an output dir: python convert_hf.py {args.src} OUT_DIR (only a Hub repo id org/name "
                 f"has a default, checkpoints/org/name)")
    out = Path(args.out) if args.out else checkpoints_root() / args.src
    try:
        if args.to_hf:
            config = native_to_hf(src, out, dtype, args.overwrite, progress=True)
        elif by_name:
            snapshot, repo_cache = download(args.src)
            config = hf_to_native(snapshot, out, dtype, args.overwrite, progress=True, trusted_root=repo_cache)
        elif src.suffix == ".gguf":
            check_output(src, out, args.overwrite)
            # The dequantized HF dir is a temporary beside OUT: a killed run's copy is removed by the next one.
            with models.temporary_beside(out, directory=True) as tmp:
                hf_dir = tmp / out.name                              # the model's name: the output dir's
                gguf_to_hf(src, hf_dir)
                config = hf_to_native(hf_dir, out, dtype, args.overwrite, progress=True)
        else:
            config = hf_to_native(src, out, dtype, args.overwrite, progress=True)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out} ({config.name or 'model'}, {config.n_layer} layers)", file=sys.stderr)


if __name__ == "__main__":
    main()
