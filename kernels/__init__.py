"""Attention and gather/scatter kernels for tokdrop, with their pure-PyTorch references.

Installed as ``tokdrop.kernels``; imports nothing from the rest of tokdrop.
"""

from .attention import BACKENDS, attention, attention_reference, resolve_backend

__all__ = ["BACKENDS", "attention", "attention_reference", "resolve_backend"]
