"""Plain-PyTorch definitions of the zoo's vision models (torchvision cannot be used here)."""
