import json

from momentum_proxy.cli import main


def test_bench_reports_both_rates_and_their_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["bench", "--image-size", "64", "--batch-size", "8", "--steps", "2", "--json", str(out)])
    res = json.loads(out.read_text())
    for kind in ("train", "embed"):
        pipeline, model = res[f"{kind}_pipeline_ips"], res[f"{kind}_model_ips"]
        assert pipeline > 0 and model > 0
        assert abs(res[f"{kind}_efficiency"] - pipeline / model) < 0.02 * pipeline / model + 0.005  # rounding
    assert "efficiency" in capsys.readouterr().out
