"""Pydantic wire models: loose-typed fields, one request model per endpoint, response envelopes."""

from models.errors import ApiError, BadInput, Forbidden, InvalidKey, NotAvailable, NotFound, PayloadTooLarge
from models.requests import *  # noqa: F403 - the request models are this package's API
from models.responses import (
    ErrorResponse,
    FailedResponse,
    JobResponse,
    MessageResponse,
    ModelListResponse,
    ProcessingResponse,
    SchedulersListResponse,
    SuccessResponse,
    SystemDetailsResponse,
    UsageResponse,
)
