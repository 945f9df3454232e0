"""The training recipe: a flat YAML file with a few sections, checked before anything runs.

    recipe = load_recipe("recipes/smollm2_135m_lora.yaml", ["max_steps=200", "optimizer.lr=5e-4"])

Every key is listed below with its default; `key=value` overrides any of them (dotted for nested ones, the value
read as YAML). An unknown key, a value of the wrong type or out of range, and invalid YAML are one-line errors
(RecipeError) that name the key and what would be valid. The `model` section says what pretraining builds (a
preset of a model file and the fields to change); for finetuning, if present, it is the architecture the recipe
was written for, and a checkpoint_dir of another architecture (other weights) is refused (model_config).
"""

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

import models

METHODS = ("pretrain", "full", "lora", "qlora", "adapter")
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-mixed")
SHARDINGS = ("full", "hybrid")


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
class EvalConfig:                     # lm-eval tasks run on out_dir/final once training ends (evaluate.run_tasks)
    tasks: list = field(default_factory=list)   # lm-eval task names, e.g. [hellaswag, arc_easy]; [] runs none
    limit: float | None = None        # examples per task: a count (>= 1), or a fraction (< 1); None: all
    num_fewshot: int | None = None    # None: each task's own default
    batch_size: int = 8
    include_path: str | None = None   # a folder of your own task YAML files


@dataclass
class Recipe:
    method: str = "lora"
    checkpoint_dir: str | None = None  # what to finetune (a native checkpoint dir)
    model: dict = field(default_factory=dict)  # pretrain: {family, preset, any Config field to change}; finetune:
                                                # the architecture the recipe expects ({} accepts any checkpoint)
    tokenizer_dir: str | None = None   # pretrain: whose tokenizer (default: checkpoint_dir)
    out_dir: str = "out/run"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
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


# ----------------------------------------------------------------------------------------------------------------
# Reading: YAML -> nested dict (overrides applied) -> the dataclasses above, each value coerced to its field's type.


