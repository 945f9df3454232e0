"""The continuous-batching engine in generate.py: sequences decoded together give what each gives alone (every
family on tiny random models, and the real SmolLM2-135M-Instruct), alone they give HF generate's tokens; stop strings,
seeds, cancellation, slot reuse, chunked prefill and the engine's own thread."""

import threading

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import convert_hf
from conftest import perturb_
from generate import LLM, MIN_DECODE_ROWS, Engine, PackedLinear, Request, Sampling
from test_generate import family_models

PROMPTS = ["Once upon a time", "The capital of France is a city that", "Hi", "def f(x):\n    return x +",
           "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2]


def tiny_checkpoint(make_hf_model, smollm2_hf_dir, tmp_path):
    torch.manual_seed(0)
    hf = perturb_(make_hf_model().eval(), scale=0.5)
    hf.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "hf" / name).write_bytes((smollm2_hf_dir / name).read_bytes())
    convert_hf.hf_to_native(tmp_path / "hf", tmp_path / "native")
    return hf, tmp_path / "native"


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        bos_token_id=1, eos_token_id=2))


@pytest.fixture(scope="module")
def tiny_llm(smollm2_hf_dir, tmp_path_factory):
    return LLM.load(tiny_checkpoint(tiny_llama, smollm2_hf_dir, tmp_path_factory.mktemp("llama"))[1], device="cpu")


def alone_and_together(engine: Engine, prompts: list[list[int]], max_new_tokens: int, **kwargs):
    request = lambda ids: Request(ids, max_new_tokens, logprobs=2, **kwargs)
    alone = [engine.run([request(ids)])[0] for ids in prompts]
    together = engine.run([request(ids) for ids in prompts])
    return alone, together


def assert_same_tokens_or_near_ties(alone, together) -> int:
    """Greedy tokens of each sequence decoded with others equal its tokens decoded alone. Where they part (a
    batch-mate changed a last bit of the logits), the alone run's top two logits must have been within 1e-4: a
    near-tie, counted and returned."""
    near_ties = 0
    for a, b in zip(alone, together):
        if a.generated != b.generated:
            i = next(i for i, (x, y) in enumerate(zip(a.generated, b.generated)) if x != y)
            (_, first), (_, second) = a.tokens[i].top
            assert first - second < 1e-4, f"token {i} differs with a top-2 margin of {first - second:.2e}"
            near_ties += 1
    return near_ties


@pytest.mark.parametrize("family", ["llama", *family_models()])
def test_every_family_decodes_the_same_together_as_alone_and_alone_as_hf(family, smollm2_hf_dir, tmp_path):
    # 5 prompts of 2 to 53 tokens in 4 slots (one waits for a slot), prefilled in chunks of 8, for 30 tokens: the
    # sliding windows of 8 (Mistral, Gemma 2/3, Phi-3) slide in every row.
    make = tiny_llama if family == "llama" else family_models()[family]
    hf, checkpoint = tiny_checkpoint(make, smollm2_hf_dir, tmp_path)
    llm = LLM.load(checkpoint, device="cpu")
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    engine = Engine(llm.model, llm.tokenizer, max_batch_size=4, prefill_chunk=8)
    alone, together = alone_and_together(engine, prompts, 30)
    assert assert_same_tokens_or_near_ties(alone, together) == 0
    if torch.backends.mkldnn.is_available():               # PackedLinear and explicit attention: bit for bit
        assert [[t.logprob for t in s.tokens] for s in alone] == [[t.logprob for t in s.tokens] for s in together]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompts[4]]), max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert alone[4].generated == ref[0, len(prompts[4]):len(prompts[4]) + len(alone[4].generated)].tolist()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PackedLinear needs oneDNN")
