"""Sparse autoencoders: load, attach, train offline, evaluate, inspect features.

SAELens 6 provides the SAE classes and the training runner; this package adds what it lacks for
an offline workbench on `interp.models` models:

- `load`: pretrained SAEs by SAELens release/id (fails fast offline), local SAE directories;
- `attach`: splice SAEs into a `HookedTransformer` with a gradient-exact error term, latents as
  model hook points (`<hook>.hook_sae_acts_post`);
- `corpus`, `activations`, `train`: corpus contexts, on-disk activation caches, training with
  SAELens's runner (`train_sae`) or trainer (`train_on_activations`), `train_or_load` (the
  SAEs of a study: loaded when saved before with the same settings, else trained);
- `quality`: held-out FVE, L0, CE loss recovered, dead and dense latents;
- `features`, `pages`: top-activating contexts, density, decoder logit lens, HTML pages.
"""

from interp.saes.activations import ActivationCacheInfo, cache_activations, load_activations
from interp.saes.attach import (
    SAE_HOOK_POINTS,
    Attachment,
    attach,
    attached_saes,
    detach,
    latent_hook_name,
)
from interp.saes.corpus import HELDOUT_FILES, TRAIN_FILES, corpus_contexts, corpus_tokens
from interp.saes.features import (
    Context,
    FeatureReport,
    FeatureStats,
    activation_density,
    feature_stats,
    inspect_features,
    logit_lens,
    top_contexts,
)
from interp.saes.load import (
    HubUnreachableError,
    SAELoadError,
    SAENotFoundError,
    list_local,
    load_local,
    load_pretrained,
    load_sae,
    saes_dir,
)
from interp.saes.pages import write_feature_pages
from interp.saes.quality import Quality, evaluate
from interp.saes.train import (
    TrainReport,
    to_inference,
    train_on_activations,
    train_or_load,
    train_sae,
    training_architectures,
)

__all__ = [
    "SAE_HOOK_POINTS",
    "ActivationCacheInfo",
    "Attachment",
    "Context",
    "FeatureReport",
    "FeatureStats",
    "HELDOUT_FILES",
    "HubUnreachableError",
    "Quality",
    "SAELoadError",
    "SAENotFoundError",
    "TRAIN_FILES",
    "TrainReport",
    "activation_density",
    "attach",
    "attached_saes",
    "cache_activations",
    "corpus_contexts",
    "corpus_tokens",
    "detach",
    "evaluate",
    "feature_stats",
    "inspect_features",
    "latent_hook_name",
    "list_local",
    "load_activations",
    "logit_lens",
    "load_local",
    "load_pretrained",
    "load_sae",
    "saes_dir",
    "to_inference",
    "top_contexts",
    "train_on_activations",
    "train_or_load",
    "train_sae",
    "training_architectures",
    "write_feature_pages",
]
