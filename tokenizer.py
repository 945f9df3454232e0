"""
One Tokenizer for every FlatLM checkpoint: text <-> token ids, streaming decode, chat templates.

A model only works on the ids it was trained on, so the reference is the tokenizer that wrote them, run on the
checkpoint's own files: HF `tokenizers` on tokenizer.json, sentencepiece on a bare tokenizer.model, tiktoken on Meta's
Llama 3 file. test_tokenizer.py holds us to zero differences on real files. Four formats, one loader each:
  1. tokenizer.json, byte-level BPE (GPT-2, Phi-2, Qwen, Phi-4, SmolLM2, Llama 3, Mistral NeMo): run by tiktoken,
     6-11x faster than `tokenizers`.
  2. tokenizer.json, SentencePiece-style BPE ("▁" for spaces, byte fallback: Llama 2, Mistral, Phi-3, CodeLlama,
     TinyLlama, Gemma): the file's normalizer and pre-tokenizer here, its BPE run by sentencepiece.
  3. tokenizer.model alone, a SentencePiece BPE: sentencepiece itself, with the model's own normalizer.
  4. tokenizer.model alone, Meta's tiktoken file for Llama 3 (lines of "base64-token rank"): run by tiktoken.
As in HF, a tokenizer.json wins over a tokenizer.model beside it. Every format shares HF's first step: "added
tokens" (special ones like <|im_start|>, plain ones like <think>) are cut out of the text and map straight to their
ids; only the text between them goes through the BPE.

Where transformers 5 differs (and we don't follow it): its LlamaTokenizer (Llama 2, Mistral, Phi-3, their kin) keeps
only the vocab and merges of tokenizer.json and puts its own pipeline around them: instead of the file's normalizer
(prepend "▁" to each piece of text, then spaces -> "▁", which is what sentencepiece does) a Metaspace pre-tokenizer
with prepend_scheme="first", which adds no "▁" to text that already starts with a space and none after an added
token. So transformers 5 encodes ' ' as [29871] where the file says [259], drops the space of ' Hello world'
([15043, 3186] instead of [29871, 15043, 3186]), and after '<|user|>' encodes '\\nhi' as 'hi' (2918) instead of
'▁hi' (7251). The files, sentencepiece, transformers 4 and the ids these models were trained on all agree with us.
"""

import base64
import codecs
import functools
import json
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

# -----------------------------------------------------------------------------
# constants

# GPT-2's pre-tokenizer, HF's ByteLevel(use_regex=true): contractions, then letter / number / other runs that may
# take one leading space, then whitespace (a run before a word leaves its last space to that word).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Llama 3's (= OpenAI's cl100k): case-insensitive contractions, numbers in groups of up to 3 digits, newlines apart.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Llama 3.1's 256 special tokens; token i gets id len(ranks) + i (Meta's llama-models tokenizer.py, which
# reserves num_reserved_special_tokens = 256 ids after the 128000 BPE ranks). Llama 3 named ids 128002-128255
# differently (128008 is <|reserved_special_token_4|> there, <|eom_id|> in 3.1): a tokenizer_config.json's
# added_tokens_decoder says which; only a bare tokenizer.model without one is taken to be Llama 3.1's.
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

SPACE = "▁"  # U+2581: how SentencePiece writes a space inside its tokens


def bytes_to_unicode():
    # GPT-2 writes each byte as one printable char so that a vocab can be JSON text: printable Latin-1 bytes stand
    # for themselves, the other 68 (controls, space, ...) move to U+0100 and up in byte order. The space byte is "Ġ".
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# the same as a str.translate table (C speed for 100k-token vocabs): each char of the table -> its byte's code point,
# any other char below U+0144 -> U+0100, which latin-1 can't encode
BYTELEVEL_TRANSLATION = {**dict.fromkeys(range(0x144), 0x100), **{ord(c): b for c, b in CHAR_TO_BYTE.items()}}


def token_bytes(token):
    """a byte-level token string ("Ġthe") -> its bytes (b" the"), or None if a char is not in GPT-2's table"""
    try:
        return token.translate(BYTELEVEL_TRANSLATION).encode("latin-1")
    except UnicodeEncodeError:
        return None


def bytelevel_bytes(token):
    # how HF's ByteLevel decoder turns one token string into bytes: through the table when every char is in it,
    # else the token's own UTF-8 (an added token like "<think>\n")
    b = token_bytes(token)
    return token.encode("utf-8") if b is None else b


def byte_piece_value(piece):
    # SentencePiece's byte-fallback pieces "<0x00>" ... "<0xFF>" stand for one byte; None for any other piece
    return int(piece[3:5], 16) if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece) else None


def read_json(path):
    """a JSON object from path, None when there is no such file; anything else is a one-line error naming it"""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"tokenizer: {path} is not valid JSON ({e}): the file is truncated or damaged; "
                         "copy it again from where the model came from") from None
    if not isinstance(data, dict):
        raise ValueError(f"tokenizer: {path} holds a JSON {type(data).__name__}, not the object it should")
    return data


def token_content(value):
    # tokenizer_config writes a token either as a string or as an AddedToken dict {"content": ..., "lstrip": ...}
    return value.get("content") if isinstance(value, dict) else value


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


