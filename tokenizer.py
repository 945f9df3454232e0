"""
One Tokenizer for every FlatLM checkpoint: text <-> token ids, streaming decode, chat templates.

A checkpoint directory carries Hugging Face's tokenizer files in one of three formats:
  1. tokenizer.json holding a byte-level BPE (GPT-2, Phi-2, Qwen, Phi-4, SmolLM2, Llama 3): run by tiktoken.
  2. tokenizer.model, a SentencePiece BPE (Llama 2, Mistral, TinyLlama, CodeLlama, Gemma, Phi-3): run by sentencepiece.
  3. tokenizer.model, Meta's tiktoken file for Llama 3 (lines of "base64-token rank"): run by tiktoken.
Whatever the format, ids and decoded text must equal what Hugging Face's `tokenizers` / transformers 5 give;
test_tokenizer.py holds us to that. Both engines are C++/Rust, so encoding a corpus stays fast.

Every format shares HF's first step: "added tokens" (special ones like <|im_start|>, and plain ones like <think>)
are cut out of the text first and map straight to their ids; only the text between them goes through BPE.
"""

import base64
import codecs
import functools
import json
import re
import unicodedata
from datetime import datetime
from pathlib import Path

# -----------------------------------------------------------------------------
# constants

# GPT-2's pre-tokenizer, HF's ByteLevel(use_regex=true): contractions, then letter / number / other runs that may
# take one leading space, then whitespace (a run before a word leaves its last space to that word).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Llama 3's (= OpenAI's cl100k): case-insensitive contractions, numbers in groups of up to 3 digits, newlines apart.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Llama 3.1's 256 special tokens; token i gets id len(ranks) + i (Meta's llama-models tokenizer.py, which
# reserves num_reserved_special_tokens = 256 ids after the 128000 BPE ranks).
LLAMA31_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA31_SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(LLAMA31_SPECIAL_TOKENS))]

# Unicode's White_Space: what an added token's lstrip / rstrip swallow in HF (Rust's \s). Not str.isspace(),
# which also counts the separators \x1c-\x1f.
WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
              + "\u2028\u2029\u202f\u205f\u3000")

# the named special tokens of transformers (its SPECIAL_TOKENS_ATTRIBUTES); chat templates see them as variables
SPECIAL_TOKEN_NAMES = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]


def bytes_to_unicode():
    # GPT-2 writes each byte as one printable char so that a vocab can be JSON text: printable Latin-1 bytes stand
    # for themselves, the other 68 (controls, space, ...) move to U+0100 and up in byte order. The space byte is "Ġ".
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def bytelevel_bytes(token):
    # how HF's ByteLevel decoder turns one token string into bytes: through the table when every char is in it,
    # else the token's own UTF-8 (an added token like "<think>\n")
    try:
        return bytes([CHAR_TO_BYTE[c] for c in token])
    except KeyError:
        return token.encode("utf-8")


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def token_content(value):
    # tokenizer_config writes a token either as a string or as an AddedToken dict {"content": ..., "lstrip": ...}
    return value.get("content") if isinstance(value, dict) else value


# -----------------------------------------------------------------------------
# byte-level BPE: what tokenizer.json's normalizer and pre-tokenizer mean, in terms tiktoken understands

