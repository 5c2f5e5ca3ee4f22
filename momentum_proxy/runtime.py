"""Embedders: one interface over the runtimes that embed images with a run's model.

`load_embedder(run_dir, runtime, device)` returns an object with `.image_size`, `.feature_dim`, `.device`,
`.identity` (what an index records about the model and runtime) and `.embed(uint8 NCHW batch) -> np.ndarray`
(L2-normalised float32 rows). Runtimes:
- `torch`: the run's best checkpoint in PyTorch (the reference);
- `onnx`: the run's model exported to `RUN/export/model.onnx` (on demand, verified against PyTorch by
  `export.export_run`, reused while the checkpoint's sha256 matches), run by onnxruntime
  (CUDAExecutionProvider where present, else CPUExecutionProvider).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from momentum_proxy.errors import UserError
from momentum_proxy.fileio import read_json
from momentum_proxy.index import file_sha256
from momentum_proxy.inference import load_model
from momentum_proxy.retrieval import model_identity
from momentum_proxy.runs import RunDir

RUNTIMES = ("torch", "onnx")
EXPORT_FILE = "export/model.onnx"


class TorchEmbedder:
    """The run's PyTorch model (the reference runtime)."""

    runtime = "torch"

    def __init__(self, run_dir: str | Path, device: str = "auto"):
        self.model, cfg, _ = load_model(run_dir, device)
        self.device = next(self.model.parameters()).device
        self.image_size, self.feature_dim = cfg.image_size, cfg.feature_dim
        self.identity = {**model_identity(run_dir), "runtime": self.runtime, "verified": True}

    @torch.inference_mode()
    def embed(self, images) -> np.ndarray:
        out = self.model(torch.as_tensor(images).to(self.device, non_blocking=True))
        return F.normalize(out.float(), dim=1).cpu().numpy()


def cached_export(run_dir: str | Path, checkpoint_sha256: str) -> Path:
    """RUN/export/model.onnx for the current checkpoint: reused when its sidecar says it was exported from
    this checkpoint at the run's image size and passed its check, else exported (and verified) now."""
    from momentum_proxy.export import export_run, sidecar_path

    path = RunDir(run_dir) / EXPORT_FILE
    meta = sidecar_path(path)
    if path.is_file() and meta.is_file():
        info = read_json(meta)
        if (info.get("checkpoint_sha256") == checkpoint_sha256 and info.get("check", {}).get("passed")
                and info.get("image_size") == RunDir(run_dir).config().image_size and info.get("format") == "onnx"
                and "int8" not in info):
            return path
    export_run(run_dir, path, fmt="onnx")
    return path


class OnnxEmbedder:
    """The run's exported ONNX model in onnxruntime."""

    runtime = "onnx"

    def __init__(self, run_dir: str | Path, device: str = "auto"):
        from momentum_proxy.export import INPUT_NAME, onnx_session, sidecar_path
        from momentum_proxy.inference import resolve_device

        identity = model_identity(run_dir)
        path = cached_export(run_dir, identity["checkpoint_sha256"])
        info = read_json(sidecar_path(path))
        self.session = onnx_session(path, str(resolve_device(device)))
        self.device = torch.device("cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu")
        self.input_name = INPUT_NAME
        self.image_size, self.feature_dim = info["image_size"], info["feature_dim"]
        self.identity = {**identity, "runtime": self.runtime, "verified": bool(info["check"]["passed"]),
                         "export_sha256": file_sha256(path)}

    def embed(self, images) -> np.ndarray:
        x = np.ascontiguousarray(torch.as_tensor(images).cpu().numpy())
        out = self.session.run(None, {self.input_name: x})[0]
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def load_embedder(run_dir: str | Path, runtime: str = "torch", device: str = "auto"):
    """The embedder of the run's best checkpoint in `runtime` (torch | onnx) on `device`."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    return (TorchEmbedder if runtime == "torch" else OnnxEmbedder)(run_dir, device)


def check_mix(built_with: dict, identity: dict) -> str:
    """Whether embeddings of `identity` (an embedder's) may join those recorded in `built_with` (an index's
    model dict); returns the combined runtime record ("onnx,torch"), or raises UserError.

    Runtimes mix only for the same checkpoint and when every runtime involved is verified (torch is the
    reference; an exported runtime passed its agreement check against it for that checkpoint)."""
    had = set(str(built_with.get("runtime", "torch")).split(","))
    runtime = identity["runtime"]
    if had == {runtime}:
        return runtime
    if built_with.get("checkpoint_sha256") != identity["checkpoint_sha256"]:
        raise UserError("the index was built from another checkpoint; rebuild it for this model")
    if not (built_with.get("verified", True) and identity["verified"]):
        raise UserError(f"refusing to mix runtimes {','.join(sorted(had))} and {runtime}: an export of this "
                        "checkpoint did not pass its check against PyTorch")
    return ",".join(sorted(had | {runtime}))