def literal_matcher(contents):
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
# tokenizer.json's normalizer, pre-tokenizer and decoder: the parts SentencePiece-style files use, in Python

def steps_of(spec, sequence_key):
    # a tokenizer.json component is one step or a {"type": "Sequence", <sequence_key>: [steps]}
    if not spec:
        return []
    return spec.get(sequence_key, []) if spec["type"] == "Sequence" else [spec]


def regex_of(pattern, where):
    # a tokenizer.json pattern, {"String": literal} or {"Regex": Oniguruma regex}, as a Python regex
    if "String" in pattern:
        return re.compile(re.escape(pattern["String"]))
    try:  # the simple regexes these files hold mean the same in Python, once Oniguruma's \z is spelled \Z
        return re.compile(pattern["Regex"].replace(r"\z", r"\Z"))
    except re.error as e:
        raise ValueError(f"unsupported regex {pattern['Regex']!r} in the {where}: {e}") from None


def normalizer_function(spec):
    """tokenizer.json normalizer -> a str -> str function, or None: the Unicode normal forms, Prepend, Replace"""
    functions = []
    for step in steps_of(spec, "normalizers"):
        kind = step["type"]
        if kind in ("NFC", "NFD", "NFKC", "NFKD"):
            functions.append(functools.partial(unicodedata.normalize, kind))
        elif kind == "Prepend":  # HF prepends to non-empty text only
            functions.append(lambda text, prefix=step["prepend"]: prefix + text if text else text)
        elif kind == "Replace":  # every match becomes the content, taken literally
            regex, content = regex_of(step["pattern"], "normalizer"), step["content"]
            functions.append(lambda text, regex=regex, content=content: regex.sub(lambda m: content, text))
        else:
            raise ValueError(f"unsupported normalizer {kind}: supported are NFC, NFD, NFKC, NFKD, Prepend, Replace")
    if not functions:
        return None
    return lambda text: functools.reduce(lambda t, f: f(t), functions, text)


def split_function(regex, behavior):
    """HF's Split pre-tokenizer: text -> pieces, each match isolated, merged into a neighbour or removed"""
    behavior = behavior.lower().replace("_", "")  # the files say "MergedWithPrevious", the Python API "merged_with_..."
    if behavior not in ("isolated", "mergedwithprevious", "mergedwithnext", "removed"):
        raise ValueError(f"unsupported Split behavior {behavior}")

    def split(text):
        pieces, pos = [], 0  # pos: where the piece being built starts
        for m in regex.finditer(text):
            start, end = m.span()
            if start == end:
                continue
            if behavior == "mergedwithprevious":  # the match ends the piece before it
                pieces.append(text[pos:end])
            elif behavior == "mergedwithnext":  # the match starts the next piece
                pieces.append(text[pos:start])
                end = start
            else:  # isolated: a piece of its own; removed: gone
                pieces += [text[pos:start], text[start:end] if behavior == "isolated" else ""]
            pos = end
        pieces.append(text[pos:])
        return [p for p in pieces if p]

    return split


def sentencepiece_pretokenizer(spec):
    """tokenizer.json pre_tokenizer of a SentencePiece-style BPE -> a (text, at_start) -> [words] function.
    at_start: the text starts the input (no added token before it), which Metaspace's "first" scheme asks."""
    steps = []
    for step in steps_of(spec, "pretokenizers"):
        kind = step["type"]
        if kind == "Metaspace":
            # spaces -> "▁", then a "▁" in front unless one is there already: before every piece ("always"),
            # only at the start of the input ("first") or never; split=true cuts before each "▁" too. Files older
            # than prepend_scheme say add_prefix_space (true: "always").
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
            replacement, split = step.get("replacement", SPACE), step.get("split", True)
            cut = split_function(re.compile(re.escape(replacement)), "MergedWithNext")

            def metaspace(text, at_start, scheme=scheme, replacement=replacement, split=split, cut=cut):
                text = text.replace(" ", replacement)
                if (scheme == "always" or (scheme == "first" and at_start)) and not text.startswith(replacement):
                    text = replacement + text
                return cut(text) if split else [text]
            steps.append(metaspace)
        elif kind == "Split" and not step.get("invert"):
            split = split_function(regex_of(step["pattern"], "pre-tokenizer"), step.get("behavior", "isolated"))
            steps.append(lambda text, at_start, split=split: split(text))
        else:
            raise ValueError(f"unsupported pre_tokenizer {kind} for a SentencePiece-style BPE: supported are "
                             "Metaspace and Split")

    def pretokenize(text, at_start):
        words = [text]
        for step in steps:
            words = [w for k, word in enumerate(words) for w in step(word, at_start and k == 0)]
        return words

    return pretokenize


