import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from PIL import Image

from momentum_proxy import cli
from momentum_proxy.config import TrainConfig
from momentum_proxy.data.loading import load_datasets, train_transform
from momentum_proxy.errors import UserError
from momentum_proxy.experiments import tune
from momentum_proxy.runs import RunDir
from momentum_proxy.training import loop as training

# Tiny trials: random weights, 48 px, one epoch of 2 steps with the backbone frozen, random proxies (no start
# embedding of train); the rest of the default space is searched.
SPACE = {"pretrained": "none", "image_size": 48, "batch_size": 8, "loader_workers": 0, "epochs": 1, "warmup_epochs": 1,
         "proxy_init": "random", "metrics": ["recall", "map@r"],
         "feature_dim": {"type": "categorical", "choices": [16, 32]}}


def load(out) -> optuna.Study:
    return optuna.load_study(study_name=tune.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")


def shown(study: optuna.Study) -> list[tuple]:
    """What a trial is: its number, state, parameters and every validation figure it produced."""
    return [(t.number, t.state, t.params, t.intermediate_values, t.value,
             {k: t.user_attrs.get(k) for k in ("val_map@r", "val_recall@1", "best_epoch", "start_map@r")})
            for t in study.trials]


@pytest.fixture
def no_plots(monkeypatch):
    """Skip the figures (seconds each on a loaded CPU) where a test is not about them."""
    monkeypatch.setattr(tune, "plots", lambda *a: None)


def copy_data(src, dst, change):
    shutil.copytree(src, dst)
    df = pd.read_csv(dst / "manifest.csv")
    change(df)
    df.to_csv(dst / "manifest.csv", index=False)
    return dst


@pytest.fixture(scope="module")
def study_dir(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "study"
    best = tune.tune(tiny_data, out, trials=2, space=SPACE)
    return out, best


def test_study_writes_trials_best_config_report_and_plots(study_dir, tiny_data):
    out, best = study_dir
    study = load(out)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in study.trials:
        run = RunDir(out / "trials" / str(t.number))
        rows = run.metrics()
        assert [r["epoch"] for r in rows] == [0, 1]
        assert t.value == max(r["val_map@r"] for r in rows if r["epoch"] >= 1)  # the objective is the file's
        assert t.user_attrs["start_map@r"] == rows[0]["val_map@r"]
        assert run.config().select == "val" and not run.config().final_test
        assert not (run / "eval.json").exists() and not (run / "embeddings.npz").exists()  # test never embedded
        assert not any(k.startswith("test") for k in rows[0])
    assert json.loads((out / "best.json").read_text()) == best
    assert best == {"data": str(tiny_data.absolute()), **{k: v for k, v in SPACE.items() if k != "epochs"},
                    **study.best_trial.user_attrs["options"], "epochs": 1, "seed": 0}
    assert study.best_value == max(t.value for t in study.trials)
    report = (out / "report.md").read_text()
    assert all(re.search(rf"^\| {t.number} \| {100 * t.value:.2f} \|", report, re.M) for t in study.trials)
    assert "Parameter importances" in report
    links = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert {"best_curves.png", "history.png", "params.png", "importances.png"} <= set(links)
    for link in links:
        assert (out / link).stat().st_size > 0 and (out / link).with_suffix(".pdf").stat().st_size > 0


def test_best_json_trains_through_train_config(study_dir, tmp_path):
    out, best = study_dir
    cli.main(["train", "--config", str(out / "best.json"), "--out", str(tmp_path / "run")])
    run = RunDir(tmp_path / "run")
    stored = run.config().to_dict()
    assert {k: stored[k] for k in best if k != "data"} == {k: v for k, v in best.items() if k != "data"}
    assert run.eval()["selected_on"] == "val" and "map@r" in run.eval()["test"]


def test_no_trial_reads_test_labels(study_dir, tiny_data, tmp_path, monkeypatch, no_plots):
    """Shuffled test labels give the same trials (parameters and val figures), and no trial embeds test."""
    out, _ = study_dir

    def shuffle_test(df):
        test = df["split"] == "test"
        df.loc[test, "label"] = np.random.default_rng(1).permutation(df.loc[test, "label"].to_numpy())

    shuffled = copy_data(tiny_data, tmp_path / "shuffled", shuffle_test)
    assert not pd.read_csv(shuffled / "manifest.csv").equals(pd.read_csv(tiny_data / "manifest.csv"))
    embedded = []
    real = training.evaluate_split
    monkeypatch.setattr(training, "evaluate_split", lambda m, split, *a, **k: embedded.append(split.name)
                        or real(m, split, *a, **k))
    tune.tune(shuffled, tmp_path / "study", trials=2, space=SPACE)
    assert shown(load(tmp_path / "study")) == shown(load(out))
    assert embedded and set(embedded) == {"val"}


def test_resume_with_other_options_is_refused(study_dir):
    out, _ = study_dir
    before = shown(load(out))
    with pytest.raises(UserError, match="another space"):
        tune.tune(load(out).user_attrs["identity"]["data"], out, trials=4, space={**SPACE, "pooling": "max"})
    assert shown(load(out)) == before


def test_killed_tune_resumes_without_rerunning_finished_trials(tiny_data, tmp_path, capsys, no_plots):
    out, space = tmp_path / "study", tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    cmd = [sys.executable, "-m", "momentum_proxy", "tune", "--data", str(tiny_data), "--out", str(out),
           "--trials", "2", "--space", str(space)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "trials" / "1" / "config.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = load(out).trials
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"], "kill during the second trial"
    log0 = (out / "trials" / "0" / "metrics.csv").stat().st_mtime_ns

    tune.tune(tiny_data, out, trials=2, space=space)
    trials = load(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[1].user_attrs["interrupted"] and trials[2].params == trials[1].params  # the killed one, retried
    assert trials[0].value == first[0].value and (out / "trials" / "0" / "metrics.csv").stat().st_mtime_ns == log0
    assert "trial 1 was interrupted" in capsys.readouterr().out
    assert json.loads((out / "best.json").read_text())["lr"] == max(
        (trials[0], trials[2]), key=lambda t: t.value).user_attrs["options"]["lr"]


def test_diverged_and_failing_trials_do_not_stop_the_study(tiny_data, tmp_path, monkeypatch, capsys, no_plots):
    real = training.train_one_epoch

    def sabotaged(job, state, *args):
        trial = job.run.path.name
        if trial == "1":
            training.check_finite(math.nan, 1, job.run)
        if trial == "2":
            raise UserError("a bad combination")
        return real(job, state, *args)

    monkeypatch.setattr(training, "train_one_epoch", sabotaged)
    out = tmp_path / "study"
    best = tune.tune(tiny_data, out, trials=3, space=SPACE)
    trials = load(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert "loss became nan" in trials[1].user_attrs["diverged"] and trials[2].user_attrs["error"] == "a bad combination"
    assert best["lr"] == trials[0].user_attrs["options"]["lr"]
    printed = capsys.readouterr().out
    assert "trial 1 diverged" in printed and "trial 2 failed: a bad combination" in printed
    assert "trial 2 (fail): a bad combination" in (out / "report.md").read_text()


def test_tune_refuses_data_without_val_split(tiny_data, tmp_path, capsys):
    data = copy_data(tiny_data, tmp_path / "noval", lambda df: df.replace({"split": {"val": "train"}}, inplace=True))
    with pytest.raises(SystemExit) as e:
        cli.main(["tune", "--data", str(data), "--out", str(tmp_path / "study"), "--trials", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mproxy: error: tune needs a val split") and err.count("\n") == 1
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("entry, message", [
    ({"colour": 1}, "unknown option 'colour'"),
    ({"select": "test"}, "set by the tuner"),
    ({"epochs": {"type": "int", "low": 1, "high": 3}}, "epochs is the budget"),
    ({"lr": {"type": "float", "low": 1e-3, "high": 1e-5}}, "low must be below high"),
    ({"lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "needs low > 0"),
    ({"lr": {"type": "float", "low": "a", "high": 1e-3}}, "needs numbers"),
    ({"loss": {"type": "categorical", "choices": []}}, "non-empty list"),
    ({"lr": {"low": 1e-5, "high": 1e-3}}, "give a plain value"),
    ({"margin": {"per_loss": {"triplet": {"type": "float", "low": 0.1, "high": 0.2}}}}, "unknown loss 'triplet'"),
])
def test_bad_space_entries_are_refused(entry, message):
    with pytest.raises(UserError, match=message):
        tune.load_space(entry)


def test_space_file_is_put_over_the_default(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: 0.0001\nloss: {type: categorical, choices: [cos_face]}\nepochs: 2\n")
    space = tune.load_space(path)
    assert space.fixed == {"lr": 0.0001, "epochs": 2}
    assert space.searched["loss"] == {"type": "categorical", "choices": ["cos_face"]}
    assert set(space.searched) == set(tune.DEFAULT_SPACE) - {"lr", "epochs"}
    with pytest.raises(UserError, match="space file not found"):
        tune.load_space(tmp_path / "missing.json")


def test_space_of_the_earlier_spelling_loads_and_its_study_continues(tmp_path):
    """A space with `momentum`, `proxy_update` mean/sum and `workers` means today's proxy_momentum, momentum_target
    and loader_workers; a study begun with the earlier default space is the same study."""
    space = tune.load_space({"momentum": {"type": "float", "low": 0.2, "high": 0.4}, "workers": 0,
                             "proxy_update": {"type": "categorical", "choices": ["sum"]}})
    assert space.searched["proxy_momentum"] == {"type": "float", "low": 0.2, "high": 0.4}
    assert space.searched["momentum_target"] == {"type": "categorical", "choices": ["sum"]}
    assert space.fixed["loader_workers"] == 0 and not {"momentum", "proxy_update", "workers"} & set(space.entries)
    earlier = {k: v for k, v in tune.DEFAULT_SPACE.items() if k not in ("proxy_momentum", "momentum_target")}
    earlier.update(momentum=tune.DEFAULT_SPACE["proxy_momentum"], proxy_update=tune.DEFAULT_SPACE["momentum_target"])
    identity = {"data": "d", "epochs": 3, "seed": 0}
    tune.open_study(tmp_path, {**identity, "space": earlier})
    tune.open_study(tmp_path, {**identity, "space": tune.load_space().entries})  # continues: no error
    with pytest.raises(UserError, match="another space"):
        tune.open_study(tmp_path, {**identity, "space": {**tune.load_space().entries, "pooling": "max"}})


def test_suggest_gives_a_margin_only_to_losses_that_have_one():
    space = tune.load_space({"loss": {"type": "categorical", "choices": ["normalized_softmax", "arc_face"]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [space.suggest(study.ask()) for _ in range(12)]
    assert {o["loss"] for o in drawn} == {"normalized_softmax", "arc_face"}
    for options in drawn:
        assert ("margin" in options) == (options["loss"] == "arc_face")
        if options["loss"] == "arc_face":
            assert 10 <= options["margin"] <= 40  # ArcFace's own range (degrees)
        TrainConfig(data="", out="", **options).validate()


# --- the TrainConfig options added for the search: schedule, aug_scale_min, final_test ---------------------
def test_cosine_and_multistep_schedules():
    param = torch.nn.Parameter(torch.zeros(1))
    for schedule, expected in [("cosine", [0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]),
                               ("multistep", [1, 1, 0.1, 0.1, 0.01])]:
        opt = torch.optim.SGD([param], lr=1.0)
        sched = training.make_scheduler(TrainConfig(data="", out="", epochs=5, schedule=schedule), opt)
        lrs = []
        for _ in range(5):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs == pytest.approx(expected)


def test_aug_scale_min_bounds_the_crop(tiny_data):
    gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
    image = Image.fromarray(gradient)
    whole = np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR))
    def crops(scale_min):
        return [np.asarray(train_transform(32, scale_min)(image, np.random.default_rng(s))) for s in range(20)]
    is_whole = lambda a: np.array_equal(a, whole) or np.array_equal(a, whole[:, ::-1])  # noqa: E731
    assert all(is_whole(a) for a in crops(1.0))
    assert not all(is_whole(a) for a in crops(0.16))
    assert load_datasets(tiny_data, 32, aug_scale_min=0.5).train.transform.scale == (0.5, 1.0)


@pytest.mark.parametrize("change, message", [({"schedule": "linear"}, "unknown --schedule"),
                                             ({"aug_scale_min": 0.0}, "--aug-scale-min"),
                                             ({"aug_scale_min": 1.5}, "--aug-scale-min")])
def test_new_options_are_validated(change, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(data="", out="", **change).validate()


def test_new_options_on_the_command_line(tiny_data):
    a = cli.parser().parse_args(["train", "--data", str(tiny_data), "--schedule", "cosine", "--aug-scale-min", "0.3"])
    cfg = cli.config_from_args(a)
    assert (cfg.schedule, cfg.aug_scale_min) == ("cosine", 0.3)


def test_interrupted_trials_are_failed_and_queued_again_once(tmp_path):
    study, storage = tune.open_study(tmp_path, {"space": {}})
    lr = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3)}
    killed = study.ask(lr)  # left RUNNING
    ctrl_c = study.ask(lr)
    study.tell(ctrl_c, state=optuna.trial.TrialState.FAIL)
    failed = study.ask(lr)
    failed.set_user_attr(tune.FINISHED, True)  # a bad combination: finished, not retried
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    assert tune.retry_interrupted_trials(study, storage) == [killed.number, ctrl_c.number]
    assert tune.retry_interrupted_trials(study, storage) == []
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "FAIL", "WAITING", "WAITING"]
    assert [t.user_attrs["retry_of"] for t in trials[3:]] == [killed.number, ctrl_c.number]
    for retried in (killed, ctrl_c):  # the queued trials come next, with the interrupted ones' parameters
        assert study.ask().suggest_float("lr", 1e-5, 1e-3) == retried.params["lr"]


def test_a_second_tuner_on_the_same_folder_is_refused(tiny_data, tmp_path):
    with tune.study_lock(tmp_path / "study"):
        with pytest.raises(UserError, match=r"being tuned by pid \d+ \(mproxy"):
            tune.tune(tiny_data, tmp_path / "study", trials=1, space=SPACE)
    assert not (tmp_path / "study" / "study.db").exists()
