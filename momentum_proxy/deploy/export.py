"""Export a run's best model to ONNX or TorchScript, with a JSON sidecar, verified before it is kept.

The exported graph is the whole EmbeddingNet: uint8 RGB images N x 3 x S x S (NCHW) -> the backbone's own
normalisation -> backbone -> pooling -> LayerNorm -> Linear (-> L2 normalisation with `normalize`). With
`tta="flip"` the graph also holds the test-time augmentation (`embedding.tta`: the image and its mirror in one
batch, their normalised embeddings averaged and renormalised), and the sidecar says so (`tta`). The batch axis is
dynamic, the image size fixed. ONNX uses the TorchScript-based exporter (`dynamo=False`) at opset 17:
on torch 2.14.1 the dynamo exporter emits opset 18 and cannot convert EfficientNet's Pad down to 17.

Every export embeds a sample of the run's test images with PyTorch and with the exported file and is kept
only when the minimum cosine is >= MIN_COSINE and every query's top-10 neighbours (within the sample) are
identical (up to float32 ties); model and sidecar are written to temporary files and renamed only after that
check. `int8` quantises the checked model (see `deploy.int8`), which is then judged by retrieval quality and speed.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn

from momentum_proxy.config import ModelConfig, check_tta
from momentum_proxy.data.loading import eval_dataset, eval_resize, make_loader
from momentum_proxy.data.manifest import read_manifest, split_frame
from momentum_proxy.deploy.int8 import MAX_MAPR_DROP, MAX_R1_DROP, calibration_batches, compare, gate, quantize
from momentum_proxy.embedding.inference import load_model
from momentum_proxy.embedding.onnx import INPUT_NAME, OUTPUT_NAME, onnx_session
from momentum_proxy.embedding.tta import tta_embed
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import atomic_path, file_sha256, write_json
from momentum_proxy.runs import BEST, RunDir
from momentum_proxy.vectors import knn, l2_normalize

FORMATS = ("onnx", "torchscript")
OPSET = 17
MIN_COSINE = 0.9999
TOP_K = 10
TIE = 1e-6  # reference similarities this close are ties: their order is float noise
CHECK_IMAGES = 64


class ExportNet(nn.Module):
    """The embedding network as exported: raw embedding, or L2-normalised with `normalize`; with a `tta` other
    than none, its test-time augmented embedding (L2-normalised)."""

    def __init__(self, net: nn.Module, normalize: bool, tta: str = "none"):
        super().__init__()
        self.net, self.normalize, self.tta = net, normalize, tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.tta != "none":
            return tta_embed(self.net, images, self.tta)
        out = self.net(images)
        return F.normalize(out, dim=1) if self.normalize else out


def sidecar_path(model_file: str | Path) -> Path:
    """The JSON description beside an exported model: FILE.json."""
    return Path(f"{model_file}.json")


def package_version() -> str:
    try:
        return metadata.version("momentum-proxy")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' deprecation and tracer warnings (the check below decides correctness)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_for_export(run_dir: str | Path) -> tuple[nn.Module, ModelConfig, dict]:
    """The run's best model on the CPU in eval mode (timm layers in their exportable variants), its config,
    and {checkpoint_sha256}."""
    run = RunDir(run_dir)
    with timm.layers.set_layer_config(exportable=True):
        model, cfg, _ = load_model(run_dir, "cpu")
    return model, cfg, {"checkpoint_sha256": file_sha256(run / BEST)}


def export_onnx(model: nn.Module, path: Path, image_size: int) -> None:
    """Write `model` (uint8 NCHW in) as ONNX opset 17 with a dynamic batch axis."""
    example = torch.randint(0, 256, (2, 3, image_size, image_size), dtype=torch.uint8)
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def export_torchscript(model: nn.Module, path: Path, image_size: int) -> None:
    """Write `model` traced with a uint8 NCHW example (any batch size works when loaded)."""
    example = torch.randint(0, 256, (2, 3, image_size, image_size), dtype=torch.uint8)
    with _quiet(), torch.no_grad():
        torch.jit.trace(model, example).save(str(path))


def exported_runner(path: Path, fmt: str):
    """A function uint8 NCHW tensor -> embeddings (numpy) that runs the exported file."""
    if fmt == "onnx":
        session = onnx_session(path)
        return lambda x: session.run(None, {INPUT_NAME: np.ascontiguousarray(x.numpy())})[0]
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x):
        with torch.inference_mode():
            return module(x).numpy()

    return run


def check_batches(cfg: ModelConfig, image_size: int, count: int = CHECK_IMAGES, split: str = "test") -> list:
    """uint8 NCHW batches of up to `count` images spread evenly over the run's `split` (eval transform)."""
    try:
        frame = split_frame(read_manifest(cfg.data), split)
    except UserError as e:
        raise UserError(f"the run's dataset is needed to check the export: {e}") from None
    if len(frame) < 2:
        raise UserError(f"the {split} split of {cfg.data} has fewer than 2 images; cannot check the export")
    rows = np.unique(np.linspace(0, len(frame) - 1, min(count, len(frame))).round().astype(int))
    dataset = eval_dataset(cfg.data, frame.iloc[rows].reset_index(drop=True), image_size)
    return [images for images, _, _ in make_loader(dataset, 32, train=False, workers=0)]


