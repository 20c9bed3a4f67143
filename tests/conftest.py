"""Shared fixtures. The embedded models' HF references are loaded once per session (dequantising
a GGUF file takes 20-70 s on 2 cores); converted HookedTransformers come from interp's cache."""

from __future__ import annotations

import os

# Shapes: every annotation in interp and experiments is checked at run time: beartype checks the
# types (an int passes for a float, PEP 484's numeric tower), jaxtyping the named dimensions,
# consistently within each call. The hook must be installed before either package is imported.
# INTERP_TYPECHECK=0 turns it off.
if os.environ.get("INTERP_TYPECHECK", "1") != "0":
    from jaxtyping import install_import_hook

    install_import_hook(
        ["interp", "experiments"],
        "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))",
    )

import pytest  # noqa: E402
import torch  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig

from interp import models
from interp.attribution.metrics import LogitDiff


@pytest.fixture(scope="session")
def hf_reference():
    """name -> (HF model, HF tokenizer) of an embedded model, loaded on first use."""
    loaded: dict[str, tuple] = {}

    def get(name: str):
        if name not in loaded:  # both embedded models together fit in ~2 GB
            loaded[name] = models.load_hf(name)
        return loaded[name]

    yield get
    loaded.clear()


@pytest.fixture(scope="session")
def default_model():
    """The default embedded model, processed, float32, CPU (shared: do not leave hooks on it)."""
    model = models.load(models.DEFAULT_MODEL, device="cpu")
    yield model
    model.reset_hooks()


@pytest.fixture(scope="session")
def load_or_skip():
    """`load_or_skip(name, **kwargs)`: `models.load(name, **kwargs)`, or skip the test when the
    model cannot be loaded here (an optional model package not installed). Under CI
    (`CI=true` in the environment) the failure fails the test instead: there every model the
    suite names must load, and a silent skip would hide a broken install."""

    def load(name: str, **kwargs):
        try:
            return models.load(name, **kwargs)
        except models.ModelLoadError as err:
            if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
                pytest.fail(f"{name} cannot be loaded under CI (CI=true): {err}")
            pytest.skip(f"{name} not available: {err}")

    return load


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _runtime_type_checks(request):
    """Runtime type checks stay on, except in tests marked `unchecked`: those pass a wrongly
    typed value on purpose to check interp's own error message (what a user sees, since users
    run without the checker)."""
    if request.node.get_closest_marker("unchecked") is None:
        yield
        return
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


def _random_pairs(model, batch=3, pos=6, seed=0):
    """Random clean/corrupt token batches, random answers, metric normalised on this model."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupt = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    answer = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    wrong = (answer + 1) % model.cfg.d_vocab
    return clean, corrupt, LogitDiff(answer, wrong).normalised(model, clean, corrupt)


@pytest.fixture
def random_pairs():
    return _random_pairs


@pytest.fixture
def linear_model() -> HookedTransformer:
    """No normalisation; W_Q = W_K = 0 so every attention pattern is the fixed uniform causal
    one; W_in = b_in = 0 so each MLP writes a constant. The logits are then affine in every
    activation (and in the embeddings), so first-order estimates must be exact."""
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16,
                                  d_vocab=50, act_fn="gelu", normalization_type=None, seed=1)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.attn.W_Q, block.attn.W_K, block.attn.b_Q, block.attn.b_K,
                      block.mlp.W_in, block.mlp.b_in):
                p.zero_()
    return model.eval()


@pytest.fixture
def device() -> str:
    """`"cuda"` for the tests marked `cuda`; the test is skipped where torch sees no CUDA GPU
    (a CPU-only torch build, or no driver)."""
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA GPU visible to torch {torch.__version__} "
                    f"(built with CUDA {torch.version.cuda or 'none'})")
    return "cuda"


def write_tiny_chat_model(path, tokenizer, n_layers: int = 4, seed: int = 0):
    """Save a random-initialised Llama (d_model 64, `n_layers` layers, 4 heads, 2 KV heads) with
    `tokenizer` (and its chat template) as a local Hugging Face directory that `models.load(path)`
    reads. End-to-end runs of the studies need a real tokenizer (single-token names, a chat
    template) but not a trained model; this one converts in about a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, default_model):
    """A local HF directory holding a tiny random Llama with the default model's tokenizer
    (`write_tiny_chat_model`); pass `str(tiny_chat_model_dir)` as `--model`."""
    return write_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chat",
                                 default_model.tokenizer)