def sentencepiece_decoder(spec):
    """tokenizer.json decoder of a SentencePiece-style BPE -> (byte_fallback, leading spaces to strip, whether the
    first token loses its "▁"s). The usual one is Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0)]:
    "▁" is a space, "<0xAB>" pieces are bytes of UTF-8, and the space the encoder put in front of the text comes
    off. Older files have the Metaspace decoder, which drops every "▁" of the first token instead."""
    byte_fallback, strip, spaces, spaceless_first = False, 0, False, False
    for step in steps_of(spec, "decoders"):
        kind = step["type"]
        if kind == "Replace" and step["pattern"].get("String") == SPACE and step["content"] == " ":
            spaces = True
        elif kind == "ByteFallback":
            byte_fallback = True
        elif kind == "Fuse":
            pass  # joining the pieces, which decode does anyway
        elif kind == "Strip" and step.get("content") == " " and not step.get("stop"):
            strip = step.get("start", 0)
        elif kind == "Metaspace":  # "▁" is a space, except in the first token unless nothing was prepended
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
            spaces, spaceless_first = True, scheme != "never"
        else:
            raise ValueError(f"unsupported decoder {kind} for a SentencePiece-style BPE: supported are Replace('▁', "
                             "' '), ByteFallback, Fuse, Strip(' ') and Metaspace")
    if not spaces:
        raise ValueError("unsupported decoder: a SentencePiece-style BPE's decoder must turn '▁' back into spaces")
    return byte_fallback, strip, spaceless_first


def pretokenizer_regex(pre):
    """a byte-level tokenizer.json's pre_tokenizer -> (one regex splitting text the same way, add_prefix_space)"""
    steps = steps_of(pre, "pretokenizers")
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


# -----------------------------------------------------------------------------
# the four formats. Each loader returns what it built: a TokenizerModel.

@dataclass
class TokenizerModel:
    tokens: list            # id -> token string ("Ġthe" byte-level, "▁the" SentencePiece; "" for an unused id)
    encode_text: Callable   # (text with no added tokens in it, at_start) -> ids; at_start: nothing came before it
    added: list             # the format's own AddedTokens
    byte_level: bool        # tokens are GPT-2 byte strings; else SentencePiece pieces ("▁" a space, "<0xAB>" a byte)
    normalize: Callable = None  # str -> str, run on the text between added tokens before encode_text
    byte_fallback: bool = True  # SentencePiece: decoding turns "<0xAB>" pieces into bytes
    strip_spaces: int = 0       # SentencePiece: decoding drops up to this many leading spaces (the prefix "▁")
    spaceless_first: bool = False  # SentencePiece: decoding drops every "▁" of the first token (Metaspace decoder)
    named: dict = field(default_factory=dict)       # the format's default bos_token, eos_token ...
    stop_tokens: list = field(default_factory=list)  # tokens that end a turn besides the eos
    post_processor: tuple = None  # tokenizer.json: the ids its post-processor puts (before, after) the text


def make_tiktoken(name, pattern, ranks):
    import tiktoken
    # tiktoken keeps only what the regex matches, HF's Split keeps the text between matches too; a last
    # alternative that takes any run the pattern can't start on makes both the same
    pattern = f"(?:{pattern})|(?:(?!{pattern})[\\s\\S])+"
    try:
        return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception as e:
        raise ValueError(f"tiktoken cannot use the pre-tokenizer regex {pattern!r}: {e}") from None


def unbuildable_tokens(ranks):
    """the tokens (bytes) that BPE with these ranks does not build from their own bytes. tiktoken's BPE on a piece
    looks the whole piece up first, so each token goes in behind a byte that is in no longer token: that byte stays
    apart, and the rest merges as the token's bytes alone would."""
    in_longer = {b for token in ranks if len(token) > 1 for b in token}
    guard = next((bytes([b]) for b in range(256) if b not in in_longer), None)
    if guard is None:
        return set()
    bpe = make_tiktoken("unbuildable", ".", ranks)._encode_single_piece
    return {token for token, rank in ranks.items() if len(token) > 1 and bpe(guard + token)[1:] != [rank]}


