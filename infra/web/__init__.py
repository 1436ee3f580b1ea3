"""The HTTP layer: the one ENDPOINTS table and the routes made from it (`api`), the key check and
limits as a FastAPI dependency (`auth`), errors as envelopes (`envelopes`), the OpenAPI document
(`openapi`), the browser page at `/` (`page`, its files in `static/`). May import handlers, models and the infra packages below it; never torch."""
