import json
import math
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from conftest import wait_for
from PIL import Image

from momentum_proxy import cli
from momentum_proxy.data.loading import load_datasets, train_transform
from momentum_proxy.errors import UserError
from momentum_proxy.experiments import tune
from momentum_proxy.runs import RunDir
from momentum_proxy.training import loop as training
from momentum_proxy.training.config import TrainConfig

# Tiny trials: random weights, 48 px, one epoch of 2 steps with the backbone frozen, random proxies (no start
# embedding of train); the rest of the default space is searched.
SPACE = {
    "pretrained": "none",
    "image_size": 48,
    "batch_size": 8,
    "loader_workers": 0,
    "epochs": 1,
    "warmup_epochs": 1,
    "proxy_init": "random",
    "metrics": ["recall", "map@r"],
    "feature_dim": {"type": "categorical", "choices": [16, 32]},
}


def load(out) -> optuna.Study:
    return optuna.load_study(study_name=tune.STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")


def shown(study: optuna.Study) -> list[tuple]:
    """What a trial is: its number, state, parameters and every validation figure it produced."""
    return [
        (
            t.number,
            t.state,
            t.params,
            t.intermediate_values,
            t.value,
            {k: t.user_attrs.get(k) for k in ("val_map@r", "val_recall@1", "best_epoch", "start_map@r")},
        )
        for t in study.trials
    ]


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
        cfg = TrainConfig.from_dict(run.info())
        assert cfg.select == "val" and not cfg.final_test
        assert not (run / "eval.json").exists() and not (run / "embeddings.npz").exists()  # test never embedded
        assert not any(k.startswith("test") for k in rows[0])
    assert json.loads((out / "best.json").read_text()) == best
    chosen = [t for t in study.trials if t.user_attrs["options"].items() <= best.items()]
    assert len(chosen) == 1 and best == {
        "data": str(tiny_data.absolute()),
        **{k: v for k, v in SPACE.items() if k != "epochs"},
        **chosen[0].user_attrs["options"],
        "epochs": 1,
        "seed": 0,
    }
    default, other = study.trials
    assert chosen[0].value >= default.value  # best.json never scores below the default recipe on val
    assert chosen[0].number == (other.number if other.value > default.value else default.number)
    report = (out / "report.md").read_text()
    assert re.search(rf"^\| 0 \(default\) \| {100 * default.value:.2f} \|", report, re.M)
    assert re.search(rf"^\| 1 \| {100 * other.value:.2f} \|", report, re.M)
    assert f"| default recipe | 0 | {100 * default.value:.2f} |" in report
    assert f"| difference | | {100 * (other.value - default.value):+.2f} |" in report
    assert ("No trial beat the default recipe" in report) == (other.value <= default.value)
    assert "Parameter importances" in report
    links = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert {"best_curves.png", "history.png", "params.png", "importances.png"} <= set(links)
    for link in links:
        assert (out / link).stat().st_size > 0 and (out / link).with_suffix(".pdf").stat().st_size > 0


def test_best_json_trains_through_train_config(study_dir, tmp_path):
    out, best = study_dir
    cli.main(["train", "--config", str(out / "best.json"), "--out", str(tmp_path / "run")])
    run = RunDir(tmp_path / "run")
    stored = TrainConfig.from_dict(run.info()).to_dict()
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
    monkeypatch.setattr(
        training, "evaluate_split", lambda m, split, *a, **k: embedded.append(split.name) or real(m, split, *a, **k)
    )
    tune.tune(shuffled, tmp_path / "study", trials=2, space=SPACE)
    assert shown(load(tmp_path / "study")) == shown(load(out))
    assert embedded and set(embedded) == {"val"}


def test_resume_with_other_options_is_refused(study_dir):
    out, _ = study_dir
    before = shown(load(out))
    with pytest.raises(UserError, match=r"holds a study with space entry pooling \{.*\}, not max; use another --out"):
        tune.tune(load(out).user_attrs["identity"]["data"], out, trials=4, space={**SPACE, "pooling": "max"})
    assert shown(load(out)) == before


def test_resume_with_another_budget_names_both_values(study_dir, tmp_path, capsys):
    out, _ = study_dir
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    data = load(out).user_attrs["identity"]["data"]
    with pytest.raises(SystemExit):
        cli.main(
            [
                "tune",
                "--data",
                data,
                "--out",
                str(out),
                "--trials",
                "2",
                "--space",
                str(space),
                "--budget-epochs",
                "2",
                "--seed",
                "3",
            ]
        )
    assert capsys.readouterr().err == (
        f"mproxy: error: {out} holds a study with epochs 1, not 2 and seed 0, not 3; "
        "use another --out or the same settings\n"
    )


def test_trial_0_is_the_default_recipe(study_dir):
    """Trial 0's parameters and its run's options are TrainConfig's defaults; feature_dim, whose default 512 is
    not among SPACE's choices, is left to the sampler and said so."""
    out, _ = study_dir
    d = TrainConfig(data="", out="")
    scale, margin = d.loss_params
    trial0, trial1 = load(out).trials
    assert {k: v for k, v in trial0.params.items() if k != "feature_dim"} == {
        "loss": d.loss,
        f"loss_scale[{d.loss}]": scale,
        f"margin[{d.loss}]": margin,
        "lr": d.lr,
        "backbone_lr_mult": d.backbone_lr_mult,
        "schedule": d.schedule,
        "proxy_momentum": d.proxy_momentum,
        "momentum_target": d.momentum_target,
        "pooling": d.pooling,
        "aug_scale_min": d.aug_scale_min,
    }
    assert trial0.params["feature_dim"] in (16, 32)
    assert trial0.user_attrs[tune.DEFAULT] == {"feature_dim": "the default 512 is not among the choices [16, 32]"}
    trained = TrainConfig.from_dict(RunDir(out / "trials" / "0").info())
    searched = (
        "loss",
        "lr",
        "backbone_lr_mult",
        "schedule",
        "proxy_momentum",
        "momentum_target",
        "pooling",
        "aug_scale_min",
    )
    assert {k: getattr(trained, k) for k in searched} == {k: getattr(d, k) for k in searched}
    assert trained.loss_params == d.loss_params
    assert tune.DEFAULT not in trial1.user_attrs and trial1.params != trial0.params
    assert "feature_dim (the default 512 is not among the choices [16, 32])" in (out / "report.md").read_text()


def test_every_default_lies_in_the_default_space(tiny_data):
    base = tune.base_config(tiny_data, tune.load_space(), 3, 0)
    params, drawn = tune.default_params(tune.load_space(), base)
    assert drawn == {}
    assert set(params) == {"loss", "loss_scale[cos_face]", "margin[cos_face]"} | (
        set(tune.DEFAULT_SPACE) - {"loss", "loss_scale", "margin", "epochs"}
    )


def test_defaults_outside_the_space_are_drawn_and_said(tiny_data):
    space = tune.load_space(
        {
            "lr": {"type": "float", "low": 1e-3, "high": 1e-2},
            "warmup_epochs": {"type": "int", "low": 0, "high": 4, "step": 2},
            "loss": {"type": "categorical", "choices": ["arc_face", "proxy_nca"]},
        }
    )
    base = tune.base_config(tiny_data, space, 1, 0)
    params, drawn = tune.default_params(space, base)
    assert drawn == {
        "lr": "the default 2.15e-05 is outside 0.001..0.01",
        "warmup_epochs": "the default 1 is off the grid 0 + k * 2",
        "loss": "the default cos_face is not among the choices ['arc_face', 'proxy_nca']",
        "loss_scale": "follows the drawn loss",
        "margin": "follows the drawn loss",
    }
    study = optuna.create_study(direction="maximize")
    tune.enqueue_default(study, space, base)
    trial = study.ask()
    options = space.suggest(trial)
    assert trial.user_attrs[tune.DEFAULT] == drawn
    assert 1e-3 <= options["lr"] <= 1e-2 and options["warmup_epochs"] in (0, 2, 4)
    assert base.image_size is None  # the backbone's native size, which trial 0 takes
    assert options["loss"] in ("arc_face", "proxy_nca") and options["image_size"] == tune.native(base).image_size == 224
    fixed_loss = tune.load_space({"loss": "arc_face"})  # ArcFace's scale and margin default to the library's
    _, drawn = tune.default_params(fixed_loss, tune.base_config(tiny_data, fixed_loss, 1, 0))
    assert set(drawn) == {"loss_scale[arc_face]", "margin[arc_face]"}


def test_a_resumed_study_does_not_enqueue_the_default_again(tiny_data, tmp_path, capsys, no_plots):
    out = tmp_path / "study"
    tune.tune(tiny_data, out, trials=1, space=SPACE)
    printed = capsys.readouterr().out
    assert "trial 0 is the default recipe but for feature_dim, drawn: the default 512 is not among" in printed
    assert "trial 0 (default recipe; drawn: feature_dim) complete" in printed
    assert "no trial beat the default recipe (trial 0, val MAP@R" in printed
    tune.tune(tiny_data, out, trials=2, space=SPACE)
    assert "default recipe but for" not in capsys.readouterr().out
    trials = load(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert [tune.DEFAULT in t.user_attrs for t in trials] == [True, False]


def synthetic_study(values: list[float], default_at: int) -> optuna.Study:
    """Finished complete trials with val MAP@R `values`; the one at `default_at` is the default recipe's."""
    study = optuna.create_study(direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    for i, value in enumerate(values):
        attrs = {
            tune.FINISHED: True,
            "options": {"lr": 1e-5 * (i + 1)},
            "val_map@r": value,
            "val_recall@1": value,
            "best_epoch": 1,
            "start_map@r": 0.1,
            **({tune.DEFAULT: {}} if i == default_at else {}),
        }
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": 1e-5 * (i + 1)}, distributions={"lr": lr}, value=value, user_attrs=attrs
            )
        )
    return study


@pytest.mark.parametrize(
    "values, chosen, sentence",
    [
        (
            [0.5, 0.4, 0.45],
            0,
            "no trial beat the default recipe (trial 0, val MAP@R 50.00; the best other, trial 2, "
            "45.00, difference -5.00): best.json is the default recipe",
        ),
        ([0.5, 0.6, 0.45], 1, "trial 1 val MAP@R 60.00 against the default recipe (trial 0) 50.00, difference +10.00"),
    ],
)
def test_report_and_summary_compare_the_best_with_the_default(
    values, chosen, sentence, tiny_data, tmp_path, capsys, no_plots
):
    study = synthetic_study(values, default_at=0)
    base = tune.base_config(tiny_data, tune.load_space(SPACE), 1, 0)
    best = tune.write_outputs(study, tmp_path, base, tune.load_space(SPACE))
    assert best["lr"] == 1e-5 * (chosen + 1) and json.loads((tmp_path / "best.json").read_text()) == best
    assert capsys.readouterr().out.startswith(f"best: {sentence}; ")
    report = (tmp_path / "report.md").read_text()
    top = 2 if chosen == 0 else chosen
    assert (
        f"| default recipe | 0 | 50.00 |\n| {'best other' if chosen == 0 else 'best'} | {top} | "
        f"{100 * values[top]:.2f} |\n| difference | | {100 * (values[top] - 0.5):+.2f} |"
    ) in report
    assert sentence[0].upper() + sentence[1:] + "." in report and f"Best: trial {chosen}" in report


def test_a_tie_with_the_default_recommends_the_default(tiny_data, tmp_path, no_plots):
    """The default is recommended unless beaten, also when its retry came after a tying trial."""
    study = synthetic_study([0.5, 0.5], default_at=1)
    base = tune.base_config(tiny_data, tune.load_space(SPACE), 1, 0)
    assert tune.write_outputs(study, tmp_path, base, tune.load_space(SPACE))["lr"] == 2e-5
    assert "No trial beat the default recipe (trial 1" in (tmp_path / "report.md").read_text()


@pytest.mark.slow  # a real `mproxy tune` process killed mid-trial (the retry logic: the tests below)
def test_killed_tune_resumes_without_rerunning_finished_trials(tiny_data, tmp_path, capsys, no_plots):
    out, space = tmp_path / "study", tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    cmd = [
        sys.executable,
        "-m",
        "momentum_proxy",
        "tune",
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--trials",
        "2",
        "--space",
        str(space),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for((out / "trials" / "1" / "config.json").exists, lambda: proc.poll() is None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = load(out).trials
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"], "kill during the second trial"
    log0 = (out / "trials" / "0" / "metrics.csv").stat().st_mtime_ns

    tune.tune(tiny_data, out, trials=2, space=space)
    trials = load(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[1].user_attrs["interrupted"] and trials[2].params == trials[1].params  # the killed one, retried
    assert [tune.DEFAULT in t.user_attrs for t in trials] == [True, False, False]  # not queued again on resume
    assert trials[0].value == first[0].value and (out / "trials" / "0" / "metrics.csv").stat().st_mtime_ns == log0
    assert "trial 1 was interrupted" in capsys.readouterr().out
    assert (
        json.loads((out / "best.json").read_text())["lr"]
        == max((trials[0], trials[2]), key=lambda t: t.value).user_attrs["options"]["lr"]
    )


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
    assert "loss became nan" in trials[1].user_attrs["diverged"]
    assert trials[2].user_attrs["error"] == "a bad combination"
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


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"colour": 1}, "unknown option 'colour'"),
        ({"select": "test"}, "set by the tuner"),
        ({"epochs": {"type": "int", "low": 1, "high": 3}}, "epochs is the budget"),
        ({"lr": {"type": "float", "low": 1e-3, "high": 1e-5}}, "low must be below high"),
        ({"lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "needs low > 0"),
        ({"lr": {"type": "float", "low": "a", "high": 1e-3}}, "needs numbers"),
        ({"loss": {"type": "categorical", "choices": []}}, "non-empty list"),
        ({"lr": {"low": 1e-5, "high": 1e-3}}, "give a plain value"),
        ({"margin": {"per_loss": {"triplet": {"type": "float", "low": 0.1, "high": 0.2}}}}, "unknown loss 'triplet'"),
    ],
)
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
    space = tune.load_space(
        {
            "momentum": {"type": "float", "low": 0.2, "high": 0.4},
            "workers": 0,
            "proxy_update": {"type": "categorical", "choices": ["sum"]},
        }
    )
    assert space.searched["proxy_momentum"] == {"type": "float", "low": 0.2, "high": 0.4}
    assert space.searched["momentum_target"] == {"type": "categorical", "choices": ["sum"]}
    assert space.fixed["loader_workers"] == 0 and not {"momentum", "proxy_update", "workers"} & set(space.entries)
    earlier = {k: v for k, v in tune.DEFAULT_SPACE.items() if k not in ("proxy_momentum", "momentum_target")}
    earlier.update(momentum=tune.DEFAULT_SPACE["proxy_momentum"], proxy_update=tune.DEFAULT_SPACE["momentum_target"])
    identity = {"data": "d", "epochs": 3, "seed": 0}
    tune.open_study(tmp_path, {**identity, "space": earlier})
    tune.open_study(tmp_path, {**identity, "space": tune.load_space().entries})  # continues: no error
    with pytest.raises(UserError, match="space entry pooling"):
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
    for schedule, expected in [
        ("cosine", [0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]),
        ("multistep", [1, 1, 0.1, 0.1, 0.01]),
    ]:
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


@pytest.mark.parametrize(
    "change, message",
    [
        ({"schedule": "linear"}, "unknown --schedule"),
        ({"aug_scale_min": 0.0}, "--aug-scale-min"),
        ({"aug_scale_min": 1.5}, "--aug-scale-min"),
    ],
)
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


def test_an_interrupted_default_trial_is_retried_as_the_default(tmp_path):
    study, storage = tune.open_study(tmp_path, {"space": {}})
    study.enqueue_trial({"lr": 2e-5}, user_attrs={tune.DEFAULT: {}})
    study.ask().suggest_float("lr", 1e-5, 1e-3)  # killed while running
    tune.retry_interrupted_trials(study, storage)
    retry = study.get_trials()[1]
    assert retry.state.name == "WAITING" and retry.user_attrs == {"retry_of": 0, tune.DEFAULT: {}}


def test_a_second_tuner_on_the_same_folder_is_refused(tiny_data, tmp_path):
    with tune.study_lock(tmp_path / "study"):
        with pytest.raises(UserError, match=r"being tuned by pid \d+ \(mproxy"):
            tune.tune(tiny_data, tmp_path / "study", trials=1, space=SPACE)
    assert not (tmp_path / "study" / "study.db").exists()


def test_trials_start_from_the_recipe_train_picks_and_a_resume_keeps_it(tiny_data, tmp_path, capsys, no_plots):
    catalogue = tmp_path / "catalogue"  # an images split: every class in train, val and test
    shutil.copytree(tiny_data, catalogue)
    df = pd.read_csv(catalogue / "manifest.csv")
    df["split"] = np.array(["train", "train", "val", "test"])[df.groupby("label").cumcount() % 4]
    df.to_csv(catalogue / "manifest.csv", index=False)
    out = tmp_path / "study"
    best = tune.tune(catalogue, out, trials=1, space=SPACE)
    printed = capsys.readouterr().out
    assert "recipe: catalogue (trial 0's values" in printed
    assert "trial 0 (catalogue recipe; drawn: feature_dim)" in printed
    trial0 = load(out).trials[0]
    assert trial0.user_attrs[tune.RECIPE] == "catalogue"
    assert trial0.params["lr"] == TrainConfig.from_recipe("catalogue").lr == 1e-3 != TrainConfig.lr
    assert best["lr"] == 1e-3  # no other trial: best.json is the recipe's
    narrow = tune.load_space({"lr": {"type": "float", "low": 1e-5, "high": 1e-4, "log": True}})
    base = tune.base_config(catalogue, narrow, 1, 0, "catalogue")
    assert tune.default_params(narrow, base)[1] == {"lr": "the catalogue recipe's 0.001 is outside 1e-05..0.0001"}
    assert "## Against the catalogue recipe" in (out / "report.md").read_text()
    with pytest.raises(UserError, match="use another --out or the same settings"):
        tune.tune(catalogue, out, trials=2, space=SPACE, recipe="default")
    with pytest.raises(UserError, match="--recipe must be one of auto, default, original, catalogue; got 'fast'"):
        tune.tune(catalogue, out, trials=2, space=SPACE, recipe="fast")
    identity = tune.identity_of(tune.base_config(tiny_data, tune.load_space(SPACE), 1, 0), tune.load_space(SPACE))
    assert "recipe" not in identity  # a study begun before --recipe (the default one) continues
