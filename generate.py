"""Generate text with a converted checkpoint: prefill, then KV-cache decoding one token at a time.

    python generate.py CHECKPOINT_DIR --prompt "The capital of France is"        # raw completion
    python generate.py CHECKPOINT_DIR --chat --prompt "What is 2 + 2?"           # through the chat template
    python generate.py CHECKPOINT_DIR                                           # interactive chat

Python:

    from generate import LLM
    llm = LLM.load("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
    llm.generate("The capital of France is", max_new_tokens=20, temperature=0)
    llm.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=50)
    for piece in llm.stream("Once upon a time", max_new_tokens=100): print(piece, end="")

Sampling defaults come from the checkpoint's generation_config.json (greedy unless it sets do_sample);
tokens/s, time to first token and peak memory go to stderr.
"""

import argparse
import hashlib
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import convert_hf
import gemv
import models
from models import DTYPES, QUANTIZE_MODES
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Sampling:
    temperature: float = 0.0     # 0: greedy
    top_k: int | None = None     # keep the k most likely tokens
    top_p: float = 1.0           # keep the smallest set of tokens whose probability reaches top_p (nucleus)

    def check(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, vocab) -> next token ids (B, 1)."""
    if s.temperature == 0:            # (in fp32: the same token, and torch's bf16 argmax on a CPU is 3x slower)
        return logits.float().argmax(dim=-1, keepdim=True)
    return torch.multinomial(sampling_probs(logits, s), 1, generator=generator)


def sampling_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits: (B, vocab) -> the distribution sample() draws from (B, vocab): temperature (> 0), top-k, top-p."""
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs          # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= s.top_p, 0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)              # a distribution again, over the nucleus
    return probs


# ----------------------------------------------------------------------------------------------------------------
# Prefill and decode


def prefill(model, prompt: torch.Tensor, s: Sampling, generator=None) -> torch.Tensor:
    # prompt: (B, T). Runs every prompt token through the model at once, filling the cache; samples token T+1 from
    # the last position's logits, the only ones computed (as HF's generate: the head is a fifth of SmolLM2-135M's
    # products for a 40-token prompt).
    input_pos = torch.arange(prompt.size(1), device=prompt.device)
    h = model(prompt, input_pos, hidden=True)                               # (B, T, C)
    return sample(model.output(h[:, -1]), s, generator)


def decode_one_token(model, token: torch.Tensor, input_pos: torch.Tensor, s: Sampling, generator=None):
    # token: (B, 1) at position input_pos (1,) -> the next token (B, 1)
    logits = model(token, input_pos)
    return sample(logits[:, -1], s, generator)


@contextmanager
def explicit_attention(model):
    """Every attention layer of model on the model file's explicit path (Attention.use_sdpa = False) inside the
    block, and, where gemv.c compiled, one query per sequence through its kernel (Attention.decode_attention): RoPE,
    the KV cache write and the attention in one call (gemv.decode_attention), where the layer rotates as that does
    (gemv.rope_fits). For one query per sequence on a CPU, torch's SDPA kernel, made for long blocks of queries, is
    slow: SmolLM2-135M's layer, 256 cached positions, one thread, 330 us in bf16 (it converts its blocks to fp32 and
    back) on an AVX-512 EPYC; the explicit path's three small ops 60 us there, but 280 us on an AVX2 one (torch has no
    fast bf16 matmul for it), where gemv.attend_one, one call computing in fp32, takes 70 (measured on a loaded
    machine: every figure here shrinks on a quiet one). The engine also needs the row-invariance of the last two."""
    # (Plain attributes, written into each module's __dict__: nn.Module's __setattr__ would cost 1 ms a token.)
    modules = [block.attn for block in model.layers if hasattr(block.attn, "use_sdpa")]
    layers = [vars(attn) for attn in modules]
    saved = [{name: attn[name] for name in ("use_sdpa", "decode_attention") if name in attn} for attn in layers]
    kernel = gemv.decode_attention if model.tok_embeddings.weight.device.type == "cpu" and gemv.library() else None
    for module, attn in zip(modules, layers):
        attn["use_sdpa"], attn["decode_attention"] = False, kernel if kernel and gemv.rope_fits(module) else None
    # and each block whose parts are gemv's, as one call (but blocks running a compiled forward: CompiledBlocks)
    fast = [] if kernel is None else [(vars(block), gemv.decode_block(block)) for block in model.layers
                                      if "forward" not in vars(block)]
    fast = [(block, forward) for block, forward in fast if forward is not None]
    for block, forward in fast:
        block["forward"] = forward
    try:
        yield
    finally:
        for attn, before in zip(layers, saved):       # the class's defaults again, or what the instance had
            del attn["use_sdpa"], attn["decode_attention"]
            attn.update(before)
        for block, _ in fast:
            del block["forward"]


def decode_one_token_explicit(model, token: torch.Tensor, input_pos: torch.Tensor, s: Sampling, generator=None):
    # decode_one_token with explicit attention: LLM's eager decoding on a CPU
    with explicit_attention(model):
        return decode_one_token(model, token, input_pos, s, generator)


