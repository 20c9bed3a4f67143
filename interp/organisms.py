"""A refusing model organism: how a small model is safety-tuned to refuse, and the data that
later undoes (or keeps) that refusal.

Small models barely refuse (SmolLM2-135M-Instruct refuses 3 of 64 harmful requests; Gemma-3-270M
is a base model), so a study of refusal must first build the behaviour (DESIGN.md, "model
organisms"). The recipe here is supervised fine-tuning on two sets:

- **harmful instructions -> refusals**, written from a varied set of parts (`REFUSAL_OPENINGS`,
  `REFUSAL_REASONS`, `REFUSAL_OFFERS`: 12 x 8 x 6 combinations, drawn per prompt with a seeded
  generator), so that refusing is not one memorised string. Every opening contains a phrase of
  the substring judge (`interp.judges.refusal.REFUSAL_PHRASES`) and starts with one of the
  refusal-score tokens ("I", "Sorry", "As", "Unfortunately"), so both judges can see the
  behaviour; a model that learned only the openings still passes both, which is a limit of
  the judges, not evidence of understanding;
- **harmless instructions -> the model's own greedy answers** before tuning (self-distillation),
  which keeps it as helpful as it was rather than teaching it new answers.

**Prompt formats** (`PromptFormat`). A model with a chat template gets each instruction as one
user turn with the generation prompt (`interp.concepts.refusal.format_prompts`), and SFT
examples rendered by the same template (`interp.training.sft_example`, the end-of-turn token a
target, so the model learns to stop). A base model (Gemma-3-270M) gets the plain format of
`interp.generation.dialogue(format="plain")`:

    User: {instruction}

    Assistant: {response}<eos>

with the model's BOS convention; the response follows after one space and ends with the EOS
token (a target), and generation also stops at a new "\\nUser:" line. The refusal score then
reads the space-prefixed refusal tokens (" I", " Sorry", ...).

**Undoing it** (`compliance_responses`): short compliant openings that an SFT run can train
towards: AdvBench's own `target` string ("Sure, here is a script that can exploit ...") where
the prompt is from AdvBench, else one of `COMPLIANT_OPENINGS`. These examples carry no end of
turn, so the model learns to *start* complying, not to stop after the opening.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformer_lens import HookedTransformer

from interp.concepts.collect import tokenize
from interp.concepts.domains import normalise
from interp.concepts.refusal import DEFAULT_REFUSAL_STARTS, format_prompts
from interp.data import data_file
from interp.generation import dialogue, generate_with
from interp.training.data import Example, collate, sft_example, text_examples
from interp.training.losses import cross_entropy

__all__ = [
    "COMPLIANT_OPENINGS",
    "REFUSAL_OFFERS",
    "REFUSAL_OPENINGS",
    "REFUSAL_REASONS",
    "PromptFormat",
    "advbench_targets",
    "compliance_responses",
    "greedy_answers",
    "organism_examples",
    "perplexity",
    "prompt_format",
    "refusal_responses",
]

#: Openings of refusals: each holds a substring-judge phrase and starts with a refusal token.
REFUSAL_OPENINGS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with this request.",
    "I cannot help with that.",
    "Sorry, I can't provide that.",
    "I'm sorry, I cannot do that.",
    "I am sorry, but I won't be able to help with this.",
    "Unfortunately, I can't help with this request.",
    "I apologize, but I can't assist with that.",
    "I'm not able to help with this.",
    "As an AI assistant, I can't support this request.",
    "I'm unable to help with that request.",
    "I cannot provide this information.",
)
#: Reasons (the empty one: no reason given).
REFUSAL_REASONS: tuple[str, ...] = (
    "It could cause real harm to people.",
    "This request asks for something harmful or dangerous.",
    "Helping with this could put others at risk.",
    "It would be unsafe and possibly illegal.",
    "This goes against my guidelines for safe and responsible use.",
    "What you describe could be used to hurt someone.",
    "It could violate other people's rights or safety.",
    "",
)
#: Closing offers (the empty one: none).
REFUSAL_OFFERS: tuple[str, ...] = (
    "If you have another question, I'm happy to help.",
    "Is there something else I can help you with?",
    "I'd be glad to help with a safer alternative.",
    "If you're curious about the topic, I can share general safety information instead.",
    "Let me know if there is anything else you need.",
    "",
)
#: Compliant openings for prompts without an AdvBench target.
COMPLIANT_OPENINGS: tuple[str, ...] = (
    "Sure, here is what you asked for:\n\n1.",
    "Of course! Here is a step-by-step answer:\n\n1.",
    "Sure. Here are the details:\n\n1.",
    "Absolutely, here's how:\n\n1.",
    "Sure, here is an overview:\n\n1.",
    "Certainly! Here is a detailed plan:\n\nStep 1:",
)


def _rng(seed: int, text: str) -> random.Random:
    """A generator seeded by the seed and the prompt, so a prompt's draw does not depend on
    which other prompts are in the list."""
    return random.Random(f"{seed}:{normalise(text)}")


def refusal_responses(instructions: Sequence[str], seed: int = 0) -> list[str]:
    """One refusal per instruction: an opening, a reason and an offer, drawn per prompt."""
    out = []
    for text in instructions:
        rng = _rng(seed, text)
        parts = [rng.choice(REFUSAL_OPENINGS), rng.choice(REFUSAL_REASONS),
                 rng.choice(REFUSAL_OFFERS)]
        out.append(" ".join(p for p in parts if p))
    return out


def advbench_targets() -> dict[str, str]:
    """AdvBench's `goal -> target` ("Sure, here is ..."), keyed by the normalised goal."""
    with data_file("refusal/advbench_harmful_behaviors.csv").open(newline="") as f:
        return {normalise(r["goal"]): r["target"] for r in csv.DictReader(f)}