def tiktoken_ranks(vocab, merges, ignore_merges):
    """a byte-level BPE's vocab and merges -> (tiktoken's ranks: token bytes -> rank, rank -> id or None if ids)

    tiktoken merges the adjacent pair whose joined bytes have the lowest rank; HF merges the pair listed first in
    "merges". Same thing when each merge's result has a rank in merge order. Ids usually are in merge order (ranks
    = ids, nothing to map); when not, rank by merge order and map ranks back to ids."""
    as_bytes = {t: b for t in vocab if (b := token_bytes(t)) is not None}
    ranks = {b: vocab[t] for t, b in as_bytes.items() if len(b) == 1}
    merged = {}  # bytes -> id, in merge order (a token made by two different merges keeps its first)
    for merge in merges:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        if a + b in as_bytes:
            merged.setdefault(as_bytes[a + b], vocab[a + b])
    # ignore_merges (Llama 3, Qwen3.5/3.6): a pre-token that is itself in the vocab is that one token, merges or not.
    # tiktoken does the same for any pre-token in its ranks, so a token that no merge builds gets a rank too, if no
    # two tokens join to it: then tiktoken can't reach it by merging either (Qwen3.6's 83 such tokens all qualify).
    unbuilt = {}
    if ignore_merges:
        known = {*ranks, *merged}
        unbuilt = {b: vocab[t] for t, b in as_bytes.items() if len(b) > 1 and b not in merged}
        known |= unbuilt.keys()
        unbuilt = {b: i for b, i in unbuilt.items() if not any(b[:k] in known and b[k:] in known
                                                                 for k in range(1, len(b)))}
    merge_ids = list(merged.values())
    top = max(vocab.values()) + 1
    if all(x < y for x, y in zip(merge_ids, merge_ids[1:])):
        ranks.update(merged)
        ranks.update(unbuilt)
        rank_to_id = None
    else:
        singles = sorted(ranks.items(), key=lambda kv: kv[1])
        order = [*singles, *merged.items(), *unbuilt.items()]
        ranks = {tok: r for r, (tok, _) in enumerate(order)}
        rank_to_id = [i for _, i in order]
        top = len(order)
    # a byte with no token in the vocab (never seen in training) is dropped by HF; tiktoken needs a rank for
    # every byte, so give those ranks past the end that map to -1, and filter them out
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    if missing:
        rank_to_id = (rank_to_id or list(range(top))) + [-1] * len(missing)
        ranks.update({tok: top + k for k, tok in enumerate(missing)})
    # tiktoken maps a pre-token that is itself in its ranks straight to that token; HF's BPE does so only with
    # ignore_merges, else only if the merges build that token from its bytes. BPEs trained by HF (one merge per
    # token: GPT-2, Qwen2, SmolLM2, StarCoder) build every token so; a vocab converted from tiktoken's ranks (a
    # merge for each split of a token) may not: 588 of Llama 3's, in a tokenizer.json that lost ignore_merges.
    # Those leave the ranks.
    if not ignore_merges and len(merges) > len(merged):
        unbuildable = unbuildable_tokens(ranks)
        ranks = {token: rank for token, rank in ranks.items() if token not in unbuildable}
    return ranks, rank_to_id


def refuse_bpe_options(model):
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"unsupported BPE option {key}={model[key]!r}")


def load_bytelevel_json(tj):
    """format 1: a byte-level BPE tokenizer.json, run by tiktoken"""
    model = tj["model"]
    refuse_bpe_options(model)
    # byte_fallback: true (transformers' GGUF reader writes it) changes nothing here: every byte has a token
    pattern, prefix_space = pretokenizer_regex(tj.get("pre_tokenizer"))
    vocab = model["vocab"]
    ranks, rank_to_id = tiktoken_ranks(vocab, model["merges"], model.get("ignore_merges"))
    enc = make_tiktoken("tokenizer.json", pattern, ranks)
    if rank_to_id is None:
        plain = enc.encode_ordinary  # ranks are ids: nothing to map
    else:
        plain = lambda text: [i for i in map(rank_to_id.__getitem__, enc.encode_ordinary(text)) if i >= 0]
    if prefix_space:  # ByteLevel(add_prefix_space=true): each text piece starts with a space
        encode_text = lambda text, at_start: plain(text if text.startswith(" ") else " " + text)
    else:
        encode_text = lambda text, at_start: plain(text)
    tokens = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    return TokenizerModel(tokens, encode_text, [AddedToken.from_dict(t["id"], t) for t in tj.get("added_tokens", [])],
                          byte_level=True, normalize=normalizer_function(tj.get("normalizer")),
                          post_processor=find_template_processing(tj.get("post_processor")) or ([], []))


def sentencepiece_from_merges(model, added_ids):
    """a SentencePiece-style tokenizer.json's BPE (vocab + merges) as a sentencepiece model, to run it at C++ speed.

    HF merges the pair listed first in "merges"; sentencepiece merges the adjacent pair whose joined piece has the
    highest score. So a piece scores minus the rank of the first merge that builds it. What BPE must never build
    becomes a CONTROL piece, which sentencepiece only emits by id: added tokens and pieces no merge builds. Returns
    the processor and the id of the unknown piece to drop from its output (None when the vocab has an unk_token)."""
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2 as pb

    vocab = model["vocab"]
    first_merge = {}
    for rank, merge in enumerate(model["merges"]):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        first_merge.setdefault(a + b, rank)
    pieces = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        pieces[i] = token
    unk = vocab.get(model.get("unk_token"))
    byte_fallback = bool(model.get("byte_fallback")) and all(f"<0x{b:02X}>" in vocab for b in range(256))

    proto, piece_type = pb.ModelProto(), pb.ModelProto.SentencePiece
    for i, token in enumerate(pieces):
        p = proto.pieces.add()
        p.piece = token if token else f"<flatlm unused id {i}>"
        if i == unk:
            p.type = piece_type.UNKNOWN
        elif byte_fallback and byte_piece_value(token or "") is not None:
            p.type = piece_type.BYTE
        elif i in added_ids or not token or (len(token) > 1 and token not in first_merge):
            p.type = piece_type.CONTROL
        else:  # (a single character is never built by merging: its score does not matter)
            p.type, p.score = piece_type.NORMAL, -float(first_merge[token] + 1) if len(token) > 1 else 0.0
    dropped = None
    if unk is None:  # sentencepiece needs an unknown piece: a last one, whose id is dropped as HF drops the char
        dropped = unk = len(pieces)
        proto.pieces.add(piece="<flatlm unk>", type=piece_type.UNKNOWN)
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, len(proto.pieces), byte_fallback
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk, -1, -1, -1
    # the text arrives normalized and pre-tokenized: sentencepiece must take it as it is, spaces included
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", 0, 0, 0
    try:
        return SentencePieceProcessor(model_proto=proto.SerializeToString()), dropped
    except RuntimeError as e:  # sentencepiece's own checks (a piece twice ...)
        raise ValueError(f"sentencepiece cannot run its BPE: {e}") from None


