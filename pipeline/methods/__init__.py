"""Compression methods as plugins: one module per method, registered by decorator, found by name.

The spec checks a rule against its method, the plan counts parameters, the allocator reads spectra and a
layer task builds the replacement, all through this registry; nothing else names a method. Importing it
loads no torch.

    from krunch.methods import CompressionMethod, LayerKind, register

    @register
    class Sparse(CompressionMethod):
        name, description, kinds = "sparse", "keep the largest weights", (LayerKind.LINEAR,)
        ...
"""

from krunch.methods.base import CompressionMethod, LayerKind
from krunch.methods.registry import QUANTIZE_ONLY, get, names, register, unregister

__all__ = ["QUANTIZE_ONLY", "CompressionMethod", "LayerKind", "get", "names", "register", "unregister"]
