"""Static int8 quantisation of an exported ONNX model (QDQ, onnxruntime.quantization), judged before it is kept.

Calibration: MinMax ranges over CALIBRATION_IMAGES training images of a prepared dataset (evaluation
transform), weights per channel (int8), activations uint8, every layer quantised. Keeping layers in fp32
(first conv, depthwise convs, the last conv, the LayerNorm + Linear head) or percentile/entropy calibration
were measured too (docs: Deploy): they recover quality but break the int8 chain, and the model then runs
slower than fp32 on this CPU. The quantised model is kept only when, on the dataset's `val` split (else its
test split), R@1 drops by at most MAX_R1_DROP, MAP@R by at most MAX_MAPR_DROP (Lite0's int8 met the R@1 rule while
losing 3.6 points of MAP@R), and it embeds faster than the fp32 model, timed batch by batch in alternation on the
same images (`gate`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from momentum_proxy.data.loading import eval_dataset, make_loader
from momentum_proxy.data.manifest import read_manifest, split_frame
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation.metrics import evaluate_embeddings
from momentum_proxy.vectors import l2_normalize

CALIBRATION_IMAGES = 256
MAX_R1_DROP = 0.005  # 0.5 points of R@1
MAX_MAPR_DROP = 0.01  # 1 point of MAP@R
BATCH = 32


def _arrays(root: str, frame, image_size: int) -> list[np.ndarray]:
    """Contiguous uint8 NCHW batches of `frame`'s images (evaluation transform)."""
    dataset = eval_dataset(root, frame.reset_index(drop=True), image_size)
    return [np.ascontiguousarray(b.numpy()) for b, _, _ in make_loader(dataset, BATCH, train=False, workers=0)]


def calibration_batches(data: str, image_size: int, count: int = CALIBRATION_IMAGES, seed: int = 0) -> list:
    """Up to `count` training images of the prepared dataset `data`, drawn with `seed`."""
    train = split_frame(read_manifest(data), "train")
    if train.empty:
        raise UserError(f"the calibration dataset {data} has no train images")
    rows = np.sort(np.random.default_rng(seed).permutation(len(train))[:count])
    return _arrays(data, train.iloc[rows], image_size)


def quantize(fp32: Path, out: Path, batches: list, input_name: str) -> dict:
    """Write the QDQ int8 model of `fp32` to `out`, calibrated on `batches`; returns the settings used."""
    from onnxruntime.quantization import (  # extra: [export]
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process  # extra: [export]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return {
        "format": "QDQ",
        "calibration": "MinMax",
        "calibration_images": sum(len(b) for b in batches),
        "weights": "int8, per channel",
        "activations": "uint8, per tensor",
        "fp32_layers": [],
    }


def compare(fp32_session, int8_session, input_name: str, data: str, image_size: int) -> dict:
    """R@1 and MAP@R of both models on the dataset's val split (else test), and their speed, timed batch by
    batch in alternation on the same images (judged by `gate`)."""
    df = read_manifest(data)
    split = "val" if (df["split"] == "val").any() else "test"
    frame = split_frame(df, split)
    batches = _arrays(data, frame, image_size)
    feats = {"fp32": [], "int8": []}
    seconds = {"fp32": 0.0, "int8": 0.0}
    for batch in batches:
        for name, session in (("fp32", fp32_session), ("int8", int8_session)):
            t0 = time.perf_counter()
            feats[name].append(session.run(None, {input_name: batch})[0])
            seconds[name] += time.perf_counter() - t0
    labels = frame["label"].to_numpy()
    res = {
        name: evaluate_embeddings(np.concatenate(f), labels, metrics=["recall", "map@r"], recalls=[1])
        for name, f in feats.items()
    }
    ips = {name: len(frame) / s for name, s in seconds.items()}
    fp32, quantised = (l2_normalize(np.concatenate(feats[name])) for name in ("fp32", "int8"))
    return {
        "split": split if split == "val" else "test (no val split)",
        "images": len(frame),
        "mean_cosine_to_fp32": round(float(np.mean(np.sum(fp32 * quantised, axis=1))), 4),
        "recall@1": {k: round(v["recall@1"], 4) for k, v in res.items()},
        "map@r": {k: round(v["map@r"], 4) for k, v in res.items()},
        "recall@1_change": round(res["int8"]["recall@1"] - res["fp32"]["recall@1"], 4),
        "map@r_change": round(res["int8"]["map@r"] - res["fp32"]["map@r"], 4),
        "images_per_second": {k: round(v, 1) for k, v in ips.items()},
        "speedup": round(ips["int8"] / ips["fp32"], 3),
    }


def gate(report: dict) -> list[str]:
    """What keeps the int8 model of a `compare` report from being kept (empty: it is kept): an R@1 drop over
    MAX_R1_DROP, a MAP@R drop over MAX_MAPR_DROP, no speed-up."""
    failed = []
    if report["recall@1_change"] < -MAX_R1_DROP:
        failed.append(f"R@1 {100 * report['recall@1_change']:+.2f} points (at most -{100 * MAX_R1_DROP:g} allowed)")
    if report["map@r_change"] < -MAX_MAPR_DROP:
        failed.append(f"MAP@R {100 * report['map@r_change']:+.2f} points (at most -{100 * MAX_MAPR_DROP:g} allowed)")
    if report["speedup"] <= 1:
        failed.append(f"not faster (x{report['speedup']})")
    return failed
