"""nn.Modules that replace dense layers; each is rebuilt from a JSON config (an allow-list), never unpickled."""

from pipeline.layers import conv, linear, quantized  # noqa: F401  (registers the layer types)
from pipeline.layers.base import CompressedLayer, build_layer, layer_types

__all__ = ["CompressedLayer", "build_layer", "layer_types"]
