"""`mproxy tune-rerank`: an Optuna study of re-ranking settings on a trained run's val split (no retraining)."""

import json
import re
import shlex
import shutil

import optuna
import pandas as pd
import pytest
from conftest import make_run, run_cli

from momentum_proxy.errors import UserError
from momentum_proxy.evaluation import jobs
from momentum_proxy.experiments import tune
from momentum_proxy.experiments import tune_rerank as tr
from momentum_proxy.retrieval.rerank import DEFAULTS, METHODS, Rerank


def load(out) -> optuna.Study:
    return optuna.load_study(study_name=tr.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")


def shown(study: optuna.Study) -> list[tuple]:
    return [(t.number, t.state, t.params, t.value, t.user_attrs.get("rerank")) for t in study.trials]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A random-weight run on a copy of the tiny dataset whose test images are deleted (only val can be read)."""
    root = tmp_path_factory.mktemp("rerank")
    data = shutil.copytree(tiny_data, root / "data")
    frame = pd.read_csv(data / "manifest.csv")
    for path in frame.loc[frame["split"] == "test", "path"]:
        (data / path).unlink()
    return make_run(root / "run", data)


@pytest.fixture
def embedded(monkeypatch):
    """The splits of every image set built for embedding (`evaluation.jobs`)."""
    seen = []
    real = jobs.eval_dataset
    monkeypatch.setattr(
        jobs, "eval_dataset", lambda root, frame, *a: seen.append(set(frame["split"])) or real(root, frame, *a)
    )
    return seen


@pytest.fixture(scope="module")
def study(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("rerank-study") / "study"
    with pytest.MonkeyPatch.context() as mp:
        seen = []
        real = jobs.eval_dataset
        mp.setattr(
            jobs, "eval_dataset", lambda root, frame, *a: seen.append(set(frame["split"])) or real(root, frame, *a)
        )
        best = tr.tune_rerank(run, out, 8)
    return out, best, seen


def cached(study, out):
    """`out` seeded with the module study's val embeddings (same run, checkpoint, runtime and tta): no embedding."""
    out.mkdir(parents=True)
    shutil.copy(study[0] / tr.EMBEDDINGS, out / tr.EMBEDDINGS)
    return out


def test_trial_0_is_no_reranking_and_best_json_is_the_recommended_trial(study):
    out, best, seen = study
    trials = load(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 8
    assert trials[0].user_attrs[tr.BASELINE] and trials[0].params == {"method": "none"}
    assert trials[0].user_attrs["rerank"] == {"method": "none"}
    for t in trials:
        method = t.user_attrs["rerank"]["method"]
        assert method in METHODS and set(t.user_attrs["rerank"]) == {"method", *DEFAULTS[method]}
        assert {p.split("[")[0] for p in t.params} <= {"method", *tr.PARAMS}
        assert t.value == t.user_attrs["figures"]["map@r"]
    assert json.loads((out / "best.json").read_text()) == best
    chosen = tr.recommended(load(out))
    assert tr.rerank_options(tr.trial_rerank(chosen)) == best
    assert chosen.value >= trials[0].value
    if chosen.number != 0:
        assert chosen.value > trials[0].value  # something else only when strictly better on val
    assert seen == [{"val"}]  # embedded once, the val split only: the test split is never read


def test_best_json_reproduces_evaluate_on_val_exactly(study, run, tmp_path, capsys):
    out, best, _ = study
    trials = load(out).trials
    chosen = tr.recommended(load(out))
    # the report's command line, run as printed: its val figures are the stored ones, to the last bit
    report = (out / "report.md").read_text()
    line = re.search(r"^mproxy evaluate .* --split val.*$", report, re.M)[0]
    assert line == shlex.join(
        ["mproxy", "evaluate", str(run), "--split", "val", "--tta", "none", *tr.rerank_flags(tr.best_rerank(best))]
    )
    code, _, err = run_cli([*shlex.split(line)[1:], "--out", tmp_path / "val.json"], capsys)
    assert code == 0, err
    figures = json.loads((tmp_path / "val.json").read_text())["val"]
    assert {k: figures[k] for k in chosen.user_attrs["figures"]} == chosen.user_attrs["figures"]
    # the Python API on the best re-ranking trial: evaluate_run(split="val") gives exactly its value
    active = max((t for t in trials if t.user_attrs["rerank"]["method"] != "none"), key=lambda t: t.value)
    summary = jobs.evaluate_run(run, split="val", rerank=tr.trial_rerank(active), out=tmp_path / "e.json")
    assert summary["val"]["map@r"] == active.value
    assert f"| {chosen.number}{' (none)' if chosen.number == 0 else ''} | {100 * chosen.value:.2f} |" in report
    assert "test split was never embedded" in report


def test_resume_adds_trials_without_embedding_again(study, run, tmp_path, capsys, embedded):
    out = cached(study, tmp_path / "study")
    tr.tune_rerank(run, out, 3, seed=3)
    first = shown(load(out))
    tr.tune_rerank(run, out, 5, seed=3)
    assert shown(load(out))[:3] == first and len(load(out).trials) == 5
    assert embedded == []  # the val embeddings kept in the folder are the study's (the module study made them)
    assert re.search(r"^trial 4: val MAP@R", capsys.readouterr().out, re.M)
    with pytest.raises(UserError, match=r"holds a study with seed 3, not 4; use another --out"):
        tr.tune_rerank(run, out, 6, seed=4)
    with pytest.raises(UserError, match=r"holds a study with metric map@r, not recall@1"):
        tr.tune_rerank(run, out, 6, seed=3, metric="recall@1")


def test_an_interrupted_trial_0_is_retried_as_no_reranking(study, run, tmp_path, monkeypatch, capsys):
    real = tr.evaluate_arrays

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "evaluate_arrays", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tr.tune_rerank(run, cached(study, tmp_path / "study"), 2)
    monkeypatch.setattr(tr, "evaluate_arrays", real)
    tr.tune_rerank(run, tmp_path / "study", 2)
    assert "trial 0 was interrupted: marked failed, its parameters queued again" in capsys.readouterr().out
    trials = load(tmp_path / "study").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs[tr.BASELINE] and trials[1].user_attrs["rerank"] == {"method": "none"}
    assert tr.baseline_trial(load(tmp_path / "study")).number == 1


def test_a_space_narrows_and_fixes_the_search_and_trial_0_stays_none(study, run, tmp_path):
    space = {
        "method": {"type": "categorical", "choices": ["dba", "kreciprocal"]},
        "alpha": 0,
        "k": {"per_method": {"dba": {"type": "int", "low": 2, "high": 4}}},
        "lambda": 0.25,
    }
    tr.tune_rerank(run, cached(study, tmp_path / "study"), 4, space=space)
    trials = load(tmp_path / "study").trials
    assert trials[0].params == {} and trials[0].user_attrs["rerank"] == {"method": "none"}
    for t in trials[1:]:
        r = t.user_attrs["rerank"]
        if r["method"] == "dba":
            assert r["alpha"] == 0 and 2 <= r["k"] <= 4 and set(t.params) == {"method", "k[dba]"}
        else:  # kreciprocal: k at its default (the table names only dba), k2 drawn, lambda fixed
            assert r["method"] == "kreciprocal" and r["k"] == 20 and r["lam"] == 0.25
            assert set(t.params) == {"method", "k2[kreciprocal]"}


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"method": "bogus"}, "search space: method: unknown method 'bogus'"),
        ({"method": {"type": "categorical", "choices": ["dba", "x"]}}, "unknown method 'x'"),
        ({"k": {"type": "float", "low": 1, "high": 5}}, "search space: k: k takes whole numbers"),
        ({"k": {"type": "int", "low": 0, "high": 5}}, "search space: k: a whole number from 1 to 1000 expected, got 0"),
        ({"alpha": {"type": "float", "low": 0, "high": 500}}, "search space: alpha: a number from 0 to 100 expected"),
        ({"lam": 1.5}, "search space: lam: a number from 0 to 1 expected, got 1.5"),
        ({"alpha": {"per_method": {"kreciprocal": 2}}}, "search space: alpha[kreciprocal]: kreciprocal takes no alpha"),
        ({"k2": {"type": "int", "low": 5, "high": 2}}, "low must be below high"),
        ({"lr": 0.1}, "search space: unknown entry 'lr'"),
        ({"lam": 0.1, "lambda": 0.2}, "give lam or lambda, not both"),
    ],
)
def test_bad_space_entries_are_refused(entry, message):
    with pytest.raises(UserError, match=re.escape(message)):
        tr.load_space(entry)


