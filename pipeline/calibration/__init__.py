"""Calibration: the Gram matrices of each layer's inputs, and error-propagating block-by-block refits."""
