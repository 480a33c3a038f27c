"""The chain that runs the stacked methods of one attention-module call on its SDPA core: the token layouts of the
call, the checks under context parallelism (query shards, head slices, the joint reorder), and the methods from the
outermost in, each method's ``ctx.dense`` calling the next one and the last one's the stock core."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import parallel
from ..context import AttentionContext
from ..errors import ContextParallelError, InterceptionError, LayoutError
from ..layout import TokenLayout
from .application import Application
from .call_state import CallState

if TYPE_CHECKING:
    from .attention_hook import Entry

IMAGE_PROMPT = "image_prompt"  # the role of an extra SDPA call in a cross-attention module

__all__ = ["MethodChain"]

Layouts = tuple[TokenLayout, TokenLayout, tuple[int, int] | None]  # (query, key, query range)


class MethodChain:
    """The acting methods of one attention-module call, outermost first; the last one's ``dense`` is the stock core."""

    def __init__(
        self,
        entries: list[Entry],
        call_state: CallState,
        ulysses: parallel.Ulysses | None,
        heads: int | None,
        processor: Any,
        text_call: int = 1,
    ) -> None:
        self.entries = entries
        self.call_state = call_state
        self.ulysses = ulysses
        self.heads = heads
        self.processor = processor
        self.layer = entries[0].layer
        self.state = entries[0].application.state
        self.sdpa_calls = 0  # SDPA calls caught in this module call so far
        self.text_call = text_call  # which of them attends the text, in a cross-attention module

    def __call__(self, sdpa: Any, call: dict[str, Any]) -> Tensor:
        """Run the chain on one intercepted SDPA call (``call``: its arguments by name)."""
        q, k, v = call.pop("query"), call.pop("key"), call.pop("value")
        self.sdpa_calls += 1
        if self.layer.role == "cross" and self.sdpa_calls != self.text_call:
            return self._extra_call(sdpa, q, k, v, call)
        if call["is_causal"]:
            raise InterceptionError(f"{self.layer.name}: causal attention is not supported by diffattn methods")
        q_layout, kv_layout, q_range = self._layouts(q.shape[-2], k.shape[-2])
        masked_rows = _to_key_padding(call)
        positional = self._positional_methods()
        self._check_query_shard(q_range, positional, q.shape[-2], q_layout)
        local_heads = q.shape[1]
        split = self._heads_split(q_range, local_heads)
        inverse = None
        if split and q_layout.text_len and positional:
            q, k, v, inverse = self._to_layout_order(q, k, v, call, q_layout, self.ulysses)
        shared = self._shared_context(call, (q_layout, kv_layout, q_range), local_heads, split)
        shared.update(self._entry_facts(q.shape[0]))
        run = _ChainRun(self, sdpa, call, shared, num_q=q.shape[-2], num_kv=k.shape[-2])
        out = run(0, q, k, v)
        self._check_all_ran(run.ran)
        if inverse is not None:
            out = out.index_select(-2, inverse)
        if masked_rows is not None:  # what the stock call gives a query that sees no key
            empty = sdpa(q[:1, :1, :1], k[:1, :1, :1], v[:1, :1, :1], attn_mask=masked_rows.new_zeros(1, 1, 1, 1))
            out = torch.where(masked_rows[:, None, :, None], empty.to(out.dtype), out)
        return out

    def _extra_call(self, sdpa: Any, q: Tensor, k: Tensor, v: Tensor, call: dict[str, Any]) -> Tensor:
        """A further SDPA call inside a cross-attention module (IP-Adapter's image-prompt attention: its keys are
        image-prompt tokens, not the text): role ``image_prompt``, which no method acts on; the stock core runs."""
        for entry in self.entries:
            entry.application.records.record(self.call_state.step, self.layer.name, IMAGE_PROMPT, acted=False)
        return sdpa(q, k, v, **call)

    # ------------------------------------------------------------------------------------------------------------
    # Layouts
    # ------------------------------------------------------------------------------------------------------------
    def _layouts(self, num_q: int, num_kv: int) -> Layouts:
        """(query layout, key layout, query range): the range is set when the call holds only this rank's queries."""
        base = self.call_state.grid
        role = self.layer.role
        if self.layer.axes == "temporal":  # the frames of one pixel
            grid: tuple[int, ...] = base[:1]
        elif self.layer.axes == "per_frame":  # one frame's (h, w) at this layer's resolution level
            grid = self.state.adapter.grid_for_length(base[1:], num_q, self.layer.name)
        else:
            grid = base if role == "joint" else self.state.adapter.grid_for_length(base, num_q, self.layer.name)
        visual = TokenLayout(grid)
        if role == "self":
            return self._self_layouts(num_q, num_kv, visual)
        if role == "cross":
            return self._cross_layouts(num_q, num_kv, visual)
        return self._joint_layouts(num_q, num_kv, visual, grid)

    def _self_layouts(self, num_q: int, num_kv: int, visual: TokenLayout) -> Layouts:
        if num_q != visual.num_tokens or num_kv != visual.num_tokens:
            raise self._mismatch(num_q, num_kv, visual)
        return visual, visual, None

    def _cross_layouts(self, num_q: int, num_kv: int, visual: TokenLayout) -> Layouts:
        ulysses = self.ulysses
        text = TokenLayout((), text_len=num_kv)
        if num_q == visual.num_tokens:
            return visual, text, None
        if ulysses is not None and num_q * ulysses.degree == visual.num_tokens:
            return visual, text, ulysses.query_range(visual.num_tokens)  # e.g. Wan: local queries, all text
        raise self._mismatch(num_q, num_kv, visual)

    def _joint_layouts(self, num_q: int, num_kv: int, visual: TokenLayout, grid: tuple[int, ...]) -> Layouts:
        text_len = num_q - visual.num_tokens
        if text_len < 0 or num_kv != num_q:
            raise self._mismatch(num_q, num_kv, visual)
        joint = TokenLayout(grid, text_len=text_len, text_first=self.layer.text_first)
        return joint, joint, None

    def _mismatch(self, num_q: int, num_kv: int, visual: TokenLayout) -> LayoutError:
        where = f"{self.layer.name} ({self.layer.role} attention)"
        if self.ulysses is not None:
            return LayoutError(
                f"{where}: the attention call has {num_q} query and {num_kv} key tokens, but the layout derived from "
                f"the model inputs is {visual.describe()} and the model runs context parallelism "
                f"(ulysses_degree={self.ulysses.degree}). This usually means the processor "
                f"{type(self.processor).__name__} attended within this rank's 1/{self.ulysses.degree} of the sequence "
                "instead of running diffusers' Ulysses attention: install a processor that passes its "
                "`_parallel_config` to dispatch_attention_fn."
            )
        return LayoutError(
            f"{where}: the attention call has {num_q} query and {num_kv} key tokens, which does not fit the layout "
            f"derived from the model inputs ({visual.describe()}). If the sequence is sharded (context parallelism), "
            f"use Ulysses mode; otherwise the adapter entry for {type(self.state.model).__name__} is wrong for this "
            "model."
        )

    # ------------------------------------------------------------------------------------------------------------
    # Context parallelism
    # ------------------------------------------------------------------------------------------------------------
    def _positional_methods(self) -> list[str]:
        """Names of the chained methods whose output depends on where tokens sit."""
        return [e.application.method.name for e in self.entries if not e.application.method.position_free]

    def _check_query_shard(
        self, q_range: tuple[int, int] | None, positional: list[str], num_q: int, q_layout: TokenLayout
    ) -> None:
        """A call that holds only this rank's queries runs position-free methods only."""
        if q_range is not None and positional:
            raise ContextParallelError(
                f"{self.layer.name} ({self.layer.role} attention): under context parallelism diffusers runs this call "
                f"on this rank's {num_q} of {q_layout.num_tokens} queries (without the all-to-all), but "
                f"{', '.join(positional)} needs all of them. "
                "Leave this layer out (layers=... or the method's roles=...)."
            )

    def _heads_split(self, q_range: tuple[int, int] | None, local_heads: int) -> bool:
        """Whether the call holds a Ulysses slice of the layer's heads (checked to be the expected share)."""
        ulysses = self.ulysses
        split = ulysses is not None and q_range is None and self.heads != local_heads
        if split and self.heads is not None and local_heads * ulysses.degree != self.heads:
            raise InterceptionError(
                f"{self.layer.name}: the attention call has {local_heads} heads; Ulysses over {ulysses.degree} ranks "
                f"of a {self.heads}-head layer should leave {self.heads // ulysses.degree}"
            )
        return split

    def _to_layout_order(
        self, q: Tensor, k: Tensor, v: Tensor, call: dict[str, Any], layout: TokenLayout, ulysses: parallel.Ulysses
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The all-to-all concatenated the ranks' ``[text shard | visual shard]`` joint sequences: put q, k, v (and
        the stock mask, in ``call``) in layout order. Returns them and the index that restores the gathered order."""
        if not parallel.text_split_with_visual(self.state.model):
            raise ContextParallelError(
                f"{self.layer.name}: under context parallelism diffattn knows where the text tokens of joint attention "
                "sit only when the model's _cp_plan splits encoder_hidden_states together with the visual tokens "
                f"(Flux, Flux2, QwenImage); {type(self.state.model).__name__}'s plan does not."
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

    # ------------------------------------------------------------------------------------------------------------
    # Running the methods
    # ------------------------------------------------------------------------------------------------------------
    def _shared_context(self, call: dict[str, Any], layouts: Layouts, local_heads: int, split: bool) -> dict[str, Any]:
        """The :class:`AttentionContext` fields every method of this call gets alike."""
        q_layout, kv_layout, q_range = layouts
        ulysses = self.ulysses
        return dict(
            role=self.layer.role,
            q_layout=q_layout,
            kv_layout=kv_layout,
            attn_mask=call["attn_mask"],
            scale=call["scale"],
            enable_gqa=call["enable_gqa"],
            head_offset=ulysses.head_offset(local_heads) if split else 0,
            total_heads=local_heads * ulysses.degree if split else None,
            q_range=q_range,
            timestep=self.call_state.timestep_1000,
            input_grid=self.call_state.grid,
        )

    def _entry_facts(self, call_batch: int) -> dict[str, Any]:
        """Batch roles and branches of this call's entries: the model's, each repeated for the frames (per-frame
        layers: entry b * F + f) or pixels (temporal layers: entry b * hw + p) a video UNet folds into the batch."""
        roles, branches = self.call_state.batch_roles, self.call_state.branches
        model_batch = len(roles) if roles is not None else (len(branches) if branches is not None else None)
        if self.layer.axes == "all" or model_batch is None:
            return dict(batch_roles=roles, branches=branches)
        if call_batch % model_batch:
            raise LayoutError(
                f"{self.layer.name}: a {self.layer.axes} attention call of batch {call_batch} does not fold the "
                f"model's {model_batch} entries"
            )
        repeat = call_batch // model_batch

        def spread(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
            return None if values is None else tuple(v for v in values for _ in range(repeat))

        return dict(batch_roles=spread(roles), branches=spread(branches))

    def _check_all_ran(self, ran: set[int]) -> None:
        """Every chained method ran: an outer one that computes the whole core without ``ctx.dense`` is refused."""
        skipped = [self.entries[i].application.method.name for i in range(len(self.entries)) if i not in ran]
        if skipped:
            outer = self.entries[min(ran)].application.method.name
            raise InterceptionError(
                f"{self.layer.name}: {outer} computed the whole attention core without calling ctx.dense, so "
                f"{', '.join(skipped)} (applied inside it) never ran. Two methods that each replace the core do not "
                "compose: give them different layers (layers=...) or steps, or combine their patterns in one method "
                "(e.g. SparseAttention(Intersection(...)))."
            )


class _ChainRun:
    """One run of a chain on one SDPA call: ``run(index, q, k, v)`` runs method ``index`` (its ``ctx.dense`` runs
    ``index + 1``), ``ran`` collects the indices that ran."""

    def __init__(
        self, chain: MethodChain, sdpa: Any, call: dict[str, Any], shared: dict[str, Any], num_q: int, num_kv: int
    ) -> None:
        self.chain = chain
        self.sdpa = sdpa
        self.call = call  # the stock call's arguments besides q, k, v
        self.shared = shared
        self.num_q = num_q
        self.num_kv = num_kv
        self.ran: set[int] = set()

    def __call__(self, index: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if index == len(self.chain.entries) or q.shape[-2] != self.num_q or k.shape[-2] != self.num_kv:
            # the stock core; a call with other token counts (e.g. PAG's one-key identity) is not on the layout
            # the inner methods act on, so it goes straight there
            return self.sdpa(q, k, v, **self.call)
        self.ran.add(index)
        entry = self.chain.entries[index]
        application = entry.application
        layer = entry.layer.name
        ctx = self._context(index, application, layer)
        _validate_once(application, ctx)
        out = application.method(q, k, v, ctx)
        _check_output(application, layer, out, q, v)
        self._record(application, layer)
        return out

    def _context(self, index: int, application: Application, layer: str) -> AttentionContext:
        call_state = self.chain.call_state
        return AttentionContext(
            layer=layer,
            step=call_state.step,
            num_steps=call_state.num_steps,
            application_id=application.id,
            dense=lambda a, b, c: self(index + 1, a, b, c),
            report=lambda **metrics: application.records.report(layer, metrics),
            **self.shared,
        )

    def _record(self, application: Application, layer: str) -> None:
        call_state = self.chain.call_state
        application.records.record(call_state.step, layer, self.chain.layer.role, acted=True)
        call_state.acted[application.id] = call_state.acted.get(application.id, 0) + 1


def _to_key_padding(call: dict[str, Any]) -> Tensor | None:
    """A boolean mask that is the outer product of one validity vector (``valid_q & valid_k``: padded text tokens
    neither attend nor are attended, HunyuanVideo 1.5) becomes in ``call`` the key-padding mask of the same vector;
    returns the ``(B, S)`` query rows that see no key (their output is then the stock one), else ``None``. The other
    rows are bitwise the same under either mask."""
    mask = call.get("attn_mask")
    if (
        mask is None
        or mask.dtype != torch.bool
        or mask.ndim != 4
        or mask.shape[1] != 1
        or mask.shape[-1] != mask.shape[-2]
    ):
        return None
    valid = mask[:, 0].any(-2)  # (B, S): keys some query sees
    rows = mask[:, 0].any(-1)
    if not torch.equal(rows, valid) or bool(valid.all()):
        return None
    if not torch.equal(mask[:, 0], valid[:, :, None] & valid[:, None, :]):
        return None
    call["attn_mask"] = valid[:, None, None, :].expand(mask.shape)
    return ~valid


def _validate_once(application: Application, ctx: AttentionContext) -> None:
    """The method's own checks, once per (layer, query layout, key layout)."""
    key = (ctx.layer, ctx.q_layout, ctx.kv_layout)
    if key not in application.validated:
        application.method.validate(ctx)
        application.validated.add(key)


def _check_output(application: Application, layer: str, out: Tensor, q: Tensor, v: Tensor) -> None:
    expected = (*q.shape[:-1], v.shape[-1])
    if tuple(out.shape) != expected or out.dtype != q.dtype:
        raise InterceptionError(
            f"{application.method.name} returned {tuple(out.shape)} {out.dtype} on {layer}; the attention "
            f"core must return {expected} {q.dtype}"
        )
