"""train.py: every method trains, a resumed run equals an uninterrupted one, the final checkpoint loads everywhere,
recipes are validated, and bad input fails with one line."""

import copy
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import convert_hf
import finetune_lora
import models
import recipe as recipe_lib
import train
from conftest import tiny_pretraining
from generate import LLM

ROOT = Path(__file__).parent
FACTS = ROOT / "recipes" / "data" / "facts_tiny.json"


def run(recipe: str, *overrides: str) -> Path:
    r = train.load_recipe(ROOT / "recipes" / recipe, list(overrides))
    return train.train(r, train.Env())


def losses(out_dir: Path, column="loss") -> dict[int, float]:
    with open(out_dir / "log.csv") as f:
        return {int(row["step"]): float(row[column]) for row in csv.DictReader(f) if row[column]}


def tiny_lora(tiny_dir, out_dir, *overrides):
    # model={}: the recipe was written for SmolLM2-135M, and tiny_dir is a much smaller Llama
    return run("smollm2_135m_lora.yaml", f"checkpoint_dir={tiny_dir}", "model={}", f"out_dir={out_dir}",
               "data.max_seq_len=48",
               "global_batch_size=4", "micro_batch_size=2", "eval_interval=0", "eval_batches=1", *overrides)


# ----------------------------------------------------------------------------------------------------------------
# Methods


def test_pretraining_loss_falls_on_shakespeare(shakespeare_dir, tmp_path):
    out = run("pretrain_shakespeare.yaml", f"data.path={shakespeare_dir}", f"out_dir={tmp_path}", "max_steps=60",
              "data.max_seq_len=64", "global_batch_size=8", "micro_batch_size=8", "log_interval=1",
              "save_interval=0", "eval_interval=0")
    loss = losses(tmp_path)
    assert loss[1] > 5 and loss[60] < 3.2, loss      # from ln(257) = 5.55 to below a unigram model of the plays
    assert losses(tmp_path, "val_loss")[60] < 3.2
    llm = LLM.load(out, device="cpu")
    assert len(llm.generate("ROMEO.", max_new_tokens=8, temperature=0)) > 0