def load_sentencepiece_json(tj):
    """format 2: a SentencePiece-style BPE tokenizer.json, its pipeline here and its BPE run by sentencepiece"""
    model = tj["model"]
    refuse_bpe_options(model)
    normalize = normalizer_function(tj.get("normalizer"))
    pretokenize = sentencepiece_pretokenizer(tj.get("pre_tokenizer"))
    byte_fallback, strip_spaces, spaceless_first = sentencepiece_decoder(tj.get("decoder"))
    added = [AddedToken.from_dict(t["id"], t) for t in tj.get("added_tokens", [])]
    sp, dropped = sentencepiece_from_merges(model, {t.id for t in added})
    vocab, ignore_merges = model["vocab"], model.get("ignore_merges")

    def encode_text(text, at_start):
        words = pretokenize(text, at_start)
        if ignore_merges:  # a word that is itself in the vocab is that one token
            ids = [[vocab[w]] if w in vocab else sp.encode(w) for w in words]
        else:
            ids = sp.encode(words)
        return [i for word in ids for i in word if i != dropped]

    tokens = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    return TokenizerModel(tokens, encode_text, added, byte_level=False, normalize=normalize,
                          byte_fallback=byte_fallback, strip_spaces=strip_spaces, spaceless_first=spaceless_first,
                          named={"unk_token": model.get("unk_token")} if model.get("unk_token") else {},
                          post_processor=find_template_processing(tj.get("post_processor")) or ([], []))


def load_sentencepiece_model(path, config):
    """format 3: a bare SentencePiece tokenizer.model, encoded by sentencepiece as the model was trained: its own
    normalizer, a dummy-prefix "▁" in front of each piece of text between added tokens (as in Meta's and Mistral's
    reference code, and HF's files written from these models) and its user-defined pieces matched by sentencepiece.
    transformers' `legacy` flag is not read: it concerns transformers' own rebuilding of these tokenizers."""
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise ValueError(f"tokenizer: {path} is not a SentencePiece model ({e}): the file is truncated or damaged; "
                         "copy it again from where the model came from") from None
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
        raise ValueError(f"tokenizer: {path} is a SentencePiece {kind} model; only SentencePiece BPE is supported "
                         "(Llama, Mistral, Gemma, Phi-3)")
    if config.get("add_prefix_space") is False:  # asked for explicitly: no "▁" in front of the text
        proto.normalizer_spec.add_dummy_prefix = False
    try:
        sp = SentencePieceProcessor(model_proto=proto.SerializeToString())
    except RuntimeError as e:  # sentencepiece's own checks
        raise ValueError(f"tokenizer: sentencepiece refuses {path}: {e}") from None

    # control pieces (<s>, [INST]) never come out of text in sentencepiece: we cut them out as special added tokens
    control = pb.ModelProto.SentencePiece.CONTROL
    added = [AddedToken(i, p.piece, special=True, normalized=False) for i, p in enumerate(proto.pieces)
             if p.type == control]
    spec = proto.trainer_spec
    pieces = [p.piece for p in proto.pieces]
    named = {name: pieces[i] for name, i in [("bos_token", spec.bos_id), ("eos_token", spec.eos_id),
                                             ("unk_token", spec.unk_id), ("pad_token", spec.pad_id)]
             if 0 <= i < len(pieces)}
    return TokenizerModel(pieces, lambda text, at_start: sp.encode(text), added, byte_level=False,
                          byte_fallback=spec.byte_fallback, strip_spaces=int(proto.normalizer_spec.add_dummy_prefix),
                          named=named)


def is_tiktoken_file(path):
    # Meta's tiktoken file is text, "base64-token rank" per line; a SentencePiece model is binary protobuf
    with open(path, "rb") as f:
        first = f.readline(1024).split()
    return len(first) == 2 and first[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]) is not None


