"""evaluate.py: lm-eval through the `flatlm` model gives what lm-eval's own `hf` model gives on the `--to-hf` export
of the same checkpoint (every request's log-likelihood, the generated text, the metrics), on tiny random models of
every family and on the real SmolLM2-135M-Instruct; perplexity equals HF transformers' strided computation; bad
input is a one-line error; the README's commands run."""

import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convert_hf
import evaluate
from conftest import perturb_

ROOT = Path(__file__).parent
TASK_DIR = ROOT / "tests" / "tasks"
TASKS = ["flatlm_test_mc", "flatlm_test_rolling", "flatlm_test_generate"]
TEXT = (TASK_DIR / "sample.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module", autouse=True)
def in_repo_root():
    # the task YAMLs name their data files relative to the repository root, where lm-eval is run from
    cwd = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(cwd)


@pytest.fixture(scope="module")
def test_tasks():
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def lm_eval_run(lm, test_tasks) -> dict:
    """lm-eval's evaluate() on the three test tasks, every request's answer logged."""
    import lm_eval.evaluator
    tasks = test_tasks.load(TASKS)
    for task in tasks["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
    return lm_eval.evaluator.evaluate(lm, tasks, log_samples=True, bootstrap_iters=0, verbosity="WARNING")


def close_to(loglikelihood: float):
    # within 1e-4, or a few float32 steps of a sum too large for that (a random model's -1890 over 100 tokens: one
    # float32 step there is 1.2e-4)
    return pytest.approx(loglikelihood, abs=1e-4, rel=1e-6)


def assert_same_answers(ours: dict, theirs: dict):
    """Every multiple-choice and rolling log-likelihood within 1e-4 with the same greedy flag, the same generated
    text, the same accuracies and (within 1e-4 relative) the same perplexities."""
    for task in TASKS:
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            for (got,), (want,) in zip(a["resps"], b["resps"], strict=True):
                if task == "flatlm_test_generate":
                    assert got == want, f"doc {a['doc_id']}: generated {got!r}, hf {want!r}"
                elif task == "flatlm_test_rolling":
                    assert got == close_to(want), f"doc {a['doc_id']}: log-likelihood {got} vs hf {want}"
                else:
                    assert got[0] == close_to(want[0]) and got[1] == want[1], f"doc {a['doc_id']}: {got} vs {want}"
        for metric, want in theirs["results"][task].items():
            got = ours["results"][task][metric]
            if "stderr" in metric:
                continue
            if metric.startswith(("acc", "exact_match")):
                assert got == want, f"{task} {metric}: {got} vs hf {want}"
            elif "perplexity" in metric or "bits" in metric:
                assert got == pytest.approx(want, rel=1e-4), f"{task} {metric}: {got} vs hf {want}"


def hf_lm(hf_dir: Path, **kwargs):
    from lm_eval.models.huggingface import HFLM
    # batch_size 1: the oracle reads each request alone, without padding
    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=1, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# lm-eval parity


def tiny_family_models():
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, PhiConfig,
                              PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    # a 64-token context: the long question is cut from the left, the long document takes two rolling windows
    base = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**base)),
        "gemma": lambda: Gemma2ForCausalLM(Gemma2Config(**base, head_dim=16, sliding_window=8)),  # soft-caps on
        "qwen": lambda: Qwen2ForCausalLM(Qwen2Config(**base)),                                   # q/k/v biases
        "phi": lambda: PhiForCausalLM(PhiConfig(**base)),                 # parallel block, partial RoPE, LayerNorm
    }


@pytest.mark.parametrize("family", list(tiny_family_models()))
def test_tiny_model_of_every_family_answers_like_lm_evals_hf_model(family, smollm2_hf_dir, test_tasks, tmp_path):
    torch.manual_seed(0)
    perturb_(tiny_family_models()[family]().eval(), scale=0.5).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (tmp_path / "hf" / name).write_bytes((smollm2_hf_dir / name).read_bytes())
    convert_hf.hf_to_native(tmp_path / "hf", tmp_path / "native")
    convert_hf.native_to_hf(tmp_path / "native", tmp_path / "export")
    # batch_size 3: ragged batches, shared questions split across batches, rows alone in theirs
    ours = lm_eval_run(evaluate.FlatLM(tmp_path / "native", device="cpu", dtype="float32", batch_size=3), test_tasks)
    extra = {"attn_implementation": "eager"} if family == "gemma" else {}   # HF's SDPA drops Gemma 2's soft-cap
    assert_same_answers(ours, lm_eval_run(hf_lm(tmp_path / "export", **extra), test_tasks))