class CompiledBlocks:
    """The compiled decode step on a CPU: decode_one_token_explicit with each block's forward compiled by
    torch.compile for one token. Every layer runs the same Block code on tensors of the same shapes, so one graph
    serves them all (two for Gemma's local and global layers) and compiling takes seconds: the whole step, unrolled
    over 30 layers, takes about 30 s. Inductor fuses each block's small ops (norms, RoPE, the softmax, residual adds)
    into a few C++ loops; the matmuls and one-query attention stay the eager kernels, called as operators (gemv.c's,
    PackedLinear's, the int8 and int4 ones). Prefill, and speculative decoding's verification, run eagerly: a graph per
    prompt length would cost more than it saves. It stays opt-in (--compile), for long generations and chat sessions,
    and compiles only the blocks that do not decode as one kernel call (gemv.DecodeBlock: a fork's edited block, or
    every block where gemv.c is unavailable).

    A graph is compiled ahead of time (aot_compile) and checked against a block once, by dynamo's guards, the first
    time that block runs with arguments of new shapes (a new cache length, batch, thread count); from then on it runs
    without them. A guarded call of a compiled function costs 50-90 us on this project's 2-core EPYC, 30 of them a
    token: SmolLM2-135M int8, 30 blocks took 14.2 ms guarded and 10.9 ms without (eager 17.3).

    Each graph is saved (torch's save_compiled_function) in cache_dir() and loaded by the next process that needs it,
    checked by its guards all the same: aot_compile's graphs miss torch's own caches (torch 2.13 names each one with a
    random uuid, which is part of the key), so without this every process compiled each graph anew, 2.5-4 s each on a
    2-core EPYC (two per model: ThreadTunedDecode's thread counts), against 0.1 s to load one (and ~1.5 s to import
    inductor, once). Loaded guards check tensors as they are outside inference mode (an inference tensor fails
    them), so compiled decoding runs under no_grad (LLM.decoding_mode)."""

    CACHE_FORMAT = 1          # part of each saved graph's file name: raise it when what a graph depends on changes

    def __init__(self, model):
        self.layers = model.layers
        self.graphs = []          # compiled Block.forward: one per kind of layer, argument shapes and thread count
        self.chosen = {}          # (layer index, thread count, grad mode, argument shapes) -> its graph

    @staticmethod
    def signature(arg):
        if isinstance(arg, torch.Tensor):
            return arg.shape, arg.stride(), arg.dtype, arg.device
        return (arg.start, arg.stop, arg.step) if isinstance(arg, slice) else arg

    def saved_path(self, block: nn.Module, args: tuple) -> Path:
        """Where a graph for this block and these arguments is saved: a name from everything it is compiled from
        (torch, the CPU, the code of the block, gemv.py and this file, the block's structure and weights' dtypes, the
        argument shapes, the thread count and grad modes)."""
        import inspect                            # (only here: compiled decoding's start)
        source = inspect.getsource(sys.modules[type(block).__module__])
        key = "\0".join(map(str, [self.CACHE_FORMAT, torch.__version__, sys.version, gemv.cpu_flags(), source,
                                   inspect.getsource(gemv), inspect.getsource(sys.modules[__name__]), block,
                                   [(name, t.dtype, t.shape) for name, t in block.state_dict().items()],
                                   [self.signature(a) for a in args],
                                   torch.get_num_threads(), torch.is_inference_mode_enabled(),
                                   torch.is_grad_enabled()]))
        return gemv.cache_dir() / "compiled" / f"block-{hashlib.sha256(key.encode()).hexdigest()[:24]}.bin"

    def load_or_compile(self, block: nn.Module, args: tuple):
        path = self.saved_path(block, args)
        if path.is_file():
            try:
                with open(path, "rb") as f:
                    graph = torch.compiler.load_compiled_function(f)
                if graph.guard_check(block, *args):
                    return graph
            except Exception:                     # another torch wrote it, or half of it: compile anew
                pass
        graph = torch.compile(type(block).forward, fullgraph=True, dynamic=False).aot_compile(((block, *args), {}))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            graph.save_compiled_function(str(path))           # (written to a temporary name and renamed)
        except Exception as e:                   # a graph torch cannot save, a read-only cache: compiled each time
            print(f"generate: compiled decoding not saved ({type(e).__name__}: {e})", file=sys.stderr)
        return graph

    def graph(self, i: int, block: nn.Module, args: tuple):
        key = (i, torch.get_num_threads(), torch.is_inference_mode_enabled(), torch.is_grad_enabled(),
               *map(self.signature, args))
        graph = self.chosen.get(key)
        if graph is None:
            forward = block.__dict__.pop("forward", None)  # the block as it is outside on(), for dynamo's guards
            try:
                graph = next((g for g in self.graphs if g.guard_check(block, *args)), None)
                if graph is None:
                    graph = self.load_or_compile(block, args)
                    graph.disable_guard_check()             # checked here, once per block and key
                    self.graphs.append(graph)
            finally:
                if forward is not None:
                    block.__dict__["forward"] = forward
            self.chosen[key] = graph
        return graph

    @contextmanager
    def on(self):
        """The blocks run their compiled forward inside (for one token per sequence: other shapes compile anew), but
        those that decode as one kernel call (gemv.DecodeBlock, set by explicit_attention), which is faster: 128 tokens
        of SmolLM2-135M on a 2-core EPYC, tokens/s with it against compiled, int8 121 against 97, fp32 51 against 45."""
        compiled = [(i, block) for i, block in enumerate(self.layers) if gemv.decode_block(block) is None]
        for i, block in compiled:
            # an instance attribute, which nn.Module.__call__ runs (set in __dict__: nn.Module's __setattr__ is slow)
            block.__dict__["forward"] = lambda *args, i=i, block=block: self.graph(i, block, args)(block, *args)
        try:
            yield
        finally:
            for _, block in compiled:
                del block.__dict__["forward"]             # the class's eager forward again

    def __call__(self, model, token, input_pos, s, generator=None):
        with self.on():
            return decode_one_token_explicit(model, token, input_pos, s, generator)


def generate_tokens(model, prompt_ids: list[int], max_new_tokens: int, s: Sampling, stop_ids=(),
                    generator=None, decode_fn=decode_one_token, stats=None):
    """Yield new token ids one by one until a stop id (not yielded) or max_new_tokens."""
    device = model.tok_embeddings.weight.device
    t0 = time.perf_counter()
    token = prefill(model, torch.tensor([prompt_ids], device=device), s, generator)
    if stats is not None:
        stats.time_to_first_token = time.perf_counter() - t0
    input_pos = torch.tensor([len(prompt_ids)], device=device)
    for i in range(max_new_tokens):
        token_id = token.item()
        if token_id in stop_ids:
            break
        yield token_id
        if stats is not None:
            stats.new_tokens = i + 1
        if i + 1 == max_new_tokens:
            break
        token = decode_fn(model, token, input_pos, s, generator)
        input_pos += 1
    if stats is not None:
        stats.total_time = time.perf_counter() - t0


class ThreadTunedDecode:
    """A CPU decode step run on as many threads as are fastest now: all of torch's threads, or one.

    One decode step is about 150 parallel regions (every matmul, the attention), and each ends only when its slowest
    thread does. On an idle machine two threads stream the weights almost twice as fast as one; on a loaded machine
    the second thread waits for the scheduler at every region. Measured on this project's 2-core EPYC at load 5,
    int8 SmolLM2-135M: 469 ms/token on 2 threads, 119 ms on 1. So each step is timed, the next one runs on the
    thread count whose latest step was faster, and every PROBE_EVERY steps the other count runs once, to notice a
    change of load (on an idle machine that probe costs about 1/PROBE_EVERY of the speed).

    bf16, int8 and int4 decoding give the same bits on any thread count; fp32 differs in the last bits (MKL's matmuls
    split their sums by thread count), as two runs of HF transformers on 1 and 2 threads do."""

    PROBE_EVERY = 32

    def __init__(self, decode_fn):
        self.decode_fn = decode_fn
        self.threads = torch.get_num_threads()
        self.seconds = {self.threads: 0.0, 1: 0.0}       # latest step time on each thread count; 0.0: not tried
        self.steps = 0

    def __call__(self, *args):
        fastest, other = sorted(self.seconds, key=self.seconds.get)
        threads = other if self.steps % self.PROBE_EVERY == self.PROBE_EVERY - 1 else fastest
        self.steps += 1
        before = torch.get_num_threads()
        if threads != before:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        try:
            return self.decode_fn(*args)
        finally:
            self.seconds[threads] = time.perf_counter() - t0  # the step's result is on the CPU: its work is done
            if threads != before:
                torch.set_num_threads(before)


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0
    total_time: float = 0.0
    verify_steps: int = 0        # speculative decoding: forward passes of the target after prefill,
    guessed: int = 0             # the guesses they checked,
    kept: int = 0                # and those they kept

    def report(self, device) -> str:
        decode_time = self.total_time - self.time_to_first_token
        tps = (self.new_tokens - 1) / decode_time if self.new_tokens > 1 and decode_time > 0 else float("nan")
        peak = models.peak_memory_gib(device)
        line = (f"prompt {self.prompt_tokens} tokens, time to first token {self.time_to_first_token:.3f} s, "
                f"{self.new_tokens} new tokens at {tps:.1f} tokens/s, peak memory {peak:.2f} GiB")
        if self.verify_steps:
            line += (f", {self.tokens_per_step():.2f} tokens per verification step ({self.kept} of "
                     f"{self.guessed} guesses kept)")
        return line

    def tokens_per_step(self) -> float:
        """Speculative decoding: tokens each forward pass of the target yields, kept guesses and its own token."""
        return (self.kept + self.verify_steps) / self.verify_steps


