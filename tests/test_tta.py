"""Test-time augmentation (`--tta flip`): one definition, honoured by every runtime, recorded by indexes and exports,
and followed by the queries against them."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_run, run_cli
from PIL import Image

from momentum_proxy.data.loading import eval_dataset, to_batch
from momentum_proxy.data.manifest import read_manifest, split_frame
from momentum_proxy.deploy.export import sidecar_path
from momentum_proxy.deploy.runtimes import export_file, load_embedder
from momentum_proxy.embedding.inference import TorchEmbedder, embed_dataset, embed_files
from momentum_proxy.embedding.processes import ModelProcess
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation.jobs import evaluate_arrays
from momentum_proxy.fileio import read_json
from momentum_proxy.paths import META_FILE
from momentum_proxy.retrieval.faiss_store import FaissStore
from momentum_proxy.serving.searcher import Searcher


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A random-weight run of its own (the ONNX exports written here stay out of the shared `tiny_run`)."""
    return make_run(tmp_path_factory.mktemp("tta") / "run", tiny_data)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return to_batch([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)])


def split_images(data: Path) -> list[str]:
    df = read_manifest(data)
    return [str(data / p) for p in df[df["split"] == "test"]["path"]]


def photo_and_mirror(data: Path, folder: Path) -> tuple[Path, Path, Path]:
    """(a folder of 8 photos, one of them, its left-right mirror image in another folder). The photo is 74 x 73
    px, so that the evaluation transform (short side 73, centre crop 64) cuts it symmetrically: the mirror's input
    is exactly the photo's input mirrored."""
    collection, queries = folder / "collection", folder / "queries"
    collection.mkdir(parents=True)
    queries.mkdir()
    source = split_images(data)
    photo = collection / "photo.png"
    Image.open(source[0]).convert("RGB").resize((74, 73)).save(photo)
    for p in source[8:36:4]:
        (collection / Path(p).name).write_bytes(Path(p).read_bytes())
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(queries / "mirrored.png")
    return collection, photo, queries / "mirrored.png"


def test_flip_is_the_renormalised_mean_of_an_image_and_its_mirror(run, batch):
    plain, flip = TorchEmbedder(run, "cpu"), TorchEmbedder(run, "cpu", "flip")
    a, b = plain.embed(batch), plain.embed(batch.flip(3))
    assert not np.allclose(a, b, atol=1e-3)  # the model alone tells an image from its mirror
    expected = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
    np.testing.assert_allclose(flip.embed(batch), expected, atol=1e-5)
    np.testing.assert_allclose(flip.embed(batch.flip(3)), flip.embed(batch), atol=1e-5)  # a mirror is the same
    assert (plain.identity["tta"], flip.identity["tta"]) == ("none", "flip")
    with pytest.raises(UserError, match="unknown --tta 'mirror'"):
        TorchEmbedder(run, "cpu", "mirror")


def test_every_runtime_embeds_with_the_tta_it_is_given(run, batch):
    """onnxruntime runs an export with the averaging in its graph (export/model-flip.onnx, beside the plain
    export/model.onnx), a model process passes it to its child: both equal PyTorch's flip embedding."""
    reference = TorchEmbedder(run, "cpu", "flip").embed(batch)
    onnx_flip, onnx_plain = load_embedder(run, "onnx", "cpu", "flip"), load_embedder(run, "onnx", "cpu")
    sidecar = read_json(sidecar_path(run / export_file("flip")))
    assert sidecar["tta"] == "flip" and sidecar["output"]["l2_normalized"] and sidecar["check"]["passed"]
    assert read_json(sidecar_path(run / export_file()))["tta"] == "none"
    assert not np.allclose(onnx_plain.embed(batch), reference, atol=1e-3)
    process = ModelProcess(run, threads=1, tta="flip")
    try:
        for embedder in (onnx_flip, process):
            assert embedder.identity["tta"] == "flip"
            np.testing.assert_allclose(embedder.embed(batch), reference, atol=1e-4)
    finally:
        process.close()


