"""Pure decompositions: a weight tensor in, factors out. No modules, no I/O, no Ray, no MLflow."""


def tensorly_pytorch():
    """tensorly on the PyTorch backend, imported only when decomposing: the layers that hold
    the factors must load without it (a registered model's consumers have torch, not tensorly)."""
    import tensorly as tl
    import tensorly.decomposition

    tl.set_backend("pytorch")
    return tl
