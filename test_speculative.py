"""Speculative decoding (generate.py): with a draft model or prompt lookup, greedy decoding yields exactly the tokens
of plain greedy decoding (every family, and the real SmolLM2-135M-Instruct), and sampling draws from exactly the
target's distribution (a chi-square test against the probabilities a full forward gives); stop ids, max_new_tokens,
the context limit, streaming, the CLI and its errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
import tokenizer
from conftest import perturb_
from generate import (LLM, DraftModel, PromptLookup, Sampling, Stats, generate_tokens, sampling_probs,
                      speculative_generate_tokens)
from models import llama

ROOT = Path(__file__).parent


def plain_tokens(model, prompt: list[int], n: int, s=Sampling(), stop_ids=()) -> list[int]:
    model.setup_cache(1, len(prompt) + n)
    with torch.inference_mode():
        return list(generate_tokens(model, prompt, n, s, stop_ids))


def speculative_tokens(model, prompt: list[int], n: int, guesser, k: int, s=Sampling(), stop_ids=(),
                       generator=None, stats=None) -> list[int]:
    model.setup_cache(1, len(prompt) + n)
    if isinstance(guesser, DraftModel):
        guesser.model.setup_cache(1, len(prompt) + n)
    with torch.inference_mode():
        return list(speculative_generate_tokens(model, prompt, n, s, guesser, k, stop_ids, generator, stats))


def tiny_llama(vocab_size: int, seed: int, scale: float = 0.5, max_seq_len: int = 64):
    """A tiny random Llama with every parameter nudged by N(0, scale), so that its distributions are far from
    uniform."""
    torch.manual_seed(seed)
    config = llama.Config(vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, dim=16, intermediate_size=32,
                          max_seq_len=max_seq_len)
    return perturb_(llama.Transformer(config), seed, scale).eval()


# ----------------------------------------------------------------------------------------------------------------
# Greedy: exactly plain greedy decoding


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "qwen3", "phi", "phi3"])
def test_greedy_speculation_yields_plain_greedy_tokens(family):
    # Three guessers on a tiny random model of each family (test_generate's configs, with 64 token ids so that the
    # text repeats itself; sliding windows of 8 over 32 tokens): a draft that mostly disagrees (another random init),
    # one that mostly agrees (the target, slightly perturbed), and prompt lookup. Each must give the plain greedy
    # tokens.
    from test_generate import family_models
    hf_config = family_models()[family]().config.to_dict()
    module = models.module(models.family_of_hf(hf_config))
    config = module.Config.from_hf({**hf_config, "vocab_size": 64})
    torch.manual_seed(0)
    target, disagreeing, agreeing = (module.Transformer(config).eval() for _ in range(3))
    perturb_(target, scale=0.5)
    agreeing.load_state_dict(target.state_dict())
    perturb_(agreeing, seed=1, scale=0.002)
    prompt = [1, 41, 23, 5, 9, 41, 23, 5]
    expected = plain_tokens(target, prompt, 32)
    vocab = config.vocab_size
    for name, guesser in [("disagreeing", DraftModel(disagreeing, vocab)), ("agreeing", DraftModel(agreeing, vocab)),
                          ("prompt lookup", PromptLookup())]:
        stats = Stats()
        assert speculative_tokens(target, prompt, 32, guesser, 4, stats=stats) == expected, name
        assert stats.new_tokens == 32 and stats.guessed > 0
        if name == "disagreeing":
            assert stats.kept < stats.guessed / 2
        if name == "agreeing":
            assert stats.kept > stats.guessed / 2


def test_stop_id_and_max_new_tokens_inside_a_kept_run():
    # A perfect draft (the target's own weights) keeps every guess: steps of k + 1 = 5 tokens. A stop id in the middle
    # of a step ends the text right before it; max_new_tokens cuts a step short; both exactly as plain decoding does.
    target, draft = tiny_llama(64, seed=3, scale=1.0), tiny_llama(64, seed=3, scale=1.0)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    plain = plain_tokens(target, prompt, 30)
    for n in range(1, 13):
        stats = Stats()
        assert speculative_tokens(target, prompt, n, DraftModel(draft, 64), 4, stats=stats) == plain[:n]
        assert stats.new_tokens == n and stats.kept == stats.guessed
    # The prefill yields token 0, the first step tokens 1-5, the second 6-10: stop at a guess of the second step.
    first = next(i for i in range(6, 10) if plain[i] not in plain[:i])
    stats = Stats()
    assert speculative_tokens(target, prompt, 30, DraftModel(draft, 64), 4, stop_ids={plain[first]}, stats=stats) \
        == plain[:first] == plain_tokens(target, prompt, 30, stop_ids={plain[first]})
    assert stats.verify_steps == 2 and stats.kept == stats.guessed


def test_prompt_lookup_guesses_what_followed_the_latest_longest_match():
    propose = lambda history, k: PromptLookup().propose(history, k)[0]
    assert propose([5, 6, 7, 8, 9, 5, 6, 7, 1, 2], 3) == []                    # 2 never came before
    assert propose([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 7], 3) == [1, 2, 5]   # the latest 5 6 7 came before 1
    assert propose([7, 2, 3, 5, 9, 2, 3, 6, 7, 2, 3], 3) == [5, 9, 2]         # 7 2 3 before 2 3, though older
    assert propose([5, 6, 7, 8, 9, 4, 8], 4) == [9, 4, 8]                      # 4 8 never came; 8 did
    # Growing history, one lookup: the index follows, and never matches the suffix with itself.
    lookup, history = PromptLookup(), [1, 2, 3]
    assert lookup.propose(history, 2)[0] == []
    history += [1, 2]
    assert lookup.propose(history, 2)[0] == [3, 1]
    history += [4]
    assert lookup.propose(history, 2)[0] == []


# ----------------------------------------------------------------------------------------------------------------
# Sampling: exactly the target's distribution


def exact_probabilities(model, prompt: list[int], n: int, s: Sampling) -> torch.Tensor:
    """The probability of every continuation of n tokens under plain sampling, from one full forward over all of them
    at once: (vocab^n,), in torch.cartesian_prod's order (the first token varies slowest)."""
    V = model.config.vocab_size
    continuations = torch.cartesian_prod(*[torch.arange(V)] * n)                  # (V^n, n)
    idx = torch.cat([torch.tensor(prompt).expand(len(continuations), -1), continuations], dim=1)
    with torch.no_grad():
        logits = model(idx)[:, len(prompt) - 1:-1]                                 # (V^n, n, V)
    probs = sampling_probs(logits.reshape(-1, V), s).view(len(continuations), n, V)
    return probs.gather(2, continuations[..., None])[..., 0].prod(dim=1)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness-of-fit test: the chance of a fit this bad or worse if counts were drawn from
    probs. Cells expected fewer than min_expected times are pooled into one; impossible cells must stay empty."""
    expected = probs.double() * counts.sum()
    assert counts[probs == 0].sum() == 0, "a continuation of probability 0 was drawn"
    rare = (expected < min_expected) & (probs > 0)
    observed = torch.cat([counts[expected >= min_expected], counts[rare].sum()[None]]).double()
    expected = torch.cat([expected[expected >= min_expected], expected[rare].sum()[None]])
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = len(observed) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2), statistic / 2).item()    # chi2 survival function


T1, TOP_K_P = Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=5, top_p=0.9)


@pytest.mark.parametrize("guesser,s", [("draft", T1), ("smaller-vocab draft", TOP_K_P), ("prompt lookup", T1),
                                       ("prompt lookup", TOP_K_P)],
                         ids=["draft-t1", "smaller_vocab_draft-t0.7_topk_topp", "lookup-t1", "lookup-t0.7_topk_topp"])
def test_speculative_sampling_draws_from_the_target_distribution(guesser, s):
    # The first 4 tokens of 1000 seeded runs (k = 2: two guesses, then a correction or the bonus token, then another
    # step) against the exact probabilities of every 4-token continuation. The drafts are the target perturbed
    # (guesses often kept, often refused) or another random model with 6 of the target's 8 ids (the corrections
    # must supply the ids it can never guess).
    V, n, runs = 8, 4, 1000
    target = tiny_llama(V, seed=0)
    prompt = [1, 2, 3, 4, 1, 2, 5, 1, 2]
    if guesser == "draft":
        draft = perturb_(tiny_llama(V, seed=0), seed=1, scale=0.3)
    elif guesser == "smaller-vocab draft":
        draft = tiny_llama(6, seed=2)
    counts, stats = torch.zeros(V ** n), Stats()
    for seed in range(runs):
        guess = PromptLookup() if guesser == "prompt lookup" else DraftModel(draft, V)
        tokens = speculative_tokens(target, prompt, n, guess, 2, s, generator=torch.Generator().manual_seed(seed),
                                    stats=stats)
        counts[sum(t * V ** (n - 1 - i) for i, t in enumerate(tokens))] += 1
    assert 0 < stats.kept < stats.guessed                      # both paths taken
    p_value = chi_square_p_value(counts, exact_probabilities(target, prompt, n, s))
    assert p_value > 1e-3, f"{guesser}, {s}: p = {p_value:.2g}"


def test_the_chi_square_test_tells_the_draft_from_the_target():
    # The same test has the power to see a wrong distribution: 1000 draws from the perturbed draft's own exact
    # distribution (what keeping every guess would give) fail it.
    s, V, n = Sampling(1.0), 8, 4
    target, draft = tiny_llama(V, seed=0), perturb_(tiny_llama(V, seed=0), seed=1, scale=0.3)
    prompt = [1, 2, 3, 4, 1, 2, 5, 1, 2]
    q = exact_probabilities(draft, prompt, n, s)
    draws = torch.multinomial(q, 1000, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=V ** n).float()
    assert chi_square_p_value(counts, exact_probabilities(target, prompt, n, s)) < 1e-6
    assert chi_square_p_value(counts, q) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Through LLM and the command line


def test_llm_with_a_draft_or_prompt_lookup_generates_the_plain_text(tiny_dir):
    llm, plain = LLM.load(tiny_dir, device="cpu", draft=tiny_dir), LLM.load(tiny_dir, device="cpu")
    prompt = "one two three four one two three four one two"
    expected = plain.generate(prompt, max_new_tokens=20, temperature=0)
    assert llm.generate(prompt, max_new_tokens=20, temperature=0, speculate_k=3) == expected
    assert llm.stats.verify_steps > 0 and llm.stats.kept == llm.stats.guessed    # the draft is the target itself
    assert "tokens per verification step" in llm.stats.report(llm.device)
    assert plain.generate(prompt, max_new_tokens=20, temperature=0, prompt_lookup=4) == expected
    assert plain.stats.verify_steps > 0


def test_context_limit_and_streaming(tiny_dir):
    # The tiny model's context is 64 tokens: a 58-token prompt leaves room for 6, however many are asked for.
    llm, plain = LLM.load(tiny_dir, device="cpu", draft=tiny_dir), LLM.load(tiny_dir, device="cpu")
    prompt = " ".join(["cat dog"] * 29)
    assert len(llm.tokenizer.encode(prompt)) == 58
    expected = plain.generate(prompt, max_new_tokens=100, temperature=0)
    assert llm.generate(prompt, max_new_tokens=100, temperature=0) == expected
    assert llm.stats.new_tokens == plain.stats.new_tokens <= 6
    # Pieces stream as tokens are kept: the first one comes before the last step has run.
    stream = llm.stream("Hello", max_new_tokens=30, temperature=0)
    first = next(stream)
    steps_so_far = llm.stats.verify_steps
    rest = "".join(stream)
    assert steps_so_far < llm.stats.verify_steps
    assert first + rest == plain.generate("Hello", max_new_tokens=30, temperature=0)


def test_bad_speculation_settings_are_refused(tiny_dir, tmp_path):
    llm = LLM.load(tiny_dir, device="cpu", draft=tiny_dir)
    with pytest.raises(ValueError, match="prompt lookup and a draft model are two ways of guessing tokens: use one"):
        llm.generate("Hi", prompt_lookup=3)
    with pytest.raises(ValueError, match="speculate_k must be a positive integer"):
        llm.generate("Hi", speculate_k=0)
    with pytest.raises(ValueError, match="prompt_lookup must be a positive integer"):
        LLM.load(tiny_dir, device="cpu").generate("Hi", prompt_lookup=0)
    # A draft that speaks other token ids: a byte-level tokenizer.
    other = tiny_llama(257, seed=0)
    models.save(other.state_dict(), other.config, tmp_path / "bytes",
                tokenizer_dir=tokenizer.write_byte_tokenizer(tmp_path / "byte_tokenizer"))
    with pytest.raises(ValueError, match="has another tokenizer than the target"):
        LLM.load(tiny_dir, device="cpu", draft=tmp_path / "bytes")


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def test_cli_draft_and_prompt_lookup(tiny_dir):
    plain = LLM.load(tiny_dir, device="cpu").generate("one two one two", max_new_tokens=12, temperature=0)
    r = cli(tiny_dir, "--prompt", "one two one two", "--max_new_tokens", "12", "--temperature", "0",
            "--prompt_lookup", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == plain.strip() and "tokens per verification step" in r.stderr
    r = cli(tiny_dir, "--prompt", "one two one two", "--max_new_tokens", "12", "--temperature", "0",
            "--draft", tiny_dir, "--draft_quantize", "int8", "--speculate_k", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == plain.strip() and "tokens per verification step" in r.stderr
    r = cli(tiny_dir, "--prompt", "x", "--draft", tiny_dir, "--prompt_lookup", "3")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "use one" in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------------------------
# The real checkpoint: SmolLM2-135M-Instruct as the target


SUMMARISE = ("Summarise this text in two sentences.\n\nThe Eiffel Tower is a wrought-iron lattice tower on the Champ "
             "de Mars in Paris, France. It is named after the engineer Gustave Eiffel, whose company designed and "
             "built the tower from 1887 to 1889. Locally nicknamed La dame de fer, it was constructed as the "
             "centrepiece of the 1889 World's Fair.")
STORY = "Write a short story about a dragon who is afraid of the dark."


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return LLM.load(smollm2_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def random_draft_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and its 8192-token context: a draft that mostly disagrees."""
    out = tmp_path_factory.mktemp("random_draft")
    draft = tiny_llama(49152, seed=0, scale=0.1, max_seq_len=8192)
    models.save(draft.state_dict(), draft.config, out, tokenizer_dir=smollm2_dir)
    return out


@pytest.fixture(scope="module")
def plain_replies(smollm2) -> dict[str, str]:
    return {prompt: smollm2.chat([{"role": "user", "content": prompt}], max_new_tokens=48, temperature=0)
            for prompt in (SUMMARISE, STORY)}


@pytest.mark.slow
@pytest.mark.parametrize("guesser", ["int8 SmolLM2", "tiny random", "prompt lookup"])
def test_real_checkpoint_greedy_text_is_unchanged(guesser, smollm2, smollm2_dir, random_draft_dir, plain_replies):
    if guesser == "prompt lookup":
        llm, kwargs = smollm2, dict(prompt_lookup=8)
    else:
        llm, kwargs = LLM.load(smollm2_dir, device="cpu", dtype=torch.float32,
                               draft=smollm2_dir if guesser == "int8 SmolLM2" else random_draft_dir,
                               draft_quantize="int8" if guesser == "int8 SmolLM2" else None), {}
    for prompt, expected in plain_replies.items():
        assert llm.chat([{"role": "user", "content": prompt}], max_new_tokens=48, temperature=0, **kwargs) == expected
        assert llm.stats.verify_steps > 0
