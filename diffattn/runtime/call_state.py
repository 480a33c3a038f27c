"""What one call of a denoiser knows, for its thread: loop position, token grid, the role and branch of each batch
entry, the model's timestep. :func:`read_call_state` reads it from the call's inputs before the forward runs."""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import parallel
from ..adapters import FamilyAdapter, ModelInputs
from ..errors import LayoutError
from .position import LoopPosition, declared_branches, loop_position

__all__ = ["CallState", "read_call_state"]


@dataclass
class CallState:
    """What one forward of a denoiser knows (one thread): loop position, grid, batch roles, the model's timestep."""

    position: LoopPosition
    grid: tuple[int, ...]
    batch_roles: tuple[str, ...] | None
    timestep: float | None  # the model's own timestep input (its scale: Flux passes t / 1000)
    timestep_1000: float | None  # on the 1000-step scale of diffusers' schedulers
    branches: tuple[str, ...] | None = None  # per entry, when the call declared prompt branches (editing)
    acted: dict[int, int] = field(default_factory=dict)  # application id -> attention calls it acted on
    decisions: dict[int, bool] = field(default_factory=dict)  # application id -> acts in this forward
    # application id -> what its batch extension keeps between pre_forward and post_forward of this forward (ends
    # with the forward, so an interrupted forward leaves nothing behind)
    extension_data: dict[int, Any] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        return self.position.step

    @property
    def num_steps(self) -> int | None:
        return self.position.num_steps

    def extend_batch(self, roles: tuple[str, ...], copied_from: list[int]) -> None:
        """Entries with ``roles``, copies of the entries ``copied_from``, were appended to this forward's batch."""
        if self.batch_roles is None:
            raise LayoutError(
                "entries were appended to a batch whose roles are unknown; call the model through a standard "
                "pipeline or inside model.cache_context('cond')"
            )
        self.batch_roles = self.batch_roles + tuple(roles)
        if self.branches is not None:
            self.branches = self.branches + tuple(self.branches[i] for i in copied_from)


def read_call_state(
    model: torch.nn.Module,
    adapter: FamilyAdapter,
    inputs: ModelInputs,
    cache_name: str | None,
    cache_context: Any,
) -> CallState:
    """The state of the call of ``model`` about to run with ``inputs`` (inside the cache context ``cache_context``,
    named ``cache_name``, when the pipeline opened one)."""
    timestep = _timestep_value(inputs.get(adapter.timestep_input))
    timestep_1000 = None if timestep is None else adapter.timestep_1000(timestep)
    position = loop_position(model, cache_context, timestep_1000)
    grid = adapter.grid(model, inputs)
    ulysses = parallel.model_ulysses(model)  # refuses ring attention before anything is split or sent
    if ulysses is not None:
        parallel.check_sequence_split(model, inputs, grid, ulysses)
    batch = _batch_size(inputs)
    skip_layers_call = inputs.get("skip_layers") is not None
    roles = _batch_roles(
        batch,
        cache_name,
        position,
        adapter.cfg_order if adapter.cfg_in_batch else None,
        skip_layers_call,
        _embeds_role(inputs, position),
    )
    return CallState(
        position=position,
        grid=grid,
        batch_roles=roles,
        timestep=timestep,
        timestep_1000=timestep_1000,
        branches=_entry_branches(batch, roles, declared_branches()),
    )


def _timestep_value(timestep: Any) -> float | None:
    if isinstance(timestep, Tensor):
        return float(timestep.detach().float().max()) if timestep.numel() else None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


def _batch_size(inputs: ModelInputs) -> int | None:
    for key in ("sample", "hidden_states", "x", "input_ids"):  # input_ids: token-latent models (UVit2D)
        value = inputs.get(key)
        if isinstance(value, Tensor):
            return int(value.shape[0])
        if isinstance(value, list) and value and all(isinstance(v, Tensor) for v in value):
            return len(value)  # one latent per entry (Z-Image)
    return None


def _embeds_role(inputs: ModelInputs, position: LoopPosition) -> str | None:
    """``"cond"`` / ``"uncond"`` when the call received the running pipeline's ``prompt_embeds`` /
    ``negative_prompt_embeds`` tensor itself (a pipeline that runs its CFG branches as separate calls)."""
    roles = dict(position.embeds)
    found = {roles[id(v)] for v in inputs.values() if isinstance(v, (Tensor, list)) and id(v) in roles}
    return found.pop() if len(found) == 1 else None


