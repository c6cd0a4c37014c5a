#!/usr/bin/env bash
# Smoke of the main job's path in the runtime-only venv (.venv-runtime, made by `scripts/setup.sh --runtime`):
# convert-gguf of the embedded SmolLM2, a chat generation, a plain-RTN quantize of every block and an AutoRound
# tuning of one block, both exported as auto_round and read back (generate, perplexity, convert). Offline; about
# 2 minutes on 2 cores. Fails on any error, on torch being importable, or on transformers' noise in the output.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv-runtime}
py="$venv/bin/python"
cli="$venv/bin/autoround-jax"
export HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export AUTOROUND_JAX_CACHE="$work/cache"
log="$work/log"
t0=$SECONDS

fail() { echo "smoke: FAILED: $*" >&2; exit 1; }
step() { echo "smoke: [$((SECONDS - t0)) s] $*"; }
run() { "$@" >"$log.step" 2>&1 || { cat "$log.step" >&2; fail "$*"; }; cat "$log.step" | tee -a "$log"; }

if "$py" -c "import torch" 2>/dev/null; then fail "torch is importable in $venv: not a runtime-only environment"; fi

step "convert-gguf"
run "$cli" convert-gguf "$work/smollm2"
step "chat generation (float)"
run "$cli" generate --model "$work/smollm2" --prompt "What is the capital of France?" --max_new_tokens 8
grep -q '[A-Za-z]' "$log.step" || fail "empty generation"

step "quantize: plain RTN W4G128, every block, auto_round export"
run "$cli" --model "$work/smollm2" --iters 0 --disable_opt_rtn --model_dtype fp32 --output_dir "$work/rtn"
export_dir="$work/rtn/smollm2-w4g128"
[ -f "$export_dir/quantization_config.json" ] || fail "no auto_round export in $export_dir"
step "reload the export: generate, perplexity, convert"
run "$cli" generate --model "$export_dir" --prompt "What is the capital of France?" --max_new_tokens 8
grep -q '[A-Za-z]' "$log.step" || fail "empty generation from the export"
run "$cli" perplexity --model "$export_dir" --seqlen 256 --max_tokens 1024
"$py" - "$log.step" <<'PY' || fail "perplexity of the RTN export is not a sane number"
import re, sys
m = re.search(r"perplexity ([0-9.]+) \((\d+) tokens scored", open(sys.argv[1]).read())
assert m and 1 < float(m.group(1)) < 200 and int(m.group(2)) == 1020, m and m.groups()
PY
run "$cli" convert "$export_dir" "$work/gptq" --to auto_gptq

step "quantize: AutoRound, block 0 only (2 iterations on fortunes), auto_round export + perplexity"
run "$cli" --model "$work/smollm2" --to_quant_block_names model.layers.0 --iters 2 --nsamples 2 --seqlen 64 \
  --batch_size 2 --dataset fortunes --model_dtype fp32 --output_dir "$work/tuned"
run "$cli" perplexity --model "$work/tuned/smollm2-w4g128" --seqlen 256 --max_tokens 512

if grep -E "PyTorch was not found|Token indices sequence length|Traceback" "$log" >&2; then
  fail "noise or a traceback in the output above"
fi
step "ok"