def same_neighbours(reference: np.ndarray, exported: np.ndarray, k: int, tie: float = TIE) -> bool:
    """Whether every row's top-k neighbours (itself excluded) are identical in both, in order. Where the lists
    differ, the items swapped must be ties: reference similarities to the query within `tie` (float32 noise)."""
    reference, exported = l2_normalize(reference), l2_normalize(exported)
    ref_idx, exp_idx = knn(reference, None, k, exclude_self=True)[1], knn(exported, None, k, exclude_self=True)[1]
    rows, cols = np.nonzero(ref_idx != exp_idx)
    sims = reference @ reference.T
    gaps = np.abs(sims[rows, ref_idx[rows, cols]] - sims[rows, exp_idx[rows, cols]])
    return bool(np.all(gaps <= tie))


def agreement(reference: np.ndarray, exported: np.ndarray, k: int = TOP_K) -> dict:
    """Minimum cosine between corresponding rows, and whether the top-k neighbours agree (`same_neighbours`)."""
    cosine = np.sum(l2_normalize(reference) * l2_normalize(exported), axis=1)
    k = min(k, len(reference) - 1)
    same = same_neighbours(reference, exported, k)
    return {
        "images": len(reference),
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
        "k": k,
        "topk_identical": same,
        "passed": bool(cosine.min() >= MIN_COSINE and same),
    }


def verify(model: nn.Module, run, batches: list) -> dict:
    """Compare the exported runner with the PyTorch model on `batches`; see `agreement`."""
    with torch.inference_mode():
        reference = np.concatenate([model(b).numpy() for b in batches])
    exported = np.concatenate([run(b) for b in batches])
    return agreement(reference, exported)


def describe(
    cfg: ModelConfig, fmt: str, image_size: int, normalize: bool, identity: dict, check: dict, tta: str = "none"
) -> dict:
    """The sidecar: everything needed to turn a photo into the input and to know what the output is."""
    resize = eval_resize(image_size)
    augment = {
        "none": "none",
        "flip": "inside the model: the mean of the L2-normalised embeddings of the image "
        "and its mirror image (left-right), renormalised",
    }[tta]
    return {
        "format": fmt,
        "exporter": f"torch.onnx.export(dynamo=False, opset_version={OPSET})" if fmt == "onnx" else "torch.jit.trace",
        "opset": OPSET if fmt == "onnx" else None,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NCHW",
            "channel_order": "RGB",
            "shape": ["batch", 3, image_size, image_size],
            "value_range": [0, 255],
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", cfg.feature_dim],
            "l2_normalized": normalize or tta != "none",
            "similarity": "cosine",
        },
        "preprocessing": {
            "decode": "Pillow, Image.open(path).convert('RGB')",
            "resize": {
                "short_side": resize,
                "long_side": f"int({resize} * long / short)",
                "interpolation": "bilinear (Pillow, antialiased)",
            },
            "center_crop": {"size": image_size, "offset": "round((side - size) / 2)"},
            "normalization": "inside the model (the backbone's mean/std, channel order and scale)",
            "to_input": "HWC uint8 array -> transpose to CHW -> stack into a batch",
            "test_time_augmentation": augment,
        },
        "tta": tta,
        "image_size": image_size,
        "feature_dim": cfg.feature_dim,
        "backbone": cfg.backbone,
        "pooling": cfg.pooling,
        **identity,
        "package_version": package_version(),
        "torch_version": torch.__version__,
        "check": check,
    }


