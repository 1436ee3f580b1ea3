"""One module per endpoint family. A handler is a plain function (request model, runtime) ->
response model; it validates everything, then submits; it raises `models.errors.ApiError` for
anything the client must change. May import models and infra's packages below the web layer;
no FastAPI, no Modal, no torch here."""
