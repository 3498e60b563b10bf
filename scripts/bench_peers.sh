#!/usr/bin/env bash
# The peers of scripts/bench_inference.py and scripts/bench_quality.py, each in a virtual environment of its
# own, so krunch's pins are untouched: torchao (weight-only int8/int4 on the same torch), llama.cpp
# (llama-cpp-python, built from source with this machine's cmake and gcc: about 40-75 minutes on 2 cores,
# once; later runs reuse it), HQQ, NNCF and llm-compressor (4-bit weight quantizers, for the quality table).
#   scripts/bench_peers.sh [torchao|llama|hqq|nncf|llmcompressor|all]     # default all; prints each venv's python
set -euo pipefail
root="${KRUNCH_BENCH_PEERS:-${XDG_CACHE_HOME:-$HOME/.cache}/krunch/bench-peers}"
python="${PYTHON:-python3}"
which="${1:-all}"
pip_flags=(--disable-pip-version-check -q)

make_venv() {  # name, then pip arguments; a stamp (of the arguments and CMAKE_ARGS) makes a second run a no-op
  local name="$1"; shift
  local venv="$root/$name" stamp="$root/$name/.installed-$(echo "$* ${CMAKE_ARGS:-}" | sha256sum | cut -c1-12)"
  if [[ ! -f "$stamp" ]]; then
    echo "bench peers: installing $name into $venv" >&2
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip "${pip_flags[@]}" install "$@"
    rm -f "$venv"/.installed-*
    touch "$stamp"
  fi
  echo "$name $venv/bin/python"
}

if [[ "$which" == torchao || "$which" == all ]]; then
  make_venv torchao torch==2.13.0 torchao==0.18.0 transformers==5.23.0 safetensors psutil
fi
if [[ "$which" == hqq || "$which" == all ]]; then
  make_venv hqq torch==2.13.0 hqq==0.2.8 transformers==5.23.0 safetensors psutil
fi
if [[ "$which" == nncf || "$which" == all ]]; then
  make_venv nncf torch==2.13.0 nncf==3.4.0 transformers==5.23.0 safetensors psutil
fi
if [[ "$which" == llmcompressor || "$which" == all ]]; then  # its own transformers pin (5.17): a venv of its own
  make_venv llmcompressor torch==2.13.0 llmcompressor==0.14.0.1 safetensors psutil
fi
if [[ "$which" == llama || "$which" == all ]]; then
  # The sdist vendors llama.cpp, whose convert_hf_to_gguf.py turns the fp32 checkpoint into a GGUF.
  # Not GGML_NATIVE: this CPU reports AMX and AVX512-FP16, and a native build dies with an illegal
  # instruction in its first decode; AVX-512 with VNNI and BF16 is what it runs. --no-cache-dir: never
  # reuse a wheel built with other flags.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    make_venv llama --no-cache-dir --force-reinstall llama-cpp-python==0.3.36 gguf==0.19.0 numpy transformers==5.23.0 \
      torch==2.13.0 safetensors sentencepiece psutil
fi
