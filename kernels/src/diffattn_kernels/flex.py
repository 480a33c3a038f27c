"""FlexAttention backend: PyTorch's ``flex_attention`` driven by the same ``BlockMask``, eager or compiled.

Eager flex on CPU evaluates ``mask_mod`` on the full score matrix (slow, but exact); compiled flex skips empty
blocks. Compilation is cached by torch per (dtype, heads, length, block size); each new shape is a recompile, so
compiled calls run with dynamo's ``recompile_limit`` raised to :data:`RECOMPILE_LIMIT` for their duration only
(past the default 8, torch would silently fall back to eager). Nothing here changes a process-wide setting: set
``TORCHINDUCTOR_CACHE_DIR`` yourself to keep inductor's cache out of the system temp folder.

Backward: FlexAttention has one on CUDA (eager and compiled), none on CPU; a CPU call whose q, k or v requires
grad raises :class:`~.errors.KernelUnsupportedError` (use the ``torch`` backend).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from .errors import GRAD_ALTERNATIVE, KernelUnsupportedError, needs_grad

__all__ = ["RECOMPILE_LIMIT", "flex_block_attention"]

RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


def _recompile_room(compiled: bool) -> contextlib.AbstractContextManager:
    """Room for one compile per shape, for this call only (inside a caller's own torch.compile: nothing to do)."""
    if not compiled or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch._dynamo.config.patch(recompile_limit=limit)


def flex_block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    compiled: bool = False,
    return_lse: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(out, lse)`` with lse float32 (B, H, Sq); rows with no allowed key give 0 and lse ``-inf``.

    Compiled flex on CPU cannot return the log-sum-exp (torch 2.13): ask with ``return_lse=False`` (lse is None).
    Differentiable on CUDA; on CPU, refuses inputs that require grad.
    """
    if compiled and return_lse and q.device.type == "cpu":
        raise ValueError("compiled FlexAttention on CPU cannot return the log-sum-exp; call with return_lse=False")
    if q.device.type == "cpu":
        if needs_grad(q, k, v):
            raise KernelUnsupportedError(
                "FlexAttention has no backward on CPU (q, k or v requires grad); " + GRAD_ALTERNATIVE
            )
        # grad mode is off, so no graph would be built; torch refuses CPU inputs that merely require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    fn = _compiled_flex() if compiled else flex_attention
    enable_gqa = k.shape[1] != q.shape[1]
    with warnings.catch_warnings(), _recompile_room(compiled):
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        if not return_lse:
            return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa), None
        out, aux = fn(
            q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_aux=AuxRequest(lse=True)
        )
    lse = aux.lse.float()
    empty = torch.isneginf(lse) | torch.isnan(lse)
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))
