"""Training options: `TrainConfig`, its recipes, its validation and the earlier spellings of its options — plain
Python, no torch import (the command line parses and checks options before torch loads).

`TrainConfig` extends the foundation's `config.ModelConfig` (what the layers below training read from a run), so
a training configuration is accepted wherever a model's is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from momentum_proxy.config import METRICS, ModelConfig, check_choice, option, read_mapping_file
from momentum_proxy.errors import UserError, require_extra

LOSS_NAMES = ("proxy_nca", "normalized_softmax", "cos_face", "arc_face", "proxy_anchor")
OPTIMIZERS = ("adam", "sgd")
PROXY_UPDATES = ("momentum", "gradient")
MOMENTUM_TARGETS = ("mean", "sum")
SELECT_METRICS = ("recall@1", "precision@1", "r_precision", "map@r")
SELECTIONS = ("val", "last", "test")
SCHEDULES = ("multistep", "cosine")
TRACKERS = ("none", "tensorboard")  # --log

# The original MP tool's behaviour, for exact reproduction (`--recipe original`, implied by its spelling
# `--data_path/--data_name`): ResNet-50, ProxyNCA, one learning rate, plain SGD (no momentum) or Adam,
# milestones at int(50%) and int(80%) of the epochs, random proxies, no warm-up, its proxy update that adds
# m * f_i for every sample, and the best epoch chosen on the test split as its published tables were.
ORIGINAL_RECIPE = dict(
    backbone="resnet50",
    loss="proxy_nca",
    loss_scale=None,
    margin=None,
    lr=1e-3,
    backbone_lr_mult=1.0,
    warmup_epochs=0,
    proxy_init="random",
    momentum_target="sum",
    proxy_momentum=0.5,
    sgd_momentum=0.0,
    schedule="multistep",
    milestone_rounding="floor",
    pooling="max",
    aug_scale_min=0.16,
    select="test",
    select_metric="recall@1",
)
# The images protocol's recipe (`--recipe catalogue`; `auto` picks it for any images split, `prepare folder
# --split images`): the values that differ from the default, chosen on val (docs: Benchmarks, Own catalogue).
CATALOGUE_RECIPE = dict(
    lr=1e-3,  # of 2.15e-5 (the default), 1e-4, 3e-4 and 1e-3, the best val MAP@R on birds50 (4 epochs, 160 px)
    epochs=8,  # of 4 and 8 at lr 1e-3, the better val MAP@R (about 9 minutes a run at 160 px for 1,500 photos)
)
RECIPE_VALUES: dict[str, dict] = {"default": {}, "original": ORIGINAL_RECIPE, "catalogue": CATALOGUE_RECIPE}
RECIPES = tuple(RECIPE_VALUES)
# The default recipe's loss parameters, found by `mproxy tune` on birds50 (docs: Tune); a loss not listed
# here (the original recipe's ProxyNCA among them) uses pytorch-metric-learning's defaults.
LOSS_DEFAULTS = {"cos_face": {"loss_scale": 30.7, "margin": 0.216}}
# Earlier names of options (config.json of older runs, `tune` files, this tool's earlier flags).
RENAMED = {"momentum": "proxy_momentum", "workers": "loader_workers"}


@dataclass(kw_only=True)
class TrainConfig(ModelConfig):
    """Every option of a training run (`mproxy train` options map 1:1 onto these fields and `ModelConfig`'s).

    The defaults are the recipe `mproxy tune` found on real fine-grained photos (birds50, selected and compared
    on validation; docs: Tune): CosFace (scale 30.7, margin 0.216) with momentum proxies (m 0.637)
    initialised at the class means, avg+max pooling, one warm-up epoch of head and proxies, lr 2.15e-5 with the
    backbone at 0.332 of it, a cosine schedule, and crops of at least half the image. Rounded to 3 digits.
    A backbone not given is decided by the device (`for_device`: EfficientNet-Lite0, ResNet-50 on CUDA) when
    training starts, for the command line and the Python API alike, and an image size not given is the backbone's
    native one (`models.backbones.resolve_config`); both are recorded in the run's config.json. Other recipes
    (`RECIPES`) start from other values: `from_recipe`, and `for_data` for a dataset's (`catalogue` on an images
    split); `recipe` names the one a configuration started from. Its own fields (`out` and those below it) are
    keyword-only.
    """

    out: str
    recipe: str = "default"  # the recipe the values started from (`from_recipe`): recorded, it sets nothing
    pretrained: str = option("default", "default (ImageNet weights) | none")
    weights: str | None = option(None, "pretrained backbone weights file (.pth/.safetensors)")
    loss: str = option("cos_face", " | ".join(LOSS_NAMES), aliases=["--loss_name"])
    loss_scale: float | None = option(
        None,
        "inverse temperature of the loss's logits (None: 30.7 for cos_face, as tuned; the library's for the others)",
    )
    margin: float | None = option(
        None,
        "margin of cos_face, arc_face, proxy_anchor (None: 0.216 for cos_face, as tuned; the library's for the others)",
    )
    proxy_update: str = option(
        "momentum",
        "how proxies are updated: momentum (after every step, p <- (1 - m) p + m f; "
        "not learned) | gradient (learned by the optimizer)",
    )
    proxy_momentum: float = option(0.637, "m of the momentum update", aliases=["--momentum"])
    momentum_target: str = option(
        "mean", "f of the momentum update: mean (of the class's batch embeddings) | sum (the original tool)"
    )
    proxy_init: str = option("class_mean", "class_mean | random")
    optimizer: str = option("adam", " | ".join(OPTIMIZERS))
    sgd_momentum: float = option(0.9, "momentum of the SGD optimizer (the original tool: none)")
    lr: float = option(2.15e-5, "head learning rate")
    backbone_lr_mult: float = option(0.332, "backbone learning rate = lr x this")
    warmup_epochs: int = option(1, "first epochs train head and proxies only (backbone frozen)")
    milestone_rounding: str = option("round", "round | floor (the original tool's int()) of the multistep milestones")
    schedule: str = option(
        "cosine", "learning-rate schedule: multistep (x0.1 at 50% and 80% of the epochs) | cosine (to 0 at the end)"
    )
    aug_scale_min: float = option(0.501, "smallest area fraction of the random-resized training crop")
    epochs: int = option(
        20, "epochs (0: no training, the run keeps the pretrained start)", aliases=["--num_epochs", "--num-epochs"]
    )
    metrics: list[str] = option(help="per-epoch metrics: " + ",".join(METRICS), factory=lambda: ["recall", "map@r"])
    select: str | None = option(
        None,
        "val | last | test: which epoch becomes best.pt (None: val when the data has a "
        "val split, else last; test only to reproduce published tables)",
    )
    select_metric: str = option("map@r", " | ".join(SELECT_METRICS) + " (selection)")
    test_every_epoch: bool = option(False, "also report test metrics every epoch (never selects)")
    final_test: bool = option(
        True, "evaluate the selected checkpoint on the test split at the end (off: tuning trials)"
    )
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto | cpu | cuda")
    amp: str = option("none", "none | bf16 | fp16 (CUDA) mixed precision")
    grad_accum: int = option(1, "gradient accumulation steps")
    compile: bool = option(False, "torch.compile the model")
    log_every: int = option(10, "steps between checks of the running loss (the step loop's only host sync)")
    log: str = option(
        "none",
        "experiment tracking beside metrics.csv: none | tensorboard (per-epoch metrics, loss, "
        "learning rate and a retrieval picture in RUN_DIR/tensorboard/; the [track] extra)",
    )

    @property
    def loss_params(self) -> tuple[float | None, float | None]:
        """(scale, margin) of the loss: the given ones, else the default recipe's for this loss (None: the
        library's)."""
        tuned = LOSS_DEFAULTS.get(self.loss, {})
        return (
            self.loss_scale if self.loss_scale is not None else tuned.get("loss_scale"),
            self.margin if self.margin is not None else tuned.get("margin"),
        )

    @property
    def momentum_mode(self) -> bool:
        """Proxies moved by `MomentumProxyUpdate`, not learned."""
        return self.proxy_update == "momentum"

    @property
    def optimizer_label(self) -> str:
        """The optimizer and, with momentum proxies, `-momentum` (run-folder names, reports)."""
        return f"{self.optimizer}-momentum" if self.momentum_mode else self.optimizer

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The configuration of a mapping in any spelling (`upgrade_options`); keys that are no field are left out."""
        return super().from_dict(upgrade_options(d))

    @classmethod
    def from_recipe(cls, name: str = "default", **overrides) -> TrainConfig:
        """The named recipe (`RECIPES`: default, original, catalogue) with `overrides` applied."""
        check_choice("recipe", name, RECIPES)
        return cls(**{"data": "", "out": "", **RECIPE_VALUES[name], **overrides, "recipe": name})

    @classmethod
    def for_data(cls, data: str | Path, out: str | Path, **overrides) -> TrainConfig:
        """The recipe for a prepared dataset (`recipe_for`: catalogue for an images split, else default), as
        `mproxy train --recipe auto` picks it, with `overrides` applied."""
        return cls.from_recipe(recipe_for(data), data=str(data), out=str(out), **overrides)

    def validate(self) -> None:
        """Raise UserError for any bad option (no torch import, nothing written)."""
        super().validate()
        check_choice("recipe", self.recipe, RECIPES)
        check_choice("loss", self.loss, LOSS_NAMES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("proxy-update", self.proxy_update, PROXY_UPDATES)
        check_choice("momentum-target", self.momentum_target, MOMENTUM_TARGETS)
        check_choice("pretrained", self.pretrained, ("default", "none"))
        check_choice("amp", self.amp, ("none", "bf16", "fp16"))
        check_choice("proxy-init", self.proxy_init, ("class_mean", "random"))
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("milestone-rounding", self.milestone_rounding, ("round", "floor"))
        check_choice("select-metric", self.select_metric, SELECT_METRICS)
        check_choice("log", self.log, TRACKERS)
        if self.log == "tensorboard":  # also for the Python API and a resumed run, before anything is written
            require_extra("track", "--log tensorboard")
        if self.select is not None:
            check_choice("select", self.select, SELECTIONS)
        if self.epochs < 0:
            raise UserError(f"--epochs must be >= 0 (0: the pretrained start only), got {self.epochs}")
        for name in ("grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise UserError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 <= self.proxy_momentum <= 1.0:
            raise UserError(f"--proxy-momentum must be in [0, 1], got {self.proxy_momentum}")
        if not 0.0 < self.aug_scale_min <= 1.0:
            raise UserError(f"--aug-scale-min must be in (0, 1], got {self.aug_scale_min}")
        if not 0.0 <= self.sgd_momentum < 1.0:
            raise UserError(f"--sgd-momentum must be in [0, 1), got {self.sgd_momentum}")
        if not self.lr > 0 or not self.backbone_lr_mult >= 0:
            raise UserError("--lr must be > 0 and --backbone-lr-mult >= 0")
        if self.loss_scale is not None and not self.loss_scale > 0:
            raise UserError(f"--loss-scale must be positive, got {self.loss_scale}")
        if self.margin is not None and self.loss not in ("cos_face", "arc_face", "proxy_anchor"):
            raise UserError(f"{self.loss} has no margin; --margin applies to cos_face, arc_face, proxy_anchor")
        for m in self.metrics:
            check_choice("metrics", m, METRICS)
        if not self.metrics:
            raise UserError("--metrics needs at least one metric")
        if self.weights is not None and not Path(self.weights).is_file():
            raise UserError(f"weights file not found: {self.weights}")

    def epoch_metrics(self) -> list[str]:
        """The metrics computed every epoch: the requested ones plus the one selection needs."""
        needed = "recall" if self.select_metric.startswith("recall@") else self.select_metric
        return list(dict.fromkeys([*self.metrics, needed]))

    def epoch_recalls(self) -> list[int]:
        ks = list(self.recalls)
        return ks if 1 in ks or not self.select_metric.startswith("recall@") else [1, *ks]


def recipe_for(data: str | Path) -> str:
    """The recipe `auto` picks for a prepared dataset: `catalogue` for an images split (`split_protocol`: every
    class in train, val and test), else `default`. UserError when the dataset cannot be read."""
    from momentum_proxy.data.manifest import read_manifest, split_protocol  # pandas: only once a dataset is read

    return "catalogue" if split_protocol(read_manifest(data)) == "images" else "default"


def describe_recipe(name: str, protocol: str) -> str:
    """The recipe in force, in one line (`train` prints it beside the protocol)."""
    if name == "catalogue":
        return "recipe: catalogue (the images protocol's; --recipe default for the benchmark recipe)"
    if name == "original":
        return "recipe: original (the original MP tool's settings)"
    other = "; --recipe catalogue for the images protocol's" if protocol == "images" else ""
    return f"recipe: default (the benchmark recipe{other})"


def upgrade_options(values: dict) -> dict:
    """`values` (TrainConfig fields) in today's spelling; the one place that reads the earlier ones.

    `momentum` and `workers` become proxy_momentum and loader_workers; proxy_update `mean`/`sum` becomes
    momentum_target (with momentum proxies); an optimizer `adam*`/`sgd*` (`*`: momentum proxies) becomes
    adam/sgd with proxy_update momentum. A plain adam/sgd meant learned proxies (proxy_update gradient) in the
    original tool's `optimizer_type` and in the earlier layout (a `momentum` key), while today it names only the
    optimizer.
    """
    v = dict(values)
    earlier = "momentum" in v and "proxy_momentum" not in v
    for old, new in RENAMED.items():
        if old in v:
            v.setdefault(new, v.pop(old))
    if _earlier_target(v.get("proxy_update")):  # the proxy_update default, momentum, is the mode it meant
        v["momentum_target"] = v.pop("proxy_update")
    packed = v.pop("optimizer_type", None)
    if packed is None and (earlier or str(v.get("optimizer")).endswith("*")):
        packed = v.get("optimizer")
    if isinstance(packed, str):
        v["optimizer"], v["proxy_update"] = packed.rstrip("*"), "momentum" if packed.endswith("*") else "gradient"
    return v


def _earlier_target(value) -> bool:
    """proxy_update's earlier values (mean, sum), or a `tune` space's choice among them."""
    choices = value.get("choices") if isinstance(value, dict) else [value]
    return isinstance(choices, list) and bool(choices) and all(c in MOMENTUM_TARGETS for c in choices)


def read_config_file(path: str | Path) -> dict:
    """TrainConfig fields from a JSON or YAML file (`train --config FILE`), in any spelling (`upgrade_options`);
    unknown keys are refused."""
    path = Path(path)
    values = upgrade_options(read_mapping_file(path, "config file"))
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known - {"versions", "data_manifest_sha256", "selection"})
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return {k: v for k, v in values.items() if k in known - {"recipe"}}  # the command's --recipe names the recipe


def run_folder_name(cfg: TrainConfig) -> str:
    """Default run-folder name, e.g. `cub_resnet50_proxy_nca_adam-momentum_0.5` (`-momentum`: momentum proxies)."""
    assert cfg.backbone is not None, "a run is named after `for_device` decided its backbone"
    return (
        f"{Path(cfg.data).name}_{cfg.backbone.replace(':', '-')}_{cfg.loss}_{cfg.optimizer_label}"
        f"_{cfg.proxy_momentum:g}"
    )