def test_lora_trains_only_adapters_and_exports(tiny_dir, tmp_path):
    out = tiny_lora(tiny_dir, tmp_path, "max_steps=6", "optimizer.lr=1e-2", "optimizer.warmup_steps=0")
    loss = losses(tmp_path)
    assert loss[6] < loss[1]
    meta = finetune_lora.adapter_metadata(out / "adapter.safetensors")
    assert meta["kind"] == "lora" and meta["merged"] == "true"
    # only adapter tensors moved: what differs from the base is exactly the merged LoRA product
    base = models.load_state_dict(tiny_dir)
    merged = models.load_state_dict(out)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("qkv.weight", "o.weight", "gate_up.weight", "down.weight")) for k in changed)
    # the final dir loads in LLM.load and, exported, in transformers with the same logits
    convert_hf.native_to_hf(out, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    idx = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        assert (hf(idx).logits - models.load(out, device="cpu")(idx)).abs().max() < 1e-4


# (family, method, Config fields): a tied head; LoRA on an untied head; Gemma 2's soft cap; Phi-2's head bias
CHUNKED_LOSS_CASES = [("llama", "full", dict(tie_embeddings=True)), ("llama", "lora", dict(tie_embeddings=False)),
                      ("gemma", "full", dict(final_softcap=3.0)), ("phi", "full", dict(bias=True, layer_norm=True))]


@pytest.mark.parametrize("family, method, fields", CHUNKED_LOSS_CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_chunked_loss_equals_plain_cross_entropy_and_its_gradients(family, method, fields, monkeypatch):
    # The oracle: F.cross_entropy over the whole micro-batch's logits, in fp32. Chunks of 5 rows: several chunks,
    # the last one short, prompt tokens (-100) skipped.
    monkeypatch.setattr(train, "LOSS_ROWS", 5)
    torch.manual_seed(0)
    m = models.module(family)
    model = m.Transformer(m.Config(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, dim=32, intermediate_size=48,
                                   max_seq_len=64, **fields))
    if method == "lora":
        finetune_lora.apply_lora(model, r=4, head=True)
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                torch.nn.init.normal_(p)                   # B off zero: the update takes part
    x, y = torch.randint(0, 96, (3, 9)), torch.randint(0, 96, (3, 9))
    y[:, :3] = -100
    y[1, 7] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    recipe, env = recipe_lib.build(recipe_lib.Recipe, {"precision": "32-true"}), train.Env()

    expected = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100,
                                                 reduction="sum")
    expected_grads = torch.autograd.grad(expected / 7, params)         # the step's scale reaches every gradient
    loss = train.loss_sum(model, x, y, recipe, env)
    grads = torch.autograd.grad(loss / 7, params)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for g, e in zip(grads, expected_grads):                            # fp32 rounding, summed in another order
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
    with torch.no_grad():                                              # validation: the loss alone
        assert train.loss_sum(model, x, y, recipe, env).item() == pytest.approx(expected.item(), rel=1e-6)


def test_chunked_loss_of_prompt_tokens_only_gives_zero_head_gradients():
    # The plain loss's gradients when no token has a target: zeros, not None (FSDP reduces the same set everywhere).
    m = models.module("llama")
    model = m.Transformer(m.Config(vocab_size=96, n_layer=1, n_head=4, n_kv_head=2, dim=32, intermediate_size=48,
                                   max_seq_len=64, tie_embeddings=False))
    recipe, env = recipe_lib.build(recipe_lib.Recipe, {"precision": "32-true"}), train.Env()
    loss = train.loss_sum(model, torch.randint(0, 96, (2, 5)), torch.full((2, 5), -100), recipe, env)
    loss.backward()
    assert loss.item() == 0
    assert torch.equal(model.lm_head.weight.grad, torch.zeros_like(model.lm_head.weight))


@pytest.mark.parametrize("bias, frozen, rows", [(False, False, (3, 7)), (True, False, (3, 7)), (False, True, (3, 7)),
                                                (False, True, (21,))])
def test_onednn_linear_gives_nn_linear_outputs_and_gradients(bias, frozen, rows):
    # The oracle: the same nn.Linear called plainly. 3-D input (rows = B * T), a bias, a frozen weight (LoRA's base),
    # a 2-D input (LoRA's).
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias).requires_grad_(not frozen)
    x = torch.randn(*rows, 48, requires_grad=True)
    grad_y = torch.randn(*rows, 80)
    params = [x] + [p for p in linear.parameters() if p.requires_grad]
    expected = linear(x)
    expected_grads = torch.autograd.grad(expected, params, grad_y)
    train.use_onednn_linears(linear)
    y = linear(x)
    node = y.grad_fn if len(rows) == 1 else y.grad_fn.next_functions[0][0]   # 2-D: not even a view (LoRA adds
    assert node.name() == "OneDNNLinearBackward"                             # into it in place)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(torch.autograd.grad(y, params, grad_y), expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):                  # bf16-mixed: autocast's bf16 F.linear
        assert linear(x).dtype == torch.bfloat16


@pytest.mark.parametrize("family, fields, compiled", [("llama", dict(tie_embeddings=True), False),
                                                     ("qwen", dict(qkv_bias=True), False), ("llama", {}, True)])
