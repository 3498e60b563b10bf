"""Methods by name: the built-in ones, those installed under the `krunch.methods` entry-point group (so Ray
workers and the operator see them too), and those registered at run time with `@register`."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re

from krunch.methods.base import CompressionMethod

BUILTIN = {"none": "krunch.methods.quantize_only", "svd": "krunch.methods.svd", "tt": "krunch.methods.tt",
           "tucker": "krunch.methods.tucker", "cp": "krunch.methods.cp", "lqer": "krunch.methods.lqer"}  # fmt: skip
ENTRY_POINT_GROUP = "krunch.methods"
NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
QUANTIZE_ONLY = "none"  # the dense weight, quantized or kept as it is

_methods: dict[str, CompressionMethod] = {}
_loaded = False
log = logging.getLogger("krunch")


def register(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    """Class decorator: make a method available to recipes under `cls.name`."""
    if not (isinstance(cls, type) and issubclass(cls, CompressionMethod)):
        raise TypeError(f"{cls!r} is not a CompressionMethod subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"method name {name!r}: lower-case letters, digits and '-', starting with a letter")
    for attribute in ("description", "kinds"):
        if not hasattr(cls, attribute):
            raise ValueError(f"method {name}: missing class attribute {attribute!r}")
    existing = _methods.get(name)
    where = f"{cls.__module__}.{cls.__qualname__}"
    if existing is not None and f"{type(existing).__module__}.{type(existing).__qualname__}" != where:  # a re-import is fine
        raise ValueError(f"method {name!r} is already registered by {type(existing).__module__}.{type(existing).__qualname__}")
    _methods[name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a method registered at run time (tests, notebooks); built-ins stay."""
    if name in BUILTIN:
        raise ValueError(f"method {name!r} is built in")
    _methods.pop(name, None)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN.values():
        importlib.import_module(module)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()  # the module registers its methods with @register
        except Exception as err:  # noqa: BLE001 - a broken plugin must not take the built-ins down
            log.warning("krunch: method plugin %s (%s) failed to load: %s", entry.name, entry.value, err)


def get(name: str) -> CompressionMethod:
    """The method called `name`; ValueError listing the known ones otherwise."""
    _load()
    method = _methods.get(name)
    if method is None:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(repr(n) for n in names())}")
    return method


def names() -> list[str]:
    """Known method names, built-ins first."""
    _load()
    builtin = [n for n in BUILTIN if n in _methods]
    return builtin + sorted(set(_methods) - set(builtin))
