"""Routing a ``dispatch_attention_fn`` processor to diffusers' native (SDPA) backend for one call, through the
processor's own ``_attention_backend`` attribute (never diffusers' process-global active backend), so that its
attention core is an SDPA call the interceptor can catch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["needs_native_override", "native_backend"]


def needs_native_override(processor: Any) -> bool:
    """Whether a call of ``processor`` must be routed to diffusers' native backend to reach SDPA."""
    if not hasattr(processor, "_attention_backend"):
        return False
    from diffusers.models.attention_dispatch import AttentionBackendName

    backend = processor._attention_backend
    return backend != AttentionBackendName.NATIVE and (backend is not None or not _active_backend_is_native())


def _active_backend_is_native() -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE


@contextlib.contextmanager
def native_backend(processor: Any) -> Iterator[None]:
    """Route a ``dispatch_attention_fn`` processor to diffusers' native (SDPA) backend for one call, through the
    processor's own ``_attention_backend`` (never diffusers' process-global active backend)."""
    if not hasattr(processor, "_attention_backend"):
        yield
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    native = AttentionBackendName.NATIVE
    previous = processor._attention_backend
    override = needs_native_override(processor)
    if override:
        processor._attention_backend = native
    try:
        yield
    finally:
        if override:
            processor._attention_backend = previous
