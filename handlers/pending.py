"""Endpoints of the spec this server does not offer yet. They answer with a clear
`501 Not Implemented` error envelope naming what is missing — never a fake success."""

from __future__ import annotations

from models.errors import NotAvailable


def not_available(endpoint: str, what: str):
    def handler(request, runtime):
        raise NotAvailable(
            f"{endpoint} is not available on this server yet: {what}",
            tip="See the README for the endpoints this server implements.",
        )

    handler.__name__ = f"{endpoint}_not_available"
    return handler
