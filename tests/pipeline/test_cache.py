from __future__ import annotations

import pytest

from krunch.cache import atomic_directory, cache_path


def test_atomic_directory_publishes_only_on_success(monkeypatch, tmp_path):
    monkeypatch.setenv("KRUNCH_CACHE_DIR", str(tmp_path))
    target = cache_path("models", "m")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as scratch:
            (scratch / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    with atomic_directory(target) as scratch:
        (scratch / "model.safetensors").write_bytes(b"x")
    assert (target / "model.safetensors").read_bytes() == b"x"
