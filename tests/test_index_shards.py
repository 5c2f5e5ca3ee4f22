"""`mproxy index` sharded over 2 torchrun ranks (gloo, CPU): each rank embeds its chunks, rank 0 fills the store.
A build killed with SIGKILL (`MPROXY_TEST_KILL_AFTER`, `retrieval.shards.test_kill`) and run again ends with the
index a single process builds: the same items in the same order, none twice, none missing."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from momentum_proxy.data.manifest import read_manifest
from momentum_proxy.distributed import DistInfo
from momentum_proxy.fileio import read_json
from momentum_proxy.retrieval import build, shards
from momentum_proxy.retrieval.build import build_index
from momentum_proxy.retrieval.stores import open_store

ARGS = ["--chunk-size", "8", "--batch-size", "4", "--device", "cpu"]  # 64 images: 8 chunks, 4 a rank


def _torchrun(run, images, out, kill=None, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(shards.KILL_ENV, None)
    if kill:
        env[shards.KILL_ENV] = kill
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "momentum_proxy",
        "index",
        str(run),
        "--images",
        str(images),
        "--out",
        str(out),
        *ARGS,
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert (res.returncode == 0) == ok, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _release(location):
    """Close this process's Milvus Lite engine of `location`, so that another process may open the file."""
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(location).removeprefix("milvus:"))


def _assert_same_index(expected, got, n=64, exact=True):
    """The same items (ids, paths in order, labels, class names), none twice, and the same vectors: bit for bit
    when both embedded the same batches (`exact`; chunks a multiple of the batch size, one thread each)."""
    a, b = open_store(expected), open_store(got)
    try:
        items = b.live_items()
        assert items == a.live_items()  # ids, paths (in order), labels, class names
        assert len({it["path"] for it in items}) == len(items) == n  # none twice, none missing
        assert (b.classes, b.sources, b.model) == (a.classes, a.sources, a.model)
        if exact:
            np.testing.assert_array_equal(b.live_vectors()[1], a.live_vectors()[1])
        else:
            np.testing.assert_allclose(b.live_vectors()[1], a.live_vectors()[1], rtol=0, atol=1e-5)
    finally:
        a.close()
        b.close()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Embed in this process on one thread, as each rank does (torchrun sets OMP_NUM_THREADS=1): the same vectors
    bit for bit, and far faster than two threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(tiny_run, tiny_data, tmp_path_factory):
    """The faiss index one process builds (shared: tests must not change it)."""
    out = tmp_path_factory.mktemp("single") / "index"
    build_index(tiny_run, tiny_data, out, batch_size=4, device="cpu")
    return out


@pytest.mark.slow  # two torchrun ranks (gloo) embed and fill the index: about 20 s; `.ci/run` runs it
def test_two_ranks_build_the_index_one_process_builds(tiny_run, tiny_data, single, tmp_path):
    res = _torchrun(tiny_run, tiny_data, tmp_path / "index")
    assert res.stdout.count("added: 64") == 1 and "total: 64" in res.stdout  # rank 0 reports, rank 1 is silent
    assert "reused" not in res.stderr
    _assert_same_index(single, tmp_path / "index")
    assert not shards.work_folder(tmp_path / "index").exists()  # chunk files removed once the index is saved


@pytest.mark.slow  # two torchrun runs with a rank killed: `.ci/run`
def test_a_rank_killed_midway_then_the_same_command_again_gives_the_same_index(tiny_run, tiny_data, single, tmp_path):
    out = tmp_path / "index"
    _torchrun(tiny_run, tiny_data, out, kill="chunk:1:1", ok=False)  # rank 1 SIGKILLs itself after 1 chunk
    assert not (out / "meta.json").exists()  # no index yet
    assert 1 <= len(list(shards.work_folder(out).glob("*.npz"))) < 8
    res = _torchrun(tiny_run, tiny_data, out)
    assert "images reused from the chunk files" in res.stderr and "added: 64" in res.stdout
    _assert_same_index(single, out)
    assert not shards.work_folder(out).exists()


