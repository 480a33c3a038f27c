"""One method applied to one denoiser: its schedule, selected layers, records, and whether it acts in a call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..context import Role
from ..errors import LayoutError, StepSelectionError
from ..layout import TokenLayout
from ..methods.base import AttentionMethod
from ..schedule import StepSchedule
from .call_state import CallState
from .ids import next_id
from .records import Records

if TYPE_CHECKING:
    from .model_hook import ModelState

__all__ = ["Application", "BatchExtension", "LayerInfo"]


class BatchExtension(Protocol):
    """Changes the batch of every model forward (e.g. guidance appends perturbed copies of the conditional entries).

    ``pre_forward`` runs after the forward's position, grid and batch roles are known (it reports the roles of the
    entries it appends with :meth:`CallState.extend_batch`) and ``post_forward`` on the output.
    ``active(call_state)`` says whether the application's method acts in this forward (e.g. only on extended batches).
    """

    def active(self, call_state: CallState) -> bool: ...

    def pre_forward(
        self, call_state: CallState, module: torch.nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]: ...

    def post_forward(self, call_state: CallState, module: torch.nn.Module, output: Any) -> Any: ...


@dataclass(frozen=True)
class LayerInfo:
    name: str
    role: Role
    text_first: bool
    axes: str = "all"  # see RoleRule.axes


class Application:
    """One method applied to one denoiser: its schedule, selected layers, hooks and records."""

    def __init__(
        self, state: ModelState, method: AttentionMethod, schedule: StepSchedule, layers: dict[str, LayerInfo]
    ) -> None:
        self.id = next_id()
        self.state = state
        self.method = method
        self.schedule = schedule
        self.layers = layers
        self.records = Records()
        self.extension: BatchExtension | None = None
        self.validated: set[tuple[str, TokenLayout, TokenLayout]] = set()
        self._checked_loop: tuple | None = None

    def on_schedule(self, call_state: CallState) -> bool:
        """Whether the schedule selects this forward's step (checked once per loop: a schedule that selects no step
        that will run raises :class:`StepSelectionError`)."""
        position = call_state.position
        loop = (position.num_steps, position.timesteps)
        if loop != self._checked_loop and (position.num_steps is not None or position.timesteps is not None):
            self.schedule.check_selects(
                position.num_steps, position.timesteps, f"{self.method.name} on {type(self.state.model).__name__}"
            )
            self._checked_loop = loop
        timestep = position.timestep if position.timestep is not None else call_state.timestep_1000
        try:
            return self.schedule.is_active(position.step, position.num_steps, timestep)
        except StepSelectionError as error:
            if position.why_unknown is None:
                raise
            raise StepSelectionError(
                f"{error} (the running pipeline's loop was not used: {position.why_unknown})"
            ) from None

    def acts(self, call_state: CallState) -> bool:
        """Whether the method acts in this forward (decided once per forward, not per attention module)."""
        decided = call_state.decisions.get(self.id)
        if decided is None:
            decided = (self.extension is None or self.extension.active(call_state)) and self.on_schedule(call_state)
            if decided:
                self._check_facts(call_state)
            call_state.decisions[self.id] = decided
        return decided

    def _check_facts(self, call_state: CallState) -> None:
        """Raise when this forward lacks a fact the method declares it needs (``requires_step``/``requires_roles``)."""
        where = f"{self.method.name} on {type(self.state.model).__name__}"
        position = call_state.position
        if self.method.requires_step and (position.step is None or position.num_steps is None):
            reason = f" ({position.why_unknown})" if position.why_unknown else ""
            raise StepSelectionError(
                f"{where} needs the denoising step and the number of steps of each model call, and this call has "
                f"none{reason}. Call the model through a diffusers pipeline, or wrap each call in "
                "`with diffattn.denoising_step(i, num_steps):` (or diffusers' model.cache_context with step_index and "
                "num_inference_steps)"
            )
        if self.method.requires_roles and call_state.batch_roles is None:
            raise LayoutError(
                f"{where} needs the role of each batch entry (uncond / cond), and this call's roles are unknown: its "
                "batch is not what the running pipeline's prompts and classifier-free guidance explain. Declare them: "
                '`with diffattn.denoising_step(i, num_steps, batch_roles=("uncond", "cond")):`, or call the model '
                'inside model.cache_context("cond")'
            )
