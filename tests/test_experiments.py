"""Sweep (resumable), figures and report."""

import pytest

from momentum_proxy.cli import main
from momentum_proxy.experiments import collect_runs

SMALL = ["--pretrained", "none", "--image-size", "48", "--batch-size", "8", "--epochs", "1", "--workers", "0",
         "--metrics", "recall"]


@pytest.fixture(scope="module")
def swept(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    main(["sweep", "--data", str(tiny_data), "--out", str(out), "--momentum", "0,1", *SMALL])
    return out


def test_sweep_runs_the_grid_and_skips_finished_runs(swept, tiny_data, capsys):
    runs = collect_runs(swept)
    assert sorted(runs["momentum"]) == [0.0, 1.0] and (runs["epochs"] == 1).all()
    stamps = {p: p.stat().st_mtime_ns for p in swept.rglob("last.pt")}
    main(["sweep", "--data", str(tiny_data), "--out", str(swept), "--momentum", "0,1", *SMALL])
    assert capsys.readouterr().out.count("skip (finished)") == 2
    assert stamps == {p: p.stat().st_mtime_ns for p in swept.rglob("last.pt")}


def test_sweep_resumes_an_interrupted_run(tiny_data, tmp_path, capsys):
    args = ["sweep", "--data", str(tiny_data), "--out", str(tmp_path), "--momentum", "0.5", *SMALL]
    main(args)
    run = next(tmp_path.iterdir())
    (run / "embeddings.npz").unlink()  # as if killed before the end
    main([*args[:-6], "--epochs", "2", *args[-4:]])
    assert "run:" in capsys.readouterr().out
    from momentum_proxy.runs import RunDir

    assert [r["epoch"] for r in RunDir(run).metrics()] == [0, 1]  # resumed: epoch 0/1 kept, config unchanged


def test_plots_and_report(swept, tmp_path):
    main(["plot", "momentum", str(swept)])
    for ext in ("png", "pdf"):
        assert (swept / f"momentum.{ext}").stat().st_size > 1000
    run = next(p for p in swept.iterdir() if p.is_dir())
    main(["plot", "curves", str(run), "--out", str(tmp_path / "c")])
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "c.pdf").stat().st_size > 1000
    main(["report", str(swept)])
    table = (swept / "benchmarks.md").read_text().splitlines()
    assert table[0].startswith("| data | backbone") and len([l for l in table if l.startswith("| data | backbone")]) == 1
    assert sum(1 for l in table if "efficientnet_lite0" in l) == 2
