"""Shared fixtures: tiny models and pipelines built from configs (no downloads), reused by every test module."""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


@functools.cache
def _cached_model(family: str) -> torch.nn.Module:
    from diffattn.testing import tiny_model  # after HF_HUB_OFFLINE is set above

    return tiny_model(family, seed=0)


@pytest.fixture
def tiny_model():
    """Factory: the tiny model of a family (cached per session, processors restored after each test)."""
    used = []

    def make(family: str) -> torch.nn.Module:
        model = _cached_model(family)
        used.append((model, {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}))
        return model

    yield make
    import diffattn

    for model, processors in used:
        diffattn.remove(model)
        for name, module in model.named_modules():
            if name in processors:
                module.set_processor(processors[name])


@contextlib.contextmanager
def global_attention_backend_restored():
    """diffusers' set_attention_backend also changes a global setting that reset_attention_backend keeps."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    try:
        yield
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)
