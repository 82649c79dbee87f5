"""Triton kernels for LoRDS. They know shapes and dtypes only: no models, no configs."""
