"""The bytes of output files: images as PNG (or, for `base64: yes`, the base64 text of the PNG)
and video frames (PIL images) as an .mp4 or .gif file. No torch here: the web tier may import
this module.

* mp4: H.264 in yuv420p with the moov atom up front (`+faststart`), the format every browser
  plays inline and starts before the whole file has arrived. The encoder is the ffmpeg binary
  that ships inside the imageio-ffmpeg wheel (libx264), fed raw RGB frames through a pipe. 4:2:0
  chroma needs even dimensions: an odd width or height gets one more column or row, a copy of the
  last one (never a rescale), so a 65x63 video is stored as 66x64.
* gif: Pillow, one palette per frame, looping forever. GIF stores frame delays in hundredths of
  a second, so the per-frame duration (round(1000 / fps) ms) is kept to 10 ms: 8 fps (125 ms)
  plays at 120 ms per frame. Pillow merges a frame identical to the one before it into a longer
  one, so a still video has fewer GIF frames than it was given.
"""

from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = ("mp4", "gif")
H264_CRF = 18  # x264 constant quality: 18 is visually lossless; 0 lossless, 51 worst
H264_PRESET = "medium"


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_image(image: Image.Image, as_base64: bool) -> bytes:
    """PNG bytes, or for `base64: yes` the base64 text of those bytes (ASCII, no data: prefix)."""
    png = encode_png(image)
    return base64.b64encode(png) if as_base64 else png


def encode_video(frames: list[Image.Image], fps: int, fmt: str) -> bytes:
    """The frames as an `fmt` ("mp4" or "gif") file playing at `fps` frames per second."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown video format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not frames:
        raise ValueError("a video needs at least one frame")
    if fps < 1:
        raise ValueError(f"fps must be at least 1, not {fps}")
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"all frames of a video must have the same size, got {sorted(sizes)}")
    rgb = [frame.convert("RGB") for frame in frames]
    return _mp4(rgb, fps) if fmt == "mp4" else _gif(rgb, fps)


def _mp4(frames: list[Image.Image], fps: int) -> bytes:
    import imageio_ffmpeg  # the engine's extra (the web image has none): imported when a video is made

    arrays = [_even(np.asarray(frame)) for frame in frames]
    height, width = arrays[0].shape[:2]
    with tempfile.TemporaryDirectory(prefix="video-") as folder:
        path = Path(folder) / "video.mp4"  # the mp4 muxer seeks back to write the index: no pipe
        writer = imageio_ffmpeg.write_frames(
            str(path),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,  # no -crf from imageio-ffmpeg's 0..10 scale: ours is below
            macro_block_size=1,  # never let imageio-ffmpeg rescale; sizes are even already
            output_params=["-crf", str(H264_CRF), "-preset", H264_PRESET, "-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )
        writer.send(None)  # start ffmpeg
        try:
            for array in arrays:
                writer.send(np.ascontiguousarray(array))
        finally:
            writer.close()  # waits for ffmpeg to finish the file; raises if it failed
        return path.read_bytes()


def _even(array: np.ndarray) -> np.ndarray:
    """Pad an H x W x 3 array to even H and W by repeating its last row / column."""

    height, width = array.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return array
    return np.pad(array, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _gif(frames: list[Image.Image], fps: int) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=round(1000 / fps),
        loop=0,  # repeat forever
    )
    return buffer.getvalue()
