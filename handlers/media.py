"""super_resolution, upload_image and nsfw_image_check.

super_resolution is a job like a generation (queued, fetchable, webhook), but its `output` is
one URL string, as the spec shows. upload_image stores the client's own bytes after checking
they are the image type it claims. nsfw_image_check runs the NSFW detector right here: it needs
no GPU, so the web tier answers it without a job.
"""

from __future__ import annotations

import io
import secrets
import time
import uuid
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from handlers import ondemand
from handlers.caller import Caller
from handlers.meta import upscale_meta
from handlers.submit import check_output_size, load_image, output_key, submit_job
from infra.jobs.params import UpscaleParams
from infra.net.inputs import decode_base64, encode_input
from infra.safety import detector
from infra.storage.base import StorageError
from models.errors import ApiError, BadInput
from models.requests import NsfwImageCheckRequest, SuperResolutionRequest, UploadImageRequest
from models.responses import JobResponse, NsfwCheckResponse, UploadImageResponse

if TYPE_CHECKING:
    from infra.runtime import Runtime

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG"}
NETWORK_OUTPUT_FACTOR = 4  # an upscaler's own output may be this many times the output limit, before resampling


def super_resolution(req: SuperResolutionRequest, rt: Runtime, caller: Caller) -> JobResponse:
    settings = rt.settings
    # 1. the image, the output size, the networks (fetched on first use), all checked first
    image = load_image(req.url, "url", rt, caller)
    width, height = round(image.width * req.scale), round(image.height * req.scale)
    check_output_size(width, height, f"url is {image.width}x{image.height}; scale {req.scale:g}", settings)
    upscaler = ondemand.require_known(req.model_id, "upscaler", "model_id", rt)
    if not isinstance(upscaler, ondemand.Pending) and upscaler.scale > req.scale:
        # the network's own output is held whole before it is resampled down to `scale`
        net_w, net_h = image.width * upscaler.scale, image.height * upscaler.scale
        if net_w * net_h > NETWORK_OUTPUT_FACTOR * settings.max_output_pixels:
            raise BadInput(
                f"url is {image.width}x{image.height}: {req.model_id} makes {net_w}x{net_h} before scaling to "
                f"{req.scale:g}x, more than this server holds",
                tip="Send a smaller image, a scale closer to the model's own, or use a x2 model.",
            )
    needed = [upscaler]
    restorer = None
    if req.face_enhance:
        restorer = settings.face_restorer_id
        needed.append(ondemand.require_known(restorer, "face_restorer", "face_enhance", rt))
    # 2. the params, the meta derived from them, and the job
    params = UpscaleParams(
        model_id=req.model_id, scale=req.scale, face_restorer=restorer, width=width, height=height, base64=req.base64
    )
    name = f"{int(time.time())}-{uuid.uuid4().hex}_out"  # the link is the credential: 122 random bits
    pending = [item for item in needed if isinstance(item, ondemand.Pending)]
    return submit_job("super_resolution", params, upscale_meta(params, req), [output_key(name, req.base64)],
                      {"image": encode_input(image)}, req, rt, caller, pending)


def upload_image(req: UploadImageRequest, rt: Runtime, caller: Caller) -> UploadImageResponse:
    settings = rt.settings
    data = decode_base64(req.base64_image, "base64_image", settings.max_input_image_bytes)
    expected = PIL_FORMATS[req.image_type]
    try:
        image = Image.open(io.BytesIO(data))
        actual, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        raise BadInput(f"base64_image has more than the {settings.max_input_image_pixels} pixels this server accepts") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadInput("base64_image is not a readable image", tip="Send the base64 of a PNG or JPEG file.") from None
    if actual != expected:
        raise BadInput(
            f"base64_image is a {actual} image but image_type says {req.image_type}",
            tip=f"Send image_type \"{actual.lower() if actual else 'png'}\" or the base64 of a {expected} file.",
        )
    if width * height > settings.max_input_image_pixels:
        raise BadInput(
            f"base64_image is {width}x{height} pixels, more than the {settings.max_input_image_pixels} pixels "
            "this server accepts",
            tip="Send a smaller image.",
        )
    try:
        image.load()  # the whole file decodes, not only its header
    except (OSError, ValueError, SyntaxError):
        raise BadInput("base64_image is a damaged or truncated image", tip="Send the complete image file.") from None
    # digits, as ModelsLab names uploads; 30 random ones (~100 bits) so the link cannot be guessed
    key = f"uploads/{time.time_ns()}{secrets.randbelow(10**30):030d}.{req.image_type}"
    expires_at = time.time() + settings.temp_output_seconds
    try:
        rt.storage.put(key, data, f"image/{expected.lower()}", expires_at=expires_at)
    except StorageError as exc:
        raise ApiError(f"The image could not be stored: {exc}", status_code=502) from None
    return UploadImageResponse(image_url=rt.storage.url(key, caller.base_url, expires_at=expires_at))


def nsfw_image_check(req: NsfwImageCheckRequest, rt: Runtime, caller: Caller) -> NsfwCheckResponse:
    image = load_image(req.init_image, "init_image", rt, caller)
    score = detector().nsfw_score(image)
    threshold = rt.settings.nsfw_threshold
    return NsfwCheckResponse(
        images=req.init_image, has_nsfw_concept=[score >= threshold], nsfw_score=round(score, 4), threshold=threshold
    )
