"""Evaluate a checkpoint: EleutherAI's lm-evaluation-harness on any of its tasks, and sliding-window perplexity.

    python evaluate.py CHECKPOINT_DIR --tasks hellaswag,arc_easy [--limit N] [--num_fewshot K] [--batch_size B]
                       [--include_path DIR] [--out results.json]
    python evaluate.py perplexity CHECKPOINT_DIR FILE.txt [--max_length L] [--stride S]
    python evaluate.py lm_eval --model flatlm --model_args checkpoint_dir=DIR --tasks ...   # lm-eval's own CLI

Python (train.py calls this at the end of a run that sets eval.tasks):

    from evaluate import run_tasks
    results = run_tasks("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct", ["hellaswag"], limit=100)

lm-eval asks a model three things, and FlatLM answers each the way lm-eval's own `hf` model does, token for token:
  loglikelihood          log p(continuation | context) and whether greedy decoding would produce it (multiple
                         choice: the choice with the highest log-likelihood is the answer);
  loglikelihood_rolling  the log-likelihood of a whole document, scored in windows of the model's context
                         (perplexity tasks);
  generate_until         greedy text until a stop string or max_gen_toks.
Every row of a batch is read by one causal forward; since a token attends only to the tokens before it, the padding
after a row cannot change it. Three things make it cheaper than the `hf` model: the choices of a question share one
pass over their common context (its keys and values, computed once, are copied into each choice's row of the KV
cache), choices that differ only in their last token share a row, and only the scored positions go through the
output head (over SmolLM2's 49k-token vocabulary the head and its softmax cost more per position than the rest of
the model).
"""

import argparse
import functools
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

import convert_hf
import models
from generate import LLM
from models import DTYPES

# ----------------------------------------------------------------------------------------------------------------
# Scoring: the log-likelihood of the last n tokens of a sequence, given the tokens before them


@contextmanager
def head_only_at(model, rows: torch.Tensor, cols: torch.Tensor):
    """Inside this block model(...) runs its output head (and whatever follows it, like Gemma 2's soft-cap) only on
    the positions (rows[i], cols[i]) and returns their logits, (N, vocab), instead of (B, T, vocab). A pre-hook on
    lm_head picks those rows out of the final hidden states (B, T, C) -> (N, C)."""
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: (args[0][rows, cols],))
    try:
        yield
    finally:
        handle.remove()


