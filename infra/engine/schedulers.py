"""A fresh diffusers scheduler per job, from the model's pristine config. The names a request may
use and how they resolve are the wire's (`models.schedulers`)."""

from __future__ import annotations

import inspect
from typing import Any


def build_scheduler(name: str, base_config: dict[str, Any], karras: bool, algorithm: str | None):
    """A new scheduler of class `name` from the model's pristine config (never a previous job's:
    flags like use_karras_sigmas would leak from one job into the next)."""
    import diffusers

    cls = getattr(diffusers, name)
    options: dict[str, Any] = {}
    accepted = inspect.signature(cls.__init__).parameters
    if "use_karras_sigmas" in accepted:
        options["use_karras_sigmas"] = karras
    if algorithm and "algorithm_type" in accepted:
        options["algorithm_type"] = algorithm
    return cls.from_config(dict(base_config), **options)
