"""Runtimes: the `Embedder` of a run's best checkpoint in PyTorch or, exported on demand, in onnxruntime.

`load_embedder(run_dir, runtime, device, tta)`:
- `torch`: `embedding.inference.TorchEmbedder` (the reference);
- `onnx`: the run's model exported to `RUN/export/model.onnx` (`model-flip.onnx` with `tta="flip"`, the averaging
  in its graph; on demand, verified against PyTorch by `deploy.export.export_run`, reused while the checkpoint's
  sha256 and the sidecar's `tta` match), run by `embedding.onnx.OnnxEmbedder` (CUDAExecutionProvider where
  present, else CPUExecutionProvider).
"""

from __future__ import annotations

from pathlib import Path

from momentum_proxy.config import check_tta
from momentum_proxy.deploy.export import export_run, sidecar_path
from momentum_proxy.embedding.inference import TorchEmbedder, resolve_device
from momentum_proxy.embedding.onnx import OnnxEmbedder
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import file_sha256, read_json
from momentum_proxy.runs import RunDir, model_identity

RUNTIMES = ("torch", "onnx")
EXPORT_FILE = "export/model.onnx"


def export_file(tta: str = "none") -> str:
    """Where in a run folder its ONNX export with `tta` lives: export/model.onnx, export/model-flip.onnx."""
    return EXPORT_FILE if tta == "none" else EXPORT_FILE.replace(".onnx", f"-{tta}.onnx")


def cached_export(run_dir: str | Path, checkpoint_sha256: str, tta: str = "none") -> Path:
    """The run's ONNX export with `tta` (`export_file`) for the current checkpoint: reused when its sidecar says
    it was exported from this checkpoint at the run's image size with this `tta` and passed its check, else
    exported (and verified) now."""
    path = RunDir(run_dir) / export_file(tta)
    meta = sidecar_path(path)
    if path.is_file() and meta.is_file():
        info = read_json(meta)
        if (
            info.get("checkpoint_sha256") == checkpoint_sha256
            and info.get("check", {}).get("passed")
            and info.get("image_size") == RunDir(run_dir).config().image_size
            and info.get("format") == "onnx"
            and info.get("tta", "none") == tta
            and "int8" not in info
        ):
            return path
    export_run(run_dir, path, fmt="onnx", tta=tta)
    return path


def onnx_embedder(run_dir: str | Path, device: str = "auto", tta: str = "none") -> OnnxEmbedder:
    """The run's verified ONNX export with `tta` (made now if missing or stale) in onnxruntime."""
    identity = model_identity(run_dir)
    path = cached_export(run_dir, identity["checkpoint_sha256"], tta)
    info = read_json(sidecar_path(path))
    identity = {
        **identity,
        "runtime": "onnx",
        "verified": bool(info["check"]["passed"]),
        "export_sha256": file_sha256(path),
        "tta": info["tta"],
    }
    return OnnxEmbedder(path, info["image_size"], info["feature_dim"], identity, str(resolve_device(device)))


def load_embedder(run_dir: str | Path, runtime: str = "torch", device: str = "auto", tta: str = "none"):
    """The `Embedder` of the run's best checkpoint in `runtime` (torch | onnx) on `device`, with the test-time
    augmentation `tta` (none | flip; `embedding.tta`)."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    check_tta(tta)
    return TorchEmbedder(run_dir, device, tta) if runtime == "torch" else onnx_embedder(run_dir, device, tta)
