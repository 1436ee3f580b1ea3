"""The OpenAI images API (`/v1/images/...`, `/v1/models`): being written (issue 18)."""


def add_routes(app, runtime, limiter) -> None:
    """Placeholder until the OpenAI routes land: nothing is served under /v1/ yet."""
