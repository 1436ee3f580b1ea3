"""The GPU fast path, the memory settings on a GPU, and the opt-in speed modes (issues 9 and 19).
Everything here is a no-op on the CPU unless said otherwise.

"The denoiser" is a pipeline's UNet (SD, SDXL) or, where it has none, its transformer (Flux.1 and its
Kontext / Fill models, SD3 / 3.5, Qwen-Image, Z-Image, Flux.2): `denoiser(pipeline)`.

The fast path (setting `fast_path`, applied where a pipeline lands on a CUDA device: on load, or
after `move_to` on Modal) keeps outputs equal to the plain fp16 / bf16 pipeline's up to
floating-point noise (bench/gpu.py measures the difference):

- a UNet and a 2-D VAE in channels_last memory format (a transformer has no convolutions: it stays
  as it is; Qwen-Image's video VAE has 3-D ones); cuDNN autotuning (`cudnn.benchmark`);
- fused QKV projections (one GEMM instead of three) in the UNet's, the VAE's, and those transformers'
  attention whose diffusers processors read the fused projection (`FUSED_QKV_TRANSFORMERS`: Flux.1,
  SD3, Flux.2). Not Qwen-Image (its processor reads to_q / to_k / to_v only, so fusing would only
  cost memory) nor Z-Image (no fusion in diffusers). diffusers keeps the unfused projections beside
  the fused ones (LoRAs need them): fusing costs the memory of the QKV weights once more, 18 % of
  Flux.1-dev's transformer (4.3 GB in bf16), which `prepare` counts when it plans the memory;
- not done: SDXL's VAE stays in diffusers' fp32 upcast (`force_upcast`) for decoding. A bf16 VAE
  would halve that cost, but `from_pipe` casts every shared component to the model's dtype in
  place for each job, so it would not stay bf16 (bench/gpu.py reports the decode share);
- `torch.compile` of the denoiser and the VAE decoder in place (`nn.Module.compile`: the module tree
  and state dict stay as they are) with `compile_mode`; "reduce-overhead" adds CUDA graphs. Shapes
  are static (`dynamic=False`): each new (batch, width, height) compiles once, which the
  persistent cache (`compile_cache_dir`, on its own Volume on Modal) makes a one-time cost
  per deployment rather than per container.

What the compiled modules cannot follow, they are taken out of for the job:
- LoRAs: peft wraps the attention projections, which a fused QKV projection bypasses and which
  changes the module tree the compiled graphs were traced for. The first LoRA loaded into a model
  unfuses its denoiser and switches compilation off for that model for good (it runs eagerly, still
  in its dtype, channels_last, quantized); models without LoRAs keep the compiled path. Decided so
  because a compiled denoiser with peft layers recompiles on every change of adapters or strengths.
  (peft applies LoRAs to torchao-quantized layers too: int8 checked on the CPU.)
- ToMe (`tomesd`, UNets only) patches the UNet's blocks per job and draws random merges from a
  per-image generator: a ToMe job runs the UNet eagerly (`eager`), the compiled graphs stay for later jobs.

Memory on a GPU (settings `text_encoder_offload`, `quantization`, `quantize_text_encoders`;
`MemorySettings`). `prepare(pipeline, device, dtype, fast, memory)` is the one call where a pipeline
lands (after loading, and instead of `pipeline.to()` in `move_to`): it moves the components, applies
the fast path and the memory settings in the order they need (fuse QKV, quantize, offload, compile),
once per model, and records what it did on the denoiser (`memory_report`, for system_details):

- dtype, `family_dtype`: fp16 for the UNet families on CUDA, bf16 for the transformer families
  (their activations overflow fp16; fp16 again on a card without bf16, compute capability < 8.0),
  fp32 on the CPU. A Modal worker's CPU load before its memory snapshot takes the GPU's dtype
  (fp16 asked: bf16 for a transformer family).
- `quantization` of the transformer's linear layers with torchao (the `quant` extra; imported only
  when asked for): fp8 (float8 dynamic activations and per-row float8 weights: compute capability
  8.9+, i.e. Ada L4 / L40S, Hopper H100 / H200, Blackwell), int8 (weight-only: any CUDA GPU, and the
  CPU; on a GPU it needs torch.compile to be faster than bf16), auto (fp8 where it runs, int8
  elsewhere on CUDA, none on the CPU), none (default). `resolve_quantization` says what a setting
  means on a device: fp8 asked on a card without it runs int8. On the CPU only a model that runs
  there (fp32) is quantized; one held on the CPU for a memory snapshot is quantized when it lands on
  the GPU. UNets are not quantized. Quantizing changes outputs a little (bench/gpu.py reports how
  much); `quantize_text_encoders` quantizes the big text encoders kept on the GPU the same way.
- `text_encoder_offload`: the big text encoders (`big_text_encoders`: every text encoder that is not
  a CLIP, i.e. T5-XXL of Flux.1 and SD3, the LLMs of Qwen-Image, Z-Image and Flux.2) stay in CPU
  memory and stream to the GPU layer by layer while a prompt is encoded (diffusers' group
  offloading, leaf level, prefetched on a CUDA stream from pinned memory), or stay on the GPU:
  keep | offload | auto (offload on a CUDA device when the weights it would hold plus activation
  headroom exceed the card's memory: `needs_offload`). CLIP encoders always stay. The offloaded
  encoders keep their hooks across `from_pipe` variants (the modules are shared) and
  `DiffusionPipeline.to()` leaves them where they are. "offload" applies on the CPU too (the hooks
  then move nothing: the tests' way to run them).

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

from infra.engine.protocol import Unsupported

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RECOMPILE_LIMIT = 64  # distinct shapes (batch x size) per compiled module before dynamo falls back to eager

APPLIED = "_sdapi_fast_path"  # attribute on a pipeline's denoiser once the fast path was applied
EAGER_FOR_GOOD = "_sdapi_eager"  # attribute on a denoiser that must not run compiled again (LoRAs)
QUANTIZED = "_sdapi_quantized"  # attribute on a module quantized by `prepare`: "int8" | "fp8"
MEMORY = "_sdapi_memory"  # attribute on a pipeline's denoiser: what `prepare` applied (memory_report)

UNET_FAMILIES = ("sd", "sdxl")
# transformers whose attention processors (diffusers 0.42.1) compute through the fused projection once fused
FUSED_QKV_TRANSFORMERS = ("FluxTransformer2DModel", "SD3Transformer2DModel", "Flux2Transformer2DModel")
QKV_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
QUANTIZATIONS = ("none", "fp8", "int8", "auto")
OFFLOAD_MODES = ("auto", "keep", "offload")
FP8_CAPABILITY = (8, 9)  # float8 matrix units: Ada, Hopper, Blackwell
BF16_CAPABILITY = (8, 0)  # bf16 matrix units: Ampere and later
HEADROOM_SHARE, HEADROOM_MIN = 0.15, 2 * 2**30  # activations, workspaces, CUDA graphs beside the weights


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


@dataclass(frozen=True)
class MemorySettings:
    """The memory settings (see the module docstring); the defaults change nothing."""

    text_encoder_offload: str = "keep"
    quantization: str = "none"
    quantize_text_encoders: bool = False

    @classmethod
    def from_settings(cls, settings) -> MemorySettings:
        return cls(settings.text_encoder_offload, settings.quantization, settings.quantize_text_encoders)


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


def denoiser(pipeline):
    """The pipeline's UNet, else its transformer; None for a pipeline with neither."""
    unet = getattr(pipeline, "unet", None)
    return unet if unet is not None else getattr(pipeline, "transformer", None)


