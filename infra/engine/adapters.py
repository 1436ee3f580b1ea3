"""What adapts a loaded model for one job: LoRAs, a textual-inversion embedding and ToMe.

All three live in modules shared by every pipeline variant of the model, so a job applies them
while it holds the model's lock, and everything a later job could notice is undone or switched
off before the lock is released:

- LoRAs stay loaded (loading is the slow part) and are activated per job with `set_adapters`
  and the job's strengths. A job without LoRAs runs with the adapters disabled, which gives the
  base model's output. Strength 0 is never used to switch one off: it resets every adapter's
  weights in peft (see the offline notes); a LoRA is left out instead.
- An embedding is loaded for the job under its token and unloaded afterwards.
- ToMe (`tomesd`) patches the UNet for the job and is removed afterwards; its random token
  choice is seeded per image, so a seed still reproduces an image exactly. A compiled UNet (the
  GPU fast path, speed.py) runs uncompiled during a ToMe job.
- Loading a LoRA first takes the model's UNet off the compiled, fused-QKV fast path for good
  (speed.before_lora): peft's wrapped projections are bypassed by a fused QKV projection.

clip_skip is passed to the pipelines, with `text_model_alias` around the call (see there). The
wire value follows A1111 and ModelsLab: 1 = the last CLIP layer (no skip), 2 = the
penultimate...; diffusers counts skipped layers, so wire n is diffusers n - 1.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager

import torch
from safetensors.torch import load_file

from infra.catalog.weights import WeightsStore
from infra.engine import LOAD_LOCK, speed
from infra.engine.protocol import DoesNotFit
from infra.engine.types import LoadedModel

log = logging.getLogger(__name__)

# ToMe merges tokens in the attention layers at full and half latent resolution (the tomesd authors
# recommend max_downsample 1 or 2; 2 also reaches models without full-res attention); the share
# merged is the setting tomesd_ratio
TOME_MAX_DOWNSAMPLE = 2


def diffusers_clip_skip(wire_value: int | None) -> int | None:
    """ModelsLab/A1111 clip_skip (1 = no skip) -> diffusers' (number of layers skipped)."""
    if not wire_value or wire_value <= 1:
        return None
    return wire_value - 1


@contextmanager
def text_model_alias(model: LoadedModel):
    """transformers >= 5.6 flattened CLIPTextModel (no `.text_model`), which diffusers' clip_skip
    path still reads. For the duration of a job (under the model's lock) an alias on the instance
    points `text_model` at the model itself. Never on the class, and never while loading: diffusers'
    loaders test `hasattr(model, "text_model")`, and with the alias single-file loading and
    text-encoder LoRAs (kohya) break."""
    aliased = []
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(model.pipeline, name, None)
        if encoder is not None and not hasattr(encoder, "text_model") and hasattr(encoder, "final_layer_norm"):
            object.__setattr__(encoder, "text_model", encoder)  # not a registered submodule
            aliased.append(encoder)
    try:
        yield
    finally:
        for encoder in aliased:
            del encoder.__dict__["text_model"]


def embedding_token(model_id: str) -> str:
    """The prompt token of an embedding: its model id (write it in the prompt to use it)."""
    return model_id


@contextmanager
def job_adapters(
    model: LoadedModel,
    weights: WeightsStore,
    loras: list[tuple[str, float]],
    embedding: str | None,
    tome_ratio: float,
    max_loras: int,
):
    """Apply the job's adapters to `model` for the duration of the block (holding its lock).
    `tome_ratio`: the share of tokens ToMe merges, 0 for no ToMe."""
    with model.lock:
        _activate_loras(model, weights, loras, max_loras)
        token = _load_embedding(model, weights, embedding) if embedding else None
        try:
            if tome_ratio:
                import tomesd

                with speed.eager(model.pipeline.unet):  # a compiled UNet runs uncompiled under ToMe
                    tomesd.apply_patch(model.pipeline.unet, ratio=tome_ratio, max_downsample=TOME_MAX_DOWNSAMPLE)
                    try:
                        yield
                    finally:
                        tomesd.remove_patch(model.pipeline.unet)
            else:
                yield
        finally:
            if token:
                _unload_embedding(model, token)


def seed_tome(model: LoadedModel, seed: int) -> None:
    """Make ToMe's random merge choices depend on the image's seed only."""
    info = getattr(getattr(model.pipeline, "unet", None), "_tome_info", None)  # (no UNet: a Flux transformer)
    if info is not None:
        device = model.pipeline.unet.device
        info["args"]["generator"] = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(seed)


# --------------------------------------------------------------------------- LoRA


def _activate_loras(model: LoadedModel, weights: WeightsStore, loras: list[tuple[str, float]], max_loras: int) -> None:
    pipeline = model.pipeline
    if not loras:
        if model.loras:
            pipeline.disable_lora()
        return
    names = [_ensure_lora(model, weights, lora_id) for lora_id, _ in loras]
    _trim_loras(model, keep=set(names), max_loras=max_loras)
    # explicit every time: a LoRA loaded while the layers were disabled would stay disabled
    pipeline.enable_lora()
    pipeline.set_adapters(names, adapter_weights=[strength for _, strength in loras])


