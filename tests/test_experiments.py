"""Sweep (resumable, over seeds), figures and the report's mean ± confidence interval."""

import math

import pandas as pd
import pytest

from momentum_proxy.cli import main
from momentum_proxy.experiments.sweep import collect_runs, mean_ci
from momentum_proxy.runs import RunDir

SMALL = [
    "--pretrained",
    "none",
    "--image-size",
    "48",
    "--batch-size",
    "8",
    "--epochs",
    "1",
    "--loader-workers",
    "0",
    "--metrics",
    "recall",
]


@pytest.fixture(scope="module")
def swept(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    main(["sweep", "--data", str(tiny_data), "--out", str(out), "--momentum", "0,1", "--seeds", "0,1", *SMALL])
    return out


def test_sweep_runs_the_grid_over_seeds_and_skips_finished_runs(swept, tiny_data, capsys):
    runs = collect_runs(swept)
    assert sorted(zip(runs["proxy_momentum"], runs["seed"])) == [(0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1)]
    assert (runs["selected_on"] == "val").all() and runs["map@r"].between(0, 1).all()
    stamps = {p: p.stat().st_mtime_ns for p in swept.rglob("last.pt")}
    main(["sweep", "--data", str(tiny_data), "--out", str(swept), "--momentum", "0,1", "--seeds", "0,1", *SMALL])
    assert capsys.readouterr().out.count("skip (finished)") == 4
    assert stamps == {p: p.stat().st_mtime_ns for p in swept.rglob("last.pt")}


def test_sweep_finishes_what_it_started(tiny_data, tmp_path, capsys):
    args = ["sweep", "--data", str(tiny_data), "--out", str(tmp_path), "--momentum", "0.5", *SMALL]
    main(args)
    run = RunDir(next(tmp_path.iterdir()))
    (run / "eval.json").unlink()  # as if killed before the end
    main(args)
    assert "resume:" in capsys.readouterr().out and run.eval() is not None
    main([*args[:-6], "--epochs", "2", *args[-4:]])  # a re-run with other --epochs trains the run again
    assert "configuration changed: epochs 1 -> 2" in capsys.readouterr().out
    assert [r["epoch"] for r in run.metrics()] == [0, 1, 2] and run.eval() is not None


def test_mean_and_confidence_interval():
    mean, ci = mean_ci(pd.Series([0.5, 0.7]))
    assert mean == pytest.approx(0.6) and ci == pytest.approx(12.7062 * 0.141421 / math.sqrt(2), rel=1e-4)
    assert math.isnan(mean_ci(pd.Series([0.5]))[1])


def test_plots_and_report(swept, tmp_path):
    main(["plot", "momentum", str(swept)])
    for ext in ("png", "pdf"):
        assert (swept / f"momentum.{ext}").stat().st_size > 1000
    run = next(p for p in swept.iterdir() if p.is_dir())
    main(["plot", "curves", str(run), "--out", str(tmp_path / "c")])
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "c.pdf").stat().st_size > 1000
    main(["report", str(swept)])
    table = (swept / "benchmarks.md").read_text().splitlines()
    assert table[0].startswith("| data | backbone") and "P@1" in table[0] and "MAP@R" in table[0]
    rows = [line for line in table if "efficientnet_lite0" in line]
    assert len(rows) == 2 and all("| val | 2 |" in r and "±" in r for r in rows)  # 2 configs x 2 seeds
    assert "95 % confidence interval" in "\n".join(table)
