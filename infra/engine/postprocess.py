"""After the pipeline: inpaint compositing and the safety checker's treatments of flagged images.

The VAE round trip changes every pixel of an inpaint output, masked or not. Pasting the
generated image into the original through the mask after decoding restores the unmasked
pixels exactly: where the mask is 0 the output equals the input, bit for bit.

An image the NSFW detector (infra/safety.py) flags is treated as the request's
`safety_checker_type` says: "blur" (a Gaussian blur strong enough that nothing is
recognisable), "pixelate" (coarse blocks), "black" (all black) or "sensitive_content_text" (the
image withheld, a notice of the same size in its place). PIL only: no torch here.
"""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFilter, ImageFont


def composite_inpaint(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """White (255) in `mask` takes the generated pixel, black (0) keeps the original."""
    if generated.size != original.size:
        generated = generated.resize(original.size, Image.Resampling.LANCZOS)
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask.convert("L"))


NOTICE = "Sensitive content - this image was withheld by the safety checker"  # ASCII: the default font has no em dash
NOTICE_BACKGROUND = (32, 32, 36)
NOTICE_TEXT = (230, 230, 230)


def blur(image: Image.Image) -> Image.Image:
    """A Gaussian blur whose radius is 1/10 of the longer side (at least 8 px): only colour washes remain."""
    image = image.convert("RGB")
    return image.filter(ImageFilter.GaussianBlur(radius=max(8, max(image.size) // 10)))


def pixelate(image: Image.Image) -> Image.Image:
    """Blocks of about 1/16 of the longer side (at least 8 px), each one flat colour."""
    image = image.convert("RGB")
    width, height = image.size
    block = max(8, round(max(width, height) / 16))
    small = image.resize((max(1, -(-width // block)), max(1, -(-height // block))), Image.Resampling.BOX)
    # scaled up whole blocks from the top-left corner, then cropped: every block is `block` pixels square
    big = small.resize((small.width * block, small.height * block), Image.Resampling.NEAREST)
    return big.crop((0, 0, width, height))


def black(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (0, 0, 0))


def sensitive_content_notice(image: Image.Image) -> Image.Image:
    """The image withheld: a dark image of the same size with a centred notice, nothing of the original."""
    width, height = image.size
    notice = Image.new("RGB", (width, height), NOTICE_BACKGROUND)
    draw = ImageDraw.Draw(notice)
    margin = max(2, width // 16)
    size = max(6, min(width // 14, height // 6))
    while True:  # the largest font (from ~1/14 of the width down) whose wrapped text fits
        font = ImageFont.load_default(size=size)
        average = max(1.0, draw.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
        text = "\n".join(textwrap.wrap(NOTICE, width=max(1, int((width - 2 * margin) / average))))
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=size // 3, align="center")
        if size <= 6 or (right - left <= width - 2 * margin and bottom - top <= height - 2 * margin):
            break
        size -= 1
    draw.multiline_text(
        ((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top),
        text, fill=NOTICE_TEXT, font=font, spacing=size // 3, align="center",
    )
    return notice


TREATMENTS = {
    "blur": blur,
    "pixelate": pixelate,
    "black": black,
    "sensitive_content_text": sensitive_content_notice,
}


def treat_flagged(image: Image.Image, kind: str) -> Image.Image:
    """A flagged image treated as ModelsLab's `safety_checker_type` says: same size, mode RGB."""
    try:
        treatment = TREATMENTS[kind]
    except KeyError:
        raise ValueError(f"unknown safety_checker_type {kind!r}; expected one of {', '.join(TREATMENTS)}") from None
    return treatment(image)
