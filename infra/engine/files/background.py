"""Background removers (removebg_mask) in the weights store: a U²-Net-style salient-object network as
one ONNX file, run through rembg on onnxruntime.

- `prepare_background_remover`: a downloaded `.onnx` file (or a folder holding exactly one) verified
  the way rembg will use it: it opens in onnxruntime, its first input takes one RGB image
  (`1 x 3 x 320 x 320` float, rembg's U²-Net input), and one run on such an input gives a first
  output of four dimensions (batch, maps, height, width), whose map 0 is the mask rembg reads. Stored
  as `model.onnx`.
- `load_background_remover`: the stored file as a rembg session (`StoredU2netSession`).

rembg is imported here only, and only when a background remover is prepared or loaded: it brings
pymatting, numba and scikit-image, which nothing else needs. (The web tier never imports this module.)
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np

from infra.engine.files.checkpoints import CheckpointError

BACKGROUND_REMOVER_FILE = "model.onnx"
U2NET_INPUT = (1, 3, 320, 320)  # what rembg's U²-Net sessions feed the network (BaseSession.normalize)


@functools.cache
def stored_session_class() -> type:
    """`StoredU2netSession`, defined on first use (rembg is imported then).

    rembg's U²-Net sessions find their model by name under rembg's own home folder (`~/.rembg`,
    downloading it there), and its `u2net_custom` session takes a `model_path` only inside that
    folder (`BaseSession.validate_model_path`). The weights store is elsewhere (the data dir, the
    Modal Volume), so this subclass takes `model_path` as it is; everything else (the input
    normalisation, reading map 0 of the first output, the min-max scaling to a 0-255 mask resized
    back to the image) is `U2netCustomSession.predict`, unchanged."""
    from rembg.sessions.u2net_custom import U2netCustomSession

    class StoredU2netSession(U2netCustomSession):
        @classmethod
        def download_models(cls, *args, **kwargs) -> str:
            return str(kwargs["model_path"])  # the store's file: nothing is downloaded, no folder check

    return StoredU2netSession


def load_background_remover(path: str | Path, providers: list[str] | None = None):
    """The stored ONNX file as a rembg session (its `predict(image)` gives the mask; `rembg.remove`
    takes it as `session`). `providers`: onnxruntime's execution providers; None: rembg's choice
    (CUDA where onnxruntime-gpu sees a GPU, else the CPU)."""
    import onnxruntime

    options = {"providers": providers} if providers else {}
    return stored_session_class()("u2net_custom", onnxruntime.SessionOptions(), model_path=str(path), **options)


def prepare_background_remover(source: Path, out: Path) -> dict:
    """Verify that `source` (an .onnx file, or a folder holding one) is a network rembg can run as
    U²-Net, and store it as `out/model.onnx`. Returns the manifest facts."""
    path = _onnx_file(source)
    try:
        session = load_background_remover(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own errors (InvalidProtobuf, Fail, ...): the file is not a model
        raise CheckpointError(f"the file is not an ONNX model onnxruntime opens: {type(exc).__name__}: {exc}") from exc
    inputs = session.inner_session.get_inputs()
    if len(inputs) != 1 or not _fits(inputs[0].shape, U2NET_INPUT):
        shapes = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise CheckpointError(f"a background remover takes one image input of shape {list(U2NET_INPUT)} (U²-Net's, as "
                              f"rembg feeds it); this model takes {shapes}")
    try:
        outputs = session.inner_session.run(None, {inputs[0].name: np.zeros(U2NET_INPUT, dtype=np.float32)})
    except Exception as exc:
        raise CheckpointError(f"the model does not run on a {list(U2NET_INPUT)} image: {type(exc).__name__}: {exc}") \
            from exc
    first = np.asarray(outputs[0])
    if first.ndim != 4 or first.shape[0] != 1 or first.shape[1] < 1:
        raise CheckpointError(f"a background remover's first output is a mask map of shape [1, n, height, width] "
                              f"(rembg reads map 0); this model's is {list(first.shape)}")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, out / BACKGROUND_REMOVER_FILE)
    return {"category": "background_remover", "format": "onnx", "file": BACKGROUND_REMOVER_FILE,
            "family": "u2net"}


def _onnx_file(source: Path) -> Path:
    if source.is_file():
        if source.suffix.lower() != ".onnx":
            raise CheckpointError(f"a background remover is one .onnx file (U²-Net as rembg publishes it), not "
                                  f"{source.name}")
        return source
    files = sorted(path for path in source.rglob("*.onnx") if path.is_file())
    if len(files) != 1:
        raise CheckpointError(f"expected one .onnx background remover file, found {len(files)}")
    return files[0]


def _fits(shape: list, wanted: tuple[int, ...]) -> bool:
    """Whether an ONNX input shape (ints, or names / None for dynamic dimensions) takes `wanted`."""
    return len(shape) == len(wanted) and all(not isinstance(d, int) or d in (w, -1) for d, w in zip(shape, wanted))