def is_compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


# --------------------------------------------------------------------------- the fast path


def _fuse(pipeline, options: FastPath) -> bool:
    """The fast path's first half, before any quantization: channels_last, fused QKV projections."""
    net, vae = denoiser(pipeline), pipeline.vae
    if getattr(net, APPLIED, False):
        return False
    configure(options)
    is_unet = getattr(pipeline, "unet", None) is not None
    for module in (net, vae) if is_unet else (vae,):
        if _convolutions_2d(module):
            module.to(memory_format=torch.channels_last)
    fusable = [vae]
    if is_unet or type(net).__name__ in FUSED_QKV_TRANSFORMERS:
        fusable.insert(0, net)
    for module in fusable:
        if getattr(module, QUANTIZED, None) or getattr(module, EAGER_FOR_GOOD, False):  # quantized weights
            continue  # cannot be concatenated; a LoRA's peft layers would be bypassed
        try:
            module.fuse_qkv_projections()
        except (ValueError, AttributeError) as exc:  # added KV projections, or no fusion: nothing to fuse
            log.info("no fused QKV projections for %s: %s", type(module).__name__, exc)
    return True


def _compile(pipeline, options: FastPath) -> None:
    """The fast path's second half, after quantization: torch.compile of the denoiser and VAE decoder."""
    net, vae = denoiser(pipeline), pipeline.vae
    if getattr(net, APPLIED, False):
        return
    if options.compile_mode != "none" and not getattr(net, EAGER_FOR_GOOD, False):
        mode = None if options.compile_mode == "default" else options.compile_mode
        kwargs = {"backend": options.backend, "dynamic": False}
        if options.backend == "inductor":
            kwargs["mode"] = mode
        net.compile(**kwargs)
        decoder = getattr(vae, "decoder", None)
        if isinstance(decoder, torch.nn.Module):
            decoder.compile(**kwargs)
    setattr(net, APPLIED, True)