def test_a_model_on_onednn_linears_trains_as_on_nn_linear(family, fields, compiled):
    # A whole step's loss and every gradient (tied head and embedding; q/k/v biases) against the plain model's.
    # compiled (compile=true): dynamo breaks its graphs at the oneDNN linears and compiles what lies between.
    torch.manual_seed(0)
    m = models.module(family)
    config = m.Config(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, dim=32, intermediate_size=48, max_seq_len=64,
                      **fields)
    plain, model = m.Transformer(config), m.Transformer(config)
    model.load_state_dict(plain.state_dict())
    train.use_onednn_linears(model, compiled=compiled)
    for block in model.layers if compiled else []:
        block.compile()
    x, y = torch.randint(0, 96, (3, 9)), torch.randint(0, 96, (3, 9))
    recipe, env = recipe_lib.build(recipe_lib.Recipe, {"precision": "32-true"}), train.Env()
    expected = train.loss_sum(plain, x, y, recipe, env)
    expected_grads = torch.autograd.grad(expected / 27, list(plain.parameters()))
    loss = train.loss_sum(model, x, y, recipe, env)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5 if compiled else 1e-6)
    for g, e in zip(torch.autograd.grad(loss / 27, list(model.parameters())), expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_lora_on_onednn_linears_trains_as_on_nn_linear():
    # LoRA adds its update into the base's output in place: with a oneDNN base, autograd must see no view there (no
    # CopySlices: a zero-filled copy of the whole output) and every gradient must be the plain layer's.
    torch.manual_seed(0)
    plain = finetune_lora.LoRALinear(torch.nn.Linear(48, 80), r=4, alpha=8)
    torch.nn.init.normal_(plain.lora_b)
    plain.base.requires_grad_(False)
    fast = copy.deepcopy(plain)
    train.use_onednn_linears(fast)
    x = torch.randn(3, 7, 48, requires_grad=True)
    grad_y = torch.randn(3, 7, 80)
    expected = plain(x)
    y = fast(x)
    names, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        names.add(node.name())
        todo += [n for n, _ in node.next_functions if n is not None]
    assert "OneDNNLinearBackward" in names and not {"CopySlices", "AsStridedBackward0"} & names, names
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(torch.autograd.grad(y, [x, fast.lora_a, fast.lora_b], grad_y),
                    torch.autograd.grad(expected, [x, plain.lora_a, plain.lora_b], grad_y)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_freed_cpu_memory_is_kept_for_the_next_step():
    # After keep_freed_cpu_memory, a 113 MB block freed and allocated again (as SmolLM2's embedding gradient is, every
    # micro-batch) comes back without page faults; plain glibc hands it back to the kernel and faults it in again:
    # ~27k faults each time with 4 KB pages, 56 with transparent huge pages.
    code = ("import contextlib, json, resource, sys, torch, train\n"
            "faults = []\n"
            "with train.keep_freed_cpu_memory() if sys.argv[1] == 'keep' else contextlib.nullcontext():\n"
            "    for _ in range(8):\n"
            "        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "        torch.zeros(49152, 576)\n"
            "        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
            "print(json.dumps(faults))\n")
    faults = {how: json.loads(subprocess.run([sys.executable, "-c", code, how], cwd=ROOT, capture_output=True,
                                             text=True, check=True).stdout) for how in ("keep", "plain")}
    none = {how: sum(f < 20 for f in counts) for how, counts in faults.items()}     # allocations without faults
    assert none["keep"] >= 6 and none["plain"] <= 1, faults


def test_qlora_runs_on_cpu(tiny_dir, tmp_path):
    out = tiny_lora(tiny_dir, tmp_path, "method=qlora", "max_steps=3", "optimizer.lr=1e-2")
    loss = losses(tmp_path)
    assert all(torch.isfinite(torch.tensor(v)) for v in loss.values())
    assert models.load(out, device="cpu").config.n_layer == 2         # merged into the full-precision base


def test_adapter_starts_as_a_no_op_and_learns(tiny_dir, tmp_path):
    out = tiny_lora(tiny_dir, tmp_path, "method=adapter", "max_steps=8", "optimizer.lr=5e-2",
                    "optimizer.warmup_steps=0", "adapter.n_layers=2", "adapter.prompt_len=4")
    loss = losses(tmp_path)
    # step 1's loss is the base model's own loss on that batch: the zero gate makes the adapter invisible
    recipe = train.load_recipe(ROOT / "recipes" / "smollm2_135m_lora.yaml",
                               [f"checkpoint_dir={tiny_dir}", "data.max_seq_len=48"])
    tokenizer = LLM.load(tiny_dir, device="cpu").tokenizer
    data = train.build_data(recipe, tokenizer, train.Env())
    base = models.load(tiny_dir, device="cpu")
    batches = data.micro_batches(0, 4, 2)
    n = sum((y != -100).sum() for _, y in batches)
    with torch.no_grad():
        expected = sum(train.loss_sum(base, x, y, recipe, train.Env()).item() for x, y in batches) / n.item()
    assert loss[1] == pytest.approx(expected, rel=1e-6)
    assert loss[8] < loss[1]
    assert finetune_lora.adapter_metadata(out / "adapter.safetensors")["merged"] == "false"
    assert LLM.load(out, device="cpu").generate("Hi", max_new_tokens=3, temperature=0) is not None


def test_full_finetuning_with_activation_checkpointing_matches_without(tiny_dir, tmp_path):
    a = tiny_lora(tiny_dir, tmp_path / "a", "method=full", "max_steps=3", "optimizer.lr=1e-3")
    tiny_lora(tiny_dir, tmp_path / "b", "method=full", "max_steps=3", "optimizer.lr=1e-3",
              "activation_checkpointing=true")
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la == pytest.approx(lb, rel=1e-5) and la[3] < la[1]
    assert models.load(a, device="cpu").config == models.load(tiny_dir, device="cpu").config


def test_compiled_lora_training_matches_eager(tiny_dir, tmp_path):
    # compile=true (each block through torch.compile: inductor fuses norms, RoPE, SwiGLU; on an AMD AVX-512 CPU
    # with the oneDNN linears left out of its graphs) follows the eager run's losses step by step. (Full
    # finetuning's compiled blocks: test_a_model_on_onednn_linears_trains_as_on_nn_linear.)
    tiny_lora(tiny_dir, tmp_path / "a", "max_steps=3", "optimizer.lr=1e-3")
    tiny_lora(tiny_dir, tmp_path / "b", "max_steps=3", "optimizer.lr=1e-3", "compile=true")
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la == pytest.approx(lb, rel=1e-4) and la[3] < la[1]


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "16-mixed"])
def test_precisions_run(precision, tiny_dir, tmp_path):
    tiny_lora(tiny_dir, tmp_path, f"precision={precision}", "max_steps=2")
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(tmp_path).values())


