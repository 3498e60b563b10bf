#!/usr/bin/env bash
# Run the test suite, installing everything first if needed.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" for the quick tier.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
exec "${KRUNCH_VENV:-$root/.venv}/bin/python" -m pytest "$@"
