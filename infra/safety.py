"""The NSFW detector: NudeNet (an ONNX YOLO detector whose weights ship in its wheel), on the CPU.

It runs offline and without torch, so the CPU web tier can answer nsfw_image_check itself and
the GPU worker can check generations. An image's NSFW score is the confidence of its most
certain explicit detection (exposed genitalia, breasts, buttocks or anus), 0.0 when there is
none; the same detections give the face boxes face_enhance restores.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

EXPLICIT = frozenset({
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
})
FACES = frozenset({"FACE_FEMALE", "FACE_MALE"})


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: tuple[int, int, int, int]  # x, y, width, height in image pixels


class NsfwDetector:
    def __init__(self):
        self._lock = threading.Lock()
        self._detector = None

    def detect(self, image: Image.Image) -> list[Detection]:
        detector = self._load()
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # as cv2.imread gives it
        return [Detection(d["class"], float(d["score"]), tuple(d["box"])) for d in detector.detect(bgr)]

    def nsfw_score(self, image: Image.Image) -> float:
        return max((d.score for d in self.detect(image) if d.label in EXPLICIT), default=0.0)

    def faces(self, image: Image.Image) -> list[Detection]:
        return [d for d in self.detect(image) if d.label in FACES]

    def _load(self):
        with self._lock:
            if self._detector is None:
                from nudenet import NudeDetector

                self._detector = NudeDetector()  # the 320n model inside the nudenet package
            return self._detector


@functools.cache
def detector() -> NsfwDetector:
    """The process-wide detector (the ONNX session is thread-safe and loaded on first use)."""
    return NsfwDetector()
