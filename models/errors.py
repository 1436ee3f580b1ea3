"""Errors a client can cause. Raised anywhere below the API layer, turned by `infra.web.api` into
the ModelsLab error envelope with the HTTP status given here."""

from __future__ import annotations


class ApiError(Exception):
    status_code = 400

    def __init__(self, message: str | dict[str, list[str]], tip: str | None = None, status_code: int | None = None):
        super().__init__(message if isinstance(message, str) else str(message))
        self.message = message
        self.tip = tip
        if status_code is not None:
            self.status_code = status_code


class BadInput(ApiError):
    """The request is well-formed but something in it cannot be used (a broken image URL...)."""

    status_code = 400


class InvalidKey(ApiError):
    status_code = 401

    def __init__(self):
        super().__init__(
            "Invalid Api Key",
            tip="1. Make sure you are passing Content-Type: application/json in the header. "
            "2. Make sure you are doing a POST request. "
            "3. Make sure the key is sent as `key` in the JSON body, as `Authorization: Bearer <key>` or in a "
            "`key` header.",
        )


class Forbidden(ApiError):
    status_code = 403


class RateLimited(ApiError):
    """ModelsLab's "Rate limit exceeded", with HTTP 429."""

    status_code = 429


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    """The request clashes with the server's state (a model id that exists, is loading or in use)."""

    status_code = 409


class PayloadTooLarge(ApiError):
    status_code = 413


class NotAvailable(ApiError):
    """A documented feature this server does not offer: never a fake success. A 400, not a 501: the
    request asked for something this server cannot do, the server itself did not fail."""

    status_code = 400
