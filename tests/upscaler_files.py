"""Tiny fixture files for upscaler / face restorer tests: random-weight networks of the real
architectures, built with spandrel's own arch classes and saved the way the official releases are.

- `write_esrgan`: Real-ESRGAN's RRDBNet in the basicsr ("new arch") key layout of
  RealESRGAN_x4plus.pth (scale 4) or RealESRGAN_x2plus.pth (scale 2: a pixel-unshuffled input,
  12 input channels, the same x4 body), wrapped as {"params_ema": state_dict}.
- `write_compact`: SRVGGNetCompact as realesr-general-x4v3.pth, wrapped as {"params": state_dict}.
- `write_gfpgan`: GFPGANv1Clean at the one size spandrel builds (512, 87M parameters: slow to
  write, so build it once per test module), wrapped as {"params_ema": state_dict}.
- `write_lama`: LaMa (big-lama's FFC ResNet, the one size spandrel builds: 51M parameters, stored
  in fp16 to halve the file) with lama-cleaner's `generator.` key prefix, for object_removal.

A path ending in .safetensors gets the bare state dict instead. Every writer is deterministic:
weights are drawn from a fixed seed inside `torch.random.fork_rng()`, so the global RNG is left
as it was. Each returns the path it wrote.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from infra.engine.files.upscalers import import_spandrel

ESRGAN_GROWTH = 32  # RRDB growth channels: spandrel builds every ESRGAN with 32 (it cannot detect others)


@contextmanager
def _seeded(seed: int):
    """The global RNG (module initialisers draw from it) seeded with `seed`, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _save(state_dict: dict[str, torch.Tensor], path: Path, wrapper: str) -> Path:
    """.safetensors: the bare state dict; .pth / .pt / .ckpt: {wrapper: state_dict} as the releases."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().contiguous().clone() for key, value in state_dict.items()}
    if path.suffix == ".safetensors":
        save_file(state_dict, path)
    else:
        torch.save({wrapper: state_dict}, path)
    return path


def esrgan_new_arch_keys(old: dict[str, torch.Tensor], num_block: int) -> dict[str, torch.Tensor]:
    """spandrel's RRDBNet state dict ("old arch": model.0, model.1.sub.N.RDBj.convk.0, ...) in
    basicsr's RRDBNet names, as Real-ESRGAN releases store it (the inverse of spandrel's mapping).
    The sequential's tail is: [Upsample, conv_upK, act] per x2 step, conv_hr, act, conv_last."""
    upconvs = sorted({int(m[1]) for k in old if (m := re.match(r"model\.(\d+)\.", k)) and int(m[1]) >= 2})
    last, hr = upconvs[-1], upconvs[-2]
    names = {last: "conv_last", hr: "conv_hr"}
    names.update({index: f"conv_up{n}" for n, index in enumerate(upconvs[:-2], start=1)})
    new = {}
    for key, value in old.items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            new[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        elif m := re.fullmatch(rf"model\.1\.sub\.{num_block}\.(weight|bias)", key):
            new[f"conv_body.{m[1]}"] = value
        elif m := re.fullmatch(r"model\.0\.(weight|bias)", key):
            new[f"conv_first.{m[1]}"] = value
        elif m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", key):
            new[f"{names[int(m[1])]}.{m[2]}"] = value
        else:
            raise ValueError(f"unexpected RRDBNet key {key}")
    return new


def build_esrgan(
    scale: int = 4, num_block: int = 1, num_feat: int = 8, num_grow_ch: int = ESRGAN_GROWTH, seed: int = 0
):
    """The RRDBNet module itself (old-arch keys), as Real-ESRGAN builds it for x4 or x2."""
    if scale not in (2, 4):
        raise ValueError("Real-ESRGAN RRDB releases are x4 (RealESRGAN_x4plus) or x2 (RealESRGAN_x2plus)")
    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    shuffle = 4 // scale  # x2plus: pixel-unshuffle by 2, then the x4 body
    with _seeded(seed):
        net = ESRGAN(in_nc=3 * shuffle * shuffle, out_nc=3, num_filters=num_feat, num_blocks=num_block, scale=4,
                     shuffle_factor=shuffle if shuffle > 1 else None)
        if num_grow_ch != ESRGAN_GROWTH:  # a variant spandrel cannot build: rebuild the dense convs
            _regrow(net, num_feat, num_grow_ch)
        _brighten(net, gain=3.0, offset=0.5)
    return net.eval()


def write_esrgan(path: Path, scale: int = 4, num_block: int = 1, num_feat: int = 8,
                 num_grow_ch: int = ESRGAN_GROWTH, seed: int = 0) -> Path:
    """RealESRGAN_x4plus (scale 4) / RealESRGAN_x2plus (scale 2) layout; num_block=6 is the
    anime_6B shape. num_grow_ch other than 32 writes a file spandrel recognises but cannot load."""
    net = build_esrgan(scale, num_block, num_feat, num_grow_ch, seed)
    return _save(esrgan_new_arch_keys(net.state_dict(), num_block), path, "params_ema")


def build_compact(scale: int = 4, num_feat: int = 8, num_conv: int = 2, seed: int = 0):
    """SRVGGNetCompact as realesr-general-x4v3 (PReLU activations)."""
    import_spandrel()
    from spandrel.architectures.Compact import Compact

    with _seeded(seed):
        net = Compact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=scale, act_type="prelu")
    return net.eval()