# ----------------------------------------------------------------------------------------------------------------
# Speculative decoding (Leviathan et al. 2023; Chen et al. 2023). Decoding one token reads every weight of the
# model, and so does scoring k + 1 tokens in one forward pass, at little more cost. So something cheap guesses the
# next k tokens; the target model runs once over its newest token and the k guesses (positions n .. n + k) and keeps
# the guesses up to the first one it disagrees with, then adds one token of its own: the correction at that point,
# or a bonus token after the k-th guess. Each step yields 1 to k + 1 tokens for one pass of the target.
#   Greedy: a guess is kept when it is the target's argmax, so the text is plain greedy decoding's.
#   Sampling: a guess x, drawn from the guesser's distribution q, is kept with probability min(1, p(x) / q(x)), p
#   the target's; at the first refusal the token is drawn from max(0, p - q), renormalised; the bonus token from p.
#   Every token then follows p exactly, whatever q is (Leviathan et al., appendix A). p and q are sampling_probs's
#   distributions, with the same temperature, top-k and top-p.
#   Refused guesses leave keys and values in the cache past the last kept position. Nothing reads them (the cache
#   mask hides every position past a query's own) and the next step writes over them: nothing needs clearing.
# Two guessers, each with propose(history, k, s, generator) -> (k guesses, their q (k, vocab) or None):
#   DraftModel: a smaller model with the same tokenizer decodes k tokens ahead, in a KV cache of its own.
#   PromptLookup (Saxena 2023): the tokens that followed the latest earlier occurrence of the text's last few
#   tokens, copied: no second model, and strong where the output repeats its input (summaries, edits, code). Its
#   guess is certain (q one-hot), so a guess x is kept with probability p(x) and a refusal draws from p without x.

SPECULATE_K = 5            # draft-model guesses per step (gpt-fast's default)
PROMPT_LOOKUP_NGRAM = 3    # the longest suffix looked up, then shorter ones down to one token (Saxena 2023)


class DraftModel:
    """Guesses from a smaller model with the target's tokenizer, decoding ahead in its own KV cache."""

    def __init__(self, model, vocab_size: int):
        self.model = model
        self.vocab_size = vocab_size          # the target's: embedding tables padded to other sizes are cut to it
        self.cached = 0                       # history[:cached] has its keys and values in the draft's cache
        self.fed = torch.empty(0, dtype=torch.long)   # the guesses last fed to the draft, from position `cached`

    def propose(self, history: list[int], k: int, s: Sampling, generator=None):
        device = self.model.tok_embeddings.weight.device
        for guess, token in zip(self.fed.tolist(), history[self.cached:]):   # the guesses the target kept
            if guess != token:
                break
            self.cached += 1
        idx = torch.tensor([history[self.cached:]], device=device)          # (1, T): what the draft has not seen
        # A draft whose embedding table is shorter than the target's (Qwen2.5-0.5B's for 7B's) lacks only padding
        # ids, which no text holds; should the target sample one, the draft reads another id and guesses worse.
        idx = idx.clamp(max=self.model.config.vocab_size - 1)
        input_pos = torch.arange(self.cached, len(history), device=device)
        guesses, probs = [], []
        for _ in range(k):
            logits = self.model(idx, input_pos)[:, -1, :self.vocab_size]     # (1, vocab)
            if s.temperature == 0:
                guess = logits.argmax(dim=-1, keepdim=True)                  # (1, 1)
            else:
                probs.append(sampling_probs(logits, s))
                guess = torch.multinomial(probs[-1], 1, generator=generator)
            guesses.append(guess[0])
            idx, input_pos = guess, input_pos[-1:] + 1
        guesses = torch.cat(guesses)                                         # (k,)
        self.cached, self.fed = len(history), guesses[:-1]
        if not probs:
            return guesses, None
        q = torch.cat(probs)                                                 # (k, draft vocab)
        return guesses, nn.functional.pad(q, (0, self.vocab_size - q.size(-1)))    # 0 on ids the draft lacks


class PromptLookup:
    """Guesses copied from the text so far: what followed the latest earlier occurrence of its last n tokens, for
    the longest n <= PROMPT_LOOKUP_NGRAM that occurred before."""

    def __init__(self):
        self.follows: dict[tuple[int, ...], int] = {}   # n-gram -> index of the token after its latest occurrence
        self.indexed = 1                                # the n-grams ending before history[1:indexed] are in it

    def propose(self, history: list[int], k: int, s: Sampling | None = None, generator=None):
        for end in range(self.indexed, len(history)):
            for n in range(1, min(PROMPT_LOOKUP_NGRAM, end) + 1):
                self.follows[tuple(history[end - n:end])] = end
        self.indexed = len(history)                     # (the suffix itself is indexed once a token follows it)
        for n in range(min(PROMPT_LOOKUP_NGRAM, len(history)), 0, -1):
            end = self.follows.get(tuple(history[-n:]))
            if end is not None:
                return history[end:end + k], None
        return [], None


def verify_guesses(model, history: list[int], guesses, q: torch.Tensor | None, s: Sampling,
                   generator=None) -> list[int]:
    """One pass of the target over history's newest token and the k guesses, at positions len(history) - 1 onward.
    Returns the guesses it keeps, then one token of its own. q: (k, vocab), the distributions the guesses were drawn
    from; None for certain guesses."""
    device = model.tok_embeddings.weight.device
    guesses = torch.as_tensor(guesses, dtype=torch.long, device=device)                   # (k,)
    k, start = len(guesses), len(history) - 1
    idx = torch.cat([torch.tensor(history[-1:], device=device), guesses])[None]          # (1, k + 1)
    logits = model(idx, torch.arange(start, start + k + 1, device=device))[0]             # (k + 1, vocab)
    if s.temperature == 0:
        best = logits.argmax(dim=-1)                                                       # (k + 1,)
        kept = int((best[:k] == guesses).int().cumprod(dim=0).sum())        # guesses before the first disagreement
        return guesses[:kept].tolist() + [best[kept].item()]
    p = sampling_probs(logits, s)                                                          # (k + 1, vocab)
    guessed = torch.zeros_like(p[:k]).scatter_(1, guesses[:, None], 1) if q is None else q      # (k, vocab)
    p_guess, q_guess = p[:k].gather(1, guesses[:, None])[:, 0], guessed.gather(1, guesses[:, None])[:, 0]
    keep = torch.rand(k, device=device, generator=generator) * q_guess <= p_guess       # probability min(1, p / q)
    kept = int(keep.int().cumprod(dim=0).sum())
    if kept == k:
        last = p[k]                                                                        # the bonus token
    else:                                  # the correction (max(0, p - q) is all 0 only if p == q: never refused)
        residual = (p[kept] - guessed[kept]).clamp(min=0)
        last = torch.where(residual.sum() > 0, residual, p[kept])
    return guesses[:kept].tolist() + [torch.multinomial(last, 1, generator=generator).item()]


