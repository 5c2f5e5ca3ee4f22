"""One `Embedder` interface: PyTorch, onnxruntime and a model process embed the same batch to the same unit rows."""

import numpy as np
import pytest
import torch

from momentum_proxy.data.loading import to_batch
from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.embedding.base import Embedder
from momentum_proxy.embedding.processes import ModelProcess


def test_every_runtime_is_an_embedder_and_they_agree(tiny_run):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    batch = to_batch(arrays)
    torch_embedder = load_embedder(tiny_run, "torch", "cpu")
    reference = torch_embedder.embed(batch)
    process = ModelProcess(tiny_run, threads=1)
    try:
        for embedder in (torch_embedder, load_embedder(tiny_run, "onnx", "cpu"), process):
            assert isinstance(embedder, Embedder), type(embedder).__name__
            assert (embedder.image_size, embedder.feature_dim) == (64, 32)
            assert embedder.identity["checkpoint_sha256"] == torch_embedder.identity["checkpoint_sha256"]
            rows = embedder.embed(batch)
            assert rows.shape == (3, 32) and rows.dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
            np.testing.assert_allclose(rows, reference, atol=1e-4)
    finally:
        process.close()
    assert not isinstance(torch.nn.Linear(2, 2), Embedder)


def test_eval_mode_restores_training_and_leaves_an_eval_model_alone(monkeypatch):
    from torch import nn

    from momentum_proxy.embedding.inference import eval_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not model[1].training
        raise RuntimeError("a failing batch")
    assert model.training and model[1].training  # back in training mode, even after an error
    model.eval()
    calls = []
    monkeypatch.setattr(model, "train", lambda mode=True: calls.append(mode) or model)
    with eval_mode(model):
        assert not model.training
    assert calls == [] and not model.training  # an inference model is not walked twice per batch
