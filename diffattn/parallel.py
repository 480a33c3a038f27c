"""diffattn under diffusers' context parallelism (``model.enable_parallelism(config=ContextParallelConfig(...))``).

Only Ulysses mode is supported: after diffusers' all-to-all each rank holds the *whole* sequence for ``H / P`` of
the heads, so a pattern defined on the full token layout applies unchanged and per-head parameters are sliced by
rank (rank ``r`` holds heads ``r * H/P ... (r+1) * H/P - 1``). Ring mode splits the keys across ranks and merges
partial results by log-sum-exp, so a method that replaces the attention core never sees the full keys: refused.

Everything diffattn reads from diffusers' parallel configuration is read here, so a diffusers change is fixed in
this one file. Two facts about diffusers' Ulysses path that diffattn's hooks rely on:

- the all-to-all concatenates the ranks' local sequences in rank order, so a sequence that each rank built as
  ``[its text shard | its visual shard]`` (joint attention of models whose plan splits both streams: Flux,
  Flux2, QwenImage) arrives as ``[text_0 | visual_0 | text_1 | visual_1 | ...]``; :func:`joint_order` gives the
  permutation to the layout's order ``[text | visual]`` (or ``[visual | text]``);
- a processor may call attention without the parallel config on purpose (Wan's cross-attention: local queries,
  all text keys), so that call sees only this rank's contiguous ``1/P`` of the queries.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ContextParallelError

__all__ = [
    "Ulysses",
    "ulysses_of",
    "model_ulysses",
    "processor_ulysses",
    "check_heads",
    "check_sequence_split",
    "text_split_with_visual",
    "joint_order",
]


@dataclass(frozen=True)
class Ulysses:
    """This rank's place in a Ulysses group: ``degree`` ranks, this one is ``rank`` (0-based)."""

    degree: int
    rank: int

    def head_offset(self, local_heads: int) -> int:
        """Index, among the layer's heads, of this rank's first head after the all-to-all."""
        return self.rank * local_heads

    def query_range(self, num_tokens: int) -> tuple[int, int]:
        """The contiguous tokens this rank holds of a sequence of ``num_tokens`` split evenly (diffusers'
        ``EquipartitionSharder``)."""
        size = num_tokens // self.degree
        return self.rank * size, (self.rank + 1) * size


def _context_config(parallel_config: Any) -> Any:
    """The ``ContextParallelConfig`` inside a diffusers ``ParallelConfig`` (or the config itself), else None."""
    if parallel_config is None:
        return None
    return getattr(parallel_config, "context_parallel_config", parallel_config)


def ulysses_of(parallel_config: Any, where: str = "the model") -> Ulysses | None:
    """The Ulysses group of a diffusers parallel config; ``None`` without context parallelism.

    Raises :class:`ContextParallelError` for modes diffattn methods cannot run under (ring, "anything" modes).
    """
    cp = _context_config(parallel_config)
    if cp is None or not hasattr(cp, "ulysses_degree"):
        return None
    ring, ulysses = int(cp.ring_degree or 1), int(cp.ulysses_degree or 1)
    if ring > 1:
        raise ContextParallelError(
            f"diffattn methods run under Ulysses context parallelism only, but {where} uses ring attention "
            f"(ring_degree={ring}, ulysses_degree={ulysses}). Ring attention splits the keys across ranks and merges "
            "partial results, so no rank ever sees the full sequence a pattern is defined on. Use "
            f"ContextParallelConfig(ulysses_degree={ring * ulysses}) (heads and sequence must divide by it), and "
            "data parallelism across nodes."
        )
    if getattr(cp, "ulysses_anything", False):
        raise ContextParallelError(
            f"{where} uses ulysses_anything=True (uneven head and sequence splits), which diffattn does not support "
            f"(Ulysses only, even splits): use ContextParallelConfig(ulysses_degree={ulysses}) with a head count and "
            "sequence length divisible by the degree."
        )
    if ulysses <= 1:
        return None
    rank = getattr(cp, "_ulysses_local_rank", None)
    if rank is None:
        raise ContextParallelError(
            f"{where} has a context-parallel config that was never set up (no Ulysses rank); enable parallelism with "
            "model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=...)) after "
            "torch.distributed.init_process_group."
        )
    return Ulysses(ulysses, int(rank))


def model_ulysses(model: torch.nn.Module) -> Ulysses | None:
    """The Ulysses group ``model.enable_parallelism`` set up, or ``None``."""
    return ulysses_of(getattr(model, "_parallel_config", None), type(model).__name__)


