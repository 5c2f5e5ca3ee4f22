"""An ONNX model file in onnxruntime as an `Embedder` (the file is made and verified by `deploy.export`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

INPUT_NAME, OUTPUT_NAME = "images", "embedding"


def onnx_session(path: str | Path, device: str = "cpu"):
    """An onnxruntime session: CUDAExecutionProvider when `device` is cuda and onnxruntime has it (in full
    float32, no TF32, as `embedding.inference.load_model`), else CPU."""
    import onnxruntime as ort  # extra: [export]

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
    return ort.InferenceSession(str(path), providers=providers)


class OnnxEmbedder:
    """An exported model file run by onnxruntime; `identity` is what an index records about it (an export with
    test-time augmentation holds it in its graph, and its identity's `tta` says which)."""

    runtime = "onnx"

    def __init__(self, model_file: str | Path, image_size: int, feature_dim: int, identity: dict, device: str = "cpu"):
        self.session = onnx_session(model_file, device)
        self.device = torch.device("cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu")
        self.image_size, self.feature_dim, self.identity = image_size, feature_dim, identity

    def embed(self, images) -> np.ndarray:
        x = np.ascontiguousarray(torch.as_tensor(images).cpu().numpy())
        out = self.session.run(None, {INPUT_NAME: x})[0]
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
