"""The OpenAPI document: FastAPI's, with every request model under components (the routes read
their bodies themselves, leniently, so each route references its model), every error status a
route answers documented with the envelope, the `request_id` path parameter, and the job headers
(`Idempotency-Key`, `Cancel-After`) on the routes that make jobs and `Last-Event-ID` on the stream."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from models.fields import DURATION_PATTERN, MAX_JOB_ID
from models.responses import ErrorResponse

# every error status a route answers, each with the error envelope (documented, so clients and the
# schema fuzz in tests/web/test_fuzz.py can hold the API to it)
ERROR_RESPONSES: dict[int, dict] = {
    code: {"model": ErrorResponse, "description": description}
    for code, description in {
        400: "Unusable input (image, model, ...), or a documented feature this server does not offer",
        401: "Invalid Api Key",
        403: "An admin endpoint called with a generation key",
        404: "Unknown model, job or file",
        409: "Clashes with the server's state (a model id that exists, is loading or in use)",
        413: "Request body too large",
        422: "Invalid fields (message: field -> messages)",
        429: "Rate limit exceeded",
    }.items()
}
BLANK = r"^[ \t\r\n]*$"  # a blank string: unset (requests.WireModel drops it), as models.fields' patterns say blanks
REQUEST_ID_PARAMETER = {
    "name": "request_id",
    "in": "path",
    "required": True,
    "description": "The `id` of a generation response (overrides `request_id` in the body).",
    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_JOB_ID},
}


JOB_HEADERS = [
    {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255},
     "description": "The same key and body from the same API key within 24 h return the first job (same id and "
     "links) and make nothing; the same key with another body is a 409. Also the body field `idempotency_key`."},
    {"name": "Cancel-After", "in": "header", "required": False,
     "schema": {"type": "string", "pattern": f"{DURATION_PATTERN}|{BLANK}", "example": "5m"},
     "description": "A deadline: seconds, or a duration like 30s, 5m, 1h30m; from 1s to 168h (7 days). Past it the job "
     "ends as cancelled. "
     "Also the body field `deadline_seconds` (which wins)."},
]
LAST_EVENT_ID_HEADER = {
    "name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0},
    "description": "Reconnecting: the id of the last event received; the stream goes on from the next one.",
}


def route_extra(request_model: type, path: str, body: bool = True) -> dict:
    """The `openapi_extra` of a route: its JSON body's model (`body`: a POST), the path parameter if
    it has one, and the job headers when its body takes the job options; a GET takes the key in the
    query (or a header)."""
    parameters = [REQUEST_ID_PARAMETER] if "{request_id}" in path else []
    if "deadline_seconds" in getattr(request_model, "model_fields", {}):
        parameters += JOB_HEADERS
    if not body:
        parameters += [{"name": "key", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "The API key (or send it as `Authorization: Bearer`, or a `key` header)."}]
        return {"parameters": parameters}
    # a body with nothing required (the key-only endpoints, fetch/{id}: the id is the path's) may be
    # left out: the key can come as a header
    given = {"key", "request_id"} if "{request_id}" in path else {"key"}
    needed = any(field.is_required() for name, field in getattr(request_model, "model_fields", {}).items()
                 if name not in given)
    # fetch/{id}, cancel/{id}: the id is the path's, so the body is the key (KeyOnlyRequest) at most
    body_model = "KeyOnlyRequest" if set(getattr(request_model, "model_fields", {})) <= given else request_model.__name__
    return {
        "requestBody": {
            "required": needed,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body_model}"}}},
        },
        **({"parameters": parameters} if parameters else {}),
    }


def stream_extra(method: str) -> dict:
    """The stream route's parameters (its body, on POST, is the key only)."""
    key = [] if method == "POST" else [{"name": "key", "in": "query", "required": False, "schema": {"type": "string"},
                                         "description": "The API key, for EventSource clients (they send no headers)."}]
    return {"parameters": [REQUEST_ID_PARAMETER, LAST_EVENT_ID_HEADER, *key]}


def openapi_schema(app: FastAPI, request_models) -> dict:
    """FastAPI's schema plus every request model under components (routes reference them)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in request_models:
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(model_schema.pop("$defs", {}))
        components[model.__name__] = model_schema
    for component in components.values():
        for name, field in component.get("properties", {}).items():
            if name in component.get("required", []):
                _needs_a_value(field)
            else:
                _blank_is_unset(field)
    app.openapi_schema = schema
    return schema




def _blank_is_unset(field: dict) -> None:
    """An optional field of a wire model: a blank string means "not set" (requests.WireModel), so a
    pattern of its allows blank strings too."""
    for option in field.get("anyOf", [field]):
        if "pattern" in option and option.get("type") == "string":
            option["pattern"] = f"{option['pattern']}|{BLANK}"
        for inner in option.get("anyOf", []):
            _blank_is_unset({"anyOf": [inner]})


def _needs_a_value(field: dict) -> None:
    """A required field of a wire model: `null` and blank strings mean "not set" (requests.WireModel),
    so the schema of a required one allows neither."""
    options = field.get("anyOf")
    if options is None:
        options = [field]
    else:
        field["anyOf"] = options = [option for option in options if option.get("type") != "null"]
    for option in options:
        if option.get("type") == "string" and "pattern" not in option and "enum" not in option:
            option["pattern"] = r"[^ \t\r\n]"  # a character that is not a blank (requests.WireModel)