def right_padded(rows: list[tuple], length: int, device) -> torch.Tensor:
    # (B, length) token ids, each row followed by token 0: causal attention keeps a row's own positions from
    # ever seeing the padding after them
    idx = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        idx[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    return idx.to(device)


def logprobs_of_rows(model, rows: list[tuple], scored: list[int]) -> torch.Tensor:
    """One causal forward over right-padded rows: the log-probs (sum(scored), vocab) of the next token at the last
    scored[b] positions of each row b, row after row."""
    device = model.tok_embeddings.weight.device
    rows_at = torch.cat([torch.full((n,), b) for b, n in enumerate(scored)]).to(device)
    cols_at = torch.cat([torch.arange(len(row) - n, len(row)) for row, n in zip(rows, scored)]).to(device)
    with head_only_at(model, rows_at, cols_at):
        logits = model(right_padded(rows, len(rows[0]), device))          # (N, vocab)
    return F.log_softmax(logits.float(), dim=-1)


def logprobs_after_prefixes(model, prefixes: list[tuple], suffixes: list[tuple], owner: list[int]) -> torch.Tensor:
    """The log-probs (sum of suffix lengths, vocab) of the next token at every position of each suffix row r, read
    after the prefix owner[r]: each prefix runs once, however many suffixes follow it (the choices of a question).

    Through the KV cache, one row per suffix: the prefixes run first (rows 0..G-1, no head), each prefix's keys and
    values are copied into the rows of its suffixes, then the suffixes run at their own positions (len(prefix)
    onwards), attending to their cached prefix and to themselves. What a padded prefix leaves in the cache past its
    length is overwritten by its suffix's tokens or lies after them, where the causal mask hides it."""
    device = model.tok_embeddings.weight.device
    P, L = max(map(len, prefixes)), max(map(len, suffixes))
    model.setup_cache(len(suffixes), P + L)
    try:
        nowhere = torch.zeros(0, dtype=torch.long, device=device)
        with head_only_at(model, nowhere, nowhere):                        # the prefixes only fill the cache
            model(right_padded(prefixes, P, device), torch.arange(P, device=device), cache_rows=slice(0, len(prefixes)))
        source = torch.tensor(owner, device=device)
        for block in model.layers:
            cache = block.attn.kv_cache                                    # k, v: (rows, K, S, D)
            cache.k[:, :, :P] = cache.k[source, :, :P]
            cache.v[:, :, :P] = cache.v[source, :, :P]
        starts = torch.tensor([len(prefixes[g]) for g in owner], device=device)
        input_pos = starts[:, None] + torch.arange(L, device=device)       # (R, L): row r's own positions
        rows_at = torch.cat([torch.full((len(s),), r) for r, s in enumerate(suffixes)]).to(device)
        cols_at = torch.cat([torch.arange(len(s)) for s in suffixes]).to(device)
        with head_only_at(model, rows_at, cols_at):
            logits = model(right_padded(suffixes, L, device), input_pos)   # (N, vocab)
    finally:
        model.clear_cache()
    return F.log_softmax(logits.float(), dim=-1)


def batches_of_rows(rows: list, batch_size: int):
    """rows: (tokens read, n scored, the sequences scored on it) -> batches for logprobs_of_rows, longest rows first
    (little padding, and a batch too large for memory fails at once): (sequences per row, the call's arguments)."""
    rows = sorted(rows, key=lambda r: len(r[0]), reverse=True)
    for k in range(0, len(rows), batch_size):
        batch = rows[k:k + batch_size]
        yield [owners for _, _, owners in batch], ([r for r, _, _ in batch], [n for _, n, _ in batch])


def batches_after_prefixes(groups: list, batch_size: int, context: int):
    """groups: (prefix, [(suffix, the sequences scored on it)]) -> batches for logprobs_after_prefixes, longest
    first, at most batch_size suffix rows each, a group kept whole so that its prefix runs once (a group of more
    than batch_size suffixes is split first). The longest prefix and the longest suffix of a batch must fit in the
    model's context side by side."""
    pieces = [(prefix, rows[k:k + batch_size]) for prefix, rows in groups for k in range(0, len(rows), batch_size)]
    pieces.sort(key=lambda g: len(g[0]) + max(len(suffix) for suffix, _ in g[1]), reverse=True)
    batch = []
    for piece in pieces + [None]:
        grown = batch + [piece]
        if batch and (piece is None or sum(len(rows) for _, rows in grown) > batch_size or
                      max(len(p) for p, _ in grown) + max(len(s) for _, rows in grown for s, _ in rows) > context):
            prefixes = [prefix for prefix, _ in batch]
            rows = [(g, suffix, owners) for g, (_, suffixes) in enumerate(batch) for suffix, owners in suffixes]
            yield [owners for _, _, owners in rows], (prefixes, [s for _, s, _ in rows], [g for g, _, _ in rows])
            batch = []
        if piece is not None:
            batch.append(piece)


@torch.inference_mode()
def score_tails(model, sequences: list[tuple[list[int], int]], batch_size: int, progress: bool = True):
    """For each (tokens, n): the sum of log p(token | the tokens before it) over the last n tokens, and whether each
    of them is the model's most likely next token. len(tokens) - 1 must fit in the model's context.

    The model reads tokens[:-1]: a prefix that is context only, then the n positions whose next token is scored (the
    suffix). Sequences that read the same tokens share one row (choices that differ in their last token only). A
    prefix that several suffixes follow runs once for all of them (logprobs_after_prefixes); the rest run as whole
    rows (logprobs_of_rows)."""
    reads: dict[tuple, dict[tuple, list[int]]] = {}      # prefix -> suffix -> the sequences scored on them
    for i, (tokens, n) in enumerate(sequences):
        if not 1 <= n < len(tokens):
            raise ValueError(f"cannot score the last {n} of {len(tokens)} tokens: each needs a token before it")
        read = tuple(tokens[:-1])
        reads.setdefault(read[:len(read) - n], {}).setdefault(read[len(read) - n:], []).append(i)
    whole_rows = [(prefix + suffix, len(suffix), owners) for prefix, suffixes in reads.items()
                  if not prefix or len(suffixes) == 1 for suffix, owners in suffixes.items()]
    groups = [(prefix, list(suffixes.items())) for prefix, suffixes in reads.items() if prefix and len(suffixes) > 1]
    work = [(owners, functools.partial(logprobs_of_rows, model, *args))
            for owners, args in batches_of_rows(whole_rows, batch_size)]
    work += [(owners, functools.partial(logprobs_after_prefixes, model, *args))
             for owners, args in batches_after_prefixes(groups, batch_size, model.config.max_seq_len)]

    totals, all_greedy = [0.0] * len(sequences), [True] * len(sequences)
    bar = tqdm(total=len(sequences), desc="scoring", disable=not progress)
    for owners, logprobs_of_batch in work:
        logprobs = logprobs_of_batch()                   # (positions, vocab), row after row, on the model's device
        positions, targets, scored_for = [], [], []      # one entry per scored token of each sequence
        end = 0
        for row_owners in owners:
            n = sequences[row_owners[0]][1]              # every sequence of a row scores the row's n positions
            end += n
            for i in row_owners:
                positions += range(end - n, end)
                targets += sequences[i][0][-n:]
                scored_for += [i] * n
        positions = torch.tensor(positions, device=logprobs.device)
        targets = torch.tensor(targets, device=logprobs.device)
        greedy = logprobs.argmax(dim=-1)[positions] == targets
        for i, logprob, hit in zip(scored_for, logprobs[positions, targets].tolist(), greedy.tolist()):
            totals[i] += logprob
            all_greedy[i] &= hit
        bar.update(sum(map(len, owners)))
    bar.close()
    return list(zip(totals, all_greedy))


# ----------------------------------------------------------------------------------------------------------------
# The lm-eval model: lm-eval's TemplateLM turns (context, continuation) strings into token lists exactly as its `hf`
# model does (a context's trailing spaces move to the continuation, the pair is encoded whole and split at the
# context's length); the token-level work is here.


@register_model("flatlm")
class FlatLM(TemplateLM):
    """A FlatLM checkpoint as an lm-eval model: `lm_eval --model flatlm --model_args checkpoint_dir=DIR`."""

    def __init__(self, checkpoint_dir, device=None, dtype=None, batch_size=8, max_length=None, max_gen_toks=256,
                 max_batch_size=None):                   # max_batch_size: lm-eval's, for its automatic batch size
        super().__init__()
        try:
            batch_size = int(batch_size)                 # lm-eval's CLI hands it over as a string
        except ValueError:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r} "
                             f"(FlatLM does not search for one: 'auto' is not supported)") from None
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.llm = LLM.load(checkpoint_dir, device=device, dtype=None if dtype == "auto" else dtype)  # auto: as stored
        self._device = self.llm.device
        self.batch_size = batch_size
        context = self.llm.model.config.max_seq_len
        self._max_length = int(max_length or context)
        if not 1 < self._max_length <= context:
            raise ValueError(f"max_length must be between 2 and the model's context of {context}, got {max_length}")
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        tok = self.llm.tokenizer
        return tok.eos_id if tok.eos_id is not None else tok.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        # what an empty context, and a document's first rolling window, is conditioned on: BOS, else EOS (as `hf`)
        bos = self.llm.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        # add_special_tokens None: the tokenizer's own default (BOS for Llama 2 and Gemma, nothing for SmolLM2), unless
        # the string already starts with the prefix token's text; True / False: the default / no special tokens.
        tok = self.llm.tokenizer
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(tok.decode([self.prefix_token_id]))
        return tok.encode(string) if add_special_tokens else tok.encode(string, bos=False, eos=False)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        # requests: ((context, continuation) or None, context tokens, continuation tokens). A pair longer than the
        # context window loses tokens from the left; the model reads all but the last token.
        sequences = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit in the model's "
                                 f"context of {self.max_length}")
            sequences.append(((context + continuation)[-(self.max_length + 1):], len(continuation)))
        results = score_tails(self.llm.model, sequences, self.batch_size, progress=not disable_tqdm)
        for (pair, _, _), answer in zip(requests, results):
            if pair is not None:                         # lm-eval's --use_cache stores each answer
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # A document of any length, in lm-eval's windows: the first predicts up to max_length tokens from the
        # prefix token, each later one the next max_length tokens with the token before them as context. Every
        # window of every document goes into one pass of _loglikelihood_tokens; the sums add up per document.
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        windows, owners = [], []
        for r, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[r] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # Requests with the same generation settings go to generate.py's batching engine together; each stops at
        # EOS, at max_gen_toks, or before the first of its stop strings (lm-eval adds the EOS token's text to them).
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
        tok = self.llm.tokenizer
        by_settings: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_settings.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm)
        for indices in by_settings.values():
            gen_kwargs = requests[indices[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=tok.decode([self.eot_token_id]))
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in the model's context "
                                 f"of {self.max_length}")
            sampling = {"temperature": 0.0}              # greedy unless the task asks for sampling
            if kwargs.get("do_sample"):
                sampling = {k: kwargs[k] for k in ("temperature", "top_k", "top_p") if kwargs.get(k) is not None}
            # each prompt keeps its last max_length - max_gen_toks tokens, as `hf` truncates it
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen_toks):] for i in indices]
            texts = self.llm.generate_ids(prompts, max_new_tokens=max_gen_toks, stop=until, **sampling)
            for i, text in zip(indices, texts):
                out[i] = postprocess_generated_text(text, until, think_end_token=None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            bar.update(len(indices))
        bar.close()
        return out


# ----------------------------------------------------------------------------------------------------------------
# Running lm-eval tasks


def task_manager_for(tasks: list[str], include_path=None):
    """lm-eval's TaskManager that knows every name in tasks. Indexing lm-eval's own ~14k task files takes it about
    15 s of CPU: when include_path alone defines every task asked for (tasks, not groups, which may name lm-eval's
    own), only that folder is indexed."""
    from lm_eval.tasks import TaskManager
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"--include_path {include_path} is not a directory of task YAML files")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}: list lm-eval's tasks with `lm-eval ls tasks`, or point "
                         f"--include_path at a folder with its YAML file")
    return manager


