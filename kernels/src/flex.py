"""FlexAttention backend: PyTorch's ``flex_attention`` driven by the same ``BlockMask``, eager or compiled.

Eager flex on CPU evaluates ``mask_mod`` on the full score matrix (slow, but exact); compiled flex skips empty
blocks. Compilation is cached by torch per (dtype, heads, length, block size).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

__all__ = ["flex_block_attention"]


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.getcwd(), ".cache", "inductor"))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


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
    """
    if compiled and return_lse and q.device.type == "cpu":
        raise ValueError("compiled FlexAttention on CPU cannot return the log-sum-exp; call with return_lse=False")
    fn = _compiled_flex() if compiled else flex_attention
    enable_gqa = k.shape[1] != q.shape[1]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        if not return_lse:
            return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa), None
        out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_aux=AuxRequest(lse=True))
    lse = aux.lse.float()
    empty = torch.isneginf(lse) | torch.isnan(lse)
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))
