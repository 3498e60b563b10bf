#!/usr/bin/env bash
# The main job, from a fresh checkout: install if needed, then run krunch.
# With no arguments: the baseline evaluation of SmolLM2-135M (perplexity on
# held-out Wikipedia), table on stdout, JSON in results/.  Any arguments are
# passed to the krunch CLI instead, e.g. scripts/demo.sh eval zoo:minilm-l6.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
krunch="${KRUNCH_VENV:-$root/.venv}/bin/krunch"
if [[ $# -eq 0 ]]; then
  mkdir -p results
  set -- eval zoo:smollm2-135m --task perplexity --json results/baseline-smollm2-135m.json
fi
exec "$krunch" "$@"
