"""Dependencies: pyproject.toml's lower bounds and extras against constraints.txt's exact pins, and a core that
really is enough to compress, save and load a model in process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonical(name)] = Version(version)
    return pins


def requirements() -> dict[str, list[Requirement]]:
    groups = {"core": [Requirement(r) for r in PROJECT["dependencies"]]}
    groups |= {extra: [Requirement(r) for r in reqs] for extra, reqs in PROJECT["optional-dependencies"].items()}
    return groups


def test_every_requirement_is_pinned_within_its_bounds_and_every_pin_is_required():
    pins, groups = constraints(), requirements()
    named = set()
    for extra, reqs in groups.items():
        for req in reqs:
            if canonical(req.name) == "krunch":
                assert extra == "all" and req.extras == {"ray", "mlflow", "operator", "zoo"}, req
                continue
            named.add(canonical(req.name))
            pinned = pins.get(canonical(req.name))
            assert pinned is not None, f"{req} ({extra}) has no pin in constraints.txt"
            assert req.specifier.contains(pinned), f"constraints.txt pins {req.name}=={pinned}, outside {req} ({extra})"
            assert not any(spec.operator == "==" for spec in req.specifier), f"{req} ({extra}): an exact pin belongs in constraints.txt"
    assert set(pins) == named, f"pins nothing requires: {sorted(set(pins) - named)}"


def test_the_core_alone_compresses_saves_and_loads_in_process(tmp_path):
    """Run the API on a plain module and list the distributions whose modules it loaded: all must be core."""
    code = f"""
import importlib.metadata as md, json, sys, torch, krunch
from torch import nn
result = krunch.compress(nn.Sequential(nn.Linear(64, 64)), {{"rules": [{{"match": "*", "method": "svd", "rank": {{"fixed": 8}}}}],
                         "quantize": {{"bits": 8}}}}, progress=False)
krunch.save(result, {str(tmp_path / "m")!r})
krunch.load({str(tmp_path / "m")!r}, model=nn.Sequential(nn.Linear(64, 64)))
owners = md.packages_distributions()
print(json.dumps(sorted({{d for m in list(sys.modules) for d in owners.get(m.split(".")[0], [])}})))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True, cwd="/")
    loaded = {canonical(d) for d in json.loads(done.stdout.splitlines()[-1])} - {"krunch"}
    allowed = {canonical(r.name) for r in requirements()["core"]}
    transitive = {"typing-extensions", "annotated-types", "pydantic-core", "typing-inspection", "sympy", "mpmath",
                  "networkx", "jinja2", "markupsafe", "filelock", "fsspec", "setuptools", "pip", "charset-normalizer"}  # fmt: skip
    assert loaded - allowed - transitive == set()