def pretokenizer_regex(pre):
    """tokenizer.json pre_tokenizer -> (one regex splitting text the same way, add_prefix_space)"""
    steps = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else [pre] if pre else []
    kinds = [step["type"] for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN, bool(steps[0].get("add_prefix_space"))
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        # Llama 3, Qwen, Phi-4: the regex is given; ByteLevel only maps bytes to chars
        split = steps[0]
        if split.get("behavior") != "Isolated" or split.get("invert"):
            raise ValueError(f"unsupported Split pre-tokenizer (behavior={split.get('behavior')}, "
                             f"invert={split.get('invert')}): only Isolated, not inverted, is supported")
        pattern = split["pattern"]
        return (pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"])), False
    if kinds == ["Digits", "ByteLevel"] and steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        # SmolLM2 on the Hub: Digits cuts the text at every digit (or digit run), then GPT-2's regex runs on each
        # piece. As one regex: digits never take the leading space, and a whitespace run stops before a digit whole,
        # as it would at the end of a piece: "(?!\S)" becomes "(?![^\s\p{N}])".
        digits = r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+"
        return rf"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}+|{digits}| ?[^\s\p{{L}}\p{{N}}]+|\s+(?![^\s\p{{N}}])|\s+""", False
    raise ValueError(f"unsupported byte-level pre_tokenizer {kinds or None}: supported are ByteLevel(use_regex=true), "
                     "Sequence[Split(regex), ByteLevel(use_regex=false)] and Sequence[Digits, ByteLevel]")


def normalizer_function(spec):
    """tokenizer.json normalizer -> a str -> str function, or None. Only the Unicode normal forms are supported."""
    steps = spec.get("normalizers", []) if spec and spec["type"] == "Sequence" else [spec] if spec else []
    forms = [step["type"] for step in steps]
    bad = [f for f in forms if f not in ("NFC", "NFD", "NFKC", "NFKD")]
    if bad:
        raise ValueError(f"unsupported normalizer {bad[0]} in tokenizer.json: supported are NFC, NFD, NFKC, NFKD")
    if not forms:
        return None
    return lambda text: functools.reduce(lambda t, form: unicodedata.normalize(form, t), forms, text)


def is_byte_level(tokenizer_json):
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return tokenizer_json.get("model", {}).get("type") == "BPE" and any(s.get("type") == "ByteLevel" for s in steps)


def make_tiktoken(name, pattern, ranks):
    import tiktoken
    # tiktoken keeps only what the regex matches, HF's Split keeps the text between matches too; a last
    # alternative that takes any run the pattern can't start on makes both the same
    pattern = f"(?:{pattern})|(?:(?!{pattern})[\\s\\S])+"
    try:
        return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception as e:
        raise ValueError(f"tiktoken cannot use the pre-tokenizer regex {pattern!r}: {e}") from None


# -----------------------------------------------------------------------------
# added tokens, cut out of the text the way HF's AddedVocabulary does

class AddedToken:
    __slots__ = ("id", "content", "special", "normalized", "lstrip", "rstrip", "single_word")

    def __init__(self, id, content, special=True, normalized=None, lstrip=False, rstrip=False, single_word=False):
        self.id, self.content, self.special = id, content, special
        self.normalized = (not special) if normalized is None else normalized  # HF's default
        self.lstrip, self.rstrip, self.single_word = lstrip, rstrip, single_word

    @classmethod
    def from_dict(cls, id, d):
        return cls(id, d["content"], d.get("special", False), d.get("normalized"), d.get("lstrip", False),
                   d.get("rstrip", False), d.get("single_word", False))


def is_word_char(c):
    # Rust regex's \w (HF's single_word test): letters, marks, decimal digits, connector punctuation (_), joiners
    category = unicodedata.category(c)
    return category[0] in "LM" or category in ("Nd", "Nl", "Pc") or c in "\u200c\u200d"


def split_added(text, matcher, tokens):
    """text -> [str | int]: the added tokens `matcher` finds become their ids, the text around them stays text"""
    out, pos, n = [], 0, len(text)
    for m in matcher.finditer(text):
        tok = tokens[m.group()]
        start, end = m.span()
        if tok.single_word and ((start > 0 and is_word_char(text[start - 1])) or (end < n and is_word_char(text[end]))):
            continue  # only matches as a whole word
        if tok.lstrip:  # the token swallows the whitespace before it (not what an earlier match took)
            while start > pos and text[start - 1] in WHITESPACE:
                start -= 1
        if tok.rstrip:  # ... and after it
            while end < n and text[end] in WHITESPACE:
                end += 1
        if start > pos:
            out.append(text[pos:start])
        out.append(tok.id)
        pos = end
    if pos < n:
        out.append(text[pos:])
    return out


def added_matcher(contents):
    """one regex finding any of the literal `contents`, leftmost-longest like HF's Aho-Corasick. It is written as a
    prefix tree ("<unused1|<unused2" -> "<unused(?:1|2)"), so a text position costs a few character tests rather
    than one test per token: Gemma 3 has thousands of added tokens."""
    trie = {}
    for content in filter(None, contents):
        node = trie
        for c in content:
            node = node.setdefault(c, {})
        node[None] = {}  # a token ends here

    def pattern(node):
        branches = [re.escape(c) + pattern(child) for c, child in node.items() if c is not None]
        if not branches:
            return ""
        group = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{group})?" if None in node else group  # a token ends here; a longer one wins if the text goes on

    return re.compile(pattern(trie)) if trie else None


# -----------------------------------------------------------------------------
# the Tokenizer

class Tokenizer:
    def __init__(self, checkpoint_dir):
        d = Path(checkpoint_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"tokenizer: checkpoint directory {d} does not exist")
        config = read_json(d / "tokenizer_config.json") or {}
        tokenizer_json = read_json(d / "tokenizer.json")
        model_file = d / "tokenizer.model"

        # which format; each _load_* sets the engine (self._encode_ordinary), the decode tables, the vocab,
        # the format's own added tokens and its default special tokens
        self._format_defaults = {}
        if tokenizer_json is not None and is_byte_level(tokenizer_json):
            self._load_bpe_json(tokenizer_json)
        elif model_file.is_file() and is_tiktoken_file(model_file):
            self._load_tiktoken_model(model_file)
        elif model_file.is_file():
            self._load_sentencepiece(model_file, config)
        elif tokenizer_json is not None:
            model = tokenizer_json.get("model", {}).get("type")
            raise ValueError(f"tokenizer: {d / 'tokenizer.json'} is a {model} tokenizer that is not byte-level BPE and "
                             "there is no tokenizer.model beside it; supported are byte-level BPE tokenizer.json, "
                             "SentencePiece BPE tokenizer.model and Llama 3 tiktoken tokenizer.model")
        else:
            raise FileNotFoundError(f"tokenizer: no tokenizer files in {d} "
                                    "(looked for tokenizer.json, tokenizer.model)")

        # the named special tokens: tokenizer_config, overridden by the legacy special_tokens_map.json (which
        # transformers only reads when tokenizer_config has no added_tokens_decoder), else the format's defaults
        named = {k: token_content(config[k]) for k in SPECIAL_TOKEN_NAMES if config.get(k) is not None}
        special_map = read_json(d / "special_tokens_map.json") or {}
        if "added_tokens_decoder" not in config:
            named.update({k: token_content(v) for k, v in special_map.items() if k in SPECIAL_TOKEN_NAMES and v})
        named = {**self._format_defaults, **named}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        if "added_tokens_decoder" not in config:
            extra = extra or special_map.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else extra

        # added tokens: the format's own (and a sentencepiece model's tokenizer.json's: Phi-3 keeps <|user|> there),
        # then tokenizer_config's added_tokens_decoder (wins, by id), then any named special token that is in the
        # vocab but not yet added (transformers adds those as special)
        added = {t.id: t for t in self._added}
        if self.kind == "sentencepiece" and tokenizer_json is not None:
            added.update({t["id"]: AddedToken.from_dict(t["id"], t) for t in tokenizer_json.get("added_tokens", [])})
        for i, t in (config.get("added_tokens_decoder") or {}).items():
            added[int(i)] = AddedToken.from_dict(int(i), t)
        contents = {t.content for t in added.values()}
        for content in [*named.values(), *map(token_content, extra)]:
            if content and content not in contents and content in self._vocab:
                added[self._vocab[content]] = AddedToken(self._vocab[content], content, special=True)
                contents.add(content)
        self._set_added_tokens(list(added.values()))

        self.special_tokens_map = {k: v for k, v in named.items() if v is not None}  # chat template variables
        gen = read_json(d / "generation_config.json") or {}
        self.bos_id = self.token_to_id(named["bos_token"]) if named.get("bos_token") else gen.get("bos_token_id")
        self.eos_id = self.token_to_id(named["eos_token"]) if named.get("eos_token") else None
        self.pad_id = self.token_to_id(named["pad_token"]) if named.get("pad_token") else gen.get("pad_token_id")
        # generation stops at any of: generation_config's eos_token_id (int or list), then the tokenizer's eos
        gen_eos = gen.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        stops = [*gen_eos, self.eos_id, *map(self.token_to_id, self._extra_stop_tokens)]
        self.eos_ids = list(dict.fromkeys(i for i in stops if i is not None))

        # what encode() adds by default: a tokenizer.json's post-processor decides (transformers then ignores
        # tokenizer_config's add_bos_token), else tokenizer_config, else the format
        template = tokenizer_json and find_template_processing(tokenizer_json.get("post_processor"))
        if tokenizer_json is not None:
            before, after = template or ([], [])
            self.add_bos, self.add_eos = bool(before), bool(after)
            if before and self.bos_id is None:
                self.bos_id = before[0]
            if after and self.eos_id is None:
                self.eos_id = after[0]
        else:
            self.add_bos = bool(config.get("add_bos_token", self._default_add_bos)) and self.bos_id is not None
            self.add_eos = bool(config.get("add_eos_token", False)) and self.eos_id is not None

        self._load_chat_templates(d, config)

    # --- format 1: byte-level BPE tokenizer.json, run by tiktoken

    def _load_bpe_json(self, tj):
        model = tj["model"]
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
            if model.get(key):
                raise ValueError(f"tokenizer: unsupported BPE option {key}={model[key]!r} in tokenizer.json")
        pattern, prefix_space = pretokenizer_regex(tj.get("pre_tokenizer"))
        self._normalize = normalizer_function(tj.get("normalizer"))
        vocab = model["vocab"]
        self._added = [AddedToken.from_dict(t["id"], t) for t in tj.get("added_tokens", [])]

        # tiktoken merges the adjacent pair whose joined bytes have the lowest rank; HF merges the pair listed first
        # in "merges". Same thing when each merge's result has a rank in merge order. Ids usually are in merge order
        # (ranks = ids, nothing to map); when not, rank by merge order and map ranks back to ids.
        ranks = {bytes([CHAR_TO_BYTE[c]]): i for c, i in vocab.items() if len(c) == 1 and c in CHAR_TO_BYTE}
        merged = {}  # bytes -> id, in merge order (a token made by two different merges keeps its first)
        for merge in model["merges"]:
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            token = a + b
            if token in vocab and all(c in CHAR_TO_BYTE for c in token):
                merged.setdefault(bytes(CHAR_TO_BYTE[c] for c in token), vocab[token])
        merge_ids = list(merged.values())
        in_order = all(x < y for x, y in zip(merge_ids, merge_ids[1:]))
        top = max([*vocab.values(), *(t.id for t in self._added)]) + 1
        if in_order:
            ranks.update(merged)
            rank_to_id = list(range(top))
        else:
            singles = sorted(ranks.items(), key=lambda kv: kv[1])
            ranks = {tok: r for r, (tok, _) in enumerate([*singles, *merged.items()])}
            rank_to_id = [i for _, i in singles] + merge_ids
        # a byte with no token in the vocab (never seen in training) is dropped by HF; tiktoken needs a rank for
        # every byte, so give those ranks past the end that map to -1, and filter them out
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        for k, tok in enumerate(missing):
            ranks[tok] = len(rank_to_id) + k
        rank_to_id += [-1] * len(missing)

        enc = make_tiktoken("tokenizer.json", pattern, ranks)
        if in_order and not missing:
            plain = enc.encode_ordinary  # ranks are ids: nothing to map
        else:
            plain = lambda text: [i for i in map(rank_to_id.__getitem__, enc.encode_ordinary(text)) if i >= 0]
        if prefix_space:  # ByteLevel(add_prefix_space=true): each text piece starts with a space
            self._encode_ordinary = lambda text, at_start: plain(text if text.startswith(" ") else " " + text)
        else:
            self._encode_ordinary = lambda text, at_start: plain(text)
        self._set_vocab_bytelevel(vocab)
        self._default_add_bos, self._extra_stop_tokens = False, []

    # --- format 2: SentencePiece tokenizer.model

    def _load_sentencepiece(self, path, config):
        import sentencepiece as spm
        try:  # the model file is a protobuf; reading and editing it needs the protobuf package
            from sentencepiece import sentencepiece_model_pb2
        except ImportError:
            raise ImportError(f"tokenizer: reading {path} needs the protobuf package: pip install protobuf") from None

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
            kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
            raise ValueError(f"tokenizer: {path} is a SentencePiece {kind} model; only SentencePiece BPE is supported "
                             "(Llama, Mistral, Gemma, Phi-3)")
        # transformers 5 runs these models as a plain BPE over the text with spaces written "▁": no SentencePiece
        # normalization (NFKC, squeezing spaces) and its own dummy-prefix rule (below). So switch sentencepiece's
        # normalizer and prefix off; what is left, its BPE with byte fallback, gives HF's ids.
        dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.precompiled_charsmap = b""
        proto.normalizer_spec.name = "identity"
        sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

        # The prefix space of Llama-style models (transformers' Metaspace pre-tokenizer): text gets a leading "▁"
        # unless it already starts with one; "first" (legacy=false, the default, and always for CodeLlama) only at
        # the very start of the input, "always" (legacy=true) also after each added token. Gemma has no prefix.
        if dummy_prefix and config.get("add_prefix_space", True) is not False:
            code_llama = str(config.get("tokenizer_class", "")).startswith("CodeLlama")
            scheme = "always" if config.get("legacy") and not code_llama else "first"
        else:
            scheme = None
        self._strip_leading_space = scheme is not None  # decoding takes one leading space off, for the prefix

        def encode_ordinary(text, at_start):
            if (scheme == "always" or (scheme == "first" and at_start)) and not text.startswith((" ", "▁")):
                text = " " + text
            return sp.encode(text)

        self.kind = "sentencepiece"
        self._encode_ordinary = encode_ordinary
        self._normalize = None
        pieces = [p.piece for p in proto.pieces]
        self._vocab = {p: i for i, p in enumerate(pieces)}
        self._id_to_token = pieces
        # control pieces (<s>, </s>) become special added tokens, user-defined ones (<start_of_turn>) plain ones
        piece = sentencepiece_model_pb2.ModelProto.SentencePiece
        is_special = {piece.CONTROL: True, piece.USER_DEFINED: False}
        self._added = [AddedToken(i, p.piece, special=is_special[p.type], normalized=False)
                       for i, p in enumerate(proto.pieces) if p.type in is_special]
        spec = proto.trainer_spec
        self._format_defaults = {name: pieces[i] for name, i in [("bos_token", spec.bos_id), ("eos_token", spec.eos_id),
                                                                 ("unk_token", spec.unk_id), ("pad_token", spec.pad_id)]
                                if 0 <= i < len(pieces)}
        # Llama and Gemma are trained with BOS first (transformers 5 loading a bare tokenizer.model adds none:
        # real checkpoints state it in tokenizer_config.json or tokenizer.json, which win)
        self._default_add_bos, self._extra_stop_tokens = True, []

    # --- format 3: Llama 3's tiktoken tokenizer.model

    def _load_tiktoken_model(self, path):
        ranks = {}
        for line in path.read_text(encoding="ascii").splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        enc = make_tiktoken(path.name, LLAMA3_PATTERN, ranks)
        self._encode_ordinary = lambda text, at_start: enc.encode_ordinary(text)
        self._normalize = None
        n = len(ranks)
        # tokenizer_config's added_tokens_decoder, when there is one, overrides these by id
        self._added = [AddedToken(n + i, t, special=True) for i, t in enumerate(LLAMA31_SPECIAL_TOKENS)]
        self._set_vocab_bytelevel({"".join(BYTE_TO_CHAR[b] for b in tok): r for tok, r in ranks.items()})
        self._format_defaults = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
        # Meta's chat models end a turn with <|eot_id|> (<|eom_id|> when calling a tool): stop there too
        self._default_add_bos, self._extra_stop_tokens = True, ["<|eom_id|>", "<|eot_id|>"]

    def _set_vocab_bytelevel(self, vocab):
        self.kind = "bpe"
        self._vocab = dict(vocab)
        top = max([*vocab.values(), *(t.id for t in self._added)]) + 1
        self._id_to_token = [""] * top
        for token, i in vocab.items():
            self._id_to_token[i] = token

    # --- shared by all formats

    def _set_added_tokens(self, added):
        for t in added:  # added tokens may lie beyond the vocab (Qwen's, Phi-3's)
            if t.id >= len(self._id_to_token):
                self._id_to_token = list(self._id_to_token) + [""] * (t.id + 1 - len(self._id_to_token))
            self._id_to_token[t.id] = t.content
        self._token_to_id = {**self._vocab, **{t.content: t.id for t in added}}
        self.vocab_size = len(self._id_to_token)
        self._special_ids = frozenset(t.id for t in added if t.special)
        # two passes, as HF: tokens with normalized=false are matched in the raw text, the others in normalized text
        norm = self._normalize or (lambda s: s)
        raw = {t.content: t for t in added if not t.normalized}
        normalized = {norm(t.content): t for t in added if t.normalized}
        self._raw_matcher, self._raw_tokens = added_matcher(raw), raw
        self._norm_matcher, self._norm_tokens = added_matcher(normalized), normalized

        if self.kind == "bpe":  # decoding: ids -> bytes -> UTF-8 (invalid bytes become U+FFFD, as in HF)
            self._id_bytes = [bytelevel_bytes(t) for t in self._id_to_token]
        else:  # pieces with "▁" for spaces; byte-fallback pieces "<0xAB>" are single bytes
            self._id_text = [t.replace("▁", " ") for t in self._id_to_token]
            self._byte_of = {i: int(t[3:5], 16) for i, t in enumerate(self._id_to_token)
                             if len(t) == 6 and t.startswith("<0x") and t.endswith(">") and is_hex(t[3:5])}

    def _split(self, text):
        """text -> [str | int], the added tokens cut out, the text pieces normalized"""
        pieces = split_added(text, self._raw_matcher, self._raw_tokens) if self._raw_matcher else [text] if text else []
        if not (self._normalize or self._norm_matcher):
            return pieces
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                piece = self._normalize(piece) if self._normalize else piece
                out += split_added(piece, self._norm_matcher, self._norm_tokens) if self._norm_matcher else [piece]
            else:
                out.append(piece)
        return out

    def encode(self, text, bos=None, eos=None):
        ids = []
        if self.add_bos if bos is None else bos:
            ids.append(self._require(self.bos_id, "BOS"))
        for k, piece in enumerate(self._split(text)):
            if isinstance(piece, str):
                ids += self._encode_ordinary(piece, k == 0)  # k == 0: the piece starts the text
            else:
                ids.append(piece)
        if self.add_eos if eos is None else eos:
            ids.append(self._require(self.eos_id, "EOS"))
        return ids

    def _require(self, token_id, name):
        if token_id is None:
            raise ValueError(f"tokenizer: this checkpoint has no {name} token")
        return token_id

    def decode(self, ids, skip_special_tokens=False):
        ids = ids.tolist() if hasattr(ids, "tolist") else [ids] if isinstance(ids, int) else ids
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        n = self.vocab_size
        if self.kind == "bpe":
            table = self._id_bytes
            return b"".join([table[i] for i in ids if 0 <= i < n]).decode("utf-8", "replace")
        # sentencepiece: HF's decoder chain Replace("▁", " "), ByteFallback, Fuse, Strip(1 leading space)
        out, run = [], []
        for i in ids:
            if i in self._byte_of:
                run.append(self._byte_of[i])
            elif 0 <= i < n:
                if run:
                    out.append(decode_byte_run(run))
                    run = []
                out.append(self._id_text[i])
        if run:
            out.append(decode_byte_run(run))
        text = "".join(out)
        return text[1:] if self._strip_leading_space and text.startswith(" ") else text

    def stream_decoder(self, skip_special_tokens=False):
        return StreamDecoder(self, skip_special_tokens)

    def token_to_id(self, token):
        return self._token_to_id.get(token)

    def id_to_token(self, i):
        return self._id_to_token[i]

    # --- chat templates

    def _load_chat_templates(self, d, config):
        # like transformers: chat_template.jinja (and additional_chat_templates/*.jinja) win over tokenizer_config's
        # chat_template (a string, or a list of {name, template}); chat_template.json is the older processor file
        templates = {}
        if (d / "chat_template.jinja").is_file():
            templates["default"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        for f in sorted((d / "additional_chat_templates").glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
        if not templates:
            t = config.get("chat_template") or (read_json(d / "chat_template.json") or {}).get("chat_template")
            templates = {x["name"]: x["template"] for x in t} if isinstance(t, list) else {"default": t} if t else {}
        self.chat_templates = templates
        self.has_chat_template = bool(templates)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
        name = kwargs.pop("chat_template", None)
        if not self.has_chat_template and name is None:
            return plain_chat(messages, add_generation_prompt)
        if name in self.chat_templates:
            source = self.chat_templates[name]
        elif name is not None:
            source = name  # a template given as text
        elif tools is not None and "tool_use" in self.chat_templates:
            source = self.chat_templates["tool_use"]
        elif "default" in self.chat_templates:
            source = self.chat_templates["default"]
        else:
            raise ValueError(f"tokenizer: several chat templates {sorted(self.chat_templates)} and none is 'default'; "
                             "pass chat_template=NAME")
        messages = [clean_message(m) for m in messages]
        variables = {**self.special_tokens_map, **kwargs}  # kwargs override the special tokens, as in transformers
        return compile_template(source).render(messages=messages, tools=tools, documents=documents,
                                               add_generation_prompt=add_generation_prompt, **variables)

    def encode_chat(self, messages, add_generation_prompt=True, **kwargs):
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        if not self.has_chat_template and "chat_template" not in kwargs:
            return self.encode(text)  # the plain fallback writes no BOS itself, so let encode add it as usual
        return self.encode(text, bos=False, eos=False)  # the template writes its own special tokens


def write_byte_tokenizer(out_dir):
    """Write a tokenizer whose tokens are the 256 bytes plus <|endoftext|> (id 256): HF's byte-level BPE format with
    no merges. Character-level models use it (recipes/pretrain_shakespeare.yaml, via recipes/tokenizers/bytes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = bytes_to_unicode()
    eot = {"id": 256, "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [eot], "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {**{chars[b]: b for b in range(256)}, "<|endoftext|>": 256}, "merges": []},
    }
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False, indent=1) + "\n")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out_dir


def is_tiktoken_file(path):
    # Meta's tiktoken file is text, "base64-token rank" per line; a SentencePiece model is binary protobuf
    with open(path, "rb") as f:
        first = f.readline(1024).split()
    return len(first) == 2 and first[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]) is not None


def find_template_processing(post):
    """tokenizer.json post_processor -> (ids before the text, ids after it), or None"""
    if not post:
        return None
    if post["type"] == "Sequence":
        found = [find_template_processing(p) for p in post.get("processors", [])]
        return next((f for f in found if f), None)
    if post["type"] != "TemplateProcessing":
        return None
    ids = {name: spec["ids"] for name, spec in post.get("special_tokens", {}).items()}
    single = post["single"]
    at = next(k for k, item in enumerate(single) if "Sequence" in item)
    before = [i for item in single[:at] if "SpecialToken" in item for i in ids[item["SpecialToken"]["id"]]]
    after = [i for item in single[at + 1:] if "SpecialToken" in item for i in ids[item["SpecialToken"]["id"]]]
    return before, after


def is_hex(s):
    return all(c in "0123456789abcdefABCDEF" for c in s)


def decode_byte_run(run):
    # HF's ByteFallback: a run of byte pieces is one UTF-8 string, or if invalid, one U+FFFD per byte
    try:
        return bytes(run).decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


# -----------------------------------------------------------------------------
# streaming decode: text as soon as it is certain, so that the pieces add up to decode(all ids)

class StreamDecoder:
    def __init__(self, tokenizer, skip_special_tokens=False):
        self.tok = tokenizer
        self.skip = tokenizer._special_ids if skip_special_tokens else frozenset()
        # byte-level: an incremental UTF-8 decoder holds back a character's first bytes until it is complete
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.run = []  # sentencepiece: byte pieces wait until the run ends (an invalid run turns all into U+FFFD)
        self.strip_pending = tokenizer.kind == "sentencepiece" and tokenizer._strip_leading_space

    def add(self, token_id):
        token_id = int(token_id)
        tok = self.tok
        if token_id in self.skip or not 0 <= token_id < tok.vocab_size:
            return ""
        if tok.kind == "bpe":
            return self.utf8.decode(tok._id_bytes[token_id])
        if token_id in tok._byte_of:
            self.run.append(tok._byte_of[token_id])
            return ""
        return self._emit(self._end_run() + tok._id_text[token_id])

    def flush(self):
        if self.tok.kind == "bpe":
            return self.utf8.decode(b"", final=True)
        return self._emit(self._end_run())

    def _end_run(self):
        text = decode_byte_run(self.run) if self.run else ""
        self.run = []
        return text

    def _emit(self, text):
        if self.strip_pending and text:  # the one leading space that decode() strips
            self.strip_pending = False
            text = text[1:] if text.startswith(" ") else text
        return text


# -----------------------------------------------------------------------------
# chat templates: the checkpoint's Jinja template, rendered as transformers renders it

@functools.lru_cache(maxsize=16)
def compile_template(source):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # {% generation %}...{% endgeneration %} marks assistant text for transformers' training masks; render the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: plain json.dumps (Jinja's own escapes <, >, & and ' for HTML)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # templates come from the Hub: a sandbox that can't touch Python internals or mutate what it's given
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def clean_message(message):
    # as transformers 5: drop keys whose value is None, and give reasoning under both names templates read
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def plain_chat(messages, add_generation_prompt):
    # the fallback for checkpoints without a template (base models): "role: content" lines, then "assistant: "
    def text(content):
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
    lines = "".join(f"{m['role']}: {text(m.get('content') or '')}\n" for m in messages)
    return lines + ("assistant: " if add_generation_prompt else "")
