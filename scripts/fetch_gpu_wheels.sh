#!/usr/bin/env bash
# Download the wheels that the lent GPU machine lacks (it has no network) into .gpu_wheels/ (gitignored), for
# scripts/gpu_suite.py to install there with `pip install --no-index`. Run here, on a machine with PyPI:
#   bash scripts/fetch_gpu_wheels.sh [DIR]
# What the GPU image already has (torch 2.11, jax 0.11.2 + CUDA, transformers 5.17, accelerate, py-cpuinfo, numpy,
# pandas, pyarrow, xxhash, requests, tqdm, flax, optax, safetensors, tokenizers, ...; see the device tool's
# KINDS.md) is not fetched: torch, jax and the nvidia packages never are. Fetched: the reference auto-round 0.16.1
# and those of its requirements (and theirs) missing from that image: datasets (auto_round imports it at import
# time) with dill and multiprocess, pydantic with pydantic-core, annotated-types and typing-inspection; plus
# typing-extensions and fsspec, installed there only if the image's versions do not satisfy the pins
# (pydantic: typing-extensions>=4.16; datasets: fsspec<=2026.9.0). Pins match the project's test venv.
# The device tool carries at most 64 MiB of ignored paths: the script prints the folder's size.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.gpu_wheels}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$DIR"

WHEELS=(
  auto-round==0.16.1
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  fsspec==2026.9.0
)

PLATFORMS=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

# --no-deps: every needed wheel is named above (the GPU image provides the rest); one version of each.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DIR" "${WHEELS[@]}"

# Keep exactly one wheel per project (a stale second version would make the install ambiguous).
"$PY" - "$DIR" "${WHEELS[@]}" <<'EOF'
import os, re, sys
folder, wanted = sys.argv[1], sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
pins = {norm(w.split("==")[0]): w.split("==")[1] for w in wanted}
for f in sorted(os.listdir(folder)):
    if not f.endswith(".whl"):
        continue
    name, version = f.split("-")[:2]
    if pins.get(norm(name)) != version:
        os.remove(os.path.join(folder, f))
        print(f"removed stale {f}")
missing = set(pins) - {norm(f.split("-")[0]) for f in os.listdir(folder) if f.endswith(".whl")}
if missing:
    sys.exit(f"missing wheels: {sorted(missing)}")
EOF

ls -1 "$DIR"
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $(du -sk "$DIR" | cut -f1) KiB in $DIR (the device tool carries <= 64 MiB)"
