"""Demo: what does the model predict after an IOI prompt, and from which layer on?

Loads a model, runs one indirect-object-identification prompt with a cache, prints the top next
tokens with their probabilities, and reads the residual stream layer by layer through the final
norm and unembedding (the "logit lens") to see from which layer the logit difference between the
indirect object (" Mary") and the subject (" John") builds up. Writes `results.json`, `top_tokens.{html,png}` and `logit_lens.{html,png}`.
"""

from __future__ import annotations

import time

import torch

from interp import models, plots
from interp.results import write_results
from interp.studies import StudyConfig, StudyInputError, check_minimum
from interp.tokens import single_token

DESCRIPTION = "Top next tokens and a logit lens on one IOI prompt (a quick smoke test)."
PROMPT = "When Mary and John went to the store, John gave a drink to"


def add_arguments(parser) -> None:
    parser.add_argument("--prompt", default=PROMPT, help="prompt to complete")
    parser.add_argument("--answer", default=" Mary", help="correct next token (single token)")
    parser.add_argument("--wrong", default=" John", help="competing next token (single token)")
    parser.add_argument("--top-k", type=int, default=10, help="how many top tokens to show")


def run(config: StudyConfig, prompt: str = PROMPT, answer: str = " Mary", wrong: str = " John",
        top_k: int = 10) -> dict:
    check_minimum("top_k", top_k, 1)
    torch.manual_seed(config.seed)
    out = config.out_dir("demo")
    t0 = time.perf_counter()
    model = models.load(config.model, device=config.device, dtype=config.dtype)
    t_load = time.perf_counter() - t0
    try:
        answer_ids = [single_token(model, answer, "answer"), single_token(model, wrong, "wrong answer")]
    except ValueError as exc:  # the message names the token and the fix
        raise StudyInputError(f"{exc} (--answer, --wrong)") from exc

    tokens = model.to_tokens(prompt)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    t_forward = time.perf_counter() - t0
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(top_k)
    top_tokens = [model.tokenizer.decode(i) for i in top.indices]

    # Logit lens: each layer's residual stream through the final norm and the unembedding.
    with torch.no_grad():
        resid, labels = cache.accumulated_resid(pos_slice=-1, apply_ln=True, return_labels=True)
        lens_logits = model.unembed(resid[:, 0].unsqueeze(1)).float()[:, 0]
    lens_logit_diff = (lens_logits[:, answer_ids[0]] - lens_logits[:, answer_ids[1]]).tolist()

    print(f"model {config.model}  prompt {prompt!r}")
    for tok, p in zip(top_tokens, top.values.tolist()):
        print(f"  {tok!r:>16}  {p:.3f}")
    print(f"P({answer!r}) = {probs[answer_ids[0]]:.3f}, P({wrong!r}) = {probs[answer_ids[1]]:.3f}")

    figures = plots.save_figure(
        plots.bar(top_tokens, top.values.tolist(), f"Next-token probabilities: {config.model}",
                  "probability"), out / "top_tokens")
    figures += plots.save_figure(
        plots.lines(labels, {f"logit({answer!r}) - logit({wrong!r})": lens_logit_diff},
                    f"Logit lens: {config.model}", "residual stream", "logit difference"),
        out / "logit_lens")
    results = {
        "study": "demo",
        "config": config,
        "prompt": prompt,
        "tokens": [model.tokenizer.decode(t) for t in tokens[0]],
        "top_tokens": [{"token": t, "prob": p} for t, p in zip(top_tokens, top.values.tolist())],
        "answer": {"token": answer, "prob": probs[answer_ids[0]].item()},
        "wrong": {"token": wrong, "prob": probs[answer_ids[1]].item()},
        "logit_lens": {"labels": labels, "logit_diff": lens_logit_diff},
        "timings_s": {"load": t_load, "forward_with_cache": t_forward},
        "figures": [f.name for f in figures],
    }
    path = write_results(out, results)
    print(f"wrote {path} and {len(figures)} figure files in {out}")
    return results