def run_tasks(checkpoint_dir, tasks, limit=None, num_fewshot=None, batch_size=8, include_path=None,
              device=None, dtype=None) -> dict:
    """Evaluate a checkpoint on lm-eval tasks (a list, or one comma-separated string): lm-eval's results dict."""
    import lm_eval
    tasks = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not tasks:
        raise ValueError("no tasks given: name at least one, e.g. --tasks hellaswag")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    checkpoint_dir = convert_hf.resolve_checkpoint(checkpoint_dir)    # a Hub repo id: fetched and converted once
    models.read_config(checkpoint_dir)                # a checkpoint that is not there fails before lm-eval's index
    manager = task_manager_for(tasks, include_path)
    model = FlatLM(checkpoint_dir, device=device, dtype=dtype, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, log_samples=False)


def write_json_atomically(obj, path: Path):
    """lm-eval's results as JSON, under a temporary name then renamed (models.atomic_file): never half-written."""
    from lm_eval.utils import handle_non_serializable
    text = json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False)
    models.atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# Perplexity of a long text: the strided sliding window of the HF perplexity guide. Windows of max_length tokens
# start every stride tokens; each window scores only the tokens the previous one did not, with the overlap before
# them as context, so each token is scored once, with at least max_length - stride tokens of context (or all the
# text before it). A token needs one before it in its window: the text's first token is never scored, nor, when
# stride = max_length, the first of each window. Perplexity = exp(total negative log-likelihood / tokens scored).


