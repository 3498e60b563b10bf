#!/usr/bin/env bash
# The peers of scripts/bench_inference.py, each in a virtual environment of its own, so krunch's pins are
# untouched: torchao (weight-only int8/int4 on the same torch) and llama.cpp (llama-cpp-python, built from
# source with this machine's cmake and gcc: about 40-75 minutes on 2 cores, once; later runs reuse it).
#   scripts/bench_peers.sh [torchao|llama|all]     # default all; prints each venv's python
set -euo pipefail
root="${KRUNCH_BENCH_PEERS:-${XDG_CACHE_HOME:-$HOME/.cache}/krunch/bench-peers}"
python="${PYTHON:-python3}"
which="${1:-all}"
pip_flags=(--disable-pip-version-check -q)

make_venv() {  # name, then pip arguments; a stamp makes a second run a no-op
  local name="$1"; shift
  local venv="$root/$name" stamp="$root/$name/.installed-$(echo "$*" | sha256sum | cut -c1-12)"
  if [[ ! -f "$stamp" ]]; then
    echo "bench peers: installing $name into $venv" >&2
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip "${pip_flags[@]}" install "$@"
    touch "$stamp"
  fi
  echo "$name $venv/bin/python"
}

if [[ "$which" == torchao || "$which" == all ]]; then
  make_venv torchao torch==2.13.0 torchao==0.18.0 transformers==5.23.0 safetensors psutil
fi
if [[ "$which" == llama || "$which" == all ]]; then
  # the sdist vendors llama.cpp, whose convert_hf_to_gguf.py turns the fp32 checkpoint into a GGUF
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    make_venv llama llama-cpp-python==0.3.36 gguf==0.19.0 numpy transformers==5.23.0 torch==2.13.0 safetensors sentencepiece psutil
fi