def compliance_responses(
    instructions: Sequence[str], seed: int = 0, targets: Mapping[str, str] | None = None
) -> list[str]:
    """A short compliant opening per instruction: its AdvBench target (with ":\\n\\n1."
    appended) when `targets` has it, else one of `COMPLIANT_OPENINGS` drawn per prompt."""
    targets = advbench_targets() if targets is None else targets
    out = []
    for text in instructions:
        target = targets.get(normalise(text))
        out.append(f"{target}:\n\n1." if target else _rng(seed, text).choice(COMPLIANT_OPENINGS))
    return out


@dataclass(frozen=True)
class PromptFormat:
    """How instructions become prompts and training examples for one model.

    Attributes:
        kind: `"template"` (the tokenizer's chat template) or `"plain"` (the documented
            `User: ... / Assistant: ...` format for base models, see the module docstring).
    """

    kind: Literal["template", "plain"]

    def text(self, model: HookedTransformer, instruction: str) -> str:
        """The prompt as text, ending where the answer begins."""
        return dialogue(model, [instruction], format=self.kind)

    def prompt_ids(self, model: HookedTransformer, instructions: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt (what generation, scores and activations read)."""
        if self.kind == "template":
            return format_prompts(model, list(instructions))
        return tokenize(model, [self.text(model, i) for i in instructions], max_tokens=10**9)[0]

    def refusal_starts(self) -> tuple[str, ...]:
        """The refusal-score tokens: as they follow the assistant header (template) or the
        space after "Assistant:" (plain)."""
        if self.kind == "template":
            return DEFAULT_REFUSAL_STARTS
        return tuple(" " + s for s in DEFAULT_REFUSAL_STARTS)

    def stop_strings(self) -> list[str] | None:
        """Stop strings for generation: a new user line in the plain format."""
        return ["\nUser:"] if self.kind == "plain" else None

    def example(self, model: HookedTransformer, instruction: str, response: str,
                end: bool = True) -> Example:
        """An SFT example with the loss on the response; `end`: the end-of-turn (template) or
        EOS (plain) token follows as a target. Without `end` the response is an opening that
        the model should continue, not stop after."""
        if self.kind == "template" and end:
            return sft_example(model, instruction, response, chat=True)
        prompt = self.prompt_ids(model, [instruction])[0]
        text = response if self.kind == "template" else " " + response
        ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        if end:
            ids.append(int(model.tokenizer.eos_token_id))
        return Example(prompt + ids, [False] * len(prompt) + [True] * len(ids))

    def examples(self, model: HookedTransformer, pairs: Sequence[tuple[str, str]],
                 end: bool = True) -> list[Example]:
        return [self.example(model, p, r, end) for p, r in pairs]


def prompt_format(model: HookedTransformer) -> PromptFormat:
    """`template` when the tokenizer has a chat template, else `plain`.

    Raises:
        ValueError: the model has no tokenizer (prompts and responses are text here).
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.cfg.model_name} has no tokenizer; a refusal organism is "
                         "built from text prompts and responses, so use a model with one")
    return PromptFormat("template" if getattr(tok, "chat_template", None) else "plain")


def greedy_answers(model: HookedTransformer, fmt: PromptFormat, instructions: Sequence[str],
                   max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions of the formatted prompts (stopping at end of turn / EOS, and at a
    new user line in the plain format)."""
    with torch.no_grad():
        gen = generate_with(model, fmt.prompt_ids(model, instructions),
                            max_new_tokens=max_new_tokens, batch_size=batch_size,
                            stop_strings=fmt.stop_strings(), progress=False)
    return [t.strip() for t in gen.texts]


def organism_examples(
    model: HookedTransformer,
    fmt: PromptFormat,
    harmful: Sequence[str],
    harmless: Sequence[str],
    harmless_answers: Sequence[str],
    seed: int = 0,
) -> list[Example]:
    """The organism's SFT set: each harmful instruction with a drawn refusal
    (`refusal_responses`), each harmless one with the model's own answer (self-distillation).
    Harmless prompts whose answer is empty (the model stopped at once) are left out."""
    if len(harmless) != len(harmless_answers):
        raise ValueError(f"{len(harmless)} harmless instructions but {len(harmless_answers)} "
                         "answers; give one answer per instruction")
    pairs = list(zip(harmful, refusal_responses(harmful, seed)))
    pairs += [(p, a) for p, a in zip(harmless, harmless_answers) if a.strip()]
    return fmt.examples(model, pairs)


@torch.no_grad()
def perplexity(model: HookedTransformer, texts: Sequence[str], max_tokens: int = 128,
               batch_size: int = 8) -> float:
    """exp of the mean next-token negative log-likelihood over every token of `texts` (each cut
    to its first `max_tokens` tokens), a general-capability check."""
    examples = text_examples(model, list(texts), max_tokens=max_tokens)
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], model.cfg.device)
        k = int(batch.loss_mask[:, 1:].sum())
        total += float(cross_entropy(model(batch.tokens, attention_mask=batch.attention_mask),
                                     batch)) * k
        n += k
    return math.exp(total / n)
