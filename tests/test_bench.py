import json

import numpy as np
import pytest

from momentum_proxy.cli import main

NAMES = (
    "train_pipeline",
    "train_model",
    "embed_pipeline",
    "embed_model",
    "embed_model_folded",
    "embed_onnx",
    "embed_onnx_int8",
)


def test_interleaved_rounds_give_medians_spreads_and_ratios_of_medians():
    """What `bench` makes of its measurements, with instant stand-ins (the whole command: the slow test below)."""
    from momentum_proxy.experiments.bench import _ratios, interleave, summarise

    values = {name: [10.0 * (i + 1) + r for r in (0.004, -2.5, 3.333)] for i, name in enumerate(NAMES)}
    order, left = [], {name: iter(v) for name, v in values.items()}
    measures = {name: (lambda name=name: order.append(name) or next(left[name])) for name in NAMES}
    assert interleave(measures, rounds=3) == values and order == list(NAMES) * 3  # A, B, C, A, B, C, ...
    res = summarise(values)
    for i, name in enumerate(NAMES):
        base = 10.0 * (i + 1)
        assert res[f"{name}_ips"] == round(base + 0.004, 2)  # the median, rounded to 0.01
        assert res["spread"][name] == [base - 2.5, round(base + 3.333, 2)]
        assert res["repeats"][name] == [round(x, 2) for x in values[name]]
    median = {name: 10.0 * (i + 1) + 0.004 for i, name in enumerate(NAMES)}
    assert _ratios(values) == {
        "train_efficiency": round(median["train_pipeline"] / median["train_model"], 3),
        "embed_efficiency": round(median["embed_pipeline"] / median["embed_model"], 3),
        "fold_speedup": round(median["embed_model_folded"] / median["embed_model"], 3),
        "onnx_speedup": round(median["embed_onnx"] / median["embed_model"], 3),
        "onnx_int8_speedup": round(median["embed_onnx_int8"] / median["embed_model"], 3),
    }


@pytest.mark.slow  # about a minute: full-size JPEGs generated and prepared, an ONNX export and its int8 quantisation
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
    for ratio, (num, den) in {
        "train_efficiency": ("train_pipeline", "train_model"),
        "embed_efficiency": ("embed_pipeline", "embed_model"),
        "fold_speedup": ("embed_model_folded", "embed_model"),
        "onnx_speedup": ("embed_onnx", "embed_model"),
        "onnx_int8_speedup": ("embed_onnx_int8", "embed_model"),
    }.items():
        # the repeats are rounded to 0.01, so each median is known within 0.005 (rounding is monotonic): the ratio
        # of medians lies between these bounds at any speed, and is reported rounded to 0.001
        n, d = np.median(res["repeats"][num]), np.median(res["repeats"][den])
        low, high = (n - 0.005) / (d + 0.005), (n + 0.005) / (d - 0.005)
        assert low - 5e-4 - 1e-9 <= res[ratio] <= high + 5e-4 + 1e-9, (ratio, res[ratio], low, high)
    assert "BatchNorm folded / torch" in (printed := capsys.readouterr().out) and "int8 / torch" in printed


def test_exact_search_bench_reports_gflops_of_search_and_bare_matmul_and_their_ratio(tmp_path, capsys):
    out = tmp_path / "search.json"
    main(
        [
            "bench",
            "--exact-search",
            "64x3000x32",
            "--top-k",
            "5",
            "--rounds",
            "2",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    res = json.loads(out.read_text())
    assert (res["queries"], res["gallery"], res["dim"], res["k"], res["rounds"]) == (64, 3000, 32, 5, 2)
    assert res["kernel"] == "faiss" and res["device"] == "cpu"  # the CPU searches in faiss (vectors.search_device)
    assert res["gflop"] == round(2 * 64 * 3000 * 32 / 1e9, 3)
    names = ("search", "mm", "torch_knn")  # torch_knn: the kernel not chosen on the CPU, for comparison
    assert set(res["repeats"]) == set(res["spread"]) == set(names)
    for name in names:
        runs = res["repeats"][name]
        assert len(runs) == 2 and min(runs) > 0
        assert res[f"{name}_gflops"] == pytest.approx(np.median(runs), abs=0.011)
        assert res["spread"][name] == [min(runs), max(runs)]
    for ratio, num in (("ratio", "search"), ("torch_knn_ratio", "torch_knn")):
        n, d = np.median(res["repeats"][num]), np.median(res["repeats"]["mm"])  # as in the test above
        low, high = (n - 0.005) / (d + 0.005), (n + 0.005) / (d - 0.005)
        assert low - 5e-4 - 1e-9 <= res[ratio] <= high + 5e-4 + 1e-9, (ratio, res[ratio], low, high)
    printed = capsys.readouterr().out
    assert "exact search 64 x 3000 x 32, top 5, cpu (faiss kernel)" in printed
    assert f"search / mm {res['ratio']:.3f} (goal >= 0.8)" in printed


def test_exact_search_shape_is_checked_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--exact-search", "64x3000"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes QUERIESxGALLERYxDIM" in err[0]
