"""SAE latents as sites of the circuit engine, and sparse feature circuits (Marks et al. 2024).

**Latents as sites.** Once SAEs are attached (`interp.saes.attach`, error term on), every
latent at every position is a node: `latent_families(model)` gives one `SiteFamily` per kind of
hook point carrying SAEs (site axes `pos, latent`), and with `error=True` one more per kind for
the error nodes (`<hook>.hook_sae_error`, site axis `pos`: the SAE's whole reconstruction error
at one position is one node, as in Marks et al.). These families go to `exact_patching`,
`attribution_patching`, `integrated_gradients` and `relp` like any other and come back as the
same `Scores`. Because the splice computes the output as `decode(latents) + error` and passes
the model's true gradient upstream, patching a latent changes the output by exactly its decoded
change, and AtP over latents is exact wherever the model is linear in them (tested).

**Sparse feature circuits.** A circuit `C` is a set of nodes. It is scored by running the model
with every node *outside* `C` ablated (replaced by its mean over a reference set of prompts,
per position) and every node inside it left alone:

    faithfulness(C) = (m(C) - m(empty)) / (m(M) - m(empty))

where `m(M)` is the metric of the unablated model and `m(empty)` the metric with every node
ablated: 1 when the circuit carries the whole behaviour that flows through the SAEs, 0 when it
carries none. `faithfulness_curve` keeps the `n` nodes with the largest |attribution| for each
`n` in `counts` (latents and error nodes ranked together) and traces faithfulness against `n`:
the better a method ranks nodes, the faster its curve rises. This is the comparison of RelP
with integrated gradients in the RelP paper (arXiv 2508.21258, after Marks et al.).

Caveats:
- Only the hook points that carry SAEs are ablated; the rest of the model runs unchanged, so
  with SAEs at a few layers "the circuit" is the set of latents at those layers through which
  the behaviour flows, not a full computational graph.
- Mean ablation per position assumes the prompts share a layout (one template); at a position
  where templates differ the mean mixes different words. Means are taken over the rows whose
  prompt reaches that position (`end_pos`).
- With several SAEs, the SAE at an earlier layer changes the input of a later one; the later
  SAE's error node absorbs that, so `m(M)` is exactly the model's own metric.

The node-circuit tools are general (any site families) and live in `interp.attribution.circuits`
(`top_nodes`, `ablation_means`, `node_circuit_metric`, `node_faithfulness_curve`,
`NodeFaithfulnessCurve`); this module re-exports them under the names it has always used
(`circuit_metric`, `faithfulness_curve`, `FaithfulnessCurve`).
"""

from __future__ import annotations

import re
from typing import Sequence

from transformer_lens import HookedTransformer

from interp.attribution.circuits import NodeFaithfulnessCurve as FaithfulnessCurve
from interp.attribution.circuits import ablation_means, top_nodes
from interp.attribution.circuits import node_circuit_metric as circuit_metric
from interp.attribution.circuits import node_faithfulness_curve as faithfulness_curve
from interp.attribution.sites import SiteFamily
from interp.saes.attach import attached_saes, latent_hook_name

__all__ = [
    "FaithfulnessCurve",
    "ablation_means",
    "circuit_metric",
    "faithfulness_curve",
    "latent_families",
    "top_nodes",
]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def latent_families(
    model: HookedTransformer, hook_names: Sequence[str] | None = None, error: bool = True
) -> list[SiteFamily]:
    """Site families over the latents (and error nodes) of the SAEs attached to `model`.

    SAEs at the same kind of hook point (e.g. `hook_resid_pre` at layers 5 and 15) form one
    family whose layers are the blocks carrying them: `latents_resid_pre` (axes `pos, latent`)
    and, with `error`, `errors_resid_pre` (axis `pos`).

    Args:
        hook_names: the SAE hook points to include (default: every attached SAE).
        error: also return the error-node families.
    """
    attached = attached_saes(model)
    names = list(attached) if hook_names is None else list(hook_names)
    if not names:
        raise ValueError("no SAEs are attached to the model; attach some with "
                         "interp.saes.attach(model, {hook_name: sae}) first")
    missing = [n for n in names if n not in attached]
    if missing:
        raise ValueError(f"no SAE is attached at {missing}; attached: {sorted(attached)}")
    by_kind: dict[str, list[int]] = {}
    for name in names:
        match = _BLOCK.match(name)
        if match is None:
            raise ValueError(f"SAE hook {name!r} is not inside a block (blocks.L.<hook>); "
                             "only block hook points can be site families")
        by_kind.setdefault(match.group(2), []).append(int(match.group(1)))
    fams = []
    for kind, layers in sorted(by_kind.items()):
        short = kind.removeprefix("hook_").replace(".", "_")
        template = f"blocks.{{L}}.{kind}"
        fams.append(SiteFamily(f"latents_{short}", latent_hook_name(template, "acts_post"),
                               ("pos", "latent"), ("batch", "pos", "latent"), tuple(sorted(layers))))
        if error:
            fams.append(SiteFamily(f"errors_{short}", latent_hook_name(template, "error"),
                                   ("pos",), ("batch", "pos", "d_act"), tuple(sorted(layers))))
    return fams
