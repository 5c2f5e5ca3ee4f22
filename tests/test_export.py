"""`mproxy export` (ONNX, TorchScript), its self-check and sidecar, and the `--runtime onnx` embedder."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from momentum_proxy.cli import main
from momentum_proxy.data.manifest import read_manifest
from momentum_proxy.deploy.export import MIN_COSINE, export_run, same_neighbours, sidecar_path
from momentum_proxy.deploy.runtimes import EXPORT_FILE, load_embedder
from momentum_proxy.embedding.inference import ModuleEmbedder, embed_files
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import file_sha256
from momentum_proxy.models.net import EmbeddingNet
from momentum_proxy.retrieval.store import check_mix
from momentum_proxy.runs import BEST, RunDir
from momentum_proxy.training.config import TrainConfig
from momentum_proxy.vectors import l2_normalize


def make_run(data, out: Path, backbone: str = "efficientnet_lite0", seed: int = 0) -> Path:
    """A run folder holding a random-weight model as its best checkpoint (64 px, 32-d)."""
    cfg = TrainConfig(data=str(data), out=str(out), backbone=backbone, pretrained="none", image_size=64, feature_dim=32)
    RunDir(out).start(cfg, overwrite=True)
    torch.manual_seed(seed)
    model = EmbeddingNet(backbone, 32, weights=None, image_size=64)
    RunDir(out).save_checkpoint(BEST, {"model": model.state_dict(), "epoch": 0})
    return out


def split_images(data) -> list[str]:
    df = read_manifest(data)
    return [str(Path(data) / p) for p in df[df["split"] == "test"]["path"]]


def assert_agree(reference: np.ndarray, other: np.ndarray):
    """Cosine >= MIN_COSINE row by row, and the same top-10 neighbours (float32 ties aside)."""
    cosine = np.sum(reference * other, axis=1) / np.linalg.norm(other, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= MIN_COSINE
    assert same_neighbours(reference, other, 10)


def onnx_embed(path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


def torch_batch(data, size=64) -> np.ndarray:
    """The test split as one uint8 NCHW array, through the evaluation transform."""
    from momentum_proxy.data.loading import eval_resize, eval_transform, read_image, to_array

    tf = eval_transform(size)
    arrays = [to_array(tf(read_image(p, eval_resize(size)))) for p in split_images(data)]
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet50", "googlenet", "inception", "timm:resnet18"])
def test_every_backbone_exports_to_onnx_and_agrees_with_pytorch(backbone, tiny_data, tmp_path):
    run = make_run(tiny_data, tmp_path / "run", backbone)
    info = export_run(run, tmp_path / "m.onnx")
    assert info["check"]["passed"] and info["check"]["k"] == 10
    images = torch_batch(tiny_data)
    model = load_embedder(run, "torch", "cpu").model
    with torch.inference_mode():
        reference = model(torch.from_numpy(images)).numpy()
    exported = onnx_embed(tmp_path / "m.onnx", images)
    assert exported.shape == reference.shape == (len(images), 32)
    assert_agree(reference, exported)
    import onnx

    assert {o.domain or "ai.onnx": o.version for o in onnx.load(tmp_path / "m.onnx").opset_import}["ai.onnx"] == 17


def test_torchscript_export_agrees_and_takes_any_batch(tiny_data, tmp_path):
    run = make_run(tiny_data, tmp_path / "run", "resnet50")
    info = export_run(run, tmp_path / "m.pt", fmt="torchscript", normalize=True)
    assert info["format"] == "torchscript" and info["output"]["l2_normalized"]
    images = torch.from_numpy(torch_batch(tiny_data))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.inference_mode():
        reference = load_embedder(run, "torch", "cpu").model(images).numpy()
        out = loaded(images).numpy()
        assert loaded(images[:3]).shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert_agree(reference, out)


def test_sidecar_describes_the_input_and_is_enough_to_embed_a_photo(tiny_data, tmp_path):
    """Follow only the sidecar (Pillow + numpy + onnxruntime, as in the README) and get the package's embedding."""
    from PIL import Image

    run = make_run(tiny_data, tmp_path / "run")
    export_run(run, tmp_path / "out" / "model.onnx", image_size=56)
    meta = json.loads(sidecar_path(tmp_path / "out" / "model.onnx").read_text())
    assert meta["checkpoint_sha256"] == file_sha256(run / BEST) and meta["opset"] == 17
    assert meta["input"]["shape"] == ["batch", 3, 56, 56] and meta["input"]["dtype"] == "uint8"
    assert meta["feature_dim"] == 32 and meta["image_size"] == 56 and meta["backbone"] == "efficientnet_lite0"
    assert meta["package_version"] and not meta["output"]["l2_normalized"] and meta["file"] == "model.onnx"

    photo = split_images(tiny_data)[0]
    size, short = meta["image_size"], meta["preprocessing"]["resize"]["short_side"]
    im = Image.open(photo).convert("RGB")
    w, h = im.size
    im = im.resize((short, int(short * h / w)) if w <= h else (int(short * w / h), short), Image.BILINEAR)
    left, top = round((im.width - size) / 2), round((im.height - size) / 2)
    x = np.asarray(im.crop((left, top, left + size, top + size)), np.uint8).transpose(2, 0, 1)[None]
    emb = onnx_embed(tmp_path / "out" / "model.onnx", np.ascontiguousarray(x))[0]

    embedder = load_embedder(run, "torch", "cpu")
    expected = embed_files(ModuleEmbedder(embedder.model, image_size=56), [photo])[0][0]
    assert np.dot(emb / np.linalg.norm(emb), expected) >= MIN_COSINE


