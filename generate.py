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
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import models
from tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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
    if s.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
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
    return torch.multinomial(probs, 1, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# Prefill and decode


def prefill(model, prompt: torch.Tensor, s: Sampling, generator=None) -> torch.Tensor:
    # prompt: (B, T). Runs every prompt token through the model at once, filling the cache; samples token T+1.
    input_pos = torch.arange(prompt.size(1), device=prompt.device)
    logits = model(prompt, input_pos)
    return sample(logits[:, -1], s, generator)


def decode_one_token(model, token: torch.Tensor, input_pos: torch.Tensor, s: Sampling, generator=None):
    # token: (B, 1) at position input_pos (1,) -> the next token (B, 1)
    logits = model(token, input_pos)
    return sample(logits[:, -1], s, generator)


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


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0
    total_time: float = 0.0

    def report(self, device) -> str:
        decode_time = self.total_time - self.time_to_first_token
        tps = (self.new_tokens - 1) / decode_time if self.new_tokens > 1 and decode_time > 0 else float("nan")
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB on Linux
        return (f"prompt {self.prompt_tokens} tokens, time to first token {self.time_to_first_token:.3f} s, "
                f"{self.new_tokens} new tokens at {tps:.1f} tokens/s, peak memory {peak:.2f} GiB")


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
        rows = x.reshape(1, -1, self.in_features).expand(self.parts, -1, -1)     # (parts, M, in), no copy
        y = torch.bmm(rows, self.blocks).transpose(0, 1).reshape(*x.shape[:-1], self.out_features)
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


class LLM:
    """A model and its tokenizer, ready to generate."""

    def __init__(self, model, tokenizer: Tokenizer, generation_config: dict | None = None, compile: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.generation_config = generation_config or {}
        self.device = model.tok_embeddings.weight.device
        self.stats = Stats()
        self.decode_fn = decode_one_token
        if compile:
            self.decode_fn = torch.compile(decode_one_token, fullgraph=True,
                                           mode="reduce-overhead" if self.device.type == "cuda" else None)
            self.setup_cache(1)                  # compile now, on a throwaway step at position 0, not in the stats
            zero = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            with torch.inference_mode():
                for _ in range(2):
                    self.decode_fn(model, zero, zero[0], Sampling())

    @classmethod
    def load(cls, checkpoint_dir, device=None, dtype=None, quantize=None, compile=False) -> "LLM":
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise FileNotFoundError(f"checkpoint dir {checkpoint_dir} not found "
                                    f"(convert one with: python convert_hf.py HF_DIR {checkpoint_dir})")
        if isinstance(dtype, str):
            dtype = DTYPES[dtype]
        device = torch.device(device) if device else models.default_device()
        # On CPU the weights are copied into a faster layout (or quantized) anyway: read them into memory rather
        # than memory-map them, so the file's pages do not count on top of the copies.
        model = models.load(checkpoint_dir, device=device, dtype=dtype, mmap=device.type != "cpu")
        if quantize:
            models.quantize(model, quantize)
        elif device.type == "cpu":
            split_linears_for_cpu(model)
        adapter = checkpoint_dir / "adapter.safetensors"
        if adapter.is_file():                     # a LLaMA-Adapter cannot be merged into the weights: apply it
            import finetune_lora
            if finetune_lora.adapter_metadata(adapter)["merged"] == "false":
                finetune_lora.load_adapter(model, adapter)
        gen_path = checkpoint_dir / "generation_config.json"
        generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls(model, Tokenizer(checkpoint_dir), generation_config, compile)

    def default_sampling(self) -> Sampling:
        g = self.generation_config
        if not g.get("do_sample", False):
            return Sampling()
        return Sampling(g.get("temperature", 1.0), g.get("top_k"), g.get("top_p", 1.0))

    @torch.inference_mode()
    def stream_ids(self, prompt_ids: list[int], max_new_tokens: int = 256, temperature=None, top_k=None,
                   top_p=None, seed=None):
        """Yield text pieces of the continuation of prompt_ids, as they decode."""
        s = self.default_sampling()
        if temperature is not None:
            s.temperature = temperature
        if top_k is not None:
            s.top_k = top_k
        if top_p is not None:
            s.top_p = top_p
        s.check()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        context = self.model.config.max_seq_len
        if len(prompt_ids) >= context:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens but the model's context is {context}; "
                             f"shorten the prompt")
        if not prompt_ids:
            raise ValueError("the prompt is empty and the tokenizer adds no BOS token: give some text")
        max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
        self.setup_cache(len(prompt_ids) + max_new_tokens)
        generator = None
        if seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        self.stats = Stats(prompt_tokens=len(prompt_ids))
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)   # as HF pipelines print text
        for token_id in generate_tokens(self.model, prompt_ids, max_new_tokens, s, self.tokenizer.eos_ids,
                                        generator, self.decode_fn, self.stats):
            piece = decoder.add(token_id)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest

    def setup_cache(self, length: int):
        # Round up so that prompts of similar length reuse one cache (and one compiled graph).
        length = min(-(-length // 256) * 256, self.model.config.max_seq_len)
        cache = self.model.layers[0].attn.kv_cache
        if cache is None or cache.k.size(2) < length:
            self.model.setup_cache(1, length, self.device)

    def stream(self, prompt: str, **kwargs):
        yield from self.stream_ids(self.tokenizer.encode(prompt), **kwargs)

    def generate(self, prompt: str, **kwargs) -> str:
        return "".join(self.stream(prompt, **kwargs))

    def stream_chat(self, messages: list[dict], **kwargs):
        yield from self.stream_ids(self.tokenizer.encode_chat(messages), **kwargs)

    def chat(self, messages: list[dict], **kwargs) -> str:
        return "".join(self.stream_chat(messages, **kwargs))


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
        messages = fit_history(llm, messages + [{"role": "user", "content": user}], kwargs["max_new_tokens"])
        reply = []
        for piece in llm.stream_chat(messages, **kwargs):
            print(piece, end="", flush=True)
            reply.append(piece)
        print()
        print(llm.stats.report(llm.device), file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(reply)})


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate text with a FlatLM checkpoint (no --prompt: chat).")
    p.add_argument("checkpoint_dir")
    p.add_argument("--prompt", help="text to continue (or, with --chat, the user message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--system", help="system message for chat")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the checkpoint's generation_config)")
    p.add_argument("--top_k", type=int)
    p.add_argument("--top_p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--quantize", choices=["int8", "nf4", "fp4", "bnb.int8"])
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's dtype")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (worth it on GPUs; on small CPUs eager decoding is faster)")
    args = p.parse_args(argv)
    try:
        llm = LLM.load(args.checkpoint_dir, args.device, args.dtype, args.quantize, args.compile)
        kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed)
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
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
