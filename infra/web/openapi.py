"""The OpenAPI document: FastAPI's, with every request model under components (the routes read
their bodies themselves, leniently, so each route references its model), every error status a
route answers documented with the envelope, and the `request_id` path parameter."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

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
REQUEST_ID_PARAMETER = {
    "name": "request_id",
    "in": "path",
    "required": True,
    "description": "The `id` of a generation response (overrides `request_id` in the body).",
    "schema": {"type": "integer", "minimum": 0},
}


def route_extra(request_model: type, path: str) -> dict:
    """The `openapi_extra` of a route: its JSON body's model, and the path parameter if it has one."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request_model.__name__}"}}},
        },
        **({"parameters": [REQUEST_ID_PARAMETER]} if "{request_id}" in path else {}),
    }


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
    app.openapi_schema = schema
    return schema
