"""How good is an SAE on held-out text: variance explained, sparsity, loss recovered, dead/dense.

`evaluate(model, sae, hook_name, tokens)` makes two kinds of passes over `tokens`:

1. **Activation statistics** (forward only up to the hook's layer): the activation `x` at every
   evaluated position, the SAE's latents `f = encode(x)` and reconstruction `x_hat`:

   - `fve`, fraction of variance explained: `1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`
     over all evaluated tokens (mean over the same tokens; SAELens's `explained_variance`);
   - `mse`: mean over tokens of `||x - x_hat||^2`; `relative_error`: `sqrt(sum||x-x_hat||^2 /
     sum||x||^2)`; `median_relative_error`: the median over tokens of `||x - x_hat|| / ||x||`.
   - `fve_typical`: the FVE over tokens whose norm is at most `outlier_factor` (10) times the
     median token norm; `n_outliers` tokens are left out. Sums over tokens can be dominated by
     a handful of tokens of enormous norm ("massive activations"): on 8128 held-out WikiText
     tokens, SmolLM2's residual stream at layer 15 has 2 tokens (after position 0) with ~170x
     the median norm that carry 88% of the summed squared norm. An SAE that reconstructs those
     gets `fve` near 1 whatever it does elsewhere; `fve_typical` and `median_relative_error`
     show the typical token;
   - `l0`: mean number of latents with `f > 0` per token;
   - `dead_fraction`: latents that never fire on these tokens; `dense_fraction`: latents that
     fire on more than `dense_threshold` (default 10%) of them. "Never" depends on how many
     tokens are evaluated: report `n_tokens` with it.

2. **Cross-entropy** (full forward passes) on the first `ce_contexts` contexts: the model's
   next-token loss clean, with the SAE's reconstruction spliced in (no error term), and with the
   activation zero-ablated, all at the evaluated positions; then

       ce_loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)

   1 means the reconstruction loses nothing; 0 means it is as bad as deleting the activation.
   Losses are averaged over the predictions made at the evaluated positions (earlier ones do
   not change). For an MLP output, zero ablation costs little, so the ratio is noisy.

**Evaluated positions.** Positions before `skip_first` are left out of everything, and left
untouched in the spliced and ablated runs. The default is the SAE's own
`cfg.metadata.seqpos_slice` start (interp's trained SAEs skip position 0, the attention sink of
a BOS-less model such as SmolLM2, whose norm is ~100x the others), else 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Int
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.hooks import zero_ablate
from interp.saes.activations import stop_layer

__all__ = ["Quality", "evaluate", "sae_skip_first"]

DENSE_THRESHOLD = 0.1
OUTLIER_FACTOR = 10.0


@dataclass(frozen=True)
class Quality:
    """An SAE's quality on a token set (see the module docstring for definitions).

    Attributes:
        fve: fraction of variance explained.
        mse: mean squared reconstruction error per token (sum over the vector).
        relative_error: `||x - x_hat|| / ||x||` over all tokens together.
        median_relative_error: median over tokens of `||x - x_hat|| / ||x||`.
        fve_typical: FVE without tokens of more than `outlier_factor` x the median norm.
        n_outliers: tokens left out of `fve_typical`.
        l0: mean active latents per token.
        ce_clean: next-token cross-entropy of the model.
        ce_sae: the same with the reconstruction spliced in (no error term).
        ce_zero: the same with the activation set to zero.
        ce_loss_recovered: `(ce_zero - ce_sae) / (ce_zero - ce_clean)`.
        dead_fraction: latents never active on the tokens.
        dense_fraction: latents active on more than `dense_threshold` of the tokens.
        dense_threshold: the firing rate above which a latent counts as dense.
        n_tokens: tokens in the activation statistics.
        n_ce_tokens: predictions in the cross-entropy numbers.
        skip_first: leading positions of each context left out.
        d_sae: number of latents.
    """

    fve: float
    mse: float
    relative_error: float
    median_relative_error: float
    fve_typical: float
    n_outliers: int
    l0: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_loss_recovered: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    n_tokens: int
    n_ce_tokens: int
    skip_first: int
    d_sae: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: FVE, L0, CE recovered, dead and dense fractions."""
        return (f"FVE {self.fve:.3f} (typical tokens {self.fve_typical:.3f}, median rel. error "
                f"{self.median_relative_error:.3f}) | L0 {self.l0:.1f} | CE recovered {self.ce_loss_recovered:.3f} "
                f"(clean {self.ce_clean:.3f}, SAE {self.ce_sae:.3f}, zero {self.ce_zero:.3f}) | "
                f"dead {self.dead_fraction:.3f} | dense {self.dense_fraction:.3f} | "
                f"{self.n_tokens} tokens")


def sae_skip_first(sae: SAE) -> int:
    """The first position an SAE was trained on: its metadata `seqpos_slice` start, else 0."""
    sl = sae.cfg.metadata.seqpos_slice
    if sl and len(sl) >= 1 and sl[0] is not None:
        return int(sl[0])
    return 0


