#!/usr/bin/env python
"""SmolLM2's fp32 checkpoint as a llama.cpp GGUF of a given type, with llama.cpp's own tools: the
convert_hf_to_gguf.py vendored in llama-cpp-python's sdist (to f32), then llama_model_quantize.
Runs in the llama.cpp peer environment (scripts/bench_peers.sh llama).

    python scripts/gguf_convert.py HF_DIR Q8_0|Q4_0|Q4_K_M|Q3_K_M|... OUT.gguf   # a llama_cpp LLAMA_FTYPE_MOSTLY_ name
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"


def vendored_llama_cpp(cache: Path) -> Path:
    """The llama.cpp source tree inside the sdist, unpacked once."""
    tree = next(cache.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if tree is not None:
        return tree
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", scratch, SDIST],
                       check=True, timeout=600)  # fmt: skip
        archive = next(Path(scratch).glob("*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
    return next(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))


def main() -> None:
    hf_dir, kind, target = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    tree = vendored_llama_cpp(target.parent)
    f32 = target.parent / "smollm2-135m-f32.gguf"
    if not f32.is_file():
        env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py"), "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32", "--outfile", str(f32)],
                       check=True, env=env, timeout=1200)  # fmt: skip
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = 2
    scratch = target.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(scratch).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize to {kind} failed")
    scratch.rename(target)


if __name__ == "__main__":
    main()
