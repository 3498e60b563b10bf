#!/usr/bin/env python
"""Regenerate the CompressionJob CRD from the pipeline's spec model (operators/crd.py).

    python scripts/gen_crd.py           # write helm/krunch/crds/compressionjobs.krunch.dev.yaml
    python scripts/gen_crd.py --check   # exit 1 if the committed file has drifted from the model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from krunch.operator.crd import CRD_PATH, render  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = CRD_PATH.read_text(encoding="utf-8") if CRD_PATH.is_file() else ""
        if current != text:
            print(f"{CRD_PATH} is out of date with krunch.spec; run scripts/gen_crd.py", file=sys.stderr)
            return 1
        return 0
    CRD_PATH.parent.mkdir(parents=True, exist_ok=True)
    CRD_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {CRD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
