"""krunch's compression library: load, decompose, quantize, evaluate, register.

This package never imports Kubernetes code; the operator lives in `operators`.
"""

__version__ = "0.1.0"
