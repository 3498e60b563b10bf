#!/usr/bin/env bash
# The main job, from a fresh checkout: install if needed, then run krunch.
# With no arguments: compress SmolLM2-135M to int8 and evaluate it before and
# after on held-out Wikipedia; results in results/smollm2-int8/.  Any arguments are
# passed to the krunch CLI instead, e.g. scripts/demo.sh eval zoo:minilm-l6.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
krunch="${KRUNCH_VENV:-$root/.venv}/bin/krunch"
if [[ $# -eq 0 ]]; then
  mkdir -p results
  set -- compress examples/smollm2-int8.yaml --out results/smollm2-int8
fi
exec "$krunch" "$@"
