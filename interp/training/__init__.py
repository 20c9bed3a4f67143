"""Fine-tuning a HookedTransformer: data, losses, parameter scopes and the training loop.

- `interp.training.data`: `Example` (tokens + loss mask), `sft_examples` (chat template, loss
  on the response), `text_chunks` / `text_examples` (forget and retain sets from articles),
  `preference_pairs` (DPO), `collate` (right padding with masks).
- `interp.training.losses`: SFT cross-entropy, gradient ascent, gradient difference, NPO,
  KL to a reference, DPO; `objective` runs a named one on a model.
- `interp.training.scopes`: `Full`, `Named` (globs / regexes on parameter names), `Masked` /
  `Indexed` / `needle` (single rows and columns, bit-for-bit elsewhere), `LoRA` (mergeable).
- `interp.training.loop`: `TrainConfig`, `train`, `TrainingResult` (checkpoints, resume).

Fine-tuned models are saved and loaded by name with `interp.models.save_variant` /
`interp.models.load(name, variant=...)`; permanent, recorded weight edits are in `interp.edits`.
"""

from interp.training.data import (
    Batch,
    Example,
    PreferencePair,
    collate,
    preference_pairs,
    sft_example,
    sft_examples,
    text_chunks,
    text_examples,
)
from interp.training.loop import StepInfo, TrainConfig, TrainingResult, train
from interp.training.losses import (
    OBJECTIVES,
    cross_entropy,
    dpo,
    gradient_ascent,
    gradient_difference,
    kl_to_reference,
    npo,
    sequence_logprobs,
)
from interp.training.scopes import (
    Full,
    Indexed,
    LoRA,
    Masked,
    Named,
    has_lora,
    merge_lora,
    needle,
    remove_lora,
)

__all__ = [
    "OBJECTIVES", "Batch", "Example", "Full", "Indexed", "LoRA", "Masked", "Named",
    "PreferencePair", "StepInfo", "TrainConfig", "TrainingResult", "collate", "cross_entropy",
    "dpo", "gradient_ascent", "gradient_difference", "has_lora", "kl_to_reference",
    "merge_lora", "needle", "npo", "preference_pairs", "remove_lora", "sequence_logprobs",
    "sft_example", "sft_examples", "text_chunks", "text_examples", "train",
]