def test_a_sabotaged_export_fails_its_check_and_leaves_nothing(tiny_data, tmp_path, monkeypatch):
    run = make_run(tiny_data, tmp_path / "run")
    forward = EmbeddingNet.forward

    def drifts_when_exported(self, x):
        out = forward(self, x)
        return out + 0.05 * out.flip(0) if torch.onnx.is_in_onnx_export() else out

    monkeypatch.setattr(EmbeddingNet, "forward", drifts_when_exported)
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="export check failed"):
        export_run(run, tmp_path / "out" / "model.onnx")
    assert list((tmp_path / "out").iterdir()) == []


def rotated(out: np.ndarray, angle: float = 0.05) -> np.ndarray:
    """Every row turned by `angle` (coordinates rotated in pairs): each row's cosine to its original is
    cos(angle), every similarity between rows, so every neighbour list, is unchanged."""
    c, s = np.cos(angle), np.sin(angle)
    turned = out.copy()
    turned[:, 0::2], turned[:, 1::2] = c * out[:, 0::2] - s * out[:, 1::2], s * out[:, 0::2] + c * out[:, 1::2]
    return turned


def two_neighbours_swapped(out: np.ndarray, k: int = 10, least_gap: float = 1e-4) -> np.ndarray:
    """One row reflected so that two adjacent items of its top-k change places (their similarities to it are
    exchanged), where that costs the least cosine. The items' similarities differ by at least `least_gap`, far
    beyond float noise: a real change of order."""
    unit = out / np.linalg.norm(out, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :k]
    best = None
    for i in range(len(out)):
        for a, b in zip(order[i, :-1], order[i, 1:]):
            gap = sims[i, a] - sims[i, b]
            loss = gap**2 / (1 - sims[a, b])  # 1 - cosine of the reflected row to the original
            if gap >= least_gap and (best is None or loss < best[0]):
                best = (loss, i, a, b)
    assert best is not None and best[0] < 5e-5, "no near neighbours to swap within the cosine tolerance"
    _, i, a, b = best
    v = unit[a] - unit[b]
    swapped = out.copy()
    swapped[i] = out[i] - 2 * (out[i] @ v) / (v @ v) * v  # the mirror that exchanges a and b
    return swapped


@pytest.mark.parametrize(
    "change, cosine_passes, neighbours_pass", [(two_neighbours_swapped, True, False), (rotated, False, True)]
)
def test_an_export_failing_one_check_alone_is_refused(
    change, cosine_passes, neighbours_pass, tiny_data, tmp_path, monkeypatch
):
    """The export is kept only when both checks pass: near neighbours reordered with every cosine >= MIN_COSINE,
    or every neighbour list intact with the cosine too low, are each refused, and nothing is written."""
    from momentum_proxy.deploy import export

    run = make_run(tiny_data, tmp_path / "run")
    real = export.exported_runner
    seen = []

    def changed_runner(path, fmt):
        runner = real(path, fmt)
        return lambda x: seen.append(len(x)) or change(runner(x))

    monkeypatch.setattr(export, "exported_runner", changed_runner)
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="export check failed") as e:
        export_run(run, tmp_path / "out" / "model.onnx")
    assert seen == [32]  # the change saw the whole sample (the 32 test images) at once
    cosine = float(re.search(r"min cosine ([0-9.]+)", str(e.value)).group(1))
    assert (cosine >= MIN_COSINE) == cosine_passes
    assert f"identical top-10 neighbours: {neighbours_pass}" in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []


