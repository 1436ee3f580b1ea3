"""Wire models of the OpenAI images API this server also speaks (`infra.web.openai_api`): the
requests as OpenAI's SDKs send them, the answers and the error body in OpenAI's shape.

Requests are lenient where OpenAI's SDKs and multipart forms differ (`n` as 2 or "2"); fields of
OpenAI's API this server has no use for are accepted and ignored (`moderation`,
`output_compression`, `input_fidelity`, `safety_identifier`, `user`, ...); other fields are kept
as extras (`model_extra`) and offered to the ModelsLab request the route builds, so
`negative_prompt`, `seed`, `steps`, `guidance_scale`, `scheduler`, `strength`... work as extras.
No torch here: the web tier imports it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from models.fields import LooseInt

NOT_TRANSPARENT = "^(?![Tt][Rr][Aa][Nn][Ss][Pp][Aa][Rr][Ee][Nn][Tt]$)"  # any background but the one not offered
MAX_IMAGES = 4
NOT_BLANK = r"[^ \t\r\n]"  # a prompt of blanks only is no prompt (models.requests.WireModel)
_SIDE = "|".join(str(side) for side in range(1024, 7, -8))  # a multiple of 8 from 8 to 1024
# `size`: WIDTHxHEIGHT, `auto`, or blank (the default); the schema's pattern and parse_size's rule
SIZE_PATTERN = f"^[ \\t]*(?:[Aa][Uu][Tt][Oo]|({_SIDE})[ \\t]*[Xx][ \\t]*({_SIDE}))?[ \\t]*$"


def _whole(value):
    """A JSON integer: 7, or 7.0 (JSON Schema's `integer` counts a number with no fraction), never
    true or "7" (the strict model refuses those)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# ModelsLab's seed range (the schema written out: pydantic leaves `ge`/`le` raw behind a BeforeValidator)
Seed = Annotated[int, BeforeValidator(_whole), Field(ge=0, le=2**32 - 1),
                 WithJsonSchema({"type": "integer", "minimum": 0, "maximum": 2**32 - 1})]


def _on_the(kind: str, **keywords):
    """A `json_schema_extra` putting `keywords` on the `kind` branch of an optional field's anyOf
    (where generators and fuzzers read them)."""

    def extra(schema: dict) -> None:
        for option in schema.get("anyOf", [schema]):
            if option.get("type") == kind:
                option.update(keywords)

    return extra  # `n`: the most images one request makes (ModelsLab's `samples`)


class OpenAIImageRequest(BaseModel):
    """What the three image routes share."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(
        None, description="A model id of this server (GET /v1/models). Omitted, or one of OpenAI's own names "
        "(dall-e-2, dall-e-3, gpt-image-*): the server's default model. Any other id not on this server: 404 "
        "model_not_found.")
    n: LooseInt(1, MAX_IMAGES) | None = Field(1, description=f"Images to make, 1..{MAX_IMAGES}.")
    size: str | None = Field(
        None, description="`WIDTHxHEIGHT`, each a multiple of 8 from 8 to 1024 (e.g. 512x512); `auto` or omitted: "
        "512x512 for generations, the input image's size for edits and variations.",
        json_schema_extra=_on_the("string", pattern=SIZE_PATTERN))
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="`url`: links to the stored PNGs; `b64_json`: the PNGs inline, base64. Default: `url`, "
        "or `b64_json` when `model` is a GPT Image name (gpt-image-*, which OpenAI always answers in base64).")
    output_format: str | None = Field(None, description="`png` only (the outputs are PNG).",
                                      json_schema_extra=_on_the("string", pattern="^(?:[Pp][Nn][Gg])?$"))
    user: str | None = Field(None, description="Accepted and ignored.")


class ImageGenerationRequest(OpenAIImageRequest):
    """POST /v1/images/generations (JSON): each field of the JSON type its schema gives (strict: a
    `seed` of `false` or `"5"` is refused, as OpenAI's API refuses it), `n` as for every route."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str = Field(min_length=1, description="What to draw.", json_schema_extra={"pattern": NOT_BLANK})
    quality: str | None = Field(
        None, description="Denoising steps: low 10; auto, standard, medium 20; high, hd 40; xhigh, max 50 (an extra "
        "`steps` wins). Other values: the default.")
    style: str | None = Field(
        None, description="`natural`: the prompt as sent; `vivid` (default): ModelsLab's prompt enhancement (quality "
        "terms appended; `revised_prompt` shows the result).")
    background: str | None = Field(None, description="`auto` or `opaque`; `transparent` is not available.",
                                   json_schema_extra=_on_the("string", pattern=NOT_TRANSPARENT))
    stream: bool | None = Field(None, description="Streaming is not available: false or omitted.",
                                json_schema_extra=_on_the("boolean", enum=[False]))
    negative_prompt: str | None = Field(None, description="Ours (extra): what to keep out of the image.")
    seed: Seed | None = Field(None, description="Ours (extra): the seed of the first image (the others: seed + i).")


class ImageEditRequest(OpenAIImageRequest):
    """POST /v1/images/edits (multipart/form-data): the text fields; `image` and `mask` are files."""

    prompt: str = Field(min_length=1, description="What to paint in the edited area.",
                        json_schema_extra={"pattern": NOT_BLANK})
    quality: str | None = Field(None, description="As for generations.")
    background: str | None = Field(None, json_schema_extra=_on_the("string", pattern=NOT_TRANSPARENT))
    stream: bool | None = Field(None, json_schema_extra=_on_the("boolean", enum=[False]))


class ImageVariationRequest(OpenAIImageRequest):
    """POST /v1/images/variations (multipart/form-data): the text fields; `image` is a file."""


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = Field(None, description="The prompt as run, when it differs from the one sent.")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time of the answer.")
    data: list[ImageData]


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the model was loaded.")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
