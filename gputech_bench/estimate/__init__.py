"""Predict memory without a GPU (fake-tensor traces) and search for the fastest setup that fits."""
