"""Runtimes: the `Embedder` of a run's best checkpoint in PyTorch or, exported on demand, in onnxruntime.

`load_embedder(run_dir, runtime, device)`:
- `torch`: `embedding.inference.TorchEmbedder` (the reference);
- `onnx`: the run's model exported to `RUN/export/model.onnx` (on demand, verified against PyTorch by
  `deploy.export.export_run`, reused while the checkpoint's sha256 matches), run by
  `embedding.onnx.OnnxEmbedder` (CUDAExecutionProvider where present, else CPUExecutionProvider).
"""
from __future__ import annotations

from pathlib import Path

from momentum_proxy.deploy.export import export_run, sidecar_path
from momentum_proxy.embedding.inference import TorchEmbedder, resolve_device
from momentum_proxy.embedding.onnx import OnnxEmbedder
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import file_sha256, read_json
from momentum_proxy.runs import RunDir, model_identity

RUNTIMES = ("torch", "onnx")
EXPORT_FILE = "export/model.onnx"


def cached_export(run_dir: str | Path, checkpoint_sha256: str) -> Path:
    """RUN/export/model.onnx for the current checkpoint: reused when its sidecar says it was exported from
    this checkpoint at the run's image size and passed its check, else exported (and verified) now."""
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


def onnx_embedder(run_dir: str | Path, device: str = "auto") -> OnnxEmbedder:
    """The run's verified ONNX export (made now if missing or stale) in onnxruntime."""
    identity = model_identity(run_dir)
    path = cached_export(run_dir, identity["checkpoint_sha256"])
    info = read_json(sidecar_path(path))
    identity = {**identity, "runtime": "onnx", "verified": bool(info["check"]["passed"]),
                "export_sha256": file_sha256(path)}
    return OnnxEmbedder(path, info["image_size"], info["feature_dim"], identity, str(resolve_device(device)))


def load_embedder(run_dir: str | Path, runtime: str = "torch", device: str = "auto"):
    """The `Embedder` of the run's best checkpoint in `runtime` (torch | onnx) on `device`."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    return TorchEmbedder(run_dir, device) if runtime == "torch" else onnx_embedder(run_dir, device)