def speculative_generate_tokens(model, prompt_ids: list[int], max_new_tokens: int, s: Sampling, guesser, k: int,
                                stop_ids=(), generator=None, stats=None):
    """generate_tokens with up to k guesses from guesser (a DraftModel or PromptLookup) checked per forward pass of
    the target: the same tokens when greedy, drawn from the same distribution when sampling. Tokens are yielded
    as they are kept, up to a stop id (not yielded) or max_new_tokens."""
    device = model.tok_embeddings.weight.device
    t0 = time.perf_counter()
    new = [prefill(model, torch.tensor([prompt_ids], device=device), s, generator).item()]
    if stats is not None:
        stats.time_to_first_token = time.perf_counter() - t0
    history, limit = list(prompt_ids), len(prompt_ids) + max_new_tokens
    while new:
        token_id = new.pop(0)
        if token_id in stop_ids:
            break
        yield token_id
        history.append(token_id)
        if stats is not None:
            stats.new_tokens += 1
        if len(history) == limit:
            break
        if not new:
            room = limit - len(history) - 1              # for guesses: the step adds a token of its own
            guesses, q = guesser.propose(history, min(k, room), s, generator) if room else ([], None)
            new = verify_guesses(model, history, guesses, q, s, generator)
            if stats is not None:
                stats.verify_steps += 1
                stats.guessed += len(guesses)
                stats.kept += len(new) - 1
    if stats is not None:
        stats.total_time = time.perf_counter() - t0


def check_speculation(draft, speculate_k: int, prompt_lookup: int | None):
    if prompt_lookup is not None and draft is not None:
        raise ValueError("prompt lookup and a draft model are two ways of guessing tokens: use one, not both")
    if prompt_lookup is not None and not (isinstance(prompt_lookup, int) and prompt_lookup >= 1):
        raise ValueError(f"prompt_lookup must be a positive integer (tokens guessed per step), got {prompt_lookup}")
    if not (isinstance(speculate_k, int) and speculate_k >= 1):
        raise ValueError(f"speculate_k must be a positive integer (draft tokens per step), got {speculate_k}")


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, draft_dir):
    """A draft model must speak the target's token ids."""
    if target.vocab_size != draft.vocab_size or \
            any(target.id_to_token(i) != draft.id_to_token(i) for i in range(target.vocab_size)):
        raise ValueError(f"the draft {draft_dir} has another tokenizer than the target; speculative decoding needs "
                         f"a draft with the same tokenizer (the same token ids)")


# ----------------------------------------------------------------------------------------------------------------
# Model preparation for inference


class SplitLinear(nn.Module):
    """A linear layer for CPU decoding, with the same weight and bias as the nn.Linear it replaces. Decoding
    multiplies one vector by every matrix, so its speed is how fast the weights stream from memory. MKL reads a tall
    matrix about twice as fast stored column-major (W^T contiguous), and only on one core: so the weight is stored
    column-major and multiplied as `parts` blocks of columns in one batched matmul, one block per core. Measured on
    this project's 2-core EPYC, fp32 SmolLM2-135M: 10 GB/s row-major, 20 column-major, 27 split in two."""

    def __init__(self, linear: nn.Linear, parts: int):
        super().__init__()
        self.weight, self.bias, self.parts = linear.weight, linear.bias, parts
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight.data = self.weight.data.t().contiguous().t()         # same values, column-major
        # (parts, in, out / parts) views of W^T: block p holds output columns p * out / parts onward
        self.blocks = self.weight.t().view(self.in_features, parts, -1).transpose(0, 1)

    def forward(self, x):
        M = x.numel() // self.in_features
        rows = x.reshape(1, M, self.in_features)
        if M == 1 and torch.compiler.is_compiling():
            # Compiled, a one-row batched matmul becomes inductor's own reduction loop, several times slower than
            # MKL: a second, identical row keeps it MKL's.
            rows = rows.expand(1, 2, self.in_features)
        y = torch.bmm(rows.expand(self.parts, -1, -1), self.blocks)[:, :M]     # (parts, M, out / parts), no copy in
        y = y.transpose(0, 1).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def split_linears_for_cpu(model: nn.Module):
    """Swap every fp32 linear layer at least as tall as it is wide for a SplitLinear over the CPU's threads (wide
    ones, like the MLP's down projection, are fastest as they are; MKL's bf16 batched matmul is slower than its
    plain one, so bf16 weights stay too). A tied head keeps sharing the embedding's weight."""
    parts = torch.get_num_threads()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32 and \
                    child.out_features >= child.in_features and child.out_features % parts == 0:
                setattr(parent, name, SplitLinear(child, parts))


class PackedLinear(nn.Module):
    """A linear layer whose weight is in oneDNN's blocked layout, multiplied by oneDNN's kernel. Measured on this
    project's 2-core EPYCs (AVX2, and AVX-512 with bf16 instructions), SmolLM2-135M's shapes:
      - fp32, the engine's decoding: MKL (what nn.Linear and SplitLinear run) computes a row with different
        reduction orders for M = 1, 2-3 and >= 4 rows, so a row's bits would depend on how many sequences share the
        step. oneDNN with a weight packed for PACK_ROWS rows computes each row alike for every M from 2 up, on 1
        and 2 threads; and for M = 1 too on AVX2, but not on AVX-512 where the input is over 1024 wide: so the
        engine decodes at least 2 rows. MKL streams the weights at 5-7 GB/s for 4-16 rows; oneDNN at 9-13. (At
        one row MKL's column-major SplitLinear is faster on AVX2, 15 GB/s against 13: single-sequence generation
        keeps it.)
      - bf16, on a CPU with AVX-512 bf16 instructions: the same bits as nn.Linear's bf16 matmul at every M (and
        every row alike), at 1.6-2x its speed (the 49152 x 576 head: 14.5 against 8.8 GB/s). Without those
        instructions oneDNN has no bf16 kernel and nn.Linear stays.
    Inference only (no autograd), and the packed copy replaces the weight: the module holds no parameter (a head
    tied to the embedding gets a copy of its own)."""

    PACK_ROWS = 16

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().contiguous()                   # (a SplitLinear's is column-major)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, self.PACK_ROWS),
                             persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        return packed_linear(x, self.packed, self.bias)


# PackedLinear's matmul as an operator of our own, which torch.compile calls as it is: inductor's lowering of the
# oneDNN op underneath wants the weight frozen into the graph as a constant, which a graph shared by every layer
# (CompiledBlocks) cannot have.
@torch.library.custom_op("flatlm::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x, packed, bias):                          # the output's shape, for tracing: (..., in) -> (..., out)
    return x.new_empty(*x.shape[:-1], packed.size(0))


def pack_linears(model: nn.Module, dtype: torch.dtype):
    """Swap every linear layer (nn.Linear or SplitLinear) with dtype weights for a PackedLinear; quantized layers
    and other dtypes stay. Without oneDNN every layer stays (and the engine's fp32 rows may then differ in their
    last bits with the batch)."""
    if not torch.backends.mkldnn.is_available():
        return
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Linear, SplitLinear) and child.weight.dtype == dtype and \
                    not isinstance(parent, gemv.GemvLinear):          # (its own decoding is row-invariant)
                setattr(parent, name, PackedLinear(child))