def one_row_off(count: int = 32, dim: int = 64, cosine: float = 0.9995) -> tuple[np.ndarray, np.ndarray]:
    """Reference rows and a copy in which row 0 alone is turned (to `cosine`) toward a direction orthogonal to
    every row: the other rows are exact and every similarity to row 0 shrinks by the same factor. Row 0 points
    away from a tight cluster of the others, so it stays last in every list and no neighbour list changes."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(count, dim))
    rows[1:] += 6 * np.eye(dim)[0]  # the others: a cluster around +e0; row 0 opposite
    rows[0] = -np.eye(dim)[0] + 0.1 * rows[0]
    rows = l2_normalize(rows.astype(np.float32))
    away = np.linalg.svd(rows)[2][-1]  # orthogonal to every row (count < dim)
    off = rows.copy()
    off[0] = cosine * rows[0] + np.sqrt(1 - cosine**2) * away
    return rows, off


def test_the_export_check_is_on_the_least_agreeing_row():
    """A single row off (cosine 0.9995), the 31 others exact and every neighbour list intact: the check fails on
    that row's cosine (a mean over the rows, 0.99998, would pass)."""
    from momentum_proxy.deploy.export import agreement

    reference, exported = one_row_off()
    check = agreement(reference, exported)
    assert check["topk_identical"] and check["mean_cosine"] >= MIN_COSINE  # only the minimum can fail it
    assert check["min_cosine"] == pytest.approx(0.9995, abs=1e-6) and not check["passed"]
    assert agreement(reference, reference.copy())["passed"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--format", "tflite", "--out", "{tmp}/m.onnx"], "unknown export format 'tflite'"),
        (["--out", "{tmp}"], "--out must be a file path, not a folder"),
        (["--image-size", "8", "--out", "{tmp}/m.onnx"], "--image-size must be at least 16"),
        (["--int8", "--out", "{tmp}/m.onnx"], "--int8 needs --format onnx and --calibration DATA"),
        (["--int8", "--calibration", "{tmp}", "--format", "torchscript", "--out", "{tmp}/m.pt"], "--int8 needs"),
        (["--calibration", "{tmp}", "--out", "{tmp}/m.onnx"], "--calibration is only used with --int8"),
        (["--int8", "--calibration", "{tmp}", "--out", "{tmp}/m.onnx"], "no manifest.csv"),
    ],
)
def test_bad_export_requests_are_one_line_errors(args, expected, tiny_data, tmp_path, capsys):
    run = make_run(tiny_data, tmp_path / "run")
    (tmp_path / "o").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), *[a.format(tmp=tmp_path / "o") for a in args]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert list((tmp_path / "o").iterdir()) == []


def test_a_backbone_that_cannot_export_is_refused_in_one_line(tiny_data, tmp_path):
    run = make_run(tiny_data, tmp_path / "run", "timm:vit_tiny_patch16_224")  # a ViT built for the run's 64 px only
    with pytest.raises(UserError, match="timm:vit_tiny_patch16_224 cannot be exported to onnx: Input height") as e:
        export_run(run, tmp_path / "m.onnx", image_size=48)
    assert "\n" not in str(e.value) and not (tmp_path / "m.onnx").exists()


def test_cli_export_reports_the_check(tiny_data, tmp_path, capsys):
    run = make_run(tiny_data, tmp_path / "run")
    main(["export", str(run), "--out", str(tmp_path / "m.onnx")])
    out = capsys.readouterr().out
    assert "min cosine" in out and (tmp_path / "m.onnx.json").is_file()


def test_onnx_runtime_index_equals_torch_index_and_runtimes_mix(tiny_data, tmp_path):
    from PIL import Image, ImageOps

    from momentum_proxy.retrieval.build import build_index
    from momentum_proxy.retrieval.faiss_store import FaissStore

    run = make_run(tiny_data, tmp_path / "run")
    build_index(run, tiny_data, tmp_path / "torch", runtime="torch", device="cpu")
    build_index(run, tiny_data, tmp_path / "onnx", runtime="onnx", device="cpu")
    a, b = FaissStore.load(tmp_path / "torch"), FaissStore.load(tmp_path / "onnx")
    assert a.paths == b.paths and a.model["runtime"] == "torch" and b.model["runtime"] == "onnx"
    # np.asarray: with pytorch-metric-learning imported, faiss may hand back torch tensors
    fa, fb = np.asarray(a.index.reconstruct_n(0, len(a))), np.asarray(b.index.reconstruct_n(0, len(b)))
    assert_agree(fa, fb)  # cosine >= 0.9999 and the same top-10 neighbours

    more = tmp_path / "more"  # new images: mirrored (a copy of an indexed photo is not indexed again)
    more.mkdir()
    for p in sorted((tiny_data / "images" / "species_05").glob("*.jpg"))[:3]:
        ImageOps.mirror(Image.open(p)).save(more / p.name)
    build_index(run, more, tmp_path / "torch", runtime="onnx", device="cpu")  # extend: verified export
    mixed = FaissStore.load(tmp_path / "torch")
    assert len(mixed) == len(a) + 3 and mixed.model["runtime"] == "onnx,torch"