def perplexity_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored): window tokens[begin:end], of which the last `scored` are scored."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    windows, scored_until = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        first = max(scored_until, begin + 1)
        if end > first:
            windows.append((begin, end, end - first))
        scored_until = end
        if end == n_tokens:
            break
    return windows


def perplexity(model, tokens: list[int], max_length: int, stride: int, batch_size: int = 1,
               progress: bool = True) -> tuple[float, int]:
    """(perplexity, number of tokens scored) of one token sequence."""
    windows = perplexity_windows(len(tokens), max_length, stride)
    if not windows:
        raise ValueError("the text is a single token: perplexity needs at least two")
    results = score_tails(model, [(tokens[begin:end], n) for begin, end, n in windows], batch_size, progress)
    n_scored = sum(n for _, _, n in windows)
    return math.exp(-sum(logprob for logprob, _ in results) / n_scored), n_scored


# ----------------------------------------------------------------------------------------------------------------
# Command line


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):                          # argparse exits 2 with the usage; we exit 1 with one line
        sys.exit(f"error: {message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def limit_arg(text: str) -> float:
    # lm-eval's --limit: a number of documents per task, or a fraction of them when below 1
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return int(value) if value >= 1 else value


def main_tasks(argv):
    p = OneLineErrorParser(prog="evaluate.py", description="Evaluate a FlatLM checkpoint on lm-eval tasks "
                                                            "(or: evaluate.py perplexity ..., evaluate.py lm_eval ...)")
    p.add_argument("checkpoint_dir")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy")
    p.add_argument("--limit", type=limit_arg, help="documents per task (a fraction of them if < 1)")
    p.add_argument("--num_fewshot", type=int, help="few-shot examples in each prompt (default: the task's)")
    p.add_argument("--batch_size", type=positive_int, default=8, help="rows per forward pass")
    p.add_argument("--include_path", help="a folder of extra task YAML files")
    p.add_argument("--out", help="write lm-eval's results JSON here")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's dtype")
    args = p.parse_args(argv)
    from lm_eval.utils import make_table
    results = run_tasks(args.checkpoint_dir, args.tasks, args.limit, args.num_fewshot, args.batch_size,
                        args.include_path, args.device, args.dtype)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.out:
        write_json_atomically(results, Path(args.out))
        print(f"results written to {args.out}", file=sys.stderr)


def main_perplexity(argv):
    p = OneLineErrorParser(prog="evaluate.py perplexity",
                           description="Perplexity of a text file, with the strided sliding window of the HF guide")
    p.add_argument("checkpoint_dir")
    p.add_argument("file", help="a UTF-8 text file")
    p.add_argument("--max_length", type=positive_int, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=positive_int, help="tokens between window starts (default: max_length / 2)")
    p.add_argument("--batch_size", type=positive_int, default=1, help="windows per forward pass")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's dtype")
    args = p.parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    llm = LLM.load(args.checkpoint_dir, device=args.device, dtype=args.dtype)
    context = llm.model.config.max_seq_len
    max_length = args.max_length or context
    if max_length > context:
        raise ValueError(f"--max_length {max_length} exceeds the model's context of {context}")
    stride = args.stride or max(1, max_length // 2)
    tokens = llm.tokenizer.encode(path.read_text(encoding="utf-8"))
    ppl, n = perplexity(llm.model, tokens, max_length, stride, args.batch_size)
    print(f"perplexity {ppl:.4f} over {n} tokens (windows of {max_length} tokens, stride {stride})")


def main_lm_eval(argv):
    # lm-eval's own command line, with the flatlm model registered (importing this file registered it)
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"perplexity": main_perplexity, "lm_eval": main_lm_eval}
    command = commands.get(argv[0], main_tasks) if argv else main_tasks
    try:
        command(argv[1:] if command is not main_tasks else argv)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
