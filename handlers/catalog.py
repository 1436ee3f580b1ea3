"""The model catalog: verify_model and get_all_models read the weights store."""

from __future__ import annotations

import time

from infra.weights import FAILED, LOADING, validate_model_id
from models.errors import BadInput, NotFound
from models.requests import KeyOnlyRequest, ModelIdRequest
from models.responses import MessageResponse, ModelListResponse


def verify_model(req: ModelIdRequest, rt) -> MessageResponse:
    entry = rt.weights.get(validate_model_id(req.model_id))
    if entry is None:
        raise NotFound(f"Model id not found: {req.model_id}", tip="get_all_models lists the models on this server.")
    if entry.status == LOADING:
        return MessageResponse(status="processing", message="Model is still loading")
    if entry.status == FAILED:
        raise BadInput(f"Model {req.model_id} failed to load: {entry.message}")
    return MessageResponse(message="Model exists on server")


def get_all_models(req: KeyOnlyRequest, rt) -> ModelListResponse:
    models = [
        {
            "model_id": m.model_id,
            "load_data": time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(m.loaded_at)),
            "category": m.category,
            "status": m.status,
        }
        for m in rt.weights.list()
    ]
    return ModelListResponse(models=models)