def test_the_eval_section_runs_lm_eval_on_the_final_checkpoint(tiny_dir, tmp_path, capsys):
    out = tiny_lora(tiny_dir, tmp_path, "max_steps=1", "eval.tasks=[flatlm_test_mc]", "eval.limit=3",
                    f"eval.include_path={ROOT / 'tests' / 'tasks'}")
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["config"]["limit"] == 3
    acc = results["results"]["flatlm_test_mc"]["acc,none"]
    assert 0 <= acc <= 1 and f"eval flatlm_test_mc: acc,none {acc:.4f}" in capsys.readouterr().err
    assert out == tmp_path / "final"


def test_global_batch_is_kept_when_the_micro_batch_does_not_split_it(capsys):
    def fitted(global_batch, micro, world):
        recipe = recipe_lib.Recipe(global_batch_size=global_batch, micro_batch_size=micro)
        return train.fit_micro_batch(recipe, train.Env(world_size=world)).micro_batch_size
    assert fitted(8, 8, 1) == 8 and fitted(8, 8, 2) == 4 and fitted(12, 8, 2) == 6 and fitted(10, 4, 2) == 1
    assert "micro_batch_size 8 -> 4: each of 2 process(es) takes 4 examples" in capsys.readouterr().err
    with pytest.raises(recipe_lib.RecipeError, match="global_batch_size=6 cannot be split evenly over 4 processes"):
        fitted(6, 1, 4)


