"""IOI head roles: the rules on given attention evidence, the evidence against a plain run, and
bad input."""

from __future__ import annotations

import pytest
import torch

from interp.tasks import generate_ioi, ioi_roles
from interp.tasks.ioi_roles import attention_evidence, head_roles


def evidence(io=0.0, s1=0.0, s2=0.0, dup=0.0, ind=0.0):
    return {"end->IO": io, "end->S1": s1, "end->S2": s2, "S2->S1": dup, "S2->S1+1": ind}


def test_roles_follow_the_attention_rules(default_model, monkeypatch):
    pairs = generate_ioi(default_model, 3, seed=1)
    given = {
        "a9.h0": evidence(io=0.6, s1=0.1, s2=0.1),   # name mover
        "a9.h1": evidence(io=0.6, s1=0.1, s2=0.1),   # the same, negative effect
        "a8.h2": evidence(io=0.1, s2=0.5),           # S-inhibition
        "a3.h3": evidence(dup=0.4, ind=0.3),         # duplicate-token and induction
        "a2.h4": evidence(io=0.3, s1=0.2, s2=0.2),   # IO below S1 + S2: not a name mover
        "a1.h5": evidence(io=0.19, dup=0.19),        # below the threshold
    }
    monkeypatch.setattr(ioi_roles, "attention_evidence", lambda model, pairs, heads: given)
    roles = head_roles(default_model, pairs, list(given), threshold=0.2, effect={"a9.h1": -0.3})
    assert [r.role for r in roles] == ["name mover", "negative name mover", "S-inhibition",
                                       "duplicate-token, induction", "other", "other"]
    assert (roles[2].layer, roles[2].index) == (8, 2)


def test_evidence_equals_a_plain_run_at_each_prompts_slots(default_model):
    pairs = generate_ioi(default_model, 4, seed=2)  # mixed templates: slots at other positions
    assert len(set(pairs.positions["S2"].tolist())) > 1
    got = attention_evidence(default_model, pairs, ["a20.h3", "a5.h0"])
    _, cache = default_model.run_with_cache(pairs.clean_tokens)
    for head, (layer, h) in {"a20.h3": (20, 3), "a5.h0": (5, 0)}.items():
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, h]
        hand = [pattern[i, pairs.positions["end"][i], pairs.positions["IO"][i]].item() for i in range(4)]
        assert got[head]["end->IO"] == pytest.approx(sum(hand) / 4, abs=1e-6)
        hand = [pattern[i, pairs.positions["S2"][i], pairs.positions["S1"][i] + 1].item() for i in range(4)]
        assert got[head]["S2->S1+1"] == pytest.approx(sum(hand) / 4, abs=1e-6)
        assert 0 <= min(got[head].values()) and max(got[head].values()) <= 1


def test_bad_input(default_model):
    pairs = generate_ioi(default_model, 2, seed=0)
    with pytest.raises(ValueError, match="named 'a\\{L\\}.h\\{H\\}'"):
        head_roles(default_model, pairs, ["m3"])
    with pytest.raises(ValueError, match="not in"):
        head_roles(default_model, pairs, ["a30.h0"])
    with pytest.raises(ValueError, match="threshold"):
        head_roles(default_model, pairs, ["a1.h0"], threshold=1.5)
    bare = pairs.select(torch.arange(2))
    bare.positions = {"end": pairs.positions["end"]}
    with pytest.raises(ValueError, match="slot positions"):
        attention_evidence(default_model, bare, ["a1.h0"])