def test_packed_linear_rows_do_not_depend_on_the_batch():
    # SmolLM2-135M's linear shapes (qkv, o, gate_up, down), random weights: each row of an M-row product is the same
    # bits for every M from MIN_DECODE_ROWS to 24, on 1 and 2 threads, and within float error of nn.Linear.
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for n_in, n_out in [(576, 960), (576, 576), (576, 3072), (1536, 576)]:
            linear = nn.Linear(n_in, n_out, bias=n_out == 960)
            packed = PackedLinear(linear)
            x = torch.randn(24, n_in)
            with torch.no_grad():
                torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
                for t in {1, threads}:
                    torch.set_num_threads(t)
                    full = packed(x)
                    for m in range(MIN_DECODE_ROWS, 24):
                        assert torch.equal(packed(x[:m]), full[:m]), (n_in, n_out, m, t)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["llama", *family_models()])
def test_explicit_attention_equals_sdpa_in_every_family(family, smollm2_hf_dir, tmp_path, monkeypatch):
    # The engine decodes through the explicit path (Attention.use_sdpa = False). A causal forward of 40 tokens
    # (past every tiny model's sliding window) and a cached one, token by token, against SDPA's.
    make = tiny_llama if family == "llama" else family_models()[family]
    _, checkpoint = tiny_checkpoint(make, smollm2_hf_dir, tmp_path)
    model = LLM.load(checkpoint, device="cpu").model
    idx = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))

    def run():
        model.setup_cache(2, 64)
        stepwise = torch.cat([model(idx[:, t:t + 1], torch.tensor([t])) for t in range(40)], dim=1)
        return model(idx), stepwise

    with torch.no_grad():
        fused = run()
        monkeypatch.setattr(type(model.layers[0].attn), "use_sdpa", False)
        explicit = run()
    for e, f in zip(explicit, fused):
        # Rounding differences of 1e-7 grow along the 40 cached steps of these perturbed models, whose logits reach
        # about 26: within 1e-5 of the largest logit. A wrong mask or scale would be off by whole units.
        torch.testing.assert_close(e, f, atol=1e-5 * f.abs().max().item(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_concurrent_greedy_equals_alone(smollm2_dir, dtype):
    # bf16: nn.Linear's matmul, or PackedLinear where the CPU has bf16 instructions (the same bits)
    llm = LLM.load(smollm2_dir, device="cpu", dtype=dtype)
    chats = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
             "Translate 'good morning' to Spanish."]
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": c}]) for c in chats]
    prompts += [llm.tokenizer.encode(p) for p in PROMPTS[:2]]                  # six lengths, chat and raw text
    engine = Engine(llm.model, llm.tokenizer, max_batch_size=8)
    alone, together = alone_and_together(engine, prompts, 32)
    assert assert_same_tokens_or_near_ties(alone, together) == 0
    for a, b in zip(alone, together):                          # every number, bit for bit
        assert [t.logprob for t in a.tokens] == [t.logprob for t in b.tokens]


# ----------------------------------------------------------------------------------------------------------------
# Stop strings, seeds, limits


def test_stop_strings_match_across_tokens_and_are_never_emitted(tiny_llm):
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, max_batch_size=4)
    ids = tiny_llm.tokenizer.encode(PROMPTS[0])
    free = engine.run([Request(ids, 20, logprobs=0)])[0]
    pieces = [tiny_llm.tokenizer.decode([t.id]) for t in free.tokens]
    assert all(pieces[3:6]), pieces
    stop = pieces[3][-2:] + pieces[4] + pieces[5][:1]              # spans three tokens
    at = free.text.index(stop)
    streamed = []
    seq = engine.run([Request(ids, 20, stop=(stop, "never appears"), on_update=lambda u: streamed.append(u.text))])[0]
    assert seq.text == free.text[:at] and seq.finish_reason == "stop"
    assert "".join(streamed) == seq.text and all(stop not in p for p in streamed)
    assert seq.generated == free.generated[:len(seq.generated)]   # the tokens that made up the stop were generated


def test_held_back_text_is_released_when_it_cannot_become_a_stop(tiny_llm):
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, max_batch_size=4)
    ids = tiny_llm.tokenizer.encode(PROMPTS[1])
    free = engine.run([Request(ids, 12)])[0]
    stop = free.text[-3:] + "\x00"                 # its first three characters are the text's end: held till the end
    updates = []
    seq = engine.run([Request(ids, 12, stop=(stop,), on_update=updates.append)])[0]
    assert seq.text == free.text and seq.finish_reason == "length"
    assert "".join(u.text for u in updates) == seq.text
    assert updates[-1].text.endswith(free.text[-3:]) and updates[-1].finish_reason == "length"


