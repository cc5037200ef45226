"""Triton kernels for the NF4 format: one module per op (quantize, dequantize, gemv, gemm).

Importing this package needs Triton; ``nf4.ops`` imports it only when Triton is present and falls back to
the PyTorch reference path otherwise. Every kernel also runs under ``TRITON_INTERPRET=1`` on CPU tensors.
"""