def prepare_for_inference(model: nn.Module, quantize: str | None = None) -> nn.Module:
    """Quantize the model's linear layers (models.QUANTIZE_MODES), or on a CPU give them the faster layout."""
    if quantize:
        models.quantize(model, quantize)
    if model.tok_embeddings.weight.device.type != "cpu" or gemv.use_for_decoding(model):
        return model
    if not quantize:
        split_linears_for_cpu(model)
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            pack_linears(model, torch.bfloat16)
    return model


# ----------------------------------------------------------------------------------------------------------------
# The engine: continuous batching, many sequences at once (serve.py, and LLM.generate / LLM.chat on a list).
#
# The KV cache has a fixed number of rows, "slots". A new sequence waits for a free slot, is prefilled into it on
# its own (a long prompt one chunk per step, so that it does not stall the others) and then joins the running
# batch: each step decodes one token for every running sequence in one forward pass, row s at its own position in
# slot s. A finished or cancelled sequence frees its slot at once and the next waiting one takes it.
#
# Batch invariance: a sequence's numbers must not depend on its batch-mates, so that N concurrent greedy requests
# give token for token what each gives alone, and a seeded sample draws the same tokens. What that takes:
#   - Prefill runs each sequence alone, in chunks that start at multiples of prefill_chunk: the same calls
#     whatever else is running. Each sequence samples with a generator of its own.
#   - MKL's fp32 matmul (nn.Linear's) computes a row with one reduction order for M >= 4 rows and others for
#     M = 1 (its gemv) and M = 2..3, and on 2 threads a tail of 1 to 3 rows takes the small-M path. oneDNN's, with
#     the weight packed once for PackedLinear.PACK_ROWS rows, computes every row alike at every M >= 2 on 1 or 2
#     threads (measured: every matrix shape of SmolLM2 and the tiny test models, M from 2 to 39, every row
#     position, on an AVX2 and an AVX-512 EPYC); M = 1 alike too on AVX2, but not on AVX-512 for inputs wider
#     than 1024 (another kernel). So on CPU the engine swaps every fp32 linear layer for a PackedLinear and
#     decodes the rows up to the last slot that decodes, and at least MIN_DECODE_ROWS of them (an idle row is
#     cheap: the weights stream once for every row). (bf16 and the int8 and int4 kernels are row-invariant as
#     they are.)
#   - CPU SDPA (its flash kernel) is not row-invariant in fp32: each thread has a scratch buffer, and MKL's
#     reduction of probs @ v depends on that buffer's alignment, so a row's bits depend on which thread ran it
#     (measured: rows agree on 1 thread). The decode step runs the model file's explicit attention instead
#     (Attention.use_sdpa = False): plain matmuls, each (row, key/value head) its own batch entry.
#   - An idle row must not disturb its slot: it writes where the slot's next real write goes anyway (position 0
#     of a free slot, the next prompt position of a slot being prefilled), which nothing reads before that.
#   - The cache length (and so the attention's reduction length) changes only while no sequence runs; see admit.

CACHE_BUCKET = 256      # cache lengths are this times a power of two (capped at the context): few reallocations
MIN_DECODE_ROWS = 2     # (where there are that many slots) see above


@dataclass
class Request:
    """One sequence to generate: a prompt's token ids and how to continue it."""
    prompt_ids: list[int]
    max_new_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None             # seeds this sequence's own generator (None: a random seed)
    stop: tuple[str, ...] = ()          # strings that end it: matched across token boundaries, never emitted
    stop_ids: tuple[int, ...] = ()      # token ids that end it, besides the tokenizer's EOS ids; never emitted
    logprobs: int | None = None         # None: none; k >= 0: each token's logprob and the k most likely tokens'
    on_update: Callable | None = None   # called on the engine's thread with every Update


@dataclass
class Token:
    id: int
    logprob: float | None = None                   # log-softmax of the model's logits (before temperature, top-p)
    top: list[tuple[int, float]] | None = None     # the k most likely (id, logprob), most likely first


@dataclass
class Update:
    text: str                     # newly released text (held back while it could still become a stop string)
    tokens: list[Token]           # the tokens this text came from
    finish_reason: str | None     # None while running; then "stop", "length", "cancelled" or "error"


def find_stop(text: str, start: int, stops) -> int | None:
    """Where the earliest stop string begins in text[start:], or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops) -> int:
    """How many characters at the end of text could be the start of a stop string (and so must wait)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


class Sequence:
    """A request's state in the engine. Its text is released as it decodes, except what could still turn into a stop
    string; `text` (all released text), `tokens` and `finish_reason` hold the result."""

    def __init__(self, request: Request, engine: "Engine"):
        self.request = request
        self.prompt_ids = list(request.prompt_ids)
        self.max_new_tokens = min(request.max_new_tokens, engine.context - len(self.prompt_ids))
        self.stop_ids = set(engine.tokenizer.eos_ids) | set(request.stop_ids)
        self.generator = torch.Generator(engine.device)
        if request.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(request.seed)
        self.decoder = engine.tokenizer.stream_decoder(skip_special_tokens=True)   # as HF pipelines print text
        self.slot: int | None = None
        self.prefilled = 0                 # prompt tokens in the cache
        self.next_token: int | None = None # the sampled token the next decode step feeds in, at `position`
        self.position = 0
        self.generated: list[int] = []     # every sampled id, a stop id included (the usage count)
        self.decoded = ""                  # all decoded text; released up to `self.released`
        self.released = 0
        self.pending: list[tuple[Token, int, int]] = []   # unreleased tokens: (token, start, end) in decoded
        self.text, self.tokens = "", []    # what was released
        self.finish_reason: str | None = None
        self.cancelled = False
        self.done = threading.Event()

    def add(self, token: Token) -> Update:
        """Take the next sampled token; return what it releases (and finish the sequence if it ends it)."""
        self.generated.append(token.id)
        if token.id in self.stop_ids:
            return self.finish("stop")
        start = len(self.decoded)
        self.decoded += self.decoder.add(token.id)
        self.pending.append((token, start, len(self.decoded)))
        if len(self.generated) >= self.max_new_tokens:
            return self.finish("length")
        stops = self.request.stop
        at = find_stop(self.decoded, self.released, stops)
        if at is not None:
            return self.release(at, "stop")
        # A stop string found later starts after `released`: the text before it holds no stop, and the held-back
        # tail is the longest one that could still grow into a stop.
        return self.release(len(self.decoded) - held_back(self.decoded[self.released:], stops))

    def finish(self, reason: str) -> Update:
        self.decoded += self.decoder.flush()          # the last bytes of an unfinished character
        at = find_stop(self.decoded, self.released, self.request.stop)
        return self.release(len(self.decoded), reason) if at is None else self.release(at, "stop")

    def release(self, upto: int, finish_reason: str | None = None) -> Update:
        text, self.released = self.decoded[self.released:upto], max(upto, self.released)
        if finish_reason is None:                     # tokens whose text is all out
            n = count_while(self.pending, lambda p: p[2] <= upto)
        elif upto == len(self.decoded):               # the end: every token
            n = len(self.pending)
        else:                                         # cut by a stop string: the tokens that reach before it
            n = count_while(self.pending, lambda p: p[1] < upto)
        tokens = [t for t, _, _ in self.pending[:n]]
        del self.pending[:n]
        self.text += text
        self.tokens += tokens
        self.finish_reason = finish_reason
        return Update(text, tokens, finish_reason)


