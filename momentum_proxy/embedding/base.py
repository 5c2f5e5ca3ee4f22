"""The one interface every way of embedding images implements."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    """Turns a uint8 RGB batch (N x 3 x S x S, S = `image_size`) into L2-normalised float32 rows, with the
    test-time augmentation its identity names (`identity["tta"]`, see `embedding.tta`).

    Implementations: `embedding.inference.TorchEmbedder` (the reference), `embedding.onnx.OnnxEmbedder`
    (onnxruntime), `embedding.processes.ModelProcess` (a model in a child process); `deploy.runtimes.load_embedder`
    picks one for a run.
    """

    runtime: str  # "torch" | "onnx"
    image_size: int
    feature_dim: int
    identity: dict  # what an index records about the model and runtime (checkpoint sha256, backbone, tta, ...)

    def embed(self, images) -> np.ndarray:
        """(N, feature_dim) float32, unit rows."""
        ...