@pytest.mark.slow  # two torchrun runs with a rank killed: `.ci/run`
def test_a_milvus_fill_killed_midway_then_rerun_adds_the_rest_once(tiny_run, tiny_data, tmp_path):
    df = read_manifest(tiny_data)
    first = df[df["class_name"] < "species_04"]  # 32 images indexed first; the sharded build adds the other 32
    listed = tmp_path / "first.csv"
    listed.write_text("".join(f"{tiny_data / p},{c}\n" for p, c in zip(first["path"], first["class_name"])))
    expected, got = f"milvus:{tmp_path}/expected.db", f"milvus:{tmp_path}/got.db"
    build_index(tiny_run, None, expected, image_list=listed, batch_size=4, device="cpu")
    _release(expected)
    shutil.copytree(tmp_path / "expected.db", tmp_path / "got.db")  # a Milvus Lite "file" is a folder
    build_index(tiny_run, tiny_data, expected, batch_size=4, device="cpu")  # the uninterrupted single process
    _torchrun(tiny_run, tiny_data, got, kill="insert:1:0", ok=False)  # rank 0 killed after 1 chunk of 8 inserted
    partial = open_store(got)
    assert len(partial) == 40 and partial.model["runtime"] == "torch"
    partial.close()
    _release(got)
    res = _torchrun(tiny_run, tiny_data, got)
    assert "24 of 24 images reused from the chunk files" in res.stderr
    assert "added: 24" in res.stdout and "already_indexed: 40" in res.stdout and "total: 64" in res.stdout
    _assert_same_index(expected, got)


def test_chunk_files_of_another_model_are_removed_and_half_written_ones_never_read(tmp_path, capsys):
    folder = tmp_path / ".chunks"
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    shards.write_chunk(folder / "a-000000.npz", "model-a", x, ["/p0", "/p1", "/p2"], [("/bad", "cannot decode")])
    shards.write_chunk(folder / "a-000001.npz", "model-b", x, ["/q0", "/q1", "/q2"], [])
    (folder / ".a-000002.npz.x1y2.tmp").write_bytes(b"PK\x03\x04 half a chunk")  # its rank was killed writing it
    chunks = shards.Chunks(folder, "model-a", 2)
    assert (
        capsys.readouterr().err == f"mproxy: removed 1 chunk file(s) of another model (or unreadable) from {folder}\n"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["a-000000.npz"]
    feats, kept, skipped = chunks.take(["/p2", "/bad", "/p0"])
    assert kept == ["/p2", "/p0"] and skipped == [("/bad", "cannot decode")]
    np.testing.assert_array_equal(feats, x[[2, 0]])
    assert "/q0" not in chunks and "/p1" in chunks


def test_a_list_with_bad_lines_and_unreadable_images_fills_as_one_process_does(tiny_run, tiny_data, tmp_path):
    """The sharded path on one rank (no process group: the plan and the barrier do nothing) from a list file with
    an unreadable image, a line naming none and an image listed twice: the index and skipped.json of one process."""
    images = sorted((tiny_data / "images").rglob("*.jpg"))[:12]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    listed = tmp_path / "list.csv"
    listed.write_text(
        "path,class_name\n" + "".join(f"{p},{p.parent.name}\n" for p in images) + f"broken.jpg,x\n,y\n{images[0]},z\n"
    )
    one = build_index(tiny_run, None, tmp_path / "one", image_list=listed, batch_size=4, device="cpu")
    job = dict(run_dir=tiny_run, images=None, out=tmp_path / "two", kind="exact", batch_size=4, device="cpu")
    job |= dict(
        rebuild=False, runtime="torch", labels="auto", tta=None, rerank=None, image_list=listed, max_memory=None
    )
    two = build._build_sharded(DistInfo(), 5, job)
    assert {**two, "index": None} == {**one, "index": None} and one["added"] == 12 and one["skipped"] == 2
    _assert_same_index(tmp_path / "one", tmp_path / "two", n=12, exact=False)  # chunks of 5, batches of 4
    assert read_json(tmp_path / "two" / "skipped.json") == read_json(tmp_path / "one" / "skipped.json")
    assert not shards.work_folder(tmp_path / "two").exists()
