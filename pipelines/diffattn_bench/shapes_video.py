"""``ShapesVideoPipeline``: text-to-video with a standard ``WanTransformer3DModel`` in pixel space.

The embedded video model: no VAE (frames are small, 32 x 32), a CLIP text encoder with the shapes grammar's
tokenizer, flow matching with ``FlowMatchEulerDiscreteScheduler`` as Wan does. Like ``WanPipeline`` it runs the
conditional and unconditional passes separately inside ``transformer.cache_context("cond" / "uncond")``, so
diffattn (and diffusers' cache hooks) see the same calls as with Wan.

The transformer's rotary embeddings are relative: from noise on a plain background it cannot tell the left of a
frame from the right, or the first frame from the last. So, as Wan's image-to-video model concatenates its
condition to the noisy latents, the pipeline concatenates three coordinate channels (frame, row and column in
[-1, 1]) when the transformer takes ``out_channels + 3`` input channels (:func:`with_coordinates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

__all__ = ["COORDINATE_CHANNELS", "ShapesVideoPipeline", "ShapesVideoOutput", "with_coordinates"]

COORDINATE_CHANNELS = 3


def with_coordinates(x: torch.Tensor, transformer: WanTransformer3DModel) -> torch.Tensor:
    """``x`` (B, C, T, H, W) with the frame / row / column coordinates appended if ``transformer`` expects them."""
    extra = transformer.config.in_channels - x.shape[1]
    if extra == 0:
        return x
    if extra != COORDINATE_CHANNELS:
        raise ValueError(
            f"the transformer takes {transformer.config.in_channels} input channels; expected "
            f"{x.shape[1]} (frames) or {x.shape[1] + COORDINATE_CHANNELS} (frames + coordinates)"
        )
    b, _, t, h, w = x.shape
    axes = [
        torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype)
        if n > 1
        else torch.zeros(1, device=x.device, dtype=x.dtype)
        for n in (t, h, w)
    ]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, T, H, W)
    return torch.cat([x, grid.expand(b, -1, -1, -1, -1)], dim=1)


@dataclass
class ShapesVideoOutput(BaseOutput):
    frames: np.ndarray | torch.Tensor  # (B, T, H, W, 3) in [0, 1] for "np"; (B, 3, T, H, W) in [-1, 1] for "pt"


class ShapesVideoPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )

    @property
    def current_timestep(self):
        """The timestep being denoised (None outside a call), as on WanPipeline: diffusers' cache hooks
        (PyramidAttentionBroadcast, FasterCache) read it through their ``current_timestep_callback``."""
        return getattr(self, "_current_timestep", None)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        num_frames: int = 8,
        height: int = 32,
        width: int = 32,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        generator: torch.Generator | None = None,
        output_type: str = "np",
    ) -> ShapesVideoOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ph, pw = self.transformer.config.patch_size[1:]
        if height % ph or width % pw:
            raise ValueError(f"height and width must be multiples of the patch size {ph}x{pw}, got {height}x{width}")
        self._guidance_scale = guidance_scale
        device = self.transformer.device
        dtype = self.transformer.dtype
        cond = self.encode_prompt(prompts).to(dtype)
        uncond = self.encode_prompt([""] * len(prompts)).to(dtype) if self.do_classifier_free_guidance else None
        shape = (len(prompts), self.transformer.config.out_channels, num_frames, height, width)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            timestep = t.expand(len(prompts))
            self._current_timestep = t
            inputs = with_coordinates(latents.to(dtype), self.transformer)
            where = {
                "step_index": i,
                "sigma": float(self.scheduler.sigmas[i]),
                "num_inference_steps": num_inference_steps,
            }
            with self.transformer.cache_context("cond", **where):
                pred = self.transformer(inputs, timestep, cond, return_dict=False)[0].float()
            if uncond is not None:
                with self.transformer.cache_context("uncond", **where):
                    pred_u = self.transformer(inputs, timestep, uncond, return_dict=False)[0].float()
                pred = pred_u + guidance_scale * (pred - pred_u)
            latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
        self._current_timestep = None
        video = latents.clamp(-1, 1)
        if output_type == "pt":
            return ShapesVideoOutput(frames=video)
        frames = ((video + 1) / 2).permute(0, 2, 3, 4, 1).cpu().numpy()
        return ShapesVideoOutput(frames=frames)