def _convolutions_2d(module) -> bool:
    """True for a module with 2-D convolutions and no 3-D ones (channels_last needs 4-D weights)."""
    dims = {p.dim() for p in module.parameters()}
    return 4 in dims and 5 not in dims


def _fused(module) -> bool:
    return getattr(module, "original_attn_processors", None) is not None or any(
        getattr(m, "fused_projections", False) for m in module.modules())


# --------------------------------------------------------------------------- memory on a GPU


def gpu_capability(device) -> tuple[int, int] | None:
    device = torch.device(device)
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def family_dtype(family: str, device, dtype: torch.dtype | None = None,
                 capability: tuple[int, int] | None = None) -> torch.dtype:
    """The dtype a model of `family` runs in on `device`. `dtype`: the engine's own choice (default
    fp16 on CUDA, fp32 on the CPU; a Modal worker asks fp16 on the CPU for its memory snapshot). The
    UNet families take it as it is; the transformer families take bf16 wherever it is fp16 (fp16
    again on a CUDA card without bf16: `capability` below 8.0; default: the card's own)."""
    device = torch.device(device)
    base = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if not family or family in UNET_FAMILIES or base != torch.float16:
        return base
    if device.type == "cuda":
        capability = capability or gpu_capability(device)
        if capability is not None and tuple(capability) < BF16_CAPABILITY:
            return torch.float16
    return torch.bfloat16


def resolve_quantization(setting: str, device_type: str, capability: tuple[int, int] | None = None,
                         dtype: torch.dtype | None = None) -> tuple[str, str]:
    """What the `quantization` setting means for a model landing on a device of `device_type` (its
    CUDA compute `capability`; `dtype` the model's): ("none" | "fp8" | "int8", a note saying why when
    it is not what was asked for, else "")."""
    if setting not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {setting!r}")
    if setting == "none":
        return "none", ""
    fp8 = device_type == "cuda" and capability is not None and tuple(capability) >= FP8_CAPABILITY
    if device_type != "cuda":
        if setting == "int8" and dtype in (None, torch.float32):
            return "int8", ""
        if setting == "int8":
            return "none", "int8 is applied when the model lands on the GPU"
        if setting == "fp8":
            return "none", "fp8 needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper, Blackwell)"
        return "none", "auto: no quantization on the CPU"
    if setting == "int8":
        return "int8", ""
    if fp8:
        return "fp8", ""
    if setting == "fp8":
        return "int8", f"fp8 needs compute capability 8.9+ (this card has {capability[0]}.{capability[1]}): int8"
    return "int8", ""