def check_heads(heads: int | None, ulysses: Ulysses, layer: str) -> None:
    if heads is not None and heads % ulysses.degree:
        raise ContextParallelError(
            f"{layer} has {heads} attention heads, which do not divide by ulysses_degree={ulysses.degree}: Ulysses "
            "gives each rank an equal share of the heads. Choose a degree that divides the head count."
        )


def check_sequence_split(
    model: torch.nn.Module, inputs: dict[str, Any], grid: tuple[int, ...], ulysses: Ulysses
) -> None:
    """Refuse, before diffusers splits anything, a sequence that cannot be split evenly across the ranks.

    The visual tokens are always split; so is every tensor the model's context-parallel plan splits at its input.
    """
    name = type(model).__name__
    degree = ulysses.degree
    visual = math.prod(grid)
    if visual % degree:
        raise ContextParallelError(
            f"{name}: {visual} visual tokens (grid {'x'.join(map(str, grid))}) do not split evenly across "
            f"ulysses_degree={degree} ranks. Choose a resolution or frame count whose token count divides by {degree}."
        )
    plan = getattr(model, "_cp_plan", None) or {}
    for arg, spec in (plan.get("") or {}).items():
        value = inputs.get(arg)
        split_dim = getattr(spec, "split_dim", None)
        if not isinstance(value, Tensor) or split_dim is None or getattr(spec, "split_output", False):
            continue
        expected = getattr(spec, "expected_dims", None)
        if expected is not None and value.ndim != expected:
            continue  # diffusers leaves it unsplit
        if value.shape[split_dim] % degree:
            raise ContextParallelError(
                f"{name}: `{arg}` has {value.shape[split_dim]} tokens along dim {split_dim}, which do not split evenly "
                f"across ulysses_degree={degree} ranks. Pad it to a multiple of {degree} (e.g. the prompt length for "
                "encoder_hidden_states) or choose another degree."
            )


def text_split_with_visual(model: torch.nn.Module) -> bool:
    """Whether the model's plan splits the text stream at its input (so joint sequences arrive rank-chunked)."""
    plan = getattr(model, "_cp_plan", None) or {}
    return "encoder_hidden_states" in (plan.get("") or {})


@functools.lru_cache(maxsize=32)
def _joint_order(text_len: int, num_visual: int, degree: int, text_first: bool) -> tuple[Tensor, Tensor]:
    t, n = text_len // degree, num_visual // degree
    chunk = torch.arange(degree).view(-1, 1) * (t + n)
    text = (chunk + (0 if text_first else n) + torch.arange(t)).flatten()
    visual = (chunk + (t if text_first else 0) + torch.arange(n)).flatten()
    order = torch.cat([text, visual] if text_first else [visual, text])
    return order, torch.argsort(order)


def joint_order(
    text_len: int, num_visual: int, degree: int, text_first: bool, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(order, inverse)`` for a joint sequence gathered by Ulysses from ``degree`` rank chunks, each
    ``[text_len/degree text | num_visual/degree visual]`` (or visual first): ``gathered[order]`` is in layout order,
    ``layout_ordered[inverse]`` is back in gathered order."""
    if text_len % degree or num_visual % degree:
        raise ContextParallelError(
            f"a joint sequence of {text_len} text and {num_visual} visual tokens does not split evenly across "
            f"ulysses_degree={degree} ranks"
        )
    order, inverse = _joint_order(text_len, num_visual, degree, text_first)
    return order.to(device), inverse.to(device)


def processor_ulysses(processor: Any, model: torch.nn.Module, layer: str, heads: int | None) -> Ulysses | None:
    """The Ulysses group a stock processor runs under in ``model``, after making sure it runs it.

    A processor installed after ``enable_parallelism`` still has ``_parallel_config=None`` and would attend within
    this rank's sequence shard: it inherits the model's config, as ``enable_parallelism`` would have set it. A
    processor without the attribute cannot run context parallelism at all: refused.
    """
    model_config = getattr(model, "_parallel_config", None)
    if _context_config(model_config) is None:
        return None
    model_ulysses(model)  # refuses ring and "anything" modes
    if not hasattr(processor, "_parallel_config"):
        raise ContextParallelError(
            f"{layer}: {type(model).__name__} runs context parallelism, but its stock processor "
            f"{type(processor).__name__} does not support it (no `_parallel_config`): it would attend within this "
            "rank's shard of the sequence only. Install the model's own diffusers processor (one that calls "
            "dispatch_attention_fn with parallel_config) before diffattn.apply."
        )
    if processor._parallel_config is None:
        processor._parallel_config = model_config
    ulysses = ulysses_of(processor._parallel_config, layer)
    if ulysses is not None:
        check_heads(heads, ulysses, layer)
    return ulysses
