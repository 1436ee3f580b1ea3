"""After the pipeline: inpaint compositing (the safety checker treatments join it later).

The VAE round trip changes every pixel of an inpaint output, masked or not. Pasting the
generated image into the original through the mask after decoding restores the unmasked
pixels exactly: where the mask is 0 the output equals the input, bit for bit.
"""

from __future__ import annotations

from PIL import Image


def composite_inpaint(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """White (255) in `mask` takes the generated pixel, black (0) keeps the original."""
    if generated.size != original.size:
        generated = generated.resize(original.size, Image.Resampling.LANCZOS)
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask.convert("L"))
