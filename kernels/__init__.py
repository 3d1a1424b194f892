"""Attention and gather/scatter kernels for tokdrop, with their pure-PyTorch references, and the
dispatcher that picks a backend for them.

Installed as ``tokdrop.kernels``; imports nothing from the rest of tokdrop.
"""

from .backends import (
    ENV_VAR,
    Backend,
    active_backend,
    attention,
    attention_varlen,
    backend_names,
    current_backend,
    register_backend,
    resolve_backend,
    use_backend,
)
from .rows import drop_tokens, drop_tokens_reference, restore_tokens, restore_tokens_reference
from .subset_attention import attention_reference, attention_reference_varlen

__all__ = [
    "ENV_VAR",
    "Backend",
    "active_backend",
    "attention",
    "attention_reference",
    "attention_reference_varlen",
    "attention_varlen",
    "backend_names",
    "current_backend",
    "drop_tokens",
    "drop_tokens_reference",
    "register_backend",
    "resolve_backend",
    "restore_tokens",
    "restore_tokens_reference",
    "use_backend",
]