def test_an_export_with_tta_holds_the_averaging_in_its_graph(run, batch, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    code, printed, err = run_cli(["export", run, "--tta", "flip", "--out", out], capsys)
    assert code == 0, err
    assert "test-time augmentation flip in the graph" in printed
    info = read_json(sidecar_path(out))
    assert info["tta"] == "flip" and info["check"]["passed"] and info["output"]["l2_normalized"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reference = TorchEmbedder(run, "cpu", "flip").embed(batch)
    exported = session.run(None, {"images": np.ascontiguousarray(batch.numpy())})[0]
    np.testing.assert_allclose(exported, reference, atol=1e-4)
    mirrored = np.ascontiguousarray(batch[:1].flip(3).numpy())  # and any batch size
    np.testing.assert_allclose(session.run(None, {"images": mirrored})[0], reference[:1], atol=1e-4)


def test_an_index_records_its_tta_and_every_query_follows_it(run, tiny_data, tmp_path, capsys):
    """A mirror image of an indexed photo finds the photo at similarity 1 when the index and the query are both
    embedded with flip (not without); the query follows the index's TTA, and another one is refused in one line."""
    collection, photo, query = photo_and_mirror(tiny_data, tmp_path)
    flip, plain = tmp_path / "flip", tmp_path / "plain"
    for folder, extra in ((flip, ["--tta", "flip"]), (plain, [])):  # none: the default (config.DEFAULT_TTA)
        code, _, err = run_cli(
            ["index", run, "--images", collection, "--out", folder, "--device", "cpu", *extra], capsys
        )
        assert code == 0, err
    assert FaissStore.load(flip).model["tta"] == "flip" and FaissStore.load(plain).model["tta"] == "none"

    found = {}
    for folder in (flip, plain):
        code, _, err = run_cli(
            [
                "retrieve",
                "--index",
                folder,
                "--query",
                query,
                "-k",
                "1",
                "--device",
                "cpu",
                "--rerank",
                "none",
                "--out",
                tmp_path / f"r-{folder.name}",
            ],
            capsys,
        )
        assert code == 0, err
        found[folder] = json.loads((tmp_path / f"r-{folder.name}" / "results.json").read_text())
    top = found[flip]["results"][0]
    assert found[flip]["model"]["tta"] == "flip" and top["path"] == str(photo) and top["score"] > 0.99999
    assert found[plain]["model"]["tta"] == "none" and found[plain]["results"][0]["score"] < 0.999

    stamp = (flip / META_FILE).read_bytes()
    for args in (
        ["retrieve", "--index", flip, "--query", query, "--tta", "none"],
        ["index", run, "--images", query.parent, "--out", flip, "--tta", "none"],
    ):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "was built with --tta flip" in err and len(err.strip().splitlines()) == 1
    assert (flip / META_FILE).read_bytes() == stamp  # nothing added

    with pytest.raises(UserError, match="built with --tta flip"):
        Searcher(flip, device="cpu", tta="none")
    searcher = Searcher(flip, device="cpu")
    try:
        assert searcher.stats()["tta"] == "flip"
        hit = searcher.search(query.read_bytes(), k=1)["results"][0]
        assert hit["path"] == str(photo) and hit["score"] > 0.99999
    finally:
        searcher.close()


def test_retrieve_in_a_run_embeds_its_split_with_the_tta(run, tiny_data, tmp_path, capsys):
    """The run's embeddings.npz was embedded without TTA: with --tta flip the split is embedded now, with flip;
    an embeddings file cannot be searched with TTA."""
    query = split_images(tiny_data)[0]
    code, _, err = run_cli(
        [
            "retrieve",
            run,
            "--query",
            query,
            "-k",
            "40",
            "--tta",
            "flip",
            "--out",
            tmp_path / "r",
            "--device",
            "cpu",
            "--rerank",
            "none",
        ],
        capsys,
    )  # raw cosine, compared below
    assert code == 0, err
    results = json.loads((tmp_path / "r" / "results.json").read_text())["results"]
    assert results and query not in [r["path"] for r in results]
    paths = [query] + [r["path"] for r in results]
    feats, _, _ = embed_files(TorchEmbedder(run, "cpu", "flip"), paths)
    np.testing.assert_allclose([r["score"] for r in results], feats[1:] @ feats[0], atol=1e-5)
    np.savez(tmp_path / "db.npz", features=np.eye(2, 32, dtype=np.float32), labels=np.arange(2))
    code, _, err = run_cli(
        ["retrieve", run, "--data_base", tmp_path / "db.npz", "--query", query, "--tta", "flip"], capsys
    )
    assert code == 2 and "was not (search the run's split" in err and len(err.strip().splitlines()) == 1


def test_evaluate_with_tta(run, tiny_data, capsys):
    code, out, err = run_cli(["evaluate", run, "--tta", "flip", "--device", "cpu", "--rerank", "none"], capsys)
    assert code == 0, err
    summary = read_json(Path(run) / "evaluate-torch-flip.json")
    assert summary["tta"] == "flip" and "tta flip" in out
    frame = split_frame(read_manifest(tiny_data), "test")
    feats = embed_dataset(
        TorchEmbedder(run, "cpu", "flip"), eval_dataset(str(tiny_data), frame, 64), workers=0, progress=False
    )
    assert summary["test"] == evaluate_arrays(feats, frame["label"].to_numpy(), None, recalls=[1, 2, 4, 8])


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "--embeddings", "{tmp}/e.npz", "--tta", "flip"], "--tta applies where a run's model embeds"),
        (["evaluate", "{run}", "--tta", "mirror"], "unknown --tta 'mirror'; choose from none, flip"),
        (["export", "{run}", "--tta", "multi", "--out", "{tmp}/m.onnx"], "unknown --tta 'multi'"),
    ],
)
def test_bad_tta_requests_are_one_line_errors(args, message, run, tmp_path, capsys):
    np.savez(tmp_path / "e.npz", features=np.eye(2, 4, dtype=np.float32), labels=np.arange(2))
    code, _, err = run_cli([a.format(tmp=tmp_path, run=run) for a in args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
