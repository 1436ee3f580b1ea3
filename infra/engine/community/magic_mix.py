"""MagicMix (Liew et al., "MagicMix: Semantic Mixing with Diffusion Models", 2022) on an SD 1.x / 2.x
model: the layout of an image filled with the content of a prompt.

The image's latents are noised to the point `kmax` of the schedule; from there the denoising runs
on the prompt, and while it is above `kmin` each step's input is mixed with the image's own latents
noised to that step (`mix_factor` of the denoised latents, the rest the image's): the layout comes
from the image, the content from the prompt. Below `kmin` the prompt alone finishes the image.
This follows diffusers' community pipeline `examples/community/magic_mix.py` (the same schedule
indices: k -> steps - int(k * steps); the step taken from the unmixed latents), which the diffusers
package does not ship; written here on StableDiffusionImg2ImgPipeline so it takes the packaged
pipelines' prompt embeddings, clip_skip, step callback and image processing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


def schedule_points(timesteps: int, kmin: float, kmax: float) -> tuple[int, int]:
    """The indices into a schedule of `timesteps` where MagicMix starts (kmax: the image noised to
    there) and where its layout phase ends (kmin); the start is at most the last step."""
    start = min(timesteps - int(kmax * timesteps), timesteps - 1)
    return start, timesteps - int(kmin * timesteps)


class MagicMixPipeline(StableDiffusionImg2ImgPipeline):
    """An SD img2img pipeline whose call is MagicMix (see the module docstring); the step callback
    gets the latents (`callback_on_step_end(pipeline, step, timestep, {"latents": ...})`)."""

    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        kmin: float = 0.3,
        kmax: float = 0.5,
        mix_factor: float = 0.5,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        generator: torch.Generator | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,  # (the latents are the one tensor given)
    ) -> StableDiffusionPipelineOutput:
        # 1. check the mixing points
        if not 0.0 <= kmin <= kmax <= 1.0:
            raise ValueError(f"MagicMix needs 0 <= kmin <= kmax <= 1, not kmin {kmin}, kmax {kmax}")
        device = self._execution_device
        guided = guidance_scale > 1.0

        # 2. the prompt's embeddings (and the negative ones, for classifier-free guidance)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, 1, guided, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip)
        text = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds

        # 3. the layout image's latents
        pixels = self.image_processor.preprocess(image).to(device=device, dtype=prompt_embeds.dtype)
        layout = retrieve_latents(self.vae.encode(pixels), generator) * self.vae.config.scaling_factor

        # 4. the schedule, and the image noised to its kmax point
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        start, layout_end = schedule_points(len(timesteps), kmin, kmax)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        noise = randn_tensor(layout.shape, generator=generator, device=device, dtype=layout.dtype)
        latents = self.scheduler.add_noise(layout, noise, timesteps[start:start + 1])
        self._num_timesteps = len(timesteps) - start

        # 5. denoise: mixed with the noised layout down to kmin, then the prompt alone
        for index in range(start, len(timesteps)):
            t = timesteps[index]
            step_input = latents
            if start < index < layout_end:
                noised_layout = self.scheduler.add_noise(layout, noise, t.reshape(1))
                step_input = mix_factor * latents + (1 - mix_factor) * noised_layout
            model_input = torch.cat([step_input] * 2) if guided else step_input
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=text).sample
            if guided:
                unconditional, conditional = noise_pred.chunk(2)
                noise_pred = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise_pred, t, latents).prev_sample
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, index - start, t, {"latents": latents}).pop("latents", latents)

        # 6. decode
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
