"""Every ModelsLab API generation as a face of the one `ENDPOINTS` table (infra/web/api.py).

A route here is a path of some generation of ModelsLab's API and the endpoint it stands for, plus
how its body maps onto that endpoint's enterprise-v1 wire model (field names, value spellings).
The route then runs exactly like the v1 one: the same auth dependency, handler, job queue, usage
metering, limits, webhooks and cancel; a job made on one generation is fetched on any other. Its
`fetch_result` points at its own generation's fetch route. The contract and its sources:
../shared/spec/modelslab-v6-v7-and-families.md; the decisions: docs/compatibility.md.

- **Enterprise v1 families** (`/api/v1/enterprise/<family>/...`, §5, §7, §8): `video/` and
  `image_editing/` and `super_resolution/` serve the admin routes every family has
  (system_details, restart_server, update_server, clear_cache, clear_queue, fetch, fetch/{id}) and
  the family's own endpoints this server can run: `video/text2video`, `video/img2video`,
  `image_editing/super_resolution` / `super_resolution/make` (the image as `init_image`),
  `image_editing/inpainting`, `image_editing/outpaint` and `image_editing/object_removal`
  (inpaint jobs: handlers/media.py), `image_editing/mask_creator`, `image_editing/removebg_mask`,
  `image_editing/magic_mix` (MagicMix on an SD model), `image_editing/qwen_edit` (img2img on the
  Qwen-Image-Edit model). What a family documents but no diffusers pipeline or well-kept library
  does (fashion, face_gen, head_shot: `EDITING_NOT_BUILT`) answers a 400 naming what is missing.
- **Enterprise model-family servers** (§6: `flux/`, `flux_klein/`, `flux_kontext_dev/`, `qwen/`,
  `z_image_turbo/`): the admin routes and the family's generation routes, whose bodies name no
  model: each runs a model category (`MODEL_FAMILY_SERVERS`; `flux/` with `deploy_type: flux_2_dev`
  runs Flux.2 dev), on the model the setting family_model_ids names for it, else the first loaded
  one (a 400 saying what to load when there is none; a `model_id` of another category is a 400).
  `init_image` may be a list of reference images (Flux.2 dev: 10, Klein: 4): the first is
  `init_image`, the others `reference_images`.
- **v6** (`/api/v6/images/...`, `/api/v6/image_editing/...`, `/api/v6/video/...`, §3, §4,
  §10.4): the same field names as v1; `fetch` with `request_id`, `fetch/{id}` by POST or GET;
  `model_reload` answers as verify_model (models are never dropped for idleness here).
- **v7** (`/api/v7/images/...`, `/api/v7/video-fusion/...`, `GET /api/v7/models`, §2):
  kebab-case routes; `init_image` may be a list (its first image is used); `aspect_ratio` gives
  the size when width and height are not sent; a video's `duration` (seconds) gives its frames.
- **v3** (`/api/v3/...`, the stablediffusionapi.com years): `text2img`, `img2img`, `dreambooth`
  (text2img of a community model, by `model_id`) and `fetch/{id}`; the parameters as JSON or as
  query-string parameters with an empty body.

The key is accepted everywhere in every spelling a generation's docs use (`infra.web.auth`):
`key` in the body or the query, `Authorization: Bearer`, a `key` header, `X-API-Key`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from models import requests as rq
from models.errors import BadInput, NotAvailable
from models.fields import is_unset, parse_number, strip_blanks

Translate = Callable[[dict], dict]

V1 = "/api/v1/enterprise"
V6 = "/api/v6"
V7 = "/api/v7"
V3 = "/api/v3"

# admin routes every enterprise family documents (§5.1); `update` is the official SDKs' spelling
FAMILY_ADMIN = ("system_details", "restart_server", "update_server", "clear_cache", "clear_queue", "fetch")

# video model names ModelsLab's video routes take that mean "the server's video model" here
# (this server makes video with AnimateDiff on an SD 1.x model: `model_id` names that SD model)
HOSTED_VIDEO_MODELS = {"cogvideox", "wanx", "wan2.1", "wan2.2", "zeroscope", "svd"}

MAX_FRAMES = 25  # what text2video makes at most (models/requests.py Text2VideoRequest)


@dataclass(frozen=True)
class Route:
    path: str  # the full path
    endpoint: str  # the name in ENDPOINTS it stands for
    tag: str  # the API generation, its OpenAPI tag
    fetch: str  # the fetch route of that generation (fetch_result = f"{fetch}/{id}")
    translate: Translate | None = None  # the body onto the endpoint's v1 wire model
    methods: tuple[str, ...] = ("POST",)
    summary: str = ""
    query_params: bool = False  # v3: the parameters may come as the query string
    request: type | None = None  # the body's own wire model, when it has fields v1's lacks (v7): validated first
    # an enterprise model-family server's route (flux/, qwen/, ...): the model category it runs, and
    # for flux/ the body's `deploy_type` values that choose another (flux_2_dev: Flux.2 dev)
    model_category: str | None = None
    deploy_types: dict[str, str] | None = None

    def category_of(self, data: dict) -> str | None:
        """The model category this call runs on (None: the request's model_id, or the default model)."""
        value = data.get("deploy_type")
        if self.deploy_types is None or is_unset(value):
            return self.model_category
        chosen = strip_blanks(str(value)).lower()
        if chosen not in self.deploy_types:
            raise BadInput(f"deploy_type {value!r} is not one this route serves",
                           tip=f"Send one of: {', '.join(self.deploy_types)}.")
        return self.deploy_types[chosen]


# --------------------------------------------------------------------------- translations


def renamed(**names: str) -> Translate:
    """Fields under the names a generation's docs give them, renamed to the v1 ones (a v1 name
    sent too wins)."""

    def translate(data: dict) -> dict:
        out = dict(data)
        for theirs, ours in names.items():
            if theirs in out:
                value = out.pop(theirs)
                out.setdefault(ours, value)
        return out

    return translate


def chain(*steps: Translate) -> Translate:
    def translate(data: dict) -> dict:
        for step in steps:
            data = step(data)
        return data

    return translate


def first_image(*names: str) -> Translate:
    """v7 sends reference images as a list: a list of one is the image (the route's model refused
    longer ones: this server takes one)."""

    def translate(data: dict) -> dict:
        out = dict(data)
        for name in names:
            value = out.get(name)
            if isinstance(value, list):
                out[name] = value[0] if value else None
        return out

    return translate


def aspect_ratio(data: dict) -> dict:
    """v7's `aspect_ratio` ("16:9", or runway's "1920:1080"; its form checked by the route's model)
    gives width and height when neither is sent: the longer side 1024 (the server's limit), both
    multiples of 8."""
    if is_unset(data.get("aspect_ratio")) or not is_unset(data.get("width")) or not is_unset(data.get("height")):
        return data
    ratio = strip_blanks(data["aspect_ratio"])
    across, down = (float(part) for part in ratio.split(":"))
    if across <= 0 or down <= 0:
        raise BadInput(f"aspect_ratio needs two sides above 0, got {ratio!r}", tip="Send e.g. 16:9, or width and height.")
    scale = 1024 / max(across, down)
    return {**data, "width": max(8, int(across * scale) // 8 * 8), "height": max(8, int(down * scale) // 8 * 8)}


def video_model(data: dict) -> dict:
    """ModelsLab's hosted video model names (cogvideox, wan2.2, ...) mean this server's video model."""
    if str(data.get("model_id", "")).lower() in HOSTED_VIDEO_MODELS:
        return {k: v for k, v in data.items() if k != "model_id"}
    return data


def duration(data: dict) -> dict:
    """v7's `duration` (seconds, checked by the route's model) gives the frames at the request's
    fps (default 8), at most MAX_FRAMES; `num_frames`, when sent, wins."""
    if is_unset(data.get("duration")) or not is_unset(data.get("num_frames")):
        return data
    fps = 8 if is_unset(data.get("fps")) else parse_number(data["fps"])
    frames = round(parse_number(data["duration"]) * fps)
    return {**data, "num_frames": max(1, min(MAX_FRAMES, frames))}



def reference_images(data: dict) -> dict:
    """Flux.2 and Klein send `init_image` as a list of reference images: the first is the image, the
    others `reference_images` (Kontext's second image, `init_image_2`, is its own field)."""
    value = data.get("init_image")
    if not isinstance(value, list):
        return data
    out = {**data, "init_image": value[0] if value else None}
    if len(value) > 1:
        out["reference_images"] = value[1:]
    return out


def not_run(what: str, missing: str) -> Translate:
    """A documented route this server cannot run: a 400 naming what is missing."""

    def translate(data: dict) -> dict:
        raise NotAvailable(f"{what} is not available on this server. {missing}",
                           tip="See docs/compatibility.md, \"Image editing\", for what this server offers instead.")

    return translate


# --------------------------------------------------------------------------- the routes


def _family_routes() -> list[Route]:
    routes = []
    families = {
        "video": {"text2video": ("text2video", video_model),
                  "img2video": ("img2video", None)},
        "image_editing": {"super_resolution": ("super_resolution", renamed(init_image="url")),
                          "inpainting": ("inpaint", None), "inpaint": ("inpaint", None),
                          "outpaint": ("outpaint", None), "object_removal": ("object_removal", None),
                          "mask_creator": ("mask_creator", None), "removebg_mask": ("removebg_mask", None),
                          "magic_mix": ("magic_mix", None)},
        "super_resolution": {"make": ("super_resolution", renamed(init_image="url"))},
    }
    for family, own in families.items():
        routes += _admin_routes(family)
        fetch = f"{V1}/{family}/fetch"
        for name, (endpoint, translate) in own.items():
            routes.append(Route(f"{V1}/{family}/{name}", endpoint, "Enterprise v1 families", fetch, translate))
    # qwen_edit: img2img on the Qwen-Image-Edit model (its instruction editing), the model named by
    # family_model_ids or the first loaded; a second image of init_image's list is refused by img2img
    editing = f"{V1}/image_editing/fetch"
    routes.append(Route(f"{V1}/image_editing/qwen_edit", "img2img", "Enterprise v1 families", editing, reference_images,
                        model_category="qwen_edit"))
    for name, missing in EDITING_NOT_BUILT.items():
        routes.append(Route(f"{V1}/image_editing/{name}", "img2img", "Enterprise v1 families", editing,
                            not_run(f"image_editing/{name}", missing), summary=f"{name}: not offered (see the message)"))
    # the model-family servers (§6): their generation routes name no model; each runs a model category
    for family, (category, names) in MODEL_FAMILY_SERVERS.items():
        routes += _admin_routes(family)
        deploy_types = {"flux": "flux", "flux_2_dev": "flux2"} if family == "flux" else None
        for name in names:
            routes.append(Route(f"{V1}/{family}/{name}", name, "Enterprise v1 families", f"{V1}/{family}/fetch",
                                reference_images if name == "img2img" else None, model_category=category,
                                deploy_types=deploy_types))
    return routes


# the image_editing routes (§7) no diffusers pipeline or well-kept library does: each answers a 400 naming
# what is missing, never a fake success
EDITING_NOT_BUILT = {
    "fashion": "Virtual try-on needs a garment-transfer model (IDM-VTON / OOTDiffusion class) with its human-parsing "
               "and pose networks; neither diffusers nor a well-kept library provides one.",
    "face_gen": "Identity-preserving face generation needs InstantID / PhotoMaker / IP-Adapter FaceID with "
                "insightface face embeddings; diffusers ships no pipeline for it and insightface's face models are "
                "not licensed for commercial use.",
    "head_shot": "Head shots from a face image need InstantID / PhotoMaker / IP-Adapter FaceID with insightface face "
                 "embeddings; diffusers ships no pipeline for it and insightface's face models are not licensed for "
                 "commercial use.",
}


# prefix -> (the model category its generation routes run, those routes); the model is the setting
# family_model_ids' for the category, else the first loaded of it (handlers.submit.family_model)
MODEL_FAMILY_SERVERS = {
    "flux": ("flux", ("text2img", "img2img")),  # with deploy_type flux_2_dev: Flux.2 dev
    "flux_klein": ("flux2_klein", ("text2img", "img2img")),
    "flux_kontext_dev": ("flux_kontext", ("img2img",)),
    "qwen": ("qwen", ("text2img", "img2img", "inpaint")),
    "z_image_turbo": ("zimage", ("text2img", "img2img")),
}


def _admin_routes(family: str) -> list[Route]:
    """The admin routes every enterprise family documents (§5.1), and `update`, under its prefix."""
    fetch = f"{V1}/{family}/fetch"
    routes = [Route(f"{V1}/{family}/{name}", name, "Enterprise v1 families", fetch) for name in FAMILY_ADMIN]
    routes.append(Route(f"{V1}/{family}/update", "update_server", "Enterprise v1 families", fetch))
    routes.append(Route(f"{V1}/{family}/fetch/{{request_id}}", "fetch", "Enterprise v1 families", fetch))
    return routes


def _v6_routes() -> list[Route]:
    images, editing, video = f"{V6}/images/fetch", f"{V6}/image_editing/fetch", f"{V6}/video/fetch"
    routes = [
        Route(f"{V6}/images/text2img", "text2img", "v6", images),
        Route(f"{V6}/images/img2img", "img2img", "v6", images),
        Route(f"{V6}/images/inpaint", "inpaint", "v6", images),
        Route(f"{V6}/images/fetch", "fetch", "v6", images),
        # models stay loaded here (nothing is dropped after 7 idle days): reloading is being there
        Route(f"{V6}/images/model_reload", "verify_model", "v6", images, summary="Is the model loaded? (v6 model_reload)"),
        Route(f"{V6}/image_editing/super_resolution", "super_resolution", "v6", editing, renamed(init_image="url")),
        Route(f"{V6}/image_editing/inpaint", "inpaint", "v6", editing),
        Route(f"{V6}/image_editing/outpaint", "outpaint", "v6", editing),
        Route(f"{V6}/image_editing/object_removal", "object_removal", "v6", editing),
        Route(f"{V6}/image_editing/mask_creator", "mask_creator", "v6", editing),
        Route(f"{V6}/image_editing/removebg_mask", "removebg_mask", "v6", editing),
        Route(f"{V6}/video/text2video", "text2video", "v6", video, video_model),
        Route(f"{V6}/video/img2video", "img2video", "v6", video),
    ]
    for fetch in (images, editing, video):
        routes.append(Route(f"{fetch}/{{request_id}}", "fetch", "v6", fetch, methods=("POST", "GET")))
    return routes


def _v7_routes() -> list[Route]:
    images, video = f"{V7}/images/fetch", f"{V7}/video-fusion/fetch"
    image = chain(first_image("init_image"), aspect_ratio)
    return [
        Route(f"{V7}/images/text-to-image", "text2img", "v7", images, aspect_ratio, request=rq.V7TextToImageRequest),
        Route(f"{V7}/images/image-to-image", "img2img", "v7", images, image, request=rq.V7ImageToImageRequest),
        Route(f"{V7}/images/inpaint", "inpaint", "v7", images, image, request=rq.V7InpaintRequest),
        Route(f"{images}/{{request_id}}", "fetch", "v7", images, methods=("POST", "GET")),
        Route(f"{V7}/video-fusion/text-to-video", "text2video", "v7", video, chain(aspect_ratio, duration, video_model),
              request=rq.V7TextToVideoRequest),
        Route(f"{V7}/video-fusion/image-to-video", "img2video", "v7", video, chain(image, duration),
              request=rq.V7ImageToVideoRequest),
        Route(f"{video}/{{request_id}}", "fetch", "v7", video, methods=("POST", "GET")),
        Route(f"{V7}/models", "get_all_models", "v7", images, methods=("GET", "POST")),
    ]


def _v3_routes() -> list[Route]:
    fetch = f"{V3}/fetch"
    return [
        Route(f"{V3}/text2img", "text2img", "v3", fetch, query_params=True),
        Route(f"{V3}/img2img", "img2img", "v3", fetch, query_params=True),
        Route(f"{V3}/dreambooth", "text2img", "v3", fetch, query_params=True,
              summary="Text to image with a community model (model_id)"),
        Route(f"{fetch}/{{request_id}}", "fetch", "v3", fetch, methods=("POST", "GET"), query_params=True),
        Route(fetch, "fetch", "v3", fetch, query_params=True),
    ]


ROUTES: list[Route] = [*_family_routes(), *_v6_routes(), *_v7_routes(), *_v3_routes()]
