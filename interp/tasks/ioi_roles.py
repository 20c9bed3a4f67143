"""IOI head roles from attention patterns (Wang et al. 2022, "Interpretability in the Wild").

The IOI circuit of GPT-2 small has heads with recognisable attention patterns on the clean
prompts ("When Mary and John went to the store, John gave a drink to"):

| role | where it attends (query -> key) | evidence column |
|---|---|---|
| name mover | from `end` to the IO name, more than to both S names together | `end->IO` vs `end->S1 + end->S2` |
| S-inhibition | from `end` to S2, more than to the IO | `end->S2` vs `end->IO` |
| duplicate-token | from S2 to S1 (the earlier copy of the same token) | `S2->S1` |
| induction | from S2 to the token after S1 (S1+1) | `S2->S1+1` |

`head_roles` measures these mean attention weights over the prompts (each prompt at its own
slot positions, `PromptPairs.positions`) and names the roles whose pattern clears
`threshold`. A head can have several roles, or none ("other").

Caveats. The patterns are necessary signs, not proof: the IOI paper also checks what each head
writes (name movers copy the name they attend to into the logits; S-inhibition heads act
through the name movers' queries), and patterns of small instruction-tuned models need not
match GPT-2 small's. A name mover with a negative effect on the logit difference is a
"negative name mover" (the caller has the sign: `head_roles(..., effect=...)`). Attention to
the first token (an attention sink) lowers every weight, so the threshold is absolute, not
relative.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from transformer_lens import HookedTransformer

from interp.tasks.ioi import PromptPairs

__all__ = ["HeadRole", "attention_evidence", "head_roles"]

#: The query -> key slot pairs measured for every head.
EVIDENCE = (("end", "IO"), ("end", "S1"), ("end", "S2"), ("S2", "S1"), ("S2", "S1+1"))


@dataclass(frozen=True)
class HeadRole:
    """One head's attention evidence and the roles it supports.

    Attributes:
        head: `a{L}.h{H}`.
        layer, index: its layer and head index.
        attention: mean attention weight per `"query->key"` slot pair (`EVIDENCE`).
        roles: the roles whose pattern clears the threshold (empty: other).
        effect: the caller's effect of the head (e.g. its circuit edges' score), if given.
    """

    head: str
    layer: int
    index: int
    attention: dict[str, float]
    roles: tuple[str, ...]
    effect: float | None = None

    @property
    def role(self) -> str:
        """The roles joined by ", ", or "other"."""
        return ", ".join(self.roles) if self.roles else "other"

    def to_dict(self) -> dict:
        return {**asdict(self), "role": self.role}


def _parse(head: str, model: HookedTransformer) -> tuple[int, int]:
    try:
        layer, index = head[1:].split(".h")
        layer, index = int(layer), int(index)
    except ValueError:
        raise ValueError(f"a head is named 'a{{L}}.h{{H}}' (e.g. 'a9.h6'), got {head!r}") from None
    if not (0 <= layer < model.cfg.n_layers and 0 <= index < model.cfg.n_heads):
        raise ValueError(f"head {head!r} is not in {model.cfg.model_name} "
                         f"({model.cfg.n_layers} layers x {model.cfg.n_heads} heads)")
    return layer, index


def attention_evidence(
    model: HookedTransformer, pairs: PromptPairs, heads: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Mean attention weight over the clean prompts of each head for each slot pair of
    `EVIDENCE` (`{"a9.h6": {"end->IO": 0.61, ...}}`), each prompt read at its own positions."""
    missing = [s for s in ("IO", "S1", "S2", "end") if s not in pairs.positions]
    if missing:
        raise ValueError(f"the pairs lack the slot positions {missing}: head roles need IOI pairs "
                         "from generate_ioi (loaded pairs carry only 'end')")
    parsed = {h: _parse(h, model) for h in heads}
    layers = sorted({layer for layer, _ in parsed.values()})
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in layers}
    tokens = pairs.clean_tokens.to(model.cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    rows = torch.arange(tokens.shape[0])
    pos = {k: v.cpu() for k, v in pairs.positions.items()}
    pos["S1+1"] = pos["S1"] + 1
    out = {}
    for head, (layer, index) in parsed.items():
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, index].float().cpu()  # [b, q, k]
        out[head] = {f"{q}->{k}": float(pattern[rows, pos[q], pos[k]].mean()) for q, k in EVIDENCE}
    return out


def head_roles(
    model: HookedTransformer,
    pairs: PromptPairs,
    heads: Sequence[str],
    threshold: float = 0.2,
    effect: Mapping[str, float] | None = None,
) -> list[HeadRole]:
    """The IOI roles of `heads` from their attention patterns on the clean prompts (see the
    module docstring for the rules), in the order given.

    Args:
        model: the model the heads belong to.
        pairs: IOI pairs from `generate_ioi` (with slot positions IO, S1, S2, end).
        heads: head names `a{L}.h{H}`.
        threshold: the smallest mean attention weight that counts as attending.
        effect: optional effect per head; a name mover with a negative effect is reported as
            "negative name mover".
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold is an attention weight in (0, 1), got {threshold}")
    evidence = attention_evidence(model, pairs, heads)
    result = []
    for head in heads:
        a = evidence[head]
        roles = []
        e = None if effect is None else effect.get(head)
        if a["end->IO"] >= threshold and a["end->IO"] > a["end->S1"] + a["end->S2"]:
            roles.append("negative name mover" if e is not None and e < 0 else "name mover")
        if a["end->S2"] >= threshold and a["end->S2"] > a["end->IO"]:
            roles.append("S-inhibition")
        if a["S2->S1"] >= threshold:
            roles.append("duplicate-token")
        if a["S2->S1+1"] >= threshold:
            roles.append("induction")
        layer, index = _parse(head, model)
        result.append(HeadRole(head, layer, index, a, tuple(roles), e))
    return result
