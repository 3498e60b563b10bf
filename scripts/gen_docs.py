#!/usr/bin/env python
"""Regenerate docs/recipe_reference.md from the spec models' field descriptions.

    python scripts/gen_docs.py           # write it
    python scripts/gen_docs.py --check   # exit 1 if the committed file has drifted from the models
"""

from __future__ import annotations

import argparse
import sys

from krunch.spec_reference import REFERENCE_PATH, render


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    text = render()
    if parser.parse_args().check:
        if not REFERENCE_PATH.is_file() or REFERENCE_PATH.read_text(encoding="utf-8") != text:
            print(f"{REFERENCE_PATH} is out of date with krunch.spec; run scripts/gen_docs.py", file=sys.stderr)
            return 1
        return 0
    REFERENCE_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {REFERENCE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