def load_recipe(path, overrides=()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found")
    raw = parse_yaml(path.read_text(), str(path)) or {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise RecipeError(f"override {item!r} is not key=value")
        node = raw if isinstance(raw, dict) else {}
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[leaf] = parse_yaml(value, f"override {item!r}")
    recipe = build(Recipe, raw)
    check(recipe)
    return recipe


def parse_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def recipe_keys(cls=Recipe, prefix="") -> list[str]:
    keys = []
    for f in fields(cls):
        default = default_of(f)
        keys += recipe_keys(type(default), f"{prefix}{f.name}.") if is_dataclass(default) else [prefix + f.name]
    return keys


def default_of(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def build(cls, raw: dict, prefix=""):
    """raw dict -> dataclass, checking every key and coercing scalar types (YAML reads 3e-4 as a string)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe section {prefix.rstrip('.') or 'top level'} must be a mapping, got {raw!r}")
    by_name = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in by_name:
            raise RecipeError(f"unknown recipe key {prefix + str(key)!r}; valid keys: {', '.join(recipe_keys())}")
        default = default_of(by_name[key])
        kwargs[key] = build(type(default), value, f"{prefix}{key}.") if is_dataclass(default) else \
            coerce(value, default, prefix + key)
    return cls(**kwargs)


def coerce(value, default, key):
    if value is None or default is None or isinstance(default, dict) and isinstance(value, dict):
        return value
    if isinstance(default, list):
        if isinstance(value, str):                                 # a,b,c from the command line
            return [v for v in value.split(",") if v]
        if isinstance(value, list):
            return value
    elif isinstance(default, bool):
        if isinstance(value, bool) or key == "resume":             # resume: true, false or a checkpoint path
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(default, int) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and number.is_integer():
            return int(number)
        if number is not None:
            raise RecipeError(f"recipe key {key!r} must be a whole number, got {value!r}")
    elif isinstance(default, float) and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(default, str) and isinstance(value, (str, int, float)):
        return str(value)
    raise RecipeError(f"recipe key {key!r} must be a {type(default).__name__}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Checking: the values a run can use. Each error names the key, the value, and what would be valid.


def check(r: Recipe):
    one_of = {"method": (r.method, METHODS), "precision": (r.precision, PRECISIONS),
              "distributed.sharding": (r.distributed.sharding, SHARDINGS),
              "data.prompt_style": (r.data.prompt_style, ("auto", "chat", "plain"))}
    for key, (value, valid) in one_of.items():
        if value not in valid:
            raise RecipeError(f"{key} {value!r} is not one of {', '.join(valid)}")
    at_least = {"max_steps": (r.max_steps, 1), "global_batch_size": (r.global_batch_size, 1),
                "micro_batch_size": (r.micro_batch_size, 1), "log_interval": (r.log_interval, 1),
                "eval_interval": (r.eval_interval, 0), "eval_batches": (r.eval_batches, 1),
                "save_interval": (r.save_interval, 0), "data.max_seq_len": (r.data.max_seq_len, 1),
                "lora.r": (r.lora.r, 1), "adapter.prompt_len": (r.adapter.prompt_len, 1),
                "adapter.n_layers": (r.adapter.n_layers, 1), "optimizer.warmup_steps": (r.optimizer.warmup_steps, 0),
                "optimizer.lr": (r.optimizer.lr, 0), "optimizer.grad_clip": (r.optimizer.grad_clip, 0),
                "distributed.shard_size": (r.distributed.shard_size, 0), "eval.batch_size": (r.eval.batch_size, 1)}
    for key, (value, low) in at_least.items():
        if not value >= low:                                       # (not >= also catches nan)
            raise RecipeError(f"{key} must be >= {low}, got {value}")
    if not 0 <= r.data.val_fraction < 1:
        raise RecipeError(f"data.val_fraction must be in [0, 1), got {r.data.val_fraction}")
    if not all(isinstance(t, str) and t for t in r.eval.tasks):
        raise RecipeError(f"eval.tasks must be a list of lm-eval task names, got {r.eval.tasks!r}")
    if r.eval.limit is not None and not (isinstance(r.eval.limit, (int, float)) and r.eval.limit > 0):
        raise RecipeError(f"eval.limit must be a count >= 1 or a fraction < 1, got {r.eval.limit!r}")
    if r.eval.num_fewshot is not None and not (isinstance(r.eval.num_fewshot, int) and r.eval.num_fewshot >= 0):
        raise RecipeError(f"eval.num_fewshot must be a whole number >= 0, got {r.eval.num_fewshot!r}")
    if not isinstance(r.resume, (bool, str)):
        raise RecipeError(f"resume must be true, false or a checkpoint path, got {r.resume!r}")
    if r.method == "pretrain" and not r.model.get("preset"):
        raise RecipeError("method pretrain needs model.family and model.preset (a preset of models/<family>.py)")
    if r.method == "pretrain" and not (r.tokenizer_dir or r.checkpoint_dir):
        raise RecipeError("method pretrain needs tokenizer_dir (a checkpoint dir whose tokenizer to use)")
    if r.method != "pretrain" and not r.checkpoint_dir:
        raise RecipeError(f"method {r.method} needs checkpoint_dir (a converted checkpoint, see convert_hf.py)")
    if not r.data.path:
        raise RecipeError("the recipe needs data.path")


# ----------------------------------------------------------------------------------------------------------------
# The model section


def preset_config(spec: dict):
    """(model file, Config) of a recipe's model section: a preset of models/<family>.py and any fields to change."""
    spec = dict(spec)
    if "preset" not in spec:
        raise RecipeError("the recipe's model section needs a preset (and family, default llama)")
    try:
        m = models.module(spec.pop("family", "llama"))
        config = m.Config.from_name(spec.pop("preset"))
    except ValueError as e:
        raise RecipeError(f"model: {e}") from None
    valid = {f.name for f in fields(config)}
    unknown = sorted(set(spec) - valid)
    if unknown:
        raise RecipeError(f"unknown model keys {unknown}; valid: {', '.join(sorted(valid))}")
    if "dim" in spec and "head_dim" not in spec:   # a new width: derive the head size again
        spec["head_dim"] = spec["dim"] // spec.get("n_head", config.n_head)
    try:
        return m, dataclasses.replace(config, **spec)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"model: {e}") from None


def model_config(recipe: Recipe):
    """(model file, Config) of the model to train: the preset for pretraining, else the checkpoint's own, which
    must be the architecture of the recipe's model section when it has one."""
    if recipe.method == "pretrain":
        return preset_config(recipe.model)
    m, config = models.read_config(recipe.checkpoint_dir)
    if recipe.model:
        expected_module, expected = preset_config(recipe.model)
        described = f"{expected_module.__name__.split('.')[-1]} preset {recipe.model['preset']}"
        if expected_module is not m:
            raise RecipeError(f"the recipe's model section ({described}) does not match {recipe.checkpoint_dir}, a "
                              f"{m.__name__.split('.')[-1]} checkpoint; fix checkpoint_dir, or set model={{}} to "
                              f"train any checkpoint")
        # The same weights, tensor for tensor: a context length or RoPE setting of its own (an Instruct variant's)
        # is the same architecture. The first field that differs is the one to name.
        if models.expected_shapes(config) != models.expected_shapes(expected):
            key = next(f.name for f in fields(config) if f.name != "name"
                       and getattr(config, f.name) != getattr(expected, f.name))
            raise RecipeError(f"the recipe's model section ({described}) does not match {recipe.checkpoint_dir}: "
                              f"{key} is {getattr(config, key)!r} there, {getattr(expected, key)!r} in the recipe; "
                              f"fix checkpoint_dir, or set model={{}} to train any checkpoint")
    return m, config
