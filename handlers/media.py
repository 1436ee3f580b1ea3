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

from PIL import Image, UnidentifiedImageError

from handlers.ondemand import require_model
from handlers.queue import check_output_size, expiry, output_key, submit_job, yes_no
from infra.net.inputs import decode_base64, encode_input
from infra.safety import detector
from infra.storage.base import StorageError
from models.errors import ApiError, BadInput
from models.requests import NsfwImageCheckRequest, SuperResolutionRequest, UploadImageRequest
from models.responses import JobResponse, NsfwCheckResponse, UploadImageResponse

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG"}
NETWORK_OUTPUT_FACTOR = 4  # an upscaler's own output may be this many times the output limit, before resampling


def super_resolution(req: SuperResolutionRequest, rt) -> JobResponse:
    settings = rt.settings
    image = rt.load_image(req.url, "url")
    width, height = round(image.width * req.scale), round(image.height * req.scale)
    check_output_size(width, height, f"url is {image.width}x{image.height}; scale {req.scale:g}", settings)
    awaiting = require_model(req.model_id, "upscaler", "model_id", rt)
    entry = rt.weights.get(req.model_id)
    if not awaiting and entry.scale > req.scale:
        # the network's own output is held whole before it is resampled down to `scale`
        net_w, net_h = image.width * entry.scale, image.height * entry.scale
        if net_w * net_h > NETWORK_OUTPUT_FACTOR * settings.max_output_pixels:
            raise BadInput(
                f"url is {image.width}x{image.height}: {req.model_id} makes {net_w}x{net_h} before scaling to "
                f"{req.scale:g}x, more than this server holds",
                tip="Send a smaller image, a scale closer to the model's own, or use a x2 model.",
            )
    restorer = None
    if req.face_enhance:
        restorer = settings.face_restorer_id
        awaiting += require_model(restorer, "face_restorer", "face_enhance", rt)
    params = {
        "model_id": req.model_id,
        "scale": req.scale,
        "face_restorer": restorer,
        "width": width,
        "height": height,
        "base64": req.base64,
        "await_models": awaiting,
        **expiry(req.temp, settings),
    }
    meta = {
        "model_id": req.model_id,
        "scale": req.scale,
        "face_enhance": req.face_enhance,
        "W": width,
        "H": height,
        "base64": yes_no(req.base64),
        "temp": yes_no(req.temp),
        "url": req.url if req.url.lower().startswith(("http://", "https://")) else "(base64 image)",
        "webhook": req.webhook,
        "track_id": req.track_id,
    }
    name = f"{int(time.time())}-{uuid.uuid4().hex}_out"  # the link is the credential: 122 random bits
    return submit_job("super_resolution", params, meta, [output_key(name, req.base64)], {"image": encode_input(image)}, req, rt)


def upload_image(req: UploadImageRequest, rt) -> UploadImageResponse:
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
    return UploadImageResponse(image_url=rt.storage.url(key, rt.base_url, expires_at=expires_at))


def nsfw_image_check(req: NsfwImageCheckRequest, rt) -> NsfwCheckResponse:
    image = rt.load_image(req.init_image, "init_image")
    score = detector().nsfw_score(image)
    threshold = rt.settings.nsfw_threshold
    return NsfwCheckResponse(
        images=req.init_image, has_nsfw_concept=[score >= threshold], nsfw_score=round(score, 4), threshold=threshold
    )
