import json

import numpy as np
import pytest

from momentum_proxy.cli import main

NAMES = ("train_pipeline", "train_model", "embed_pipeline", "embed_model", "embed_onnx", "embed_onnx_int8")


def test_bench_reports_medians_of_interleaved_rounds_and_their_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["bench", "--image-size", "64", "--batch-size", "8", "--steps", "2", "--rounds", "2", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["rounds"] == 2 and set(res["repeats"]) == set(res["spread"]) == set(NAMES)
    for name in NAMES:
        runs = res["repeats"][name]
        assert len(runs) == 2 and min(runs) > 0
        assert res[f"{name}_ips"] == pytest.approx(np.median(runs), abs=0.011)  # median of the rounded repeats
        assert res["spread"][name] == [min(runs), max(runs)]
    for ratio, (num, den) in {"train_efficiency": ("train_pipeline", "train_model"),
                              "embed_efficiency": ("embed_pipeline", "embed_model"),
                              "onnx_speedup": ("embed_onnx", "embed_model"),
                              "onnx_int8_speedup": ("embed_onnx_int8", "embed_model")}.items():
        # the repeats are rounded to 0.01, so each median is known within 0.005 (rounding is monotonic): the ratio
        # of medians lies between these bounds at any speed, and is reported rounded to 0.001
        n, d = np.median(res["repeats"][num]), np.median(res["repeats"][den])
        low, high = (n - 0.005) / (d + 0.005), (n + 0.005) / (d - 0.005)
        assert low - 5e-4 - 1e-9 <= res[ratio] <= high + 5e-4 + 1e-9, (ratio, res[ratio], low, high)
    assert "int8 / torch" in capsys.readouterr().out
