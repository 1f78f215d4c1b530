"""Triton backends (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

The modules here import triton; this package file does not, so the public API imports them only when the
Triton backend is chosen.
"""
