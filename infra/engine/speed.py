"""The GPU fast path and the opt-in speed modes (issue 9). Everything here is a no-op on the CPU.

The fast path (setting `fast_path`, applied by the ModelCache when a pipeline lands on a CUDA device:
on load, or after `move_to` on Modal) keeps outputs equal to the plain fp16 pipeline's up to
floating-point noise (bench/gpu.py measures the difference):

- UNet and VAE in channels_last memory format; cuDNN autotuning (`cudnn.benchmark`);
- fused QKV projections in the UNet's and VAE's attention (one GEMM instead of three);
- not done: SDXL's VAE stays in diffusers' fp32 upcast (`force_upcast`) for decoding. A bf16 VAE
  would halve that cost, but `from_pipe` casts every shared component to the model's dtype in
  place for each job, so it would not stay bf16 (bench/gpu.py reports the decode share);
- `torch.compile` of the UNet and the VAE decoder in place (`nn.Module.compile`: the module tree
  and state dict stay as they are) with `compile_mode`; "reduce-overhead" adds CUDA graphs. Shapes
  are static (`dynamic=False`): each new (batch, width, height) compiles once, which the
  persistent cache (`compile_cache_dir`, on the weights Volume on Modal) makes a one-time cost
  per deployment rather than per container.

What the compiled modules cannot follow, they are taken out of for the job:
- LoRAs: peft wraps the attention projections, which a fused QKV projection bypasses and which
  changes the module tree the compiled graphs were traced for. The first LoRA loaded into a model
  unfuses its UNet and switches compilation off for that model for good (it runs eagerly, still
  fp16 and channels_last); models without LoRAs keep the compiled path. Decided so because a
  compiled UNet with peft layers recompiles on every change of adapters or strengths.
- ToMe (`tomesd`) patches the UNet's blocks per job and draws random merges from a per-image
  generator: a ToMe job runs the UNet eagerly (`eager`), the compiled graphs stay for later jobs.

The speed modes that change outputs are separate settings, off by default: `tomesd_mode` /
`tomesd_ratio` (adapters.py applies ToMe) and `cfg_cutoff` (classifier-free guidance only for the
first part of the steps, `cfg_cutoff_callback`).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RECOMPILE_LIMIT = 64  # distinct shapes (batch x size) per compiled module before dynamo falls back to eager

APPLIED = "_sdapi_fast_path"  # attribute on a pipeline's UNet once the fast path was applied
EAGER_FOR_GOOD = "_sdapi_eager"  # attribute on a UNet that must not run compiled again (LoRAs)


@dataclass(frozen=True)
class FastPath:
    enabled: bool = False
    compile_mode: str = "reduce-overhead"
    cache_dir: Path | None = None
    # for tests and the CPU check of bench/gpu.py only: apply on the CPU too, with this dynamo backend
    allow_cpu: bool = False
    backend: str = "inductor"

    @classmethod
    def from_settings(cls, settings) -> FastPath:
        return cls(settings.fast_path, settings.compile_mode, settings.compile_cache_dir)

    def active_on(self, device: torch.device) -> bool:
        return self.enabled and (device.type == "cuda" or self.allow_cpu)


_configured: set = set()


def configure(options: FastPath) -> None:
    """Process-wide switches, once: cuDNN autotuning, dynamo's recompile limit and the persistent
    compile cache (inductor's FX graph cache, AOTAutograd cache, autotuning results and Triton
    kernels all live under TORCHINDUCTOR_CACHE_DIR)."""
    key = (options.cache_dir, options.compile_mode)
    if key in _configured:
        return
    _configured.add(key)
    torch.backends.cudnn.benchmark = True
    if options.cache_dir is not None:
        cache = Path(options.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    if options.compile_mode == "none":
        return
    import torch._inductor.config as inductor
    from torch._dynamo import config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
    inductor.fx_graph_cache = True
    if hasattr(inductor, "autotune_local_cache"):
        inductor.autotune_local_cache = True
    inductor.conv_1x1_as_mm = True  # the UNet's 1x1 convolutions as matrix products
    try:
        import torch._functorch.config as functorch

        functorch.enable_autograd_cache = True
    except (ImportError, AttributeError):
        pass


def apply_fast_path(pipeline, device: torch.device, options: FastPath | None) -> bool:
    """Put a loaded pipeline on the fast path (once). False where it does not apply (off, or not
    on a GPU). Everything it changes survives `pipeline.to()` and `from_pipe`, which share the
    modules (and cast them to the model's dtype in place)."""
    if options is None or not options.active_on(torch.device(device)):
        return False
    unet, vae = getattr(pipeline, "unet", None), getattr(pipeline, "vae", None)
    if unet is None or vae is None:
        return False
    if getattr(unet, APPLIED, False):
        return True
    configure(options)
    unet.to(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)
    for module in (unet, vae):
        try:
            module.fuse_qkv_projections()
        except (ValueError, AttributeError) as exc:  # added KV projections: nothing to fuse
            log.info("no fused QKV projections for %s: %s", type(module).__name__, exc)
    if options.compile_mode != "none":
        mode = None if options.compile_mode == "default" else options.compile_mode
        kwargs = {"backend": options.backend, "dynamic": False}
        if options.backend == "inductor":
            kwargs["mode"] = mode
        unet.compile(**kwargs)
        vae.decoder.compile(**kwargs)
    setattr(unet, APPLIED, True)
    return True


def is_compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


# --------------------------------------------------------------------------- what the compiled path cannot follow


def before_lora(pipeline) -> None:
    """Before a LoRA is loaded into a model: unfuse the UNet's QKV projections (peft wraps to_q /
    to_k / to_v, which the fused projection would bypass) and run it eagerly from now on."""
    unet = pipeline.unet
    if getattr(unet, "original_attn_processors", None) is not None:
        unet.unfuse_qkv_projections()
        unet.original_attn_processors = None
    if is_compiled(unet):
        unet._compiled_call_impl = None
    setattr(unet, EAGER_FOR_GOOD, True)


@contextmanager
def eager(module):
    """Run a compiled module eagerly for the block (a ToMe job); compiled again afterwards."""
    compiled = getattr(module, "_compiled_call_impl", None)
    if compiled is None:
        yield
        return
    module._compiled_call_impl = None
    try:
        yield
    finally:
        if not getattr(module, EAGER_FOR_GOOD, False):
            module._compiled_call_impl = compiled


# --------------------------------------------------------------------------- cfg_cutoff (changes outputs)

# pipeline tensors that carry the unconditional half of the classifier-free guidance batch
_CFG_TENSORS = ("prompt_embeds", "add_text_embeds", "add_time_ids", "mask", "masked_image_latents")


def cfg_cutoff_call(pipeline, steps: int, fraction: float, guidance_scale: float) -> dict:
    """Extra pipeline-call arguments that stop classifier-free guidance after `fraction` of the
    steps (the later steps run the conditional half only: half the UNet work). {} where it does
    not apply: fraction >= 1, no guidance, or a pipeline without step-end callbacks."""
    names = getattr(pipeline, "_callback_tensor_inputs", None)
    if fraction >= 1 or guidance_scale <= 1 or not names or "prompt_embeds" not in names:
        return {}
    last = max(int(steps * fraction), 1) - 1  # the step after which guidance stops
    inputs = [name for name in _CFG_TENSORS if name in names]

    def callback(pipe, step, timestep, tensors):
        if step == last:
            pipe._guidance_scale = 0.0  # do_classifier_free_guidance turns False
            for name in inputs:
                if tensors.get(name) is not None:
                    tensors[name] = tensors[name].chunk(2)[-1]
        return tensors

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": inputs}