def _ensure_lora(model: LoadedModel, weights: WeightsStore, lora_id: str) -> str:
    entry = weights.require(lora_id, ("lora",), "lora_model")
    cached = model.loras.get(lora_id)
    if cached and cached[0] == entry.version:
        model.loras.move_to_end(lora_id)
        return cached[1]
    if cached:  # deleted and loaded again under the same id: drop the old adapter
        model.pipeline.delete_adapters(cached[1])
        del model.loras[lora_id]
    name = "lora_" + re.sub(r"\W", "_", lora_id)
    speed.before_lora(model.pipeline)
    try:
        with LOAD_LOCK:
            model.pipeline.load_lora_weights(str(weights.payload(lora_id)), adapter_name=name)
    except Exception as exc:
        if name in _adapter_names(model):
            model.pipeline.delete_adapters(name)
        raise DoesNotFit(
            f"LoRA {lora_id} does not fit model {model.model_id}: {type(exc).__name__}: {str(exc)[:300]}",
            tip="Use a LoRA trained for this base model (SD 1.x, SD 2.x, SDXL, Flux.1 or SD3; get_all_models shows its family).",
        ) from exc
    if name not in _adapter_names(model):
        raise DoesNotFit(f"LoRA {lora_id} has no weights that fit model {model.model_id}")
    model.loras[lora_id] = (entry.version, name)
    return name


def _trim_loras(model: LoadedModel, keep: set[str], max_loras: int) -> None:
    while len(model.loras) > max(max_loras, len(keep)):
        lora_id, (_, name) = next(iter(model.loras.items()))
        if name in keep:
            model.loras.move_to_end(lora_id)
            continue
        model.pipeline.delete_adapters(name)
        del model.loras[lora_id]


def forget_lora(model: LoadedModel, lora_id: str) -> None:
    """Unload a LoRA from a cached model (it was deleted from the store)."""
    with model.lock:
        cached = model.loras.pop(lora_id, None)
        if cached:
            model.pipeline.delete_adapters(cached[1])


def _adapter_names(model: LoadedModel) -> set[str]:
    return {name for names in model.pipeline.get_list_adapters().values() for name in names}


# --------------------------------------------------------------------------- embeddings


def _load_embedding(model: LoadedModel, weights: WeightsStore, embedding_id: str) -> str:
    pipeline = model.pipeline
    token = embedding_token(embedding_id)
    tensors = load_file(weights.payload(embedding_id))
    try:
        if model.family == "sdxl":
            if "clip_g" not in tensors:
                raise DoesNotFit(f"Embedding {embedding_id} is for SD 1.x/2.x; model {model.model_id} is SDXL")
            pipeline.load_textual_inversion(
                tensors["clip_l"], token=token, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer
            )
            pipeline.load_textual_inversion(
                tensors["clip_g"], token=token, text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2
            )
        else:
            if "emb_params" not in tensors:
                raise DoesNotFit(f"Embedding {embedding_id} is for SDXL; model {model.model_id} is not")
            pipeline.load_textual_inversion(tensors["emb_params"], token=token)
    except DoesNotFit:
        raise
    except Exception as exc:
        _unload_embedding(model, token)
        raise DoesNotFit(f"Embedding {embedding_id} does not fit model {model.model_id}: {exc}") from exc
    return token


def _unload_embedding(model: LoadedModel, token: str) -> None:
    pipeline = model.pipeline
    pairs = [(pipeline.tokenizer, pipeline.text_encoder)]
    if model.family == "sdxl":
        pairs.append((pipeline.tokenizer_2, pipeline.text_encoder_2))
    for tokenizer, text_encoder in pairs:
        # a multi-vector embedding adds token, token_1, token_2, ...
        added = [t for t in tokenizer.get_added_vocab() if t == token or re.fullmatch(re.escape(token) + r"_\d+", t)]
        if added:
            pipeline.unload_textual_inversion(tokens=added, tokenizer=tokenizer, text_encoder=text_encoder)


# --------------------------------------------------------------------------- IP-Adapter


@contextmanager
def job_ip_adapter(model: LoadedModel, pipeline, folder, encoder, scale: float):
    """An IP-Adapter (a catalog folder: ip_adapter.safetensors + image_encoder/, the encoder loaded
    once as a component) in the model's UNet for the block, at `scale`; the job's `pipeline` (a
    copy of a variant) gets the image encoder and its feature extractor. Loaded with diffusers'
    `load_ip_adapter` (it swaps the cross-attention processors and adds the image projection) and
    unloaded with `unload_ip_adapter` afterwards, and the pipeline's feature extractor put back: the
    next job runs on the model as it was. Like a LoRA, it takes the UNet off the fused, compiled
    fast path for good (speed.before_lora). Hold the model's lock (inside `job_adapters`)."""
    from infra.engine.files.convert import IP_ADAPTER_FILE

    base = model.pipeline
    speed.before_lora(base)
    extractor = getattr(base, "feature_extractor", None)
    base.register_modules(image_encoder=encoder)  # (so load_ip_adapter does not read the encoder again)
    try:
        with LOAD_LOCK:
            base.load_ip_adapter(str(folder), subfolder="", weight_name=IP_ADAPTER_FILE, image_encoder_folder=None,
                                 local_files_only=True)
        base.set_ip_adapter_scale(scale)
        pipeline.image_encoder, pipeline.feature_extractor = encoder, base.feature_extractor
        yield
    finally:
        if getattr(base.unet, "encoder_hid_proj", None) is not None:
            base.unload_ip_adapter()
        base.register_modules(image_encoder=None, feature_extractor=extractor)