def test_mixing_runtimes_needs_a_verified_export_of_the_same_checkpoint():
    built = {"checkpoint_sha256": "ab", "runtime": "torch", "verified": True}
    onnx = {"checkpoint_sha256": "ab", "runtime": "onnx", "verified": True}
    assert check_mix(built, onnx) == "onnx,torch"
    assert check_mix({**built, "runtime": "onnx"}, onnx) == "onnx"
    with pytest.raises(UserError, match="did not pass its check"):
        check_mix(built, {**onnx, "verified": False})
    with pytest.raises(UserError, match="did not pass its check"):
        check_mix({**built, "runtime": "onnx", "verified": False}, {**onnx, "runtime": "torch"})
    with pytest.raises(UserError, match="another checkpoint"):
        check_mix(built, {**onnx, "checkpoint_sha256": "cd"})


def test_onnx_embedder_exports_once_per_checkpoint(tiny_data, tmp_path):
    run = make_run(tiny_data, tmp_path / "run")
    first = load_embedder(run, "onnx", "cpu")
    assert first.image_size == 64 and first.feature_dim == 32 and first.identity["runtime"] == "onnx"
    stamp = (run / EXPORT_FILE).stat().st_mtime_ns
    assert load_embedder(run, "onnx", "cpu").identity == first.identity
    assert (run / EXPORT_FILE).stat().st_mtime_ns == stamp  # reused
    make_run(tiny_data, run, seed=1)  # a new best checkpoint
    again = load_embedder(run, "onnx", "cpu")
    meta = json.loads(sidecar_path(run / EXPORT_FILE).read_text())
    assert meta["checkpoint_sha256"] == file_sha256(run / BEST) == again.identity["checkpoint_sha256"]
    assert again.identity["checkpoint_sha256"] != first.identity["checkpoint_sha256"]
    with pytest.raises(UserError, match="unknown runtime"):
        load_embedder(run, "tensorrt")


