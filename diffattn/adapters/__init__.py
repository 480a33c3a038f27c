"""Model-family knowledge, in one place: which attention module plays which role, and the visual token grid.

Each supported diffusers model class has one small :class:`FamilyAdapter` entry, in a module of this package named
after its family (``unet``, ``sd3``, ``flux``, ``wan``, ``cogvideox``, ``hunyuan_video``, ``ltx_video``). Everything
diffattn needs from a model beyond its attention modules comes from here: the role of every attention module (self,
cross, joint text + image, and where the text sits in a joint sequence) and the grid of visual tokens (after patching)
read from the model's own forward inputs. Add a family with :func:`register_adapter`.
"""

from __future__ import annotations

from . import cogvideox, flux, hunyuan_video, ltx_video, sd3, unet, wan
from .base import FamilyAdapter, GridFn, ModelInputs, RoleRule, model_inputs
from .registry import adapter_for, register_adapter, supported_models

__all__ = [
    "RoleRule",
    "FamilyAdapter",
    "adapter_for",
    "register_adapter",
    "supported_models",
    "ModelInputs",
    "model_inputs",
    "GridFn",
]

for _family in (unet, sd3, flux, wan, cogvideox, hunyuan_video, ltx_video):
    register_adapter(_family.ADAPTER)
