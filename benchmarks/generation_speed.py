"""Generation speed: `interp.generation.generate_with` vs TransformerLens and Hugging Face.

The same chat prompts (one user turn each, rendered with the chat template), greedy decoding,
`--new-tokens` tokens per prompt with no early stop, timed side by side in one run:

- ours: `generate_with` at each batch size, without hooks and with a hook attached at every
  layer (a zero steering vector at `resid_pre`: the hook machinery runs, the output must not
  change);
- TransformerLens `HookedTransformer.generate`: one prompt at a time (on `--tl-prompts` of
  them, it is slow) and batched (left-padded lists of strings) at each batch size;
- Hugging Face `generate` on the dequantised model behind the HookedTransformer
  (`interp.models.load_hf`), left-padded batches.

Every side is warmed up (a short run on the same batch shape) before it is timed. Correctness:
each greedy output is compared with the reference decode (one prompt at a time, the whole
growing sequence recomputed at every step, argmax): directly for `--full-reference` prompts,
and for the rest by the equivalent one-forward check `is_reference_decode`. A mismatch of ours
is reported and makes the script exit with status 1 (HF's and TL's agreement with the
reference is reported only). Writes
`results/benchmarks/generation_speed.json`. Ratios hold roughly on a busy machine (the load
average is recorded); absolute rates do not.

    python benchmarks/generation_speed.py                  # 32 prompts, batches 1 8 32, 64 tokens
    python benchmarks/generation_speed.py --quick          # 8 prompts, batches 1 8, 16 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

from interp import hooks, models
from interp.generation import dialogue, generate_with, left_pad, pad_id

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
    "Name three primary colours.", "What is 12 times 7?", "Tell me a fun fact about cats.",
    "Explain photosynthesis briefly.", "Who wrote Hamlet?", "What's a good name for a dog?",
    "Translate 'hello' into Spanish.", "Why is the sky blue?", "Give me a synonym for happy.",
    "What is the boiling point of water?", "Suggest a weekend activity.", "What is an atom?",
    "How many legs does a spider have?", "What is the largest planet?", "How do plants grow?",
    "Describe a rainbow.", "What is gravity?", "List two fruits that are red.",
    "What does a baker do?", "How far is the Moon?", "What is the opposite of cold?",
    "Why do we sleep?", "What is a verb?", "How do birds fly?", "What is 100 divided by 4?",
    "Write one sentence about autumn.", "What language is spoken in Brazil?",
    "What is a volcano?", "How do you make tea?",
]


@torch.no_grad()
def reference_decode(model, ids: list[int], n: int) -> list[int]:
    """Greedy decode of one prompt by full recomputation: `model(tokens)` on the whole growing
    sequence at every step, argmax of the last position. No cache, no padding, no batching."""
    tokens = torch.tensor([ids])
    for _ in range(n):
        nxt = model(tokens)[0, -1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return tokens[0, len(ids):].tolist()


@torch.no_grad()
def is_reference_decode(model, ids: list[int], completion: list[int]) -> bool:
    """Whether `completion` is the full-recomputation greedy decode of `ids`, in one forward
    pass: `model(ids + completion)` must put its argmax on each next completion token. Each
    position sees exactly the tokens the reference's step sees (causal attention), so by
    induction this holds iff `reference_decode` returns `completion` (up to the rounding of a
    different sequence length, the same caveat as for any comparison of two decodes)."""
    logits = model(torch.tensor([ids + completion]))[0, len(ids) - 1:-1]
    return logits.argmax(-1).tolist() == completion


def timed(fn, warm):
    warm()  # warm-up (a short run): allocations, kernels for new shapes
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--tl-prompts", type=int, default=4,
                        help="prompts TransformerLens generates one at a time (slow)")
    parser.add_argument("--no-tl-batched", action="store_true")
    parser.add_argument("--small-prompts", type=int, default=8,
                        help="batch sizes below this are timed on this many prompts")
    parser.add_argument("--full-reference", type=int, default=2,
                        help="prompts also decoded by full recomputation (slow); the others are "
                             "checked in one forward pass each (is_reference_decode)")
    parser.add_argument("--quick", action="store_true", help="8 prompts, batches 1 8, 16 tokens")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/generation_speed.json"))
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.batch_sizes, args.new_tokens, args.tl_prompts = 8, [1, 8], 16, 2
    load_before = os.getloadavg()
    model = models.load(args.model, device="cpu")
    hf, _ = models.load_hf(args.model)
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    texts = [dialogue(model, [q]) for q in questions]
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n_new = args.new_tokens
    total = len(ids) * n_new
    print(f"{args.model}: {len(ids)} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens, "
          f"{n_new} new tokens, {torch.get_num_threads()} threads, load {load_before[0]:.1f}")

    start = time.perf_counter()
    reference = [reference_decode(model, x, n_new) for x in ids[: args.full_reference]]
    print(f"reference decode (full recompute, one prompt at a time) of {len(reference)} prompts: "
          f"{time.perf_counter() - start:.0f} s")

    zero = torch.zeros(model.cfg.d_model)
    rows: dict = {"config": {**vars(args), "out": str(args.out), "load_avg_before": load_before,
                             "threads": torch.get_num_threads()}, "batches": {}}
    failed = False

    def matches(outs: list[list[int]]) -> list[bool]:
        """Per completion of prompts 0, 1, ...: is it the reference decode? Compared directly
        where the reference was run, else checked with `is_reference_decode`."""
        return [o == reference[i] if i < len(reference) else is_reference_decode(model, ids[i], o)
                for i, o in enumerate(outs)]

    def ours(prompts, b, n, hook_list):
        return generate_with(model, prompts, hooks=hook_list, max_new_tokens=n, batch_size=b,
                             stop_tokens=(), progress=False).tokens

    @torch.no_grad()
    def hf_generate(prompts, b, n):
        out = []
        for first in range(0, len(prompts), b):
            tokens, mask = left_pad(prompts[first:first + b], pad_id(model))
            res = hf.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=pad_id(model))
            out += res[:, tokens.shape[1]:].tolist()
        return out

    def tl_generate(prompt_texts, b, n):
        out = []
        for first in range(0, len(prompt_texts), b):
            chunk = prompt_texts[first:first + b]
            res = model.generate(chunk if len(chunk) > 1 else chunk[0], max_new_tokens=n,
                                 do_sample=False, stop_at_eos=False, prepend_bos=False,
                                 verbose=False, return_type="tokens")
            out += res[:, -n:].tolist()
        return out

    # TransformerLens one prompt at a time, on a subset.
    k = min(args.tl_prompts, len(ids))
    if k:
        outs, t = timed(partial(tl_generate, texts[:k], 1, n_new), partial(tl_generate, texts[:1], 1, 2))
        rows["transformer_lens_single"] = {"tok_s": k * n_new / t, "prompts": k,
                                           "agree_with_reference": sum(matches(outs))}
        print(f"TL generate, 1 prompt at a time ({k} prompts): {k * n_new / t:7.1f} tok/s")

    for b in args.batch_sizes:
        # Small batches are slow: time them on the first `--small-prompts` prompts.
        m = len(ids) if b >= args.small_prompts else min(args.small_prompts, len(ids))
        sub, sub_texts, total = ids[:m], texts[:m], m * n_new
        row: dict = {"prompts": m}
        for name, hook_list in (("ours", []), ("ours_hooked", [
                hooks.steer(model, zero, layers="all", scale=1.0)])):
            outs, t = timed(partial(ours, sub, b, n_new, hook_list),
                            partial(ours, sub[:b], b, 2, hook_list))
            ok = matches(outs)
            row[name] = {"tok_s": total / t, "seconds": t, "agree_with_reference": sum(ok)}
            if not all(ok):
                failed = True
                bad = [i for i, good in enumerate(ok) if not good]
                print(f"  MISMATCH {name} batch {b}: prompts {bad} differ from the reference")
        hf.generation_config.eos_token_id = None
        outs, t = timed(partial(hf_generate, sub, b, n_new), partial(hf_generate, sub[:b], b, 2))
        row["hf"] = {"tok_s": total / t, "seconds": t, "agree_with_reference": sum(matches(outs))}
        if not args.no_tl_batched and b > 1:  # batch 1: see the one-at-a-time row
            try:
                outs, t = timed(partial(tl_generate, sub_texts, b, n_new),
                                partial(tl_generate, sub_texts[:b], b, 2))
                row["transformer_lens_batched"] = {"tok_s": total / t, "seconds": t,
                                                   "agree_with_reference": sum(matches(outs))}
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                row["transformer_lens_batched"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        row["ratio_hf_over_ours"] = row["hf"]["tok_s"] / row["ours"]["tok_s"]
        row["ratio_hf_over_ours_hooked"] = row["hf"]["tok_s"] / row["ours_hooked"]["tok_s"]
        rows["batches"][str(b)] = row
        tlb = row.get("transformer_lens_batched", {})
        print(f"batch {b:>3} ({m} prompts): ours {row['ours']['tok_s']:6.1f} tok/s, with hooks "
              f"{row['ours_hooked']['tok_s']:6.1f}, HF {row['hf']['tok_s']:6.1f}, TL batched "
              f"{tlb.get('tok_s', float('nan')):6.1f} (HF/ours {row['ratio_hf_over_ours']:.2f}x); "
              f"reference decode: ours {row['ours']['agree_with_reference']}/{m}, "
              f"HF {row['hf']['agree_with_reference']}/{m}, TL "
              f"{tlb.get('agree_with_reference', '-')}")
    rows["load_avg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out} (load {rows['load_avg_after'][0]:.1f})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