def test_seeded_samples_do_not_depend_on_the_batch(tiny_llm):
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, max_batch_size=4)
    prompts = [tiny_llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    hot = Sampling(temperature=1.0, top_p=0.9)
    alone = engine.run([Request(prompts[0], 20, hot, seed=7)])[0]
    together = engine.run([Request(prompts[0], 20, hot, seed=7), Request(prompts[1], 20, hot, seed=8),
                           Request(prompts[2], 20, hot)])
    assert together[0].generated == alone.generated
    assert together[1].generated != alone.generated


def test_limits_and_finish_reasons(tiny_llm):
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, max_batch_size=2, max_seq_len=64)
    ids = tiny_llm.tokenizer.encode(PROMPTS[0])
    seq = engine.run([Request(ids, 5)])[0]
    assert len(seq.generated) == 5 and seq.finish_reason == "length"
    long = engine.run([Request(ids, 1000)])[0]                      # capped by the context
    assert len(ids) + len(long.generated) == 64 and long.finish_reason == "length"
    first = seq.generated[0]
    ends = engine.run([Request(ids, 5, stop_ids=(first,))])[0]        # a stop id: generated, never emitted
    assert ends.generated == [first] and ends.text == "" and ends.finish_reason == "stop"


@pytest.mark.parametrize("request_kwargs,message", [
    (dict(prompt_ids=[]), "the prompt is empty"),
    (dict(prompt_ids=[1] * 64), "the prompt is 64 tokens but the context is 64"),
    (dict(prompt_ids=[49152]), "prompt token ids must be integers in [0, 49152)"),
    (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(prompt_ids=[1], sampling=Sampling(top_p=0)), "top_p must be in (0, 1]"),
    (dict(prompt_ids=[1], stop=("",)), "stop strings must be non-empty"),
])
def test_bad_requests_are_refused_at_submit(request_kwargs, message, tiny_llm):
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError) as e:
        engine.submit(Request(**request_kwargs))
    assert message in str(e.value)
    assert not engine.waiting


# ----------------------------------------------------------------------------------------------------------------
# Slots and the engine's thread


def test_cancel_frees_the_slot_for_the_next_sequence(tiny_llm):
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, max_batch_size=1)
    ids = tiny_llm.tokenizer.encode(PROMPTS[0])
    first, second = engine.submit(Request(ids, 100)), engine.submit(Request(ids, 3))
    for _ in range(3):
        engine.step()
    assert first.slot == 0 and len(first.generated) > 0 and second.slot is None
    engine.cancel(first)
    engine.step()
    assert first.finish_reason == "cancelled" and second.slot == 0
    while engine.step():
        pass
    assert second.finish_reason == "length" and engine.slots == [None] * len(engine.slots)


def test_engine_thread_serves_submissions_from_other_threads(tiny_llm):
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, max_batch_size=4, prefill_chunk=4)
    prompts = [tiny_llm.tokenizer.encode(p) for p in PROMPTS]
    expected = [s.text for s in engine.run([Request(ids, 16) for ids in prompts])]
    engine.start()
    try:
        pieces = [[] for _ in prompts]
        seqs = [None] * len(prompts)

        def client(i):
            seqs[i] = engine.submit(Request(prompts[i], 16, on_update=lambda u: pieces[i].append(u.text)))
            seqs[i].done.wait(60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ["".join(p) for p in pieces] == expected
    finally:
        engine.close()


def test_llm_generate_and_chat_take_lists(tiny_llm):
    greedy = dict(max_new_tokens=8, temperature=0)
    assert tiny_llm.generate(PROMPTS[:3], **greedy) == [tiny_llm.generate(p, **greedy) for p in PROMPTS[:3]]
    chats = [[{"role": "user", "content": c}] for c in ("Hi", "What is 2 + 2?")]
    assert tiny_llm.chat(chats, **greedy) == [tiny_llm.chat(c, **greedy) for c in chats]
