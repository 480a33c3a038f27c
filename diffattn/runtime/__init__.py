"""The runtime: diffusers hooks that run a stack of methods in place of an attention module's attention core.

Two kinds of named diffusers ``ModelHook`` (the registry diffusers' own layer-skip and cache hooks use):

- one :class:`ModelStateHook` (``"diffattn"``, :mod:`.model_hook`) on each denoiser that has at least one
  application: before every forward it reads where the denoising loop is (:mod:`.position`), the token grid and the
  role of each batch entry (:mod:`.call_state`), for this call and this thread only, and lets a batch-expanding
  application (guidance) change the batch;
- one :class:`AttentionHook` (``"diffattn.attention"``, :mod:`.attention_hook`) on each attention module some
  application selected, holding the applications on it (removing one removes its entries, the hook goes with the
  last). The stock processor object is never replaced: whatever processor the module has at call time (after
  ``set_attn_processor``, IP-Adapter loading or ``set_attention_backend``) runs, and a ``TorchFunctionMode``
  (:mod:`.interceptor`) catches its ``scaled_dot_product_attention`` call. Processors that go through diffusers'
  ``dispatch_attention_fn`` are routed to the native (SDPA) backend for that call through their own
  ``_attention_backend`` attribute (:mod:`.backend`; no process-global switch). A processor whose core is not an
  SDPA call raises :class:`InterceptionError` at that call. Under ``torch.compile`` the caught call becomes the
  custom op ``diffattn::attention_core`` (:mod:`.core_op`).

**Stacking.** Any number of applications (:mod:`.application`) on one model. On a call, the acting applications of
the module form a chain (:mod:`.chain`) ordered by :attr:`AttentionMethod.stack_level` (batch-expanding guidance 0,
editing 1, kernel-level methods 2; ties in the order they were applied): each method's ``ctx.dense(q, k, v)`` calls
the next one, the last one the stock attention core. Removing an application removes exactly its own hooks.

**Threads.** Per-call state lives in thread-local storage and the interception mode is per thread, so two pipelines
(two models) in two threads do not see each other. One model called from two threads at once is not supported.

**Memory.** Records are bounded (:mod:`.records`): the last :data:`RECENT_CALLS` call records, the set of (step,
layer) pairs acted on, and per-layer metric sums.
"""

from __future__ import annotations

from .application import Application, BatchExtension, LayerInfo
from .attention_hook import ATTENTION_HOOK, AttentionHook, Entry, attach_entry, detach_application
from .call_state import CallState
from .model_hook import MODEL_HOOK, ModelState, ModelStateHook, drop_state_if_unused, existing_state, model_state
from .position import LoopPosition, declared_branches, denoising_step, loop_position, prompt_branches
from .records import RECENT_CALLS, CallRecord, Records

__all__ = [
    "CallRecord",
    "Records",
    "CallState",
    "ModelState",
    "Application",
    "AttentionHook",
    "ModelStateHook",
    "BatchExtension",
    "Entry",
    "LayerInfo",
    "MODEL_HOOK",
    "ATTENTION_HOOK",
    "RECENT_CALLS",
    "attach_entry",
    "detach_application",
    "model_state",
    "existing_state",
    "drop_state_if_unused",
    "LoopPosition",
    "denoising_step",
    "loop_position",
    "prompt_branches",
    "declared_branches",
]
