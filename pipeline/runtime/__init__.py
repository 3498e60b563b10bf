"""What a consumer needs to run a compressed model, and nothing else: it imports torch only.

The layers that replace dense ones, the quantized kernels they run on, and the registry that rebuilds a
layer from its JSON config (an allow-list), never by unpickling.
"""

from . import conv, linear, quantized  # noqa: F401  (registers the layer types)
from .base import CompressedLayer, QuantizedTensor, build_layer, layer_types, set_exact
from .decode import compile_decode, greedy_decode
from .kernels import Kernel
from .quant import QuantFormat

__all__ = ["CompressedLayer", "Kernel", "QuantFormat", "QuantizedTensor", "build_layer", "compile_decode", "greedy_decode", "layer_types", "set_exact"]
