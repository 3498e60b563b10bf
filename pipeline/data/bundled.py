"""Where the bundled data files live inside installed packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from krunch.errors import DataError


def package_root(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(module, "package with the bundled data is not installed; run scripts/setup.sh")
    return Path(next(iter(spec.submodule_search_locations)))


def gensim_test_file(name: str) -> Path:
    path = package_root("gensim") / "test" / "test_data" / name
    if not path.is_file():
        raise DataError(str(path), "bundled gensim test data file is missing; reinstall gensim==4.4.0")
    return path


WIKIPEDIA_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
