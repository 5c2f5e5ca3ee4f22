"""The one interface every way of embedding images implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # the interface names torch's device type without importing torch
    import torch


@runtime_checkable
class Embedder(Protocol):
    """Turns a uint8 RGB batch (N x 3 x S x S, S = `image_size`) into float32 rows of `feature_dim`, L2-normalised,
    with the test-time augmentation its identity names (`identity["tta"]`, see `embedding.tta`).

    Implementations: `embedding.inference.ModuleEmbedder` (any torch module: the model in training),
    `embedding.inference.TorchEmbedder` (a run's best model in PyTorch, the reference), `embedding.onnx.OnnxEmbedder`
    (onnxruntime), `embedding.processes.ModelProcess` (a model in a child process); `deploy.runtimes.load_embedder`
    picks one for a run. `embedding.inference.embed_dataset` and `embed_files` take any of them.
    """

    runtime: str  # "torch" | "onnx"
    device: torch.device  # where it computes; a caller puts tensors it hands back there (metrics, gathers)
    image_size: int
    feature_dim: int
    identity: dict  # what an index records about the model and runtime (checkpoint sha256, backbone, tta, ...)

    def embed(self, images) -> np.ndarray:
        """(N, feature_dim) float32, unit rows."""
        ...