def write_compact(path: Path, scale: int = 4, num_feat: int = 8, num_conv: int = 2, seed: int = 0) -> Path:
    return _save(build_compact(scale, num_feat, num_conv, seed).state_dict(), path, "params")


def write_gfpgan(path: Path, seed: int = 0) -> Path:
    """GFPGANv1Clean with the hyperparameters spandrel hardcodes (those of GFPGANv1.3 / v1.4)."""
    import_spandrel()
    from spandrel.architectures.GFPGAN import GFPGAN

    with _seeded(seed):
        net = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                     num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    return _save(net.state_dict(), path, "params_ema")


def write_lama(path: Path, seed: int = 0) -> Path:
    """LaMa's inpainting generator (spandrel's arch: image + mask in, RGB out), its keys under
    `generator.` as the LaMa training checkpoints name them, in fp16; a bare state dict in .safetensors."""
    import_spandrel()
    from spandrel.architectures.LaMa import LaMa

    with _seeded(seed):
        net = LaMa(in_nc=4, out_nc=3)
    state = {f"generator.{key.removeprefix('model.')}" if key.startswith("model.") else key: value.half()
             if value.is_floating_point() else value for key, value in net.state_dict().items()}
    return _save(state, path, "state_dict")


def write_not_a_model(path: Path) -> Path:
    """A valid checkpoint of tensors that are no network spandrel knows."""
    with _seeded(1):
        state = {"encoder.weight": torch.randn(4, 4), "encoder.bias": torch.randn(4)}
    return _save(state, path, "params_ema")


def _brighten(net: torch.nn.Module, gain: float, offset: float) -> None:
    """Scale the last conv of a random net and add `offset` to its bias, so the output is a
    textured mid-grey image rather than a dark one clamped to 0 (as freshly initialised RRDBs give)."""
    last = [module for module in net.modules() if isinstance(module, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(gain)
        last.bias.mul_(gain).add_(offset)


def _regrow(net: torch.nn.Module, num_feat: int, growth: int) -> None:
    """Replace the dense-block convs of an RRDBNet by ones with `growth` growth channels."""
    for name, module in list(net.named_modules()):
        if m := re.search(r"RDB\d\.conv(\d)$", name):
            k = int(m[1])
            conv = module[0]
            module[0] = torch.nn.Conv2d(num_feat + (k - 1) * growth, num_feat if k == 5 else growth, 3, 1, 1)
            del conv
