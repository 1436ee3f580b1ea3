"""AnimateDiff motion adapters in the weights store: verify and save (`prepare_motion_adapter`: a
diffusers MotionAdapter folder, or an original AnimateDiff single file whose config is read from
its tensor shapes) and load (`load_motion_adapter`). How a video job runs: `infra.engine.video`."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import MotionAdapter
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

from infra.engine import read_json
from infra.engine.files.checkpoints import CheckpointError, read_state_dict

# Every released AnimateDiff motion module has 8 heads; the head count is not in the weight shapes.
ANIMATEDIFF_HEADS = 8
ANIMATEDIFF_NORM_GROUPS = 32
DEFAULT_MAX_FRAMES = 32  # diffusers' default, for a file without positional-encoding tensors
SDXL_CHANNELS = [320, 640, 1280]  # the AnimateDiff SDXL (beta) adapter's blocks


def prepare_motion_adapter(source: Path, out: Path, dtype: torch.dtype) -> dict:
    """Verify `source` (a diffusers MotionAdapter folder, or an original AnimateDiff single file)
    as a motion adapter and save it to `out` as a diffusers folder in `dtype`. Returns the manifest
    facts. The caller holds LOAD_LOCK."""
    if source.is_dir():
        adapter = _adapter_from_folder(source, dtype)
        fmt = "diffusers"
    else:
        adapter = _adapter_from_file(source, dtype)
        fmt = source.suffix.lstrip(".").lower()
    channels = list(adapter.config.block_out_channels)
    if adapter.config.conv_in_channels:
        raise CheckpointError(
            "this is a PIA (image animation) motion adapter; only AnimateDiff text2video adapters are supported"
        )
    if channels == SDXL_CHANNELS:
        raise CheckpointError(
            "this is an SDXL motion adapter; this server runs AnimateDiff on Stable Diffusion 1.x models only"
        )
    adapter.save_pretrained(out, safe_serialization=True)
    return {"category": "motion_adapter", "format": fmt, "family": "sd"}


def load_motion_adapter(folder: Path, device: torch.device, dtype: torch.dtype) -> MotionAdapter:
    """A stored motion adapter, in eval mode on `device`. The caller holds LOAD_LOCK."""
    adapter = MotionAdapter.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return adapter.to(device).eval()


def _adapter_from_folder(source: Path, dtype: torch.dtype) -> MotionAdapter:
    # an AnimateDiff pipeline folder keeps its adapter in motion_adapter/
    folder = source / "motion_adapter" if (source / "motion_adapter" / "config.json").is_file() else source
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            "the folder has no config.json: it is not a diffusers MotionAdapter. Load a MotionAdapter folder "
            "(config.json + weights) or one AnimateDiff motion module file (.ckpt / .safetensors)"
        )
    try:
        class_name = read_json(folder / "config.json").get("_class_name")
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"the folder's config.json is not a JSON object: {exc}") from exc
    if class_name != "MotionAdapter":
        raise CheckpointError(
            f"the folder holds a {class_name or 'model of unknown class'}, not a MotionAdapter (AnimateDiff motion module)"
        )
    try:
        adapter = MotionAdapter.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"the motion adapter folder does not load: {type(exc).__name__}: {exc}") from exc
    # diffusers leaves weights missing from the file on the meta device, without an error
    missing = [name for name, t in (*adapter.named_parameters(), *adapter.named_buffers()) if t.is_meta]
    if missing:
        raise CheckpointError(
            f"the motion adapter folder does not load: its weights do not match its config.json "
            f"({len(missing)} tensors missing, e.g. {missing[0]})"
        )
    return adapter


def _adapter_from_file(path: Path, dtype: torch.dtype) -> MotionAdapter:
    original = read_state_dict(path)
    if any(key.startswith("controlnet_cond_embedding.") for key in original):
        raise CheckpointError("this is an AnimateDiff SparseCtrl ControlNet, not a motion module")
    state = convert_animatediff_checkpoint_to_diffusers(original)  # drops the (computed) pos_encoder tensors
    config = _adapter_config(state, _max_frames(original))
    try:
        adapter = MotionAdapter.from_config(config)
        missing, unexpected = adapter.load_state_dict(state, strict=False)
    except Exception as exc:
        raise CheckpointError(f"the motion module weights do not fit together: {type(exc).__name__}: {exc}") from exc
    # the sinusoidal positional encodings are computed, not learned: they may be missing
    missing = [key for key in missing if not key.endswith("pos_embed.pe")]
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:3])
        raise CheckpointError(f"the file is not a complete AnimateDiff motion module (e.g. {shown})")
    return adapter.to(dtype).eval()


def _adapter_config(state: dict[str, torch.Tensor], max_frames: int) -> dict:
    """A MotionAdapter config from the shapes of its (diffusers-keyed) weights."""
    down = _motion_layers(state, "down_blocks")
    if not down:
        raise CheckpointError(
            "the file is not an AnimateDiff motion module: it has no down_blocks.*.motion_modules weights"
        )
    if sorted(down) != list(range(len(down))):
        raise CheckpointError(f"the motion module's down blocks are not numbered 0..n-1: {sorted(down)}")
    blocks = range(len(down))
    try:
        channels = [int(state[f"down_blocks.{i}.motion_modules.0.proj_in.weight"].shape[0]) for i in blocks]
    except KeyError as exc:
        raise CheckpointError(f"the motion module has no input projection {exc}") from exc
    layers = [len(down[i]) for i in blocks]
    transformer_layers = [_transformer_layers(state, f"down_blocks.{i}.motion_modules.0.") for i in blocks]
    mid = _motion_layers(state, "mid_block", numbered=False).get(None, set())
    return {
        "block_out_channels": channels,
        "motion_layers_per_block": _one_or_all(layers),
        "motion_transformer_layers_per_block": _one_or_all(transformer_layers),
        "motion_mid_block_layers_per_block": max(len(mid), 1),
        "motion_transformer_layers_per_mid_block": _transformer_layers(state, "mid_block.motion_modules.0.")
        if mid
        else 1,
        "motion_num_attention_heads": ANIMATEDIFF_HEADS,
        "motion_norm_num_groups": ANIMATEDIFF_NORM_GROUPS,
        "motion_max_seq_length": max_frames,
        "use_motion_mid_block": bool(mid),
    }


def _motion_layers(state: dict, prefix: str, numbered: bool = True) -> dict:
    """block index (None for the unnumbered mid block) -> the indices of its motion modules."""
    pattern = re.compile(
        rf"^{prefix}\.(\d+)\.motion_modules\.(\d+)\." if numbered else rf"^{prefix}\.motion_modules\.(\d+)\."
    )
    found: dict = {}
    for key in state:
        if match := pattern.match(key):
            block, layer = (int(match[1]), int(match[2])) if numbered else (None, int(match[1]))
            found.setdefault(block, set()).add(layer)
    return found


def _transformer_layers(state: dict, prefix: str) -> int:
    return (
        len({m[1] for key in state if (m := re.match(rf"^{re.escape(prefix)}transformer_blocks\.(\d+)\.", key))}) or 1
    )


def _max_frames(original: dict[str, torch.Tensor]) -> int:
    """Frames the positional encoding covers: its [1, frames, channels] tensor, in either layout."""
    for key, tensor in original.items():
        if key.endswith(("pos_encoder.pe", "pos_embed.pe")) and tensor.ndim == 3:
            return int(tensor.shape[1])
    return DEFAULT_MAX_FRAMES


def _one_or_all(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