@pytest.fixture(scope="module")
def smollm2_export(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "export"
    convert_hf.native_to_hf(smollm2_dir, out)
    return out


@pytest.mark.slow
def test_smollm2_answers_like_lm_evals_hf_model(smollm2_dir, smollm2_export, test_tasks):
    ours = lm_eval_run(evaluate.FlatLM(smollm2_dir, device="cpu", dtype="float32", batch_size=4), test_tasks)
    theirs = lm_eval_run(hf_lm(smollm2_export), test_tasks)
    assert_same_answers(ours, theirs)
    assert ours["results"]["flatlm_test_mc"]["acc,none"] > 0.5    # a real model answers most of them right


# ----------------------------------------------------------------------------------------------------------------
# Perplexity


def hf_strided_perplexity(hf_model, ids: list[int], max_length: int, stride: int) -> float:
    """The HF perplexity guide's loop: windows every stride tokens, the tokens the previous window scored masked
    with -100, transformers' own shifted cross-entropy; its mean times the exact count of scored labels."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=labels).loss.item()
        n = (labels[:, 1:] != -100).sum().item()
        nll, count, prev_end = nll + loss * n, count + n, end
        if end == len(ids):
            break
    return math.exp(nll / count)


@pytest.mark.parametrize("max_length,stride", [(32, 12), (32, 32), (64, 64)])
def test_perplexity_equals_hf_strided_computation(max_length, stride, tiny_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir.parent / "hf", dtype=torch.float32).eval()
    llm = evaluate.LLM.load(tiny_dir, device="cpu", dtype=torch.float32)
    ids = llm.tokenizer.encode(TEXT)[:150]
    ppl, n = evaluate.perplexity(llm.model, ids, max_length, stride, batch_size=2, progress=False)
    assert ppl == pytest.approx(hf_strided_perplexity(hf, ids, max_length, stride), rel=1e-4)
    assert n == len(ids) - 1 - (len(ids) - 1) // max_length * (stride == max_length)


@pytest.mark.slow
def test_smollm2_perplexity_equals_hf_and_the_cli_prints_it(smollm2_dir, smollm2_hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    ids = evaluate.LLM.load(smollm2_dir, device="cpu").tokenizer.encode(TEXT)
    r = cli("perplexity", smollm2_dir, TASK_DIR / "sample.txt", "--max_length", "128", "--stride", "48")
    assert r.returncode == 0, r.stderr
    ppl = float(re.search(r"perplexity ([\d.]+) over (\d+) tokens", r.stdout).group(1))
    assert ppl == pytest.approx(hf_strided_perplexity(hf, ids, 128, 48), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Command line: errors, --out, the README


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


@pytest.mark.parametrize("args,fragment", [
    (["{missing}", "--tasks", "flatlm_test_mc", "--include_path", "tests/tasks"], "not found"),
    (["{tiny}", "--tasks", "flatlm_test_mc", "--batch_size", "0"], "--batch_size: must be a positive integer"),
    (["{tiny}", "--tasks", "flatlm_test_mc", "--include_path", "no/such/dir"], "no/such/dir is not a directory"),
    (["perplexity", "{tiny}", "no_such.txt"], "no_such.txt not found"),
    (["perplexity", "{tiny}", "README.md", "--max_length", "16", "--stride", "32"], "stride must be between 1 and"),
])
def test_cli_errors_are_one_line(args, fragment, tiny_dir, tmp_path):
    r = cli(*[a.format(tiny=tiny_dir, missing=tmp_path / "missing") for a in args])
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and fragment in r.stderr, r.stderr


def test_lm_eval_finds_the_model_by_name(tiny_dir, test_tasks):
    # what `lm_eval --model flatlm --model_args ...` does once its command line is parsed: arguments as one string
    import lm_eval
    results = lm_eval.simple_evaluate(model="flatlm", model_args=f"checkpoint_dir={tiny_dir},device=cpu",
                                      tasks=["flatlm_test_mc"], batch_size="4", limit=2, task_manager=test_tasks,
                                      bootstrap_iters=0)
    mc = results["results"]["flatlm_test_mc"]
    assert mc["sample_len"] == 2 and "acc,none" in mc


def test_unknown_task_is_named(tiny_dir):
    with pytest.raises(ValueError, match="unknown task 'no_such_task'.*lm-eval ls tasks"):
        evaluate.run_tasks(tiny_dir, "flatlm_test_mc,no_such_task", include_path=TASK_DIR)


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("\n## Evaluate\n")[1].split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()
            if line.startswith("python evaluate.py")]


def test_readme_commands_run(tiny_dir, tmp_path):
    """The README's commands as written, on a tiny model in place of the SmolLM2 checkpoint it names."""
    commands = readme_commands()
    assert len(commands) >= 3
    for command in commands:
        args = [a.replace("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct", str(tiny_dir))
                for a in shlex.split(command)[2:]]
        if "--out" in args:
            args[args.index("--out") + 1] = str(tmp_path / "results.json")
        r = cli(*args)
        assert r.returncode == 0, f"{command}\n{r.stderr[-3000:]}"
        assert "|" in r.stdout or "perplexity" in r.stdout, r.stdout
    results = __import__("json").loads((tmp_path / "results.json").read_text())
    assert "acc,none" in results["results"]["flatlm_test_mc"]
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]          # no temporary left beside it