def test_cli_refuses_a_bad_space_or_metric_in_one_line(tiny_run, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("method: [dba]\n")
    for extra, message in [
        (["--space", space], "search space: method: unknown method ['dba']"),
        (["--metric", "nmi"], "unknown --metric 'nmi'"),
        (["--tta", "rotate"], "unknown --tta 'rotate'"),
    ]:
        code, out, err = run_cli(["tune-rerank", tiny_run, "--out", tmp_path / "study", "--trials", 2, *extra], capsys)
        assert (
            code == 2 and out == "" and err.count("\n") == 1 and err.startswith("mproxy: error: ") and message in err
        ), err
    code, _, err = run_cli(["tune-rerank", tmp_path / "missing", "--out", tmp_path / "s", "--trials", 2], capsys)
    assert code == 2 and err == f"mproxy: error: {tmp_path / 'missing'} is not a run folder (no config.json)\n"
    assert not (tmp_path / "study").exists()


def test_tune_and_tune_rerank_refuse_each_others_study_folder(run, tiny_data, tmp_path):
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name=tune.STUDY_NAME)
    with pytest.raises(UserError, match=r"holds a study of 'mproxy tune', not of 'mproxy tune-rerank'"):
        tr.tune_rerank(run, tmp_path, 1)
    other = tmp_path / "other"
    other.mkdir()
    optuna.create_study(storage=f"sqlite:///{other / 'study.db'}", study_name=tr.STUDY_NAME)
    with pytest.raises(UserError, match=r"holds a study of 'mproxy tune-rerank', not of 'mproxy tune'"):
        tune.tune(tiny_data, other, trials=1, space={"pretrained": "none"})


def test_metric_and_options_round_trip():
    assert tr.check_metric("recall@4") == 4 and tr.check_metric("map@r") is None
    for bad in ("nmi", "recall", "recall@0", "MAP@R"):
        with pytest.raises(UserError):
            tr.check_metric(bad)
    for rerank in (
        Rerank("none"),
        Rerank("dba+aqe", k=7, alpha=2.1),
        Rerank("kreciprocal", k=6, k2=11, lam=0.07205113335976154),
    ):
        options = tr.rerank_options(rerank)
        assert tr.best_rerank(options) == rerank
        flags = tr.rerank_flags(rerank)
        parsed = dict(zip(flags[::2], flags[1::2]))
        assert (
            Rerank(
                parsed["--rerank"],
                *(
                    float(parsed[f]) if f in parsed else None
                    for f in ("--rerank-k", "--rerank-alpha", "--rerank-k2", "--rerank-lambda")
                ),
            )
            == rerank
        )
    assert tr.rerank_options(Rerank("dba", k=5)) == {"rerank": "dba", "rerank_k": 5, "rerank_alpha": 3.0}
    with pytest.raises(UserError, match="not a tune-rerank best.json"):
        tr.best_rerank({"lr": 1})
