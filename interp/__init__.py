"""interp: a mechanistic-interpretability workbench built on TransformerLens.

Start with `interp.models.load()` (the default embedded model, offline) and `interp.hooks`.
"""

__version__ = "0.1.0"
