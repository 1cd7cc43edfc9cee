"""Triton kernels, one op per module. Import lazily: importing triton is not free, and on
machines without it the package still works through the PyTorch reference."""
