"""Attention and gather/scatter kernels for tokdrop, with their pure-PyTorch references.

Installed as ``tokdrop.kernels``; imports nothing from the rest of tokdrop.
"""

from .attention import BACKENDS, attention, attention_reference, register_backend, resolve_backend
from .rows import drop_tokens, drop_tokens_reference, restore_tokens, restore_tokens_reference

__all__ = [
    "BACKENDS",
    "attention",
    "attention_reference",
    "drop_tokens",
    "drop_tokens_reference",
    "register_backend",
    "resolve_backend",
    "restore_tokens",
    "restore_tokens_reference",
]
