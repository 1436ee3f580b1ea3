"""One module per endpoint family. A handler is a plain function (request model, runtime) ->
response model; it raises `models.ApiError` for anything the client must change.
No FastAPI, no Modal, no torch here."""