def load_tiktoken_model(path, config):
    """format 4: Meta's tiktoken tokenizer.model (Llama 3), run by tiktoken with Llama 3's regex"""
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"tokenizer: line {number} of {path} is not 'base64-token rank': the file is truncated "
                             "or damaged; copy it again from where the model came from") from None
    enc = make_tiktoken(path.name, LLAMA3_PATTERN, ranks)
    tokens = [""] * len(ranks)
    for token, rank in ranks.items():
        tokens[rank] = "".join(BYTE_TO_CHAR[b] for b in token)
    # the special tokens' names: tokenizer_config.json's added_tokens_decoder (read by Tokenizer) when there is one,
    # else we assume Llama 3.1's (Llama 3's checkpoints all ship a tokenizer_config.json that names them)
    n = len(ranks)
    added = [] if config.get("added_tokens_decoder") else [
        AddedToken(n + i, t, special=True) for i, t in enumerate(LLAMA31_SPECIAL_TOKENS)]
    # Meta's chat models end a turn with <|eot_id|> (<|eom_id|> when calling a tool): stop there too
    return TokenizerModel(tokens, lambda text, at_start: enc.encode_ordinary(text), added, byte_level=True,
                          named={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
                          stop_tokens=["<|eom_id|>", "<|eot_id|>"])


def load_model(d, tokenizer_json, config):
    """the checkpoint's tokenizer files -> a TokenizerModel, by the format they are in"""
    json_path, model_path = d / "tokenizer.json", d / "tokenizer.model"
    if tokenizer_json is not None:
        try:
            kind = tokenizer_json["model"]["type"]
            steps = steps_of(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
            if kind == "BPE" and any(step["type"] == "ByteLevel" for step in steps):
                return load_bytelevel_json(tokenizer_json)
            if kind == "BPE":
                return load_sentencepiece_json(tokenizer_json)
        except ValueError as e:
            raise ValueError(f"tokenizer: {json_path}: {e}") from None
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"tokenizer: {json_path} is malformed ({type(e).__name__}: {e}): the file is damaged; "
                             "copy it again from where the model came from") from None
    if model_path.is_file():
        if is_tiktoken_file(model_path):
            return load_tiktoken_model(model_path, config)
        return load_sentencepiece_model(model_path, config)
    if tokenizer_json is not None:
        raise ValueError(f"tokenizer: {json_path} is a {kind} tokenizer and there is no tokenizer.model beside it; "
                         "supported are BPE tokenizer.json (byte-level or SentencePiece-style), SentencePiece BPE "
                         "tokenizer.model and Llama 3's tiktoken tokenizer.model")
    raise FileNotFoundError(f"tokenizer: no tokenizer files in {d} (looked for tokenizer.json, tokenizer.model)")


# -----------------------------------------------------------------------------
# special tokens: which are named (bos, eos ...) and which are added

def named_special_tokens(d, config, defaults):
    """-> ({"bos_token": content, ...}, [additional special tokens]): tokenizer_config's, else the legacy
    special_tokens_map.json's (which transformers reads only when tokenizer_config has no added_tokens_decoder),
    else the format's defaults"""
    special_map = {} if "added_tokens_decoder" in config else read_json(d / "special_tokens_map.json") or {}
    named = {**defaults,
             **{k: token_content(v) for k, v in special_map.items() if k in SPECIAL_TOKEN_NAMES and v},
             **{k: token_content(config[k]) for k in SPECIAL_TOKEN_NAMES if config.get(k) is not None}}
    extra = (config.get("additional_special_tokens") or config.get("extra_special_tokens")
             or special_map.get("additional_special_tokens") or [])
    extra = list(extra.values()) if isinstance(extra, dict) else extra
    return {k: v for k, v in named.items() if v}, [token_content(t) for t in extra]


def all_added_tokens(model, config, special_contents):
    """the format's added tokens, then tokenizer_config's added_tokens_decoder (wins, by id), then any named special
    token that is in the vocab but not yet added (transformers adds those as special)"""
    added = {t.id: t for t in model.added}
    for i, t in (config.get("added_tokens_decoder") or {}).items():
        added[int(i)] = AddedToken.from_dict(int(i), t)
    contents = {t.content for t in added.values()}
    vocab = {t: i for i, t in enumerate(model.tokens) if t}
    for content in special_contents:
        if content and content not in contents and content in vocab:
            added[vocab[content]] = AddedToken(vocab[content], content, special=True)
            contents.add(content)
    return list(added.values())


# -----------------------------------------------------------------------------
# decoding: HF's Strip and ByteFallback, and streaming decode (text as soon as it is certain, so that the pieces
# add up to decode(all ids))

def strip_spaces(text, n):
    # HF's Strip decoder: up to n leading spaces come off
    k = 0
    while k < n and k < len(text) and text[k] == " ":
        k += 1
    return text[k:]


def decode_byte_run(run):
    # HF's ByteFallback: a run of byte pieces is one UTF-8 string, or if invalid, one U+FFFD per byte
    try:
        return bytes(run).decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


class StreamDecoder:
    def __init__(self, tokenizer, skip_special_tokens=False):
        self.tok = tokenizer
        self.skip = tokenizer._special_ids if skip_special_tokens else frozenset()
        # byte-level: an incremental UTF-8 decoder holds back a character's first bytes until it is complete
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.run = []  # SentencePiece: byte pieces wait until the run ends (an invalid run turns all into U+FFFD)
        self.strip_left = 0 if tokenizer.byte_level else tokenizer._strip_spaces  # leading spaces decode() drops
        self.first = True  # no token added yet

    def add(self, token_id):
        token_id = int(token_id)
        tok = self.tok
        if token_id in self.skip or not 0 <= token_id < tok.vocab_size:
            return ""
        if tok.byte_level:
            return self.utf8.decode(tok._id_bytes[token_id])
        first, self.first = self.first, False
        if token_id in tok._byte_of:
            self.run.append(tok._byte_of[token_id])
            return ""
        return self._emit(self._end_run() + tok._piece_text(token_id, first))

    def flush(self):
        if self.tok.byte_level:
            return self.utf8.decode(b"", final=True)
        return self._emit(self._end_run())

    def _end_run(self):
        text = decode_byte_run(self.run) if self.run else ""
        self.run = []
        return text

    def _emit(self, text):
        if self.strip_left and text:  # the leading spaces that decode() strips, until the first other character
            stripped = strip_spaces(text, self.strip_left)
            self.strip_left = 0 if stripped else self.strip_left - len(text)
            text = stripped
        return text


# -----------------------------------------------------------------------------
# chat templates: the checkpoint's Jinja template, rendered as transformers renders it

def load_chat_templates(d, config):
    """-> ({name: template source}, {name: where it came from}). Like transformers: chat_template.jinja (and
    additional_chat_templates/*.jinja) win over tokenizer_config's chat_template (a string, or a list of {name,
    template}); chat_template.json is the older processor file."""
    files = [d / "chat_template.jinja", *sorted((d / "additional_chat_templates").glob("*.jinja"))]
    files = {("default" if f.name == "chat_template.jinja" else f.stem): f for f in files if f.is_file()}
    if files:
        return {name: f.read_text(encoding="utf-8") for name, f in files.items()}, {n: str(f) for n, f in files.items()}
    origin, t = d / "tokenizer_config.json", config.get("chat_template")
    if not t:
        origin, t = d / "chat_template.json", (read_json(d / "chat_template.json") or {}).get("chat_template")
    if isinstance(t, list):
        return {x["name"]: x["template"] for x in t}, {x["name"]: f"{origin} ('{x['name']}')" for x in t}
    return ({"default": t}, {"default": str(origin)}) if t else ({}, {})


def render_template(source, origin, **variables):
    """the template rendered; whatever goes wrong in it is a one-line ValueError naming the template"""
    import jinja2

    def one_line(e):
        return " ".join(str(e).split())

    try:
        template = compile_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"tokenizer: chat template {origin} is not valid Jinja (line {e.lineno}): {one_line(e)}") \
            from None
    try:
        return template.render(**variables)
    except jinja2.exceptions.SecurityError as e:
        raise ValueError(f"tokenizer: chat template {origin} did what the sandbox forbids: {one_line(e)}") from None
    except jinja2.TemplateError as e:  # raise_exception(...) in the template, an undefined name used ...
        raise ValueError(f"tokenizer: chat template {origin} refused these messages: {one_line(e)}") from None
    except Exception as e:  # the template's own code failed on these messages (a missing key, a wrong type)
        raise ValueError(f"tokenizer: chat template {origin} failed on these messages: "
                         f"{type(e).__name__}: {one_line(e)}") from None


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

    def refuse_private(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace may not hold {name!r}: names starting with _ reach "
                                                  "for Python's internals")

    class Namespace(jinja2.utils.Namespace):
        # namespace(...) is the one object a template can write to; as in transformers, no "_" names on it
        def __init__(*args, **kwargs):  # (no named self, so that namespace(self=...) still works, as in Jinja)
            attrs = dict(*args[1:], **kwargs)
            for name in attrs:
                refuse_private(name)
            jinja2.utils.Namespace.__init__(args[0], attrs)

        def __setitem__(self, name, value):
            refuse_private(name)
            super().__setitem__(name, value)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: plain json.dumps (Jinja's own escapes <, >, & and ' for HTML)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # templates come from the Hub: a sandbox that can't touch Python internals or mutate what it's given
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["namespace"] = Namespace
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