def quantization_config(kind: str):
    """torchao's config for `kind` ("int8" | "fp8"); torchao is imported here, only when asked for."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow
    except ImportError as exc:
        raise Unsupported(
            f"quantization {kind} needs torchao, which is not installed here ({exc}): install the `quant` extra "
            "(pip install 'sd-enterprise-api[quant]', as the Modal GPU image does), or set SDAPI_QUANTIZATION=none"
        ) from exc
    if kind == "int8":
        return Int8WeightOnlyConfig()
    if kind == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise ValueError(f"no quantization config for {kind!r}")


def big_text_encoders(pipeline) -> list[str]:
    """The pipeline's text encoders that are not CLIPs (T5, LLMs): the ones worth offloading."""
    names = []
    for name, module in pipeline.components.items():
        if name.startswith("text_encoder") and isinstance(module, torch.nn.Module):
            if not type(module).__name__.startswith("CLIP"):
                names.append(name)
    return names


def needs_offload(mode: str, need_bytes: int, card_bytes: int | None) -> bool:
    """Whether the big text encoders go to the CPU: `mode` keep | offload | auto; auto: when the bytes
    the model needs on the card (weights with the encoders, plus headroom) exceed the card's
    (`card_bytes` None: not a GPU, nothing to save)."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"text_encoder_offload must be one of {', '.join(OFFLOAD_MODES)}, not {mode!r}")
    if mode != "auto":
        return mode == "offload"
    return card_bytes is not None and need_bytes > card_bytes


def tensor_bytes(tensor) -> int:
    """Bytes a tensor holds; a torchao tensor subclass counts its inner tensors (int8 / fp8 data, scales)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module) -> int:
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def planned_bytes(module, dtype: torch.dtype, quantize: str = "none", fuse: bool = False) -> int:
    """Bytes `module` will hold in `dtype`, its linear weights quantized to one byte (`quantize`
    not "none") and its QKV projections held twice (`fuse`)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, sub in module.named_modules():
        for kind, tensor in (*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)):
            if getattr(sub, QUANTIZED, None) or _is_quantized_tensor(tensor):
                total += tensor_bytes(tensor)
                continue
            per = 1 if quantize != "none" and isinstance(sub, torch.nn.Linear) and kind == "weight" else size
            if not tensor.is_floating_point():
                per = tensor.element_size()
            copies = 2 if fuse and name.rsplit(".", 1)[-1] in QKV_PROJECTIONS else 1
            total += tensor.numel() * per * copies
    return total


def _is_quantized_tensor(tensor) -> bool:
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__")


_STORED_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def bytes_on_disk(component_dir: Path, dtype: torch.dtype, quantize: str = "none") -> int:
    """Bytes a stored component (a diffusers / transformers folder of safetensors) will hold loaded in
    `dtype`, its 2-D weights (the linear layers) in one byte when `quantize` is not "none"; read from
    the safetensors headers only (no weights are read)."""
    import json
    import struct

    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in Path(component_dir).glob("*.safetensors"):
        with open(path, "rb") as file:
            header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            if info["dtype"] not in _STORED_FLOATS:  # (integer tensors keep their size)
                total += info["data_offsets"][1] - info["data_offsets"][0]
            elif quantize != "none" and len(info["shape"]) == 2 and name.endswith(".weight"):
                total += numel
            else:
                total += numel * size
    return total


def load_offloaded(folder: Path, family: str, device, dtype: torch.dtype, memory: MemorySettings | None) -> dict:
    """Before a pipeline is loaded onto a GPU: its big text encoders loaded into CPU memory, when
    `prepare` will offload them (offload; auto: when the stored model, planned as `prepare` plans it,
    exceeds the card), to pass to `from_pretrained` so that they never land on the card; else {}.
    (`prepare` decides again from the loaded modules.)"""
    import json

    device = torch.device(device)
    memory = memory or MemorySettings()
    if device.type != "cuda" or family in UNET_FAMILIES or memory.text_encoder_offload == "keep":
        return {}
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    encoders = {name: value for name, value in index.items() if name.startswith("text_encoder")
                and isinstance(value, list) and value[0] == "transformers" and not str(value[1]).startswith("CLIP")}
    if not encoders:
        return {}
    if memory.text_encoder_offload == "auto":
        quant, _ = resolve_quantization(memory.quantization, device.type, gpu_capability(device), dtype)
        need = 0
        for name, value in index.items():
            if isinstance(value, list) and value[0] is not None and (folder / name).is_dir():
                kind = quant if name == "transformer" or (name in encoders and memory.quantize_text_encoders) else "none"
                need += bytes_on_disk(folder / name, dtype, kind)
        need += max(HEADROOM_MIN, int(HEADROOM_SHARE * need))
        if not needs_offload("auto", need, torch.cuda.get_device_properties(device).total_memory):
            return {}
    import transformers

    return {name: getattr(transformers, cls).from_pretrained(folder / name, dtype=dtype, low_cpu_mem_usage=True).eval()
            for name, (_, cls) in encoders.items()}


def _dtype_of(module) -> torch.dtype:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _is_offloaded(module) -> bool:
    try:
        from diffusers.hooks.group_offloading import _is_group_offload_enabled
    except ImportError:
        return False
    return _is_group_offload_enabled(module)


def prepare(pipeline, device, dtype: torch.dtype | None = None, fast: FastPath | None = None,
            memory: MemorySettings | None = None) -> dict:
    """Land a pipeline on `device` in `dtype` (None: as it is) with the fast path (`fast`) and the
    memory settings (`memory`; None: none): its components moved (big text encoders to the CPU when
    offloaded), then fused QKV projections, quantization, text-encoder offload and compilation, each
    once per model. Call it after loading and wherever the pipeline is moved (instead of
    `pipeline.to()`). Returns what was applied (also kept for `memory_report`)."""
    device = torch.device(device)
    memory = memory or MemorySettings()
    net = denoiser(pipeline)
    unet = getattr(pipeline, "unet", None) is not None
    fast_on = fast is not None and fast.active_on(device) and net is not None and getattr(pipeline, "vae", None) is not None
    capability = gpu_capability(device)
    quant, note = ("none", "")
    if net is not None and not unet:
        quant, note = resolve_quantization(memory.quantization, device.type, capability, dtype)
    quant = getattr(net, QUANTIZED, None) or quant  # once quantized, it stays so
    config = quantization_config(quant) if quant != "none" and not getattr(net, QUANTIZED, None) else None
    encoders = big_text_encoders(pipeline)
    offloaded = [name for name in encoders if _is_offloaded(getattr(pipeline, name))]
    need = card = None
    if encoders and not offloaded:
        fuse = fast_on and not getattr(net, APPLIED, False) and not unet and type(net).__name__ in FUSED_QKV_TRANSFORMERS
        need = 0
        for name, module in pipeline.components.items():
            if isinstance(module, torch.nn.Module):
                module_dtype = dtype or _dtype_of(module)
                if module is net:
                    need += planned_bytes(module, module_dtype, quant, fuse)
                else:
                    kind = quant if name in encoders and memory.quantize_text_encoders else "none"
                    need += planned_bytes(module, module_dtype, kind)
        need += max(HEADROOM_MIN, int(HEADROOM_SHARE * need))
        card = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        if needs_offload(memory.text_encoder_offload, need, card):
            offloaded = list(encoders)
    # 1. every component where it computes (offloaded encoders wait on the CPU), in the model's dtype
    for name, module in pipeline.components.items():
        if not isinstance(module, torch.nn.Module) or _is_offloaded(module):
            continue
        target = torch.device("cpu") if name in offloaded else device
        if getattr(module, QUANTIZED, None) or dtype is None or _dtype_of(module) == dtype:
            module.to(target)  # (a dtype already right: parts kept in fp32 by from_pretrained stay so)
        else:
            module.to(target, dtype)
    # 2. fast path, first half (fusing needs the unquantized weights)
    if fast_on:
        _fuse(pipeline, fast)
    # 3. quantization of the transformer (and the big text encoders it keeps, if asked)
    if config is not None:
        targets = [net] + [getattr(pipeline, name) for name in encoders
                           if memory.quantize_text_encoders and name not in offloaded]
        _quantize(targets, quant, config)
    # 4. offload: the big text encoders stream to the device while they encode
    for name in offloaded:
        module = getattr(pipeline, name)
        if not _is_offloaded(module):
            _offload(module, device)
    # 5. fast path, second half
    if fast_on:
        _compile(pipeline, fast)
    report = {
        "dtype": str(_dtype_of(net)).replace("torch.", "") if net is not None else None,
        "quantization": quant,
        "text_encoders_offloaded": offloaded,
        "text_encoders_on_device": [name for name in encoders if name not in offloaded],
        "fast_path": bool(net is not None and getattr(net, APPLIED, False)),
        "fused_qkv": bool(net is not None and _fused(net)),
        "compiled": bool(net is not None and is_compiled(net)),
        "device": str(device),
    }
    if note:
        report["note"] = note
    earlier = getattr(net, MEMORY, None) or {}
    for key, value in (("planned_gb", need), ("card_gb", card)):  # (planned once: kept when landing again)
        if value is not None:
            report[key] = round(value / 1e9, 1)
        elif key in earlier:
            report[key] = earlier[key]
    if net is not None:
        setattr(net, MEMORY, report)
    return report


def _quantize(modules, kind: str, config) -> None:
    from torchao.quantization import quantize_

    for module in modules:
        quantize_(module, config)
        setattr(module, QUANTIZED, kind)
        log.info("quantized %s to %s", type(module).__name__, kind)


def _offload(module, device: torch.device) -> None:
    """diffusers' group offloading at leaf level: the weights stay in (pinned) CPU memory and each
    layer is copied to `device` just before it runs, the next one prefetched on a CUDA stream."""
    from diffusers.hooks import apply_group_offloading

    stream = device.type == "cuda"
    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="leaf_level", use_stream=stream, record_stream=stream)
    log.info("%s offloaded to the CPU (streamed to %s while it encodes)", type(module).__name__, device)


def memory_report(pipeline) -> dict | None:
    """What `prepare` applied to this pipeline's model (dtype, quantization, offloaded text encoders,
    fast path), or None where it did not run."""
    report = getattr(denoiser(pipeline), MEMORY, None)
    return dict(report) if report is not None else None


# --------------------------------------------------------------------------- what the compiled path cannot follow


def before_lora(pipeline) -> None:
    """Before a LoRA is loaded into a model: unfuse its denoiser's QKV projections (peft wraps to_q /
    to_k / to_v, which the fused projection would bypass) and run it eagerly from now on."""
    net = denoiser(pipeline)
    if net is None:
        return
    if getattr(net, "original_attn_processors", None) is not None:  # UNets, SD3: processors swapped back
        net.unfuse_qkv_projections()
        net.original_attn_processors = None
    elif any(getattr(m, "fused_projections", False) for m in net.modules()):  # Flux.1, Flux.2: fused layers dropped
        net.unfuse_qkv_projections()
    if is_compiled(net):
        net._compiled_call_impl = None
    setattr(net, EAGER_FOR_GOOD, True)


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