@torch.no_grad()
def evaluate(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    tokens: Int[Tensor, "batch pos"],
    *,
    batch_size: int = 8,
    ce_contexts: int | None = None,
    skip_first: int | None = None,
    dense_threshold: float = DENSE_THRESHOLD,
    outlier_factor: float = OUTLIER_FACTOR,
) -> Quality:
    """Evaluate `sae` at `hook_name` of `model` on `tokens` (see the module docstring).

    Args:
        model: the model the SAE reads (no SAEs attached at `hook_name`).
        sae: the SAE.
        hook_name: where it reads.
        tokens: held-out contexts, e.g. `corpus_contexts(model, "heldout", ...)`.
        batch_size: contexts per forward pass.
        ce_contexts: how many of the contexts the cross-entropy passes use (default all).
        skip_first: leading positions left out (default: from the SAE's metadata).
        dense_threshold: firing rate above which a latent is dense.
        outlier_factor: tokens with norm above this times the median are left out of
            `fve_typical`.

    Raises:
        ValueError: unknown hook, or an SAE whose width does not match the activation.
    """
    if hook_name not in model.hook_dict:
        raise ValueError(f"{model.cfg.model_name} has no hook point {hook_name!r}.")
    skip = sae_skip_first(sae) if skip_first is None else int(skip_first)
    if not 0 <= skip < tokens.shape[1]:
        raise ValueError(f"skip_first={skip} must be in [0, {tokens.shape[1]}).")
    device = model.W_E.device
    stop = stop_layer([hook_name])

    sq_err = sq_norm = 0.0
    total = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n = 0
    active = 0.0
    token_x: list[Tensor] = []
    token_err: list[Tensor] = []
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size].to(device)
        _, cache = model.run_with_cache(batch, names_filter=[hook_name], stop_at_layer=stop)
        x = cache[hook_name][:, skip:]
        f = sae.encode(x.to(sae.dtype))
        x_hat = sae.decode(f)
        x_flat = x.flatten(2).reshape(-1, sae.cfg.d_in).double().cpu()
        err = (x_flat - x_hat.flatten(2).reshape(-1, sae.cfg.d_in).double().cpu())
        sq_err += err.pow(2).sum().item()
        token_x.append(x_flat.float())
        token_err.append(err.pow(2).sum(-1))
        sq_norm += x_flat.pow(2).sum().item()
        total += x_flat.sum(0)
        on = (f.reshape(-1, sae.cfg.d_sae) > 0).double().cpu()
        fires += on.sum(0)
        active += on.sum().item()
        n += x_flat.shape[0]
    variance = sq_norm - total.pow(2).sum().item() / n
    rates = fires / n
    xs, errs = torch.cat(token_x).double(), torch.cat(token_err)
    norms = xs.norm(dim=-1)
    typical = norms <= outlier_factor * norms.median()
    xt = xs[typical]
    var_t = (xt - xt.mean(0)).pow(2).sum().item()
    median_rel = (errs.sqrt() / norms.clamp(min=1e-12)).median().item()

    ce_tokens = tokens if ce_contexts is None else tokens[:ce_contexts]
    losses = {"clean": [], "sae": [], "zero": []}

    def splice(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()
        out[:, skip:] = sae.decode(sae.encode(act[:, skip:].to(sae.dtype))).to(act.dtype)
        return out

    zero = zero_ablate(model, hook_name, from_position=skip)

    for start in range(0, ce_tokens.shape[0], batch_size):
        batch = ce_tokens[start:start + batch_size].to(device)
        for name, hooks in (("clean", []), ("sae", [(hook_name, splice)]), ("zero", zero.fwd_hooks())):
            loss = model.run_with_hooks(batch, return_type="loss", loss_per_token=True, fwd_hooks=hooks)
            losses[name].append(loss[:, skip:].double().cpu().flatten())
    ce = {k: torch.cat(v).mean().item() for k, v in losses.items()}
    denom = ce["zero"] - ce["clean"]
    return Quality(
        fve=1.0 - sq_err / variance if variance > 0 else float("nan"),
        mse=sq_err / n,
        relative_error=math.sqrt(sq_err / sq_norm) if sq_norm > 0 else float("nan"),
        median_relative_error=median_rel,
        fve_typical=1.0 - errs[typical].sum().item() / var_t if var_t > 0 else float("nan"),
        n_outliers=int((~typical).sum()),
        l0=active / n,
        ce_clean=ce["clean"],
        ce_sae=ce["sae"],
        ce_zero=ce["zero"],
        ce_loss_recovered=(ce["zero"] - ce["sae"]) / denom if denom != 0 else float("nan"),
        dead_fraction=(rates == 0).double().mean().item(),
        dense_fraction=(rates > dense_threshold).double().mean().item(),
        dense_threshold=dense_threshold,
        n_tokens=n,
        n_ce_tokens=int(torch.cat(losses["clean"]).numel()),
        skip_first=skip,
        d_sae=sae.cfg.d_sae,
    )
