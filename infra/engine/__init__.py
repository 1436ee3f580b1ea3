"""The only package that imports torch and diffusers. Import its modules lazily from the rest."""

import json
import threading
from pathlib import Path
from typing import Any

# architecture config folders shipped with the code (see configs/): real SD families and tiny ones
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

# diffusers/accelerate build models under `init_empty_weights`, which patches torch.nn globally:
# a model constructed on another thread meanwhile gets `meta` tensors. Every load in this process
# (pipelines, components, LoRAs, conversions) takes this lock.
LOAD_LOCK = threading.RLock()


def quiet_libraries() -> None:
    """Errors only from diffusers / transformers, and no progress bars in the server log."""
    import diffusers
    import transformers

    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