# -----------------------------------------------------------------------------
# the Tokenizer

class Tokenizer:
    def __init__(self, checkpoint_dir):
        d = Path(checkpoint_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"tokenizer: checkpoint directory {d} does not exist")
        config = read_json(d / "tokenizer_config.json") or {}
        tokenizer_json = read_json(d / "tokenizer.json")
        model = load_model(d, tokenizer_json, config)
        named, extra = named_special_tokens(d, config, model.named)
        self._set_tables(model, all_added_tokens(model, config, [*named.values(), *extra]))

        self.special_tokens_map = named  # chat templates see these as variables
        gen = read_json(d / "generation_config.json") or {}
        self.bos_id = self.token_to_id(named["bos_token"]) if "bos_token" in named else gen.get("bos_token_id")
        self.eos_id = self.token_to_id(named["eos_token"]) if "eos_token" in named else None
        self.pad_id = self.token_to_id(named["pad_token"]) if "pad_token" in named else gen.get("pad_token_id")
        # generation stops at any of: generation_config's eos_token_id (int or list), the tokenizer's eos, and the
        # format's end-of-turn tokens
        gen_eos = gen.get("eos_token_id")
        stops = [*(gen_eos if isinstance(gen_eos, list) else [gen_eos]), self.eos_id,
                 *map(self.token_to_id, model.stop_tokens)]
        self.eos_ids = list(dict.fromkeys(i for i in stops if i is not None))

        # what encode() adds by default: a tokenizer.json's post-processor decides (as `tokenizers` on the file),
        # else tokenizer_config (BOS by default: Llama, Mistral and Gemma were trained with it)
        if model.post_processor is not None:
            self.add_bos, self.add_eos = False, False
            before, after = model.post_processor
            if before:
                self.add_bos, self.bos_id = True, self.bos_id if self.bos_id is not None else before[0]
            if after:
                self.add_eos, self.eos_id = True, self.eos_id if self.eos_id is not None else after[0]
        else:
            self.add_bos = bool(config.get("add_bos_token", True)) and self.bos_id is not None
            self.add_eos = bool(config.get("add_eos_token", False)) and self.eos_id is not None

        self.chat_templates, self._template_origins = load_chat_templates(d, config)
        self.has_chat_template = bool(self.chat_templates)

    def _set_tables(self, model, added):
        """the lookup tables encode and decode use, from the loaded model and every added token"""
        self.byte_level = model.byte_level
        self._encode_text, self._normalize = model.encode_text, model.normalize
        tokens = list(model.tokens)
        tokens += [""] * (max([len(tokens) - 1, *(t.id for t in added)]) + 1 - len(tokens))  # added ids may lie beyond
        self._token_to_id = {t: i for i, t in enumerate(tokens) if t}
        for t in added:
            tokens[t.id] = t.content
            self._token_to_id[t.content] = t.id
        self._id_to_token = tokens
        self.vocab_size = len(tokens)
        self._special_ids = frozenset(t.id for t in added if t.special)
        # two passes, as HF: tokens with normalized=false are matched in the raw text, the others in normalized text
        norm = self._normalize or (lambda s: s)
        self._raw_tokens = {t.content: t for t in added if not t.normalized}
        self._norm_tokens = {norm(t.content): t for t in added if t.normalized}
        self._raw_matcher, self._norm_matcher = literal_matcher(self._raw_tokens), literal_matcher(self._norm_tokens)

        if self.byte_level:  # decoding: ids -> bytes -> UTF-8 (invalid bytes become U+FFFD, as in HF)
            self._id_bytes = [bytelevel_bytes(t) for t in tokens]
        else:  # pieces with "▁" for spaces; byte-fallback pieces "<0xAB>" are single bytes
            self._id_text = [t.replace(SPACE, " ") for t in tokens]
            values = [byte_piece_value(t) if model.byte_fallback else None for t in tokens]
            self._byte_of = {i: v for i, v in enumerate(values) if v is not None and i not in self._special_ids}
            self._strip_spaces, self._spaceless_first = model.strip_spaces, model.spaceless_first

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
        return [piece for piece in out if piece != ""]

    def encode(self, text, bos=None, eos=None):
        ids = []
        if self.add_bos if bos is None else bos:
            ids.append(self._require(self.bos_id, "BOS"))
        for k, piece in enumerate(self._split(text)):
            if isinstance(piece, str):
                ids += self._encode_text(piece, k == 0)  # k == 0: the piece starts the text
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
        if self.byte_level:
            table = self._id_bytes
            return b"".join([table[i] for i in ids if 0 <= i < n]).decode("utf-8", "replace")
        # SentencePiece: HF's decoder chain Replace("▁", " "), ByteFallback, Fuse, Strip(leading spaces)
        out, run = [], []
        for k, i in enumerate([i for i in ids if 0 <= i < n]):
            if i in self._byte_of:
                run.append(self._byte_of[i])
            else:
                if run:
                    out.append(decode_byte_run(run))
                    run = []
                out.append(self._piece_text(i, first=k == 0))
        if run:
            out.append(decode_byte_run(run))
        return strip_spaces("".join(out), self._strip_spaces)

    def _piece_text(self, i, first):
        # a SentencePiece token as text: "▁" is a space (and nothing in the first token after a Metaspace decoder)
        return self._id_to_token[i].replace(SPACE, "") if first and self._spaceless_first else self._id_text[i]

    def stream_decoder(self, skip_special_tokens=False):
        return StreamDecoder(self, skip_special_tokens)

    def token_to_id(self, token):
        return self._token_to_id.get(token)

    def id_to_token(self, i):
        return self._id_to_token[i]

    # --- chat templates

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
        name = kwargs.pop("chat_template", None)
        if not self.has_chat_template and name is None:
            return plain_chat(messages, add_generation_prompt)
        if name in self.chat_templates:
            source, origin = self.chat_templates[name], self._template_origins[name]
        elif name is not None:
            source, origin = name, "the chat template given as text"  # a template given as text
        else:
            name = "tool_use" if tools is not None and "tool_use" in self.chat_templates else "default"
            if name not in self.chat_templates:
                raise ValueError(f"tokenizer: several chat templates {sorted(self.chat_templates)} and none is "
                                 "'default'; pass chat_template=NAME")
            source, origin = self.chat_templates[name], self._template_origins[name]
        messages = [clean_message(m) for m in messages]
        variables = {**self.special_tokens_map, **kwargs}  # kwargs override the special tokens, as in transformers
        return render_template(source, origin, messages=messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)

    def encode_chat(self, messages, add_generation_prompt=True, **kwargs):
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        if not self.has_chat_template and "chat_template" not in kwargs:
            return self.encode(text)  # the plain fallback writes no BOS itself, so let encode add it as usual
        return self.encode(text, bos=False, eos=False)  # the template writes its own special tokens


# -----------------------------------------------------------------------------
# a tokenizer for character-level models

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
