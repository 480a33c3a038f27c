"""The diffattn processor: wraps a module's stock diffusers processor and replaces only its attention core.

The stock processor still projects q/k/v, normalises, applies rotary embeddings, joins text and image tokens and
projects out. While a method acts on a call, a ``TorchFunctionMode`` catches the processor's
``scaled_dot_product_attention`` and hands ``(q, k, v, ctx)`` to the method instead. Processors that go through
diffusers' ``dispatch_attention_fn`` are routed to the ``native`` backend for that call, so the core is an SDPA
call whichever backend the model is set to (flex, xformers, flash, sage); under context parallelism the native
backend's Ulysses all-to-all runs first, so the method sees the full sequence for this rank's heads (see
:mod:`diffattn.parallel`). A processor whose core is still not an SDPA call (e.g. the xformers UNet processor)
raises :class:`InterceptionError` instead of running without the method.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import parallel
from .context import AttentionContext, Role
from .errors import ContextParallelError, InterceptionError, LayoutError
from .layout import TokenLayout

if TYPE_CHECKING:
    from .runtime import RunState

__all__ = ["DiffattnProcessor", "unwrap_processor"]

logger = logging.getLogger(__name__)

_SDPA = F.scaled_dot_product_attention
_SDPA_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
        for n, d in (
            ("query", inspect.Parameter.empty),
            ("key", inspect.Parameter.empty),
            ("value", inspect.Parameter.empty),
            ("attn_mask", None),
            ("dropout_p", 0.0),
            ("is_causal", False),
            ("scale", None),
            ("enable_gqa", False),
        )
    ]
)


def unwrap_processor(processor: Any) -> Any:
    """The stock processor under any diffattn wrapping."""
    while isinstance(processor, DiffattnProcessor):
        processor = processor.inner
    return processor


@contextlib.contextmanager
def _native_backend(inner: Any) -> Iterator[None]:
    """Route a ``dispatch_attention_fn`` processor to diffusers' native (SDPA) backend for one call."""
    from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend

    native = AttentionBackendName.NATIVE
    previous = getattr(inner, "_attention_backend", None)
    override = previous is not None and previous != native
    if override:
        inner._attention_backend = native
    try:
        with attention_backend(native):
            yield
    finally:
        if override:
            inner._attention_backend = previous


