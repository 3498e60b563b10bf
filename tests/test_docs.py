"""Generated documentation matches its sources."""

from __future__ import annotations

from krunch.spec_reference import REFERENCE_PATH, render


def test_the_recipe_reference_is_generated_from_the_spec():
    assert REFERENCE_PATH.read_text(encoding="utf-8") == render(), "run scripts/gen_docs.py"
    assert "| `activationAware` | bool | `False` |" in render()
