"""Studies: one module per study, each a thin script over `interp` (see `experiments.registry`)."""