def _validate(fmt: str, out: Path, image_size: int | None, int8: bool, calibration, tta: str) -> None:
    check_tta(tta)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if out.is_dir() or str(out).endswith(("/", "\\")):
        raise UserError(f"--out must be a file path, not a folder: {out}")
    if image_size is not None and image_size < 16:
        raise UserError(f"--image-size must be at least 16, got {image_size}")
    if int8 and (fmt != "onnx" or not calibration):
        raise UserError("--int8 needs --format onnx and --calibration DATA (a prepared dataset)")
    if calibration and not int8:
        raise UserError("--calibration is only used with --int8")
    if calibration:
        read_manifest(calibration)  # a one-line error when it is not a prepared dataset


def _quantize(fp32: Path, out: Path, calibration: str, cfg: ModelConfig, image_size: int) -> dict:
    """The int8 model of `fp32` at `out`, and its report; refused (UserError) when it does not pay off."""
    settings = quantize(fp32, out, calibration_batches(calibration, image_size), INPUT_NAME)
    report = compare(onnx_session(fp32), onnx_session(out), INPUT_NAME, cfg.data, image_size)
    failed = gate(report)
    if failed:
        ips = report["images_per_second"]
        raise UserError(
            f"int8 model not kept: {'; '.join(failed)} on {report['images']} {report['split']} images "
            f"(mean cosine to fp32 {report['mean_cosine_to_fp32']}, {ips['int8']} img/s vs fp32 "
            f"{ips['fp32']}); nothing written"
        )
    return {
        **settings,
        "calibration_data": str(calibration),
        **report,
        "passed": True,
        "gate": {"max_recall@1_drop": MAX_R1_DROP, "max_map@r_drop": MAX_MAPR_DROP},
    }


def _write(fmt: str, model: nn.Module, path: Path, image_size: int, backbone: str) -> None:
    """Export, turning any exporter failure into a one-line refusal."""
    try:
        (export_onnx if fmt == "onnx" else export_torchscript)(model, path, image_size)
    except Exception as e:  # exporters raise many types; the reason is their first line
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"backbone {backbone} cannot be exported to {fmt}: {reason}") from None


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    fmt: str = "onnx",
    image_size: int | None = None,
    normalize: bool = False,
    int8: bool = False,
    calibration: str | Path | None = None,
    check_images: int = CHECK_IMAGES,
    tta: str = "none",
) -> dict:
    """Export the run's best model to `out` (+ `out.json`), verified against PyTorch; returns the sidecar.
    `tta` (none | flip) puts the test-time augmentation into the graph (`ExportNet`).

    With `int8`, the verified fp32 ONNX model is quantised (calibrated on the training images of the prepared
    dataset `calibration`) and kept only if it passes `int8.compare` on the run's dataset."""
    out = Path(out)
    _validate(fmt, out, image_size, int8, calibration, tta)
    net, cfg, identity = load_for_export(run_dir)
    size = image_size or cfg.image_size
    model = ExportNet(net, normalize, tta).eval()
    batches = check_batches(cfg, size, check_images)
    with (
        atomic_path(out) as tmp_model,
        atomic_path(sidecar_path(out)) as tmp_json,
        tempfile.TemporaryDirectory() as tmp,
    ):
        exported = Path(tmp) / "fp32.onnx" if int8 else tmp_model
        _write(fmt, model, exported, size, cfg.backbone)
        check = verify(model, exported_runner(exported, fmt), batches)
        if not check["passed"]:
            raise UserError(
                f"export check failed on {check['images']} test images: min cosine "
                f"{check['min_cosine']:.6f} (needs >= {MIN_COSINE}), identical top-{check['k']} "
                f"neighbours: {check['topk_identical']}; nothing written"
            )
        info = {**describe(cfg, fmt, size, normalize, identity, check, tta), "file": out.name}
        if int8:
            info["int8"] = _quantize(exported, tmp_model, str(calibration), cfg, size)
        write_json(tmp_json, info)
    return info