def _batch_roles(
    batch: int | None,
    cache_name: str | None,
    position: LoopPosition,
    cfg_order: tuple[str, str] | None,
    skip_layers_call: bool,
    embeds_role: str | None = None,
) -> tuple[str, ...] | None:
    """Roles of the batch entries, from this call: declared with denoising_step(batch_roles=...), the cache
    context's name, or the running pipeline's CFG flag checked against the batch that arrives (``cfg_in_batch``: the
    family batches [uncond, cond]). Anything else (3-way CFG, diffusers' PAG pipelines, a batch the pipeline's prompts
    do not explain) is unknown: ``None``, and methods that need roles raise."""
    if batch is None:
        return None
    if position.batch_roles is not None:
        if len(position.batch_roles) != batch:
            raise LayoutError(
                f"denoising_step(batch_roles={position.batch_roles}) names "
                f"{len(position.batch_roles)} entries, but the model was called with a batch of {batch}"
            )
        return position.batch_roles
    named = cache_role(cache_name)
    if named is not None:
        return (named,) * batch
    guided = _pipeline_guides(position.pipeline)
    if guided is None:
        guided = position.frame_guides
    per_branch = position.prompt_batch
    if guided is None or per_branch is None:
        return None
    if guided and cfg_order is not None and batch == 2 * per_branch:
        return (cfg_order[0],) * per_branch + (cfg_order[1],) * per_branch
    if batch == per_branch and (not guided or skip_layers_call):
        return ("cond",) * batch  # no CFG, or SD3's skip-layer call (the conditional latents only)
    if batch == per_branch and embeds_role is not None:
        return (embeds_role,) * batch  # one CFG branch per call, told by the prompt embeddings it received
    return None


def cache_role(name: str | None) -> str | None:
    """The role of every entry of a call made inside ``cache_context(name)``: a stock pipeline's ``"cond"`` /
    ``"uncond"``, or the prediction names of diffusers' guiders (modular pipelines): ``"pred_uncond"`` is
    unconditional, ``"pred_cond"`` and its perturbed variants (``"pred_cond_skip"``, ``"pred_cond_seg"``,
    ``"pred_cond_stg"``, ...) run the conditional prompt. Any other name: ``None`` (unknown)."""
    if name in ("cond", "uncond"):
        return name
    if name == "pred_uncond":
        return "uncond"
    if name == "pred_cond" or (name is not None and name.startswith("pred_cond_")):
        return "cond"
    return None


def _pipeline_guides(pipeline: Any) -> bool | None:
    """The running pipeline's ``do_classifier_free_guidance`` (``None``: no pipeline, or it cannot say yet); a
    pipeline whose call takes no negative prompt runs no classifier-free guidance (Flux 2: guidance-distilled)."""
    if pipeline is None:
        return None
    if not hasattr(type(pipeline), "do_classifier_free_guidance"):
        parameters = inspect.signature(type(pipeline).__call__).parameters
        return False if not {"negative_prompt", "negative_prompt_embeds"} & set(parameters) else None
    try:
        return bool(pipeline.do_classifier_free_guidance)
    except AttributeError:  # a property that reads state the pipeline sets later in its call
        return None


def _entry_branches(
    batch: int | None, roles: tuple[str, ...] | None, declared: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    """The branch of each batch entry from the per-prompt branches: within each run of equal roles (a CFG half),
    entries are the prompts in order, each repeated ``num_images_per_prompt`` times."""
    if declared is None or batch is None:
        return None
    runs = [(0, batch)] if roles is None else _runs(roles)
    out: list[str] = []
    for start, stop in runs:
        size = stop - start
        if size % len(declared):
            raise LayoutError(
                f"the call declares {len(declared)} prompt branches {declared}, but a CFG half of its "
                f"batch has {size} entries; pass one prompt per branch"
            )
        copies = size // len(declared)
        out += [declared[j // copies] for j in range(size)]
    return tuple(out)


def _runs(roles: tuple[str, ...]) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal roles."""
    found, start = [], 0
    for _, group in itertools.groupby(roles):
        stop = start + len(list(group))
        found.append((start, stop))
        start = stop
    return found