class _CoreInterceptor(TorchFunctionMode):
    """Replaces SDPA calls made inside one stock processor call by the processor's method."""

    def __init__(
        self, processor: DiffattnProcessor, step: int, ulysses: parallel.Ulysses | None, heads: int | None
    ) -> None:
        super().__init__()
        self.processor = processor
        self.step = step
        self.ulysses = ulysses
        self.heads = heads
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: A002 (torch's name)
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        self.calls += 1
        bound = _SDPA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        return self.processor._attend(func, dict(bound.arguments), self.step, self.ulysses, self.heads)


class DiffattnProcessor:
    """Attention processor that runs ``method`` in place of the stock processor's attention core.

    Install it through :func:`diffattn.apply` (or ``model.set_attn_processor(handle.processors)``). Attributes that
    diffusers sets on processors (``_attention_backend``, ``_parallel_config``) pass through to the stock processor,
    and so does every other attribute read; ``inspect.signature(processor.__call__)`` is the stock one, so diffusers
    keeps passing keyword arguments such as ``image_rotary_emb``.
    """

    def __init__(self, inner: Any, *, layer: str, role: Role, text_first: bool, run: RunState) -> None:
        inner = unwrap_processor(inner)
        vars(self).update(inner=inner, layer=layer, role=role, text_first=text_first, _run=run)
        stock_call = type(inner).__call__

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return DiffattnProcessor.__call__(self, *args, **kwargs)

        __call__.__signature__ = inspect.signature(stock_call)  # type: ignore[attr-defined]
        vars(self)["__call__"] = types.MethodType(__call__, self)

    # -- attributes diffusers reads or sets on processors ---------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        inner = vars(self).get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_attention_backend", "_parallel_config"):
            setattr(self.inner, name, value)
        else:
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"DiffattnProcessor({self._run.method.name} on {self.layer} [{self.role}], stock={type(self.inner).__name__})"

    # -- the call ------------------------------------------------------------------------------------------------
    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = self._run
        heads = getattr(attn, "heads", None)
        # Before the step check: a processor installed after enable_parallelism must get the parallel config even on
        # steps where the method does not act.
        ulysses = parallel.processor_ulysses(self.inner, run.model, self.layer, heads)
        step = run.step
        if not run.acts_at(step):
            run.record(step, self.layer, self.role, acted=False)
            return self.inner(attn, *args, **kwargs)
        interceptor = _CoreInterceptor(self, step, ulysses, heads)
        with _native_backend(self.inner), interceptor:
            out = self.inner(attn, *args, **kwargs)
        if interceptor.calls == 0:
            raise InterceptionError(
                f"{self.layer}: the stock processor {type(self.inner).__name__} computed attention without "
                "torch.nn.functional.scaled_dot_product_attention (e.g. xformers or a manual softmax), so "
                f"{run.method.name} could not replace it. Restore an SDPA processor first (for UNets: "
                "model.set_default_attn_processor() or pipe.disable_xformers_memory_efficient_attention()), then "
                "apply diffattn again."
            )
        return out

    def _layouts(
        self, num_q: int, num_kv: int, ulysses: parallel.Ulysses | None
    ) -> tuple[TokenLayout, TokenLayout, tuple[int, int] | None]:
        """(query layout, key layout, query range): the range is set when the call holds only this rank's queries."""
        run = self._run
        base = run.grid
        if base is None:
            raise LayoutError(
                f"{self.layer}: no token grid is known; the model's forward hook did not run. Call the model "
                "(or pipeline) itself rather than its submodules, after diffattn.apply."
            )
        if self.role == "joint":
            grid = base
        else:
            grid = run.adapter.grid_for_length(base, num_q, self.layer)
        visual = TokenLayout(grid)
        if self.role == "self":
            if num_q != visual.num_tokens or num_kv != visual.num_tokens:
                raise self._mismatch(num_q, num_kv, visual, ulysses)
            return visual, visual, None
        if self.role == "cross":
            text = TokenLayout((), text_len=num_kv)
            if num_q == visual.num_tokens:
                return visual, text, None
            if ulysses is not None and num_q * ulysses.degree == visual.num_tokens:
                return visual, text, ulysses.query_range(visual.num_tokens)  # e.g. Wan: local queries, all text
            raise self._mismatch(num_q, num_kv, visual, ulysses)
        text_len = num_q - visual.num_tokens
        if text_len < 0 or num_kv != num_q:
            raise self._mismatch(num_q, num_kv, visual, ulysses)
        joint = TokenLayout(grid, text_len=text_len, text_first=self.text_first)
        return joint, joint, None

    def _mismatch(self, num_q: int, num_kv: int, visual: TokenLayout, ulysses: parallel.Ulysses | None) -> LayoutError:
        if ulysses is not None:
            return LayoutError(
                f"{self.layer} ({self.role} attention): the attention call has {num_q} query and {num_kv} key tokens, "
                f"but the layout derived from the model inputs is {visual.describe()} and the model runs context "
                f"parallelism (ulysses_degree={ulysses.degree}). This usually means the stock processor "
                f"{type(self.inner).__name__} attended within this rank's 1/{ulysses.degree} of the sequence "
                "instead of running diffusers' Ulysses attention: install a processor that passes its "
                "`_parallel_config` to dispatch_attention_fn."
            )
        return LayoutError(
            f"{self.layer} ({self.role} attention): the attention call has {num_q} query and {num_kv} key tokens, "
            f"which does not fit the layout derived from the model inputs ({visual.describe()}). If the sequence is "
            "sharded (context parallelism), use Ulysses mode; otherwise the adapter entry for "
            f"{type(self._run.model).__name__} is wrong for this model."
        )

    def _attend(
        self, sdpa: Any, call: dict[str, Any], step: int, ulysses: parallel.Ulysses | None, heads: int | None
    ) -> Tensor:
        run = self._run
        method = run.method
        q, k, v = call.pop("query"), call.pop("key"), call.pop("value")
        if call["is_causal"]:
            raise InterceptionError(f"{self.layer}: causal attention is not supported by diffattn methods")
        q_layout, kv_layout, q_range = self._layouts(q.shape[-2], k.shape[-2], ulysses)
        if q_range is not None and not method.position_free:
            raise ContextParallelError(
                f"{self.layer} ({self.role} attention): under context parallelism diffusers runs this call on this "
                f"rank's {q.shape[-2]} of {q_layout.num_tokens} queries (without the all-to-all), but {method.name} "
                "needs all of them. Leave this layer out (layers=... or the method's roles=...)."
            )
        # After diffusers' Ulysses all-to-all this call holds the whole sequence for q.shape[1] of the layer's heads.
        local_heads = q.shape[1]
        split = ulysses is not None and q_range is None and heads != local_heads
        if split and heads is not None and local_heads * ulysses.degree != heads:
            raise InterceptionError(
                f"{self.layer}: the attention call has {local_heads} heads; Ulysses over {ulysses.degree} ranks of a "
                f"{heads}-head layer should leave {heads // ulysses.degree}"
            )
        inverse = None
        if split and q_layout.text_len and not method.position_free:
            q, k, v, inverse = self._to_layout_order(q, k, v, call, q_layout, ulysses)

        def dense(q_: Tensor, k_: Tensor, v_: Tensor) -> Tensor:
            return sdpa(q_, k_, v_, **call)

        ctx = AttentionContext(
            layer=self.layer,
            role=self.role,
            step=step,
            num_steps=run.num_steps,
            q_layout=q_layout,
            kv_layout=kv_layout,
            batch_roles=run.batch_roles,
            attn_mask=call["attn_mask"],
            scale=call["scale"],
            enable_gqa=call["enable_gqa"],
            dense=dense,
            report=lambda **metrics: run.report(self.layer, metrics),
            head_offset=ulysses.head_offset(local_heads) if split else 0,
            total_heads=local_heads * ulysses.degree if split else None,
            q_range=q_range,
            timestep=run.timestep,
            input_grid=run.grid,
        )
        key = (self.layer, q_layout, kv_layout)
        if key not in run.validated:
            method.validate(ctx)
            run.validated.add(key)
        out = method(q, k, v, ctx)
        expected = (*q.shape[:-1], v.shape[-1])
        if tuple(out.shape) != expected or out.dtype != q.dtype:
            raise InterceptionError(
                f"{method.name} returned {tuple(out.shape)} {out.dtype} on {self.layer}; the attention core must "
                f"return {expected} {q.dtype}"
            )
        if inverse is not None:
            out = out.index_select(-2, inverse)
        run.record(step, self.layer, self.role, acted=True)
        return out

    def _to_layout_order(
        self, q: Tensor, k: Tensor, v: Tensor, call: dict[str, Any], layout: TokenLayout, ulysses: parallel.Ulysses
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The all-to-all concatenated the ranks' ``[text shard | visual shard]`` joint sequences: put q, k, v (and the
        stock mask, in ``call``) in layout order. Returns them and the index that restores the gathered order."""
        if not parallel.text_split_with_visual(self._run.model):
            raise ContextParallelError(
                f"{self.layer}: under context parallelism diffattn knows where the text tokens of joint attention sit "
                "only when the model's _cp_plan splits encoder_hidden_states together with the visual tokens (Flux, "
                f"Flux2, QwenImage); {type(self._run.model).__name__}'s plan does not."
            )
        order, inverse = parallel.joint_order(
            layout.text_len, layout.num_visual, ulysses.degree, layout.text_first, q.device
        )
        mask = call["attn_mask"]
        if mask is not None:
            n = q.shape[-2]
            if mask.shape[-1] == n:
                mask = mask.index_select(-1, order)
            if mask.ndim >= 2 and mask.shape[-2] == n:
                mask = mask.index_select(-2, order)
            call["attn_mask"] = mask
        q, k, v = (x.index_select(-2, order) for x in (q, k, v))
        return q, k, v, inverse