# ----------------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resumed_run_equals_uninterrupted(method, tiny_dir, tmp_path):
    common = [f"method={method}", "max_steps=6", "optimizer.lr=5e-3", "optimizer.warmup_steps=2",
              "lora.dropout=0.1"]
    tiny_lora(tiny_dir, tmp_path / "straight", *common)
    tiny_lora(tiny_dir, tmp_path / "saving", *common, "save_interval=3")
    resumed = tiny_lora(tiny_dir, tmp_path / "resumed", *common,
                        f"resume={tmp_path / 'saving' / 'checkpoints' / 'step-000003'}")
    straight = losses(tmp_path / "straight")
    assert losses(tmp_path / "resumed") == {k: v for k, v in straight.items() if k > 3}   # bit-identical on CPU
    a, b = models.load_state_dict(tmp_path / "straight" / "final"), models.load_state_dict(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_true_picks_the_latest_checkpoint(tiny_dir, tmp_path):
    tiny_lora(tiny_dir, tmp_path, "max_steps=2", "save_interval=1")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000002"
    tiny_lora(tiny_dir, tmp_path, "max_steps=3", "resume=true")
    assert list(losses(tmp_path)) == [1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# Recipes and errors


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses_and_builds_on_meta(path):
    recipe = train.load_recipe(path)
    m, config = recipe_lib.preset_config(recipe.model)
    with torch.device("meta"):
        model = m.Transformer(config)
        if recipe.method == "qlora":          # 4-bit quantization needs real weights: check the LoRA part
            recipe.method = "lora"
        train.apply_method(model, recipe)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable <= total
    if recipe.method in ("lora", "adapter"):
        assert trainable < total / 20


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def assert_one_line_error(r, *fragments):
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and len([ln for ln in lines if ln.startswith("error")]) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_unknown_key_lists_the_valid_keys(tmp_path):
    r = cli(ROOT / "recipes" / "smollm2_135m_lora.yaml", "data.pth=x.json")
    assert_one_line_error(r, "unknown recipe key 'data.pth'", "data.path", "max_steps", "optimizer.lr")


def test_bad_values_and_missing_files(tmp_path):
    recipe = ROOT / "recipes" / "smollm2_135m_lora.yaml"
    assert_one_line_error(cli(recipe, "max_steps=lots"), "max_steps", "int")
    assert_one_line_error(cli(recipe, "method=dpo"), "method 'dpo'", "lora")
    assert_one_line_error(cli(tmp_path / "nope.yaml"), str(tmp_path / "nope.yaml"))
    assert_one_line_error(cli(recipe, f"checkpoint_dir={tmp_path}"), str(tmp_path / "config.json"))


def test_bad_data_record_names_file_and_line(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n" + '{"instruction": "Hi"}\n')
    r = cli(ROOT / "recipes" / "smollm2_135m_lora.yaml", f"checkpoint_dir={tiny_dir}", "model={}", f"data.path={bad}",
            f"out_dir={tmp_path / 'out'}")
    assert_one_line_error(r, f"{bad}:2")


def test_a_finetuning_recipe_refuses_a_checkpoint_of_another_architecture(tiny_dir, capsys):
    # smollm2_135m_lora.yaml says model: {family: llama, preset: SmolLM2-135M}; tiny_dir is a 2-layer Llama
    error = main_error(capsys, ROOT / "recipes" / "smollm2_135m_lora.yaml", f"checkpoint_dir={tiny_dir}")
    assert "model section (llama preset SmolLM2-135M) does not match" in error and "model={}" in error
    assert "n_layer is 2 there, 30 in the recipe" in error or "dim is 64 there" in error
    error = main_error(capsys, ROOT / "recipes" / "gemma2_2b_lora.yaml", f"checkpoint_dir={tiny_dir}")
    assert "(gemma preset gemma-2-2b)" in error and "a llama checkpoint" in error


# ----------------------------------------------------------------------------------------------------------------
# What a user may type: each mistake is one line naming it, and nothing is written or replaced


def main_error(capsys, *argv) -> str:
    """train.main on argv, which must fail with exit status 1 and one line, `error: ...`, on stderr: that line."""
    with pytest.raises(SystemExit) as e:
        train.main(list(map(str, argv)))
    assert e.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1, lines
    return lines[-1]


@pytest.mark.parametrize("override, message", [
    ("max_steps=-3", "max_steps must be >= 1, got -3"),
    ("max_steps=2.5", "recipe key 'max_steps' must be a whole number, got 2.5"),
    ("global_batch_size=0", "global_batch_size must be >= 1, got 0"),
    ("micro_batch_size=0", "micro_batch_size must be >= 1, got 0"),
    ("log_interval=0", "log_interval must be >= 1, got 0"),
    ("eval_interval=-1", "eval_interval must be >= 0, got -1"),
    ("data.val_fraction=1.5", "data.val_fraction must be in [0, 1), got 1.5"),
    ("data.path=[oops", "override 'data.path=[oops' is not valid YAML"),
    ("eval.limit=-2", "eval.limit must be a count >= 1 or a fraction < 1, got -2"),
])
def test_bad_values_stop_before_anything_is_written(override, message, small_corpus, tmp_path, capsys):
    (tmp_path / "final").mkdir()                                     # a finished run's result: never replaced
    (tmp_path / "final" / "config.json").write_text("{}")
    error = main_error(capsys, *tiny_pretraining(small_corpus, tmp_path, "llama", override))
    assert message in error
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["config.json"]


def test_a_model_too_large_for_memory_is_refused_with_the_figure(small_corpus, tmp_path, capsys):
    error = main_error(capsys, *tiny_pretraining(small_corpus, tmp_path, "llama"),
                       'model={"family": "llama", "preset": "Llama-3.1-405B"}')
    assert "Llama-3.1-405B needs about" in error and "GiB on cpu" in error
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_invalid_yaml_and_an_out_dir_that_is_a_file(small_corpus, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\ndata: {path: x.json\nmax_steps: 3\n")
    assert f"error: {bad} is not valid YAML at line " in main_error(capsys, bad)
    (tmp_path / "taken").write_text("not a directory")
    error = main_error(capsys, *tiny_pretraining(small_corpus, tmp_path / "taken", "llama"))
    assert f"out_dir {tmp_path / 'taken'} is a file" in error


def test_data_that_is_not_utf8_is_named(tiny_dir, tmp_path, capsys):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps({"instruction": "Hi", "output": "Hello"}).encode() + b"\n" +
                       '{"instruction": "Caf\u00e9?", "output": "Oui"}\n'.encode("latin-1"))
    error = main_error(capsys, ROOT / "recipes" / "smollm2_135m_lora.yaml", f"checkpoint_dir={tiny_dir}", "model={}",
                       f"data.path={latin1}", f"out_dir={tmp_path / 'out'}")
    assert f"{latin1} is not UTF-8 text (byte 0xe9 at line 2)" in error
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("To be, or not to be.")
    (corpus / "bad.txt").write_bytes("Caf\u00e9".encode("latin-1"))
    error = main_error(capsys, *tiny_pretraining(corpus, tmp_path / "pre", "llama"))
    assert f"{corpus / 'bad.txt'} is not UTF-8 text" in error


def test_a_non_finite_loss_stops_training_and_saves_nothing(small_corpus, tmp_path):
    args = tiny_pretraining(small_corpus, tmp_path, "llama", "optimizer.lr=1e30", "max_steps=6", "save_interval=1")
    with pytest.raises(train.TrainingError, match=r"^step (\d): the loss is (nan|inf); stopped, nothing saved") as e:
        train.train(recipe_lib.load_recipe(args[0], args[1:]), train.Env())
    last_finite = int(e.value.args[0].split()[1][:-1]) - 1
    assert last_finite >= 1 and not (tmp_path / "final").exists()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert saved == [f"step-{s:06d}" for s in range(1, last_finite + 1)]
    assert (tmp_path / "checkpoints" / "latest").read_text() == saved[-1]


@pytest.fixture
def saved_run(small_corpus, tmp_path) -> Path:
    """A finished 4-step pretraining run with checkpoints at steps 2 and 4."""
    train.main(tiny_pretraining(small_corpus, tmp_path / "run", "llama", "max_steps=4", "save_interval=2"))
    return tmp_path / "run"


def test_resuming_needs_a_readable_checkpoint_of_this_run(saved_run, small_corpus, tmp_path, capsys):
    checkpoint = saved_run / "checkpoints" / "step-000002"
    other = tmp_path / "other"
    error = main_error(capsys, *tiny_pretraining(small_corpus, other, "llama", "model.n_layer=3",
                                                 f"resume={checkpoint}"))
    assert f"resume: {checkpoint} is a checkpoint of another run: n_layer is 2 there, 3 in this recipe" in error
    error = main_error(capsys, *tiny_pretraining(small_corpus, other, "llama", "max_steps=1", f"resume={checkpoint}"))
    assert "is at step 2, past max_steps=1" in error
    (saved_run / "checkpoints" / "latest").write_text("step-000099")
    error = main_error(capsys, *tiny_pretraining(small_corpus, saved_run, "llama", "resume=true"))
    assert "latest names step-000099, which is missing or incomplete" in error
    shard = checkpoint / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    error = main_error(capsys, *tiny_pretraining(small_corpus, other, "llama", "max_steps=4", f"resume={checkpoint}"))
    assert f"cannot read the training checkpoint {checkpoint}" in error
    assert not (other / "final").exists()


def test_a_run_killed_at_any_moment_resumes_with_the_losses_of_one_that_never_stopped(small_corpus, tmp_path):
    def args(out, *more):
        return tiny_pretraining(small_corpus, out, "llama", "max_steps=8", "save_interval=1", "eval_interval=2",
                                *more)
    train.main(args(tmp_path / "straight"))
    killed = tmp_path / "killed"
    run = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args(killed)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000003").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)                                   # somewhere in step 4 or its checkpoint
    run.wait()
    assert not (killed / "final").exists()
    train.main(args(killed, "resume=true"))
    for column in ("loss", "val_loss"):                               # one row per step, the same numbers
        assert losses(killed, column) == losses(tmp_path / "straight", column)
    with open(killed / "log.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == list(range(1, 9))
    a, b = models.load_state_dict(tmp_path / "straight" / "final"), models.load_state_dict(killed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# The real checkpoint


@pytest.mark.slow
def test_lora_teaches_smollm2_a_new_fact_that_survives_export(smollm2_dir, tmp_path):
    question = [{"role": "user", "content": "Who is the mascot of the FlatLM project?"}]   # not in the data
    before = LLM.load(smollm2_dir, device="cpu").chat(question, max_new_tokens=24, temperature=0)
    assert "Pim" not in before
    out = run("smollm2_135m_lora.yaml", f"checkpoint_dir={smollm2_dir}", f"out_dir={tmp_path}", f"data.path={FACTS}",
              "max_steps=40", "eval_interval=0")
    llm = LLM.load(out, device="cpu")
    after = llm.chat(question, max_new_tokens=24, temperature=0)
    assert "Pim" in after, after
    # exported to HF format, transformers gives the same greedy answer
    convert_hf.native_to_hf(out, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = llm.tokenizer.encode_chat(question)
    with torch.no_grad():
        new = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(new) if t in llm.tokenizer.eos_ids), len(new))
    assert llm.tokenizer.decode(new[:stop]) == after