def test_int8_model_is_quantised_and_its_report_is_consistent(tiny_data, tmp_path):
    import onnx

    from momentum_proxy.deploy.export import INPUT_NAME, onnx_session
    from momentum_proxy.deploy.int8 import MAX_R1_DROP, calibration_batches, compare, gate, quantize

    run = make_run(tiny_data, tmp_path / "run")
    export_run(run, tmp_path / "fp32.onnx")
    batches = calibration_batches(str(tiny_data), 64)
    assert sum(len(b) for b in batches) == 16  # every training image (fewer than 256)
    settings = quantize(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", batches, INPUT_NAME)
    ops = {n.op_type for n in onnx.load(tmp_path / "int8.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and settings["calibration_images"] == 16
    report = compare(
        onnx_session(tmp_path / "fp32.onnx"), onnx_session(tmp_path / "int8.onnx"), INPUT_NAME, str(tiny_data), 64
    )
    r1 = report["recall@1"]
    assert report["images"] == 16 and report["split"] == "val"  # the dataset has a val split: reported there
    assert report["recall@1_change"] == pytest.approx(r1["int8"] - r1["fp32"], abs=2e-4)
    assert 0 < report["mean_cosine_to_fp32"] <= 1.0001
    ips = report["images_per_second"]
    m = report["map@r"]
    assert report["map@r_change"] == pytest.approx(m["int8"] - m["fp32"], abs=2e-4)
    if r1["fp32"] - r1["int8"] > MAX_R1_DROP + 1e-4 or ips["int8"] <= ips["fp32"]:
        assert gate(report)


@pytest.mark.parametrize("map_change, kept", [(-0.005, True), (-0.015, False)])
def test_int8_export_is_kept_only_with_a_passing_report(map_change, kept, tiny_data, tmp_path, monkeypatch):
    """The real quantisation and comparison, with the report's quality and speed then set (a random-weight model's
    figures on 16 images, and a timing, decide nothing): MAP@R -0.5 points is kept, -1.5 refused."""
    from momentum_proxy.deploy import export

    real_compare, reports = export.compare, []

    def decided(*args):
        report = real_compare(*args)
        reports.append(dict(report))
        return {**report, **lite0_like_report(0.0, map_change, 1.4)}

    monkeypatch.setattr(export, "compare", decided)
    run = make_run(tiny_data, tmp_path / "run")
    (tmp_path / "out").mkdir()
    if kept:
        info = export_run(run, tmp_path / "out" / "m.onnx", int8=True, calibration=tiny_data)
        assert info["int8"]["passed"] and info["int8"]["calibration_data"] == str(tiny_data)
        assert info["int8"]["map@r_change"] == map_change
        assert json.loads((tmp_path / "out" / "m.onnx.json").read_text())["int8"] == info["int8"]
    else:
        with pytest.raises(UserError, match=r"int8 model not kept: MAP@R -1.50 points"):
            export_run(run, tmp_path / "out" / "m.onnx", int8=True, calibration=tiny_data)
        assert list((tmp_path / "out").iterdir()) == []
    assert len(reports) == 1 and reports[0]["images"] == 16  # the real comparison ran, on the val split


def lite0_like_report(r1_change: float, map_change: float, speedup: float = 1.4) -> dict:
    """An int8 report shaped as `int8.compare`'s (as measured for Lite0: R@1 held, MAP@R -3.6 points)."""
    return {
        "split": "val",
        "images": 1489,
        "mean_cosine_to_fp32": 0.79,
        "recall@1": {"fp32": 0.9, "int8": 0.9 + r1_change},
        "map@r": {"fp32": 0.5, "int8": 0.5 + map_change},
        "recall@1_change": r1_change,
        "map@r_change": map_change,
        "images_per_second": {"fp32": 100.0, "int8": 100.0 * speedup},
        "speedup": speedup,
    }


@pytest.mark.parametrize(
    "r1, mapr, speedup, failed",
    [
        (0.0047, -0.036, 1.4, ["MAP@R -3.60 points (at most -1 allowed)"]),  # Lite0's: R@1 alone would keep it
        (-0.005, -0.01, 1.4, []),
        (-0.0051, 0.0, 1.4, ["R@1 -0.51 points (at most -0.5 allowed)"]),
        (0.0, -0.0101, 1.4, ["MAP@R -1.01 points (at most -1 allowed)"]),  # just past the bound
        (0.0, -0.015, 1.4, ["MAP@R -1.50 points (at most -1 allowed)"]),  # a bound at twice the threshold would pass
        (-0.0075, 0.0, 1.4, ["R@1 -0.75 points (at most -0.5 allowed)"]),
        (0.0, 0.0, 1.0, ["not faster (x1.0)"]),
    ],
)
def test_the_int8_gate_needs_recall_map_at_r_and_speed(r1, mapr, speedup, failed):
    from momentum_proxy.deploy.int8 import gate

    assert gate(lite0_like_report(r1, mapr, speedup)) == failed


def test_an_int8_export_losing_map_at_r_is_refused(tiny_data, tmp_path, monkeypatch):
    """With the report of Lite0's int8 (R@1 +0.47, MAP@R -3.6) nothing is written; with MAP@R -0.5 it is kept,
    the report and the gate's bounds in the sidecar."""
    import shutil

    from momentum_proxy.deploy import export

    run = make_run(tiny_data, tmp_path / "run")
    report = {}
    monkeypatch.setattr(export, "quantize", lambda fp32, out, batches, name: shutil.copy(fp32, out) and {})
    monkeypatch.setattr(export, "compare", lambda *args: report)
    (tmp_path / "out").mkdir()
    report.update(lite0_like_report(0.0047, -0.036))
    with pytest.raises(UserError, match=r"int8 model not kept: MAP@R -3.60 points \(at most -1 allowed\)"):
        export_run(run, tmp_path / "out" / "m.onnx", int8=True, calibration=tiny_data)
    assert list((tmp_path / "out").iterdir()) == []
    report.update(lite0_like_report(0.0047, -0.005))
    info = export_run(run, tmp_path / "out" / "m.onnx", int8=True, calibration=tiny_data)
    assert info["int8"]["passed"] and info["int8"]["gate"] == {"max_recall@1_drop": 0.005, "max_map@r_drop": 0.01}
    assert json.loads((tmp_path / "out" / "m.onnx.json").read_text())["int8"]["map@r_change"] == -0.005