def bucketed_cache_length(need: int, context: int) -> int:
    """The KV cache length for `need` positions: CACHE_BUCKET times a power of two, capped at the context."""
    length = CACHE_BUCKET
    while length < need:
        length *= 2
    return min(length, context)


def count_while(items, keep) -> int:
    n = 0
    while n < len(items) and keep(items[n]):
        n += 1
    return n


class Engine:
    """Continuous batching over max_batch_size cache slots. submit() and cancel() may be called from any thread;
    the steps run either on the engine's own thread (start(), for a server) or in the caller's (run())."""

    def __init__(self, model, tokenizer: Tokenizer, max_batch_size: int = 8, max_seq_len: int | None = None,
                 prefill_chunk: int = 256):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (a prompt token and a new one), got {max_seq_len}")
        self.model, self.tokenizer = model, tokenizer
        self.device = model.tok_embeddings.weight.device
        if self.device.type == "cpu":
            pack_linears(model, torch.float32)         # bf16 ones are packed already where that helps
            for layer in model.modules():              # every decode step's rows through gemv.c: row-invariant
                if isinstance(layer, gemv.GemvLinear):
                    layer.max_rows = max(layer.max_rows, max_batch_size)
        self.context = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        self.slots: list[Sequence | None] = [None] * max_batch_size
        self.running: list[Sequence] = []          # in the order they were admitted
        self.waiting: deque[Sequence] = deque()
        self.cache_len, self.cache = 0, None       # the cache this engine set up in the model
        self.finished: dict[str, int] = {}         # sequences ended, by finish reason
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closed = False

    # --- the outside: any thread

    def submit(self, request: Request) -> Sequence:
        """Queue a request. A bad one raises ValueError here and never reaches the batch."""
        self.check(request)
        seq = Sequence(request, self)
        with self.lock:
            if self.closed:
                raise RuntimeError("the engine is closed")
            self.waiting.append(seq)
            self.lock.notify()
        return seq

    def cancel(self, seq: Sequence):
        """Stop a sequence: its slot is freed before the next step."""
        with self.lock:
            seq.cancelled = True
            self.lock.notify()

    def check(self, r: Request):
        vocab = self.model.config.vocab_size
        if not r.prompt_ids:
            raise ValueError("the prompt is empty and the tokenizer adds no BOS token: give some text")
        if len(r.prompt_ids) >= self.context:
            raise ValueError(f"the prompt is {len(r.prompt_ids)} tokens but the context is {self.context}; "
                             f"shorten the prompt")
        if not all(isinstance(i, int) and 0 <= i < vocab for i in r.prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if r.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
        r.sampling.check()
        if r.logprobs is not None and r.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {r.logprobs}")
        if any(not isinstance(s, str) or not s for s in r.stop):
            raise ValueError("stop strings must be non-empty strings")

    # --- the steps

    def start(self):
        """Run the steps on a thread of the engine's own until close()."""
        self.thread = threading.Thread(target=self.serve_forever, name="flatlm-engine", daemon=True)
        self.thread.start()

    def close(self):
        with self.lock:
            self.closed = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    def serve_forever(self):
        while True:
            with self.lock:
                while not (self.closed or self.waiting or self.running):
                    self.lock.wait()
                if self.closed:
                    return
            try:
                self.step()
            except Exception:                 # a failed step fails its sequences, never the engine
                traceback.print_exc()
                for seq in list(self.running):
                    self.end(seq, Update("", [], "error"))

    def run(self, requests: list[Request]) -> list[Sequence]:
        """Submit requests and run steps in this thread until every one is done (no engine thread must run)."""
        seqs = [self.submit(r) for r in requests]
        while self.step():
            pass
        return seqs

    @torch.inference_mode()
    def step(self) -> bool:
        """Drop cancelled sequences, admit waiting ones, prefill, decode one token for every running sequence.
        Returns whether any work is left."""
        with self.lock:
            for seq in [s for s in [*self.waiting, *self.running] if s.cancelled]:
                self.end(seq, Update("", [], "cancelled"))
            self.admit()
        self.prefill()
        self.decode()
        with self.lock:
            return bool(self.waiting or self.running)

    def admit(self):
        """Move waiting sequences into free slots, first come first served. A sequence needs prompt +
        max_new_tokens cache positions; the cache is resized only while nothing runs (a new length would change
        the running rows' attention), so a sequence that does not fit waits until the running ones finish."""
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            need = len(seq.prompt_ids) + seq.max_new_tokens
            ours = self.cache is not None and self.cache is self.model.layers[0].attn.kv_cache
            if not ours or need > self.cache_len:
                if self.running:
                    return
                upcoming = list(self.waiting)[: self.max_batch_size]
                self.resize_cache(max(len(s.prompt_ids) + s.max_new_tokens for s in upcoming))
            self.waiting.popleft()
            seq.slot = self.slots.index(None)
            self.slots[seq.slot] = seq
            self.running.append(seq)

    def resize_cache(self, need: int):
        self.cache_len = bucketed_cache_length(need, self.context)
        self.model.setup_cache(len(self.slots), self.cache_len, self.device)
        self.cache = self.model.layers[0].attn.kv_cache

    def prefill(self):
        """Prefill admitted prompts into their slots, each alone, up to prefill_chunk tokens a step (at least one
        chunk): a long prompt goes in over several steps while the others keep decoding."""
        budget = self.prefill_chunk
        for seq in [s for s in self.running if s.prefilled < len(s.prompt_ids)]:
            while budget > 0 and seq.prefilled < len(seq.prompt_ids):
                start = seq.prefilled
                chunk = seq.prompt_ids[start: start + self.prefill_chunk]
                idx = torch.tensor([chunk], device=self.device)                     # (1, T)
                input_pos = torch.arange(start, start + len(chunk), device=self.device)
                h = self.model(idx, input_pos, cache_rows=slice(seq.slot, seq.slot + 1), hidden=True)  # (1, T, C)
                seq.prefilled += len(chunk)
                budget -= len(chunk)
            if seq.prefilled == len(seq.prompt_ids):
                seq.position = seq.prefilled
                self.accept(seq, self.model.output(h[:, -1])[0])                   # the last position's logits only
            if budget <= 0:
                return

    def decode(self):
        decoding = [s for s in self.running if s.next_token is not None]
        if not decoding:
            return
        n = max(max(s.slot for s in decoding) + 1, min(MIN_DECODE_ROWS, len(self.slots)))
        idx = torch.zeros(n, 1, dtype=torch.long)                        # idle rows: token 0 ...
        input_pos = torch.zeros(n, 1, dtype=torch.long)                  # ... at position 0 of a free slot
        for s in self.running:
            if s.slot < n:
                input_pos[s.slot, 0] = s.position if s.next_token is not None else s.prefilled
        for s in decoding:
            idx[s.slot, 0] = s.next_token
        with explicit_attention(self.model):
            logits = self.model(idx.to(self.device), input_pos.to(self.device), cache_rows=slice(0, n))[:, -1]
        greedy = logits.argmax(dim=-1).tolist()                          # (n,): one host sync for every row
        for s in decoding:
            s.position += 1
            self.accept(s, logits[s.slot], greedy[s.slot])

    def accept(self, seq: Sequence, logits: torch.Tensor, greedy: int | None = None):
        """Choose seq's next token from its logits (vocab,), release its text, free its slot if it is done."""
        r = seq.request
        if r.sampling.temperature == 0:
            token_id = greedy if greedy is not None else logits.argmax().item()
        else:
            token_id = sample(logits[None], r.sampling, seq.generator).item()
        token = Token(token_id)
        if r.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            token.logprob = logprobs[token_id].item()
            if r.logprobs:
                top = logprobs.topk(r.logprobs)
                token.top = list(zip(top.indices.tolist(), top.values.tolist()))
        update = seq.add(token)
        seq.next_token = token_id
        if update.finish_reason:
            self.end(seq, update)
        else:
            self.deliver(seq, update)

    def end(self, seq: Sequence, update: Update):
        seq.finish_reason = update.finish_reason
        if seq in self.running:
            self.running.remove(seq)
            self.slots[seq.slot] = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.finished[update.finish_reason] = self.finished.get(update.finish_reason, 0) + 1
        self.deliver(seq, update)
        seq.done.set()

    def deliver(self, seq: Sequence, update: Update):
        if seq.request.on_update is None:
            return
        try:
            seq.request.on_update(update)
        except Exception:                        # the listener is broken: stop its sequence, not the engine
            traceback.print_exc()
            seq.cancelled = True


class LLM:
    """A model and its tokenizer, ready to generate."""

    def __init__(self, model, tokenizer: Tokenizer, generation_config: dict | None = None, compile: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.generation_config = generation_config or {}
        self.device = model.tok_embeddings.weight.device
        self.stats = Stats()
        self.engine: Engine | None = None        # made on the first list of prompts
        self.max_batch_size = 16
        self.draft: LLM | None = None            # speculative decoding's draft model (LLM.load(..., draft=DIR))
        self.compiled = compile
        self.decode_fn = decode_one_token_explicit if self.device.type == "cpu" else decode_one_token
        if compile:
            if self.device.type == "cpu":
                self.decode_fn = CompiledBlocks(model)
            else:                                # the whole step, replayed as a CUDA graph
                self.decode_fn = torch.compile(decode_one_token, fullgraph=True, mode="reduce-overhead")
            self.warm_up()
        if self.device.type == "cpu" and torch.get_num_threads() > 1:
            self.decode_fn = ThreadTunedDecode(self.decode_fn)

    def decoding_mode(self):
        """The grad mode this LLM decodes in: inference_mode, but no_grad for compiled decoding on a CPU (the guards
        of CompiledBlocks' saved graphs fail on inference tensors)."""
        return torch.no_grad() if self.compiled and self.device.type == "cpu" else torch.inference_mode()

    def warm_up(self):
        # Compile now, on throwaway steps at position 0, not in the stats: on a CPU for both thread counts that
        # ThreadTunedDecode may choose (a compiled graph is for one thread count).
        with self.decoding_mode():
            self.setup_cache(1)
            zero = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            threads = torch.get_num_threads()
            try:
                for n in sorted({threads, 1}) if self.device.type == "cpu" else [threads]:
                    torch.set_num_threads(n)
                    for _ in range(2):
                        self.decode_fn(self.model, zero, zero[0], Sampling())
            finally:
                torch.set_num_threads(threads)

    @classmethod
    def load(cls, checkpoint_dir, device=None, dtype=None, quantize=None, compile=False, draft=None,
             draft_quantize=None) -> "LLM":
        """checkpoint_dir: a native checkpoint dir, or a Hub repo id org/name (fetched and converted into
        checkpoints/org/name on first use: convert_hf.resolve_checkpoint). draft: a smaller checkpoint with the same
        tokenizer, loaded on the same device in the same dtype (quantized as draft_quantize says), to guess tokens
        for speculative decoding."""
        checkpoint_dir = convert_hf.resolve_checkpoint(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise FileNotFoundError(f"checkpoint dir {checkpoint_dir} not found (convert one with: python "
                                    f"convert_hf.py HF_DIR {checkpoint_dir}, or give a Hub repo id org/name)")
        if isinstance(dtype, str) or dtype is not None and dtype not in DTYPES.values():
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        device = models.check_device(device)
        gen_path = checkpoint_dir / "generation_config.json"
        generation_config = models.read_json_object(gen_path) if gen_path.is_file() else {}
        # On CPU the weights are copied into a faster layout (or quantized) anyway: read them into memory rather
        # than memory-map them, so the file's pages do not count on top of the copies.
        model = models.load(checkpoint_dir, device=device, dtype=dtype, mmap=device.type != "cpu")
        prepare_for_inference(model, quantize)
        adapter = checkpoint_dir / "adapter.safetensors"
        if adapter.is_file():                     # a LLaMA-Adapter cannot be merged into the weights: apply it
            import finetune_lora                  # only on this path: generating needs no training code
            if finetune_lora.adapter_metadata(adapter)["merged"] == "false":
                finetune_lora.load_adapter(model, adapter)
        llm = cls(model, Tokenizer(checkpoint_dir), generation_config, compile)
        try:                                      # the file's sampling defaults: its fault, not the caller's
            llm.default_sampling().check()
        except (ValueError, TypeError) as e:
            raise ValueError(f"{gen_path}: {e}; fix the file (without do_sample decoding is greedy)") from None
        if draft is not None:
            llm.draft = cls.load(draft, device, dtype, draft_quantize)
            check_same_tokenizer(llm.tokenizer, llm.draft.tokenizer, draft)
        return llm

    def default_sampling(self) -> Sampling:
        g = self.generation_config
        if not g.get("do_sample", False):
            return Sampling()
        return Sampling(g.get("temperature", 1.0), g.get("top_k"), g.get("top_p", 1.0))

    def sampling(self, temperature=None, top_k=None, top_p=None) -> Sampling:
        """The checkpoint's defaults, with what was given instead."""
        s = self.default_sampling()
        if temperature is not None:
            s.temperature = temperature
        if top_k is not None:
            s.top_k = top_k
        if top_p is not None:
            s.top_p = top_p
        s.check()
        return s

    def stream_ids(self, prompt_ids: list[int], max_new_tokens: int = 256, temperature=None, top_k=None,
                   top_p=None, seed=None, speculate_k: int = SPECULATE_K, prompt_lookup: int | None = None):
        """Yield text pieces of the continuation of prompt_ids, as they decode. With a draft model, speculative
        decoding with speculate_k guesses per step; prompt_lookup=N: N guesses per step copied from the text."""
        return self.decoding_mode()(self._stream_ids)(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                                                      speculate_k, prompt_lookup)

    def _stream_ids(self, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, speculate_k, prompt_lookup):
        s = self.sampling(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_speculation(self.draft, speculate_k, prompt_lookup)
        context = self.model.config.max_seq_len
        if self.draft is not None:                # the draft decodes every position too
            context = min(context, self.draft.model.config.max_seq_len)
        if len(prompt_ids) >= context:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens but the model's context is {context}; "
                             f"shorten the prompt")
        if not prompt_ids:
            raise ValueError("the prompt is empty and the tokenizer adds no BOS token: give some text")
        max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
        self.setup_cache(len(prompt_ids) + max_new_tokens)
        if self.draft is not None:
            self.draft.setup_cache(len(prompt_ids) + max_new_tokens)
        generator = None
        if seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        self.stats = Stats(prompt_tokens=len(prompt_ids))
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)   # as HF pipelines print text
        if self.draft is None and prompt_lookup is None:
            tokens = generate_tokens(self.model, prompt_ids, max_new_tokens, s, self.tokenizer.eos_ids, generator,
                                     self.decode_fn, self.stats)
        else:
            guesser = PromptLookup() if prompt_lookup else DraftModel(self.draft.model, self.model.config.vocab_size)
            tokens = speculative_generate_tokens(self.model, prompt_ids, max_new_tokens, s, guesser,
                                                 prompt_lookup or speculate_k, self.tokenizer.eos_ids, generator,
                                                 self.stats)
        for token_id in tokens:
            piece = decoder.add(token_id)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest

    def setup_cache(self, length: int):
        # Round up so that prompts of similar length reuse one cache. Compiled, each cache length is a graph of its
        # own (per thread count on a CPU): lengths CACHE_BUCKET times a power of two keep them few.
        context = self.model.config.max_seq_len
        if self.compiled:
            length = bucketed_cache_length(length, context)
        else:
            length = min(-(-length // CACHE_BUCKET) * CACHE_BUCKET, context)
        cache = self.model.layers[0].attn.kv_cache
        if cache is None or cache.k.size(0) != 1 or cache.k.size(2) < length or \
                cache.k.is_inference() and not torch.is_inference_mode_enabled():   # (the engine's has many rows;
            self.model.setup_cache(1, length, self.device)                       # it runs in inference mode)

    def stream(self, prompt: str, **kwargs):
        yield from self.stream_ids(self.tokenizer.encode(prompt), **kwargs)

    def generate(self, prompt: str | list[str], **kwargs) -> str | list[str]:
        """The continuation of a prompt, or of each of a list of prompts (decoded together by the engine). stop=[...]
        ends a continuation at the first of these strings (not included)."""
        if isinstance(prompt, str) and not kwargs.get("stop"):
            kwargs.pop("stop", None)
            return "".join(self.stream(prompt, **kwargs))
        prompts = [prompt] if isinstance(prompt, str) else prompt
        texts = self.generate_ids([self.tokenizer.encode(p) for p in prompts], **kwargs)
        return texts[0] if isinstance(prompt, str) else texts

    def stream_chat(self, messages: list[dict], **kwargs):
        yield from self.stream_ids(self.tokenizer.encode_chat(messages), **kwargs)

    def chat(self, messages: list[dict] | list[list[dict]], **kwargs) -> str | list[str]:
        """The reply to a conversation (a list of messages), or to each of a list of conversations."""
        one = not messages or isinstance(messages[0], dict)
        if one and not kwargs.get("stop"):
            kwargs.pop("stop", None)
            return "".join(self.stream_chat(messages, **kwargs))
        conversations = [messages] if one else messages
        texts = self.generate_ids([self.tokenizer.encode_chat(m) for m in conversations], **kwargs)
        return texts[0] if one else texts

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 256, temperature=None, top_k=None,
                     top_p=None, seed=None, stop=()) -> list[str]:
        """Continue every prompt (token ids) through the engine, all in one batch as far as its slots go. With a
        seed, each sequence samples as it would alone with that seed."""
        sampling = self.sampling(temperature, top_k, top_p)
        requests = [Request(ids, max_new_tokens, sampling, seed, tuple(stop or ())) for ids in prompts]
        if self.engine is None:
            self.engine = Engine(self.model, self.tokenizer, self.max_batch_size)
        return [seq.text for seq in self.engine.run(requests)]


# ----------------------------------------------------------------------------------------------------------------
# Command line


def fit_history(llm: LLM, messages: list[dict], max_new_tokens: int) -> list[dict]:
    """Drop the oldest exchanges (keeping a system message) until the prompt leaves room for the reply."""
    budget = llm.model.config.max_seq_len - max_new_tokens
    while len(llm.tokenizer.encode_chat(messages)) > budget:
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise ValueError(f"the message does not fit in the model's context ({llm.model.config.max_seq_len} "
                             f"tokens with {max_new_tokens} new ones); shorten it or lower --max_new_tokens")
        del messages[first:first + 2]
    return messages


def interactive_chat(llm: LLM, system: str | None, **kwargs):
    print("Chat with the model. Empty line or Ctrl-D quits, /reset forgets the conversation.", file=sys.stderr)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            user = input(">> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not user.strip():
            return
        if user.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        try:
            turn = fit_history(llm, messages + [{"role": "user", "content": user}], kwargs["max_new_tokens"])
        except ValueError as e:                   # refuse this message, keep the conversation
            print(f"error: {e}", file=sys.stderr)
            continue
        messages = turn
        reply = []
        for piece in llm.stream_chat(messages, **kwargs):
            print(piece, end="", flush=True)
            reply.append(piece)
        print()
        print(llm.stats.report(llm.device), file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(reply)})


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate text with a FlatLM checkpoint (no --prompt: chat).")
    p.add_argument("checkpoint_dir", help="a converted checkpoint dir, or a Hub repo id org/name (converted once)")
    p.add_argument("--prompt", help="text to continue (or, with --chat, the user message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--system", help="system message for chat")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the checkpoint's generation_config)")
    p.add_argument("--top_k", type=int)
    p.add_argument("--top_p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--quantize", choices=QUANTIZE_MODES)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's dtype")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: on a GPU the whole step, as a CUDA graph; on a CPU each block "
                   "that gemv.c does not run as one call (a fork's edited one; seconds to compile: worth it for "
                   "long generations)")
    p.add_argument("--draft", metavar="DIR", help="speculative decoding: a smaller checkpoint with the same "
                   "tokenizer guesses --speculate_k tokens, the model checks them in one pass")
    p.add_argument("--draft_quantize", choices=QUANTIZE_MODES, help="quantize the draft model")
    p.add_argument("--speculate_k", type=int, default=SPECULATE_K, help="draft tokens guessed per step")
    p.add_argument("--prompt_lookup", type=int, metavar="N", help="speculative decoding without a draft: guess N "
                   "tokens per step, copied from what followed the text's last tokens earlier in it")
    args = p.parse_args(argv)
    try:
        check_speculation(args.draft, args.speculate_k, args.prompt_lookup)
        llm = LLM.load(args.checkpoint_dir, args.device, args.dtype, args.quantize, args.compile, args.draft,
                       args.draft_quantize)
        kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, speculate_k=args.speculate_k,
                      prompt_lookup=args.prompt_lookup)
        if args.prompt is None:
            interactive_chat(llm, args.system, **kwargs)
            return
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            pieces = llm.stream_chat(messages + [{"role": "user", "content": args.prompt}], **kwargs)
        else:
            pieces = llm.stream(args.prompt, **kwargs)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        print(llm.stats.report(llm.device), file=sys.stderr)
    except (ValueError, OSError) as e:           # OSError: FileNotFoundError, and a checkpoints/ dir not writable
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
