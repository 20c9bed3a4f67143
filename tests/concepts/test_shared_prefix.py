"""`SharedPrefix`: next-token logits with the prompts' common head run once, against plain
left-padded forward passes of every whole prompt."""

from __future__ import annotations

import random

import pytest
import torch

from interp import hooks, models
from interp.concepts.refusal import SharedPrefix, common_prefix_length, length_batches
from interp.generation import next_token_logits


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model(request):
    return models.load(request.param)


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Five prompts sharing a 7-token head, suffixes of different lengths (one of 1 token)."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(0, vocab, (7,), generator=gen).tolist()
    return [head + torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (1, 4, 2, 6, 3)]


def _plain(model, prompts, hook=()):
    """Each prompt alone, no padding, no cache: the reference."""
    rows = []
    with torch.no_grad():
        for h in ([hook] if isinstance(hook, hooks.Hook) else list(hook)):
            h.attach(model)
        try:
            for p in prompts:
                rows.append(model(torch.tensor([p]))[0, -1])
        finally:
            for h in ([hook] if isinstance(hook, hooks.Hook) else list(hook)):
                h.detach()
    return torch.stack(rows)


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5, 1], [6, 1]]) == 0
    assert common_prefix_length([]) == 0


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_logits_equal_whole_prompts_run_alone(model, batch_size):
    prompts = _prompts(model.cfg.d_vocab)
    shared = SharedPrefix(model, prompts, batch_size)
    assert shared.k == 7
    torch.testing.assert_close(shared.logits(), _plain(model, prompts), atol=1e-4, rtol=1e-4)


def test_position_independent_hooks_act_on_the_head_too(model):
    prompts = _prompts(model.cfg.d_vocab, seed=1)
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    shared = SharedPrefix(model, prompts, batch_size=2)
    for hook in (hooks.ablate_direction(model, direction),
                 hooks.steer(model, 2 * direction, layers=[0])):
        ours = shared.logits(hook)
        torch.testing.assert_close(ours, _plain(model, prompts, hook), atol=1e-4, rtol=1e-4)
        assert (ours - shared.logits()).abs().max() > 1e-3  # the hook did something


def test_starting_at_the_hooked_layer_equals_the_full_run(model):
    prompts = _prompts(model.cfg.d_vocab, seed=2)
    last = model.cfg.n_layers - 1
    steer = hooks.steer(model, torch.randn(model.cfg.d_model), layers=[last], scale=3.0)
    shared = SharedPrefix(model, prompts, batch_size=3)
    torch.testing.assert_close(shared.logits(steer, start_layer=last),
                               _plain(model, prompts, steer), atol=1e-4, rtol=1e-4)


def test_prompts_without_a_common_head_and_bad_input(model):
    prompts = [[1, 2, 3], [4, 5]]
    shared = SharedPrefix(model, prompts)
    assert shared.k == 0
    torch.testing.assert_close(shared.logits(), next_token_logits(model, prompts),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="at least one prompt"):
        SharedPrefix(model, [])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SharedPrefix(model, prompts, batch_size=0)


def _partitions(items):
    """Every set partition of `items` (Bell-number many; small inputs only)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1:]]


@pytest.mark.parametrize("seed", range(4))
def test_length_batches_is_the_cheapest_partition(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 30) for _ in range(6)]
    max_rows, overhead = 3, 5

    def cost(groups):
        return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)

    groups = length_batches(lengths, max_rows, overhead)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(1 <= len(g) <= max_rows for g in groups)
    best = min(cost(p) for p in _partitions(list(range(6))) if all(len(g) <= max_rows for g in p))
    assert cost(groups) == best
