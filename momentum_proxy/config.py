"""Training configuration: `TrainConfig`, its recipes and its validation — plain Python, no torch import.

Every option is checked here before anything is written or any heavy library is loaded, so a bad value costs
the user a one-line error, not a claimed run folder.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from momentum_proxy.errors import UserError

LOSS_NAMES = ("proxy_nca", "normalized_softmax", "cos_face", "arc_face", "proxy_anchor")
OPTIMIZERS = ("adam*", "sgd*", "adam", "sgd")
POOLINGS = ("max", "avgmax")
METRICS = ("recall", "precision@1", "r_precision", "map@r", "nmi")
RETRIEVAL_METRICS = ("recall", "precision@1", "r_precision", "map@r")
SELECT_METRICS = ("recall@1", "precision@1", "r_precision", "map@r")
SELECTIONS = ("val", "last", "test")
SCHEDULES = ("multistep", "cosine")

# The original MP tool's behaviour, for exact reproduction (`--recipe original`, implied by its spelling
# `--data_path/--data_name`): ResNet-50, ProxyNCA, one learning rate, plain SGD (no momentum) or Adam,
# milestones at int(50%) and int(80%) of the epochs, random proxies, no warm-up, its proxy update that adds
# m * f_i for every sample, and the best epoch chosen on the test split as its published tables were.
ORIGINAL_RECIPE = dict(backbone="resnet50", loss="proxy_nca", loss_scale=None, margin=None, lr=1e-3,
                       backbone_lr_mult=1.0, warmup_epochs=0, proxy_init="random", proxy_update="sum", momentum=0.5,
                       sgd_momentum=0.0, schedule="multistep", milestone_rounding="floor", pooling="max",
                       aug_scale_min=0.16, select="test", select_metric="recall@1")
RECIPES = ("default", "original")
# The default recipe's loss parameters, found by `mproxy tune` on birds50 (README, "Tune"); a loss not listed
# here (the original recipe's ProxyNCA among them) uses pytorch-metric-learning's defaults.
LOSS_DEFAULTS = {"cos_face": {"loss_scale": 30.7, "margin": 0.216}}


def option(default=None, help: str = "", *, aliases: list[str] = (), factory=None):
    """A `TrainConfig` field that is also an `mproxy train` option: `--name-with-dashes`, then `aliases` (the
    original tool's spellings), with `help`; its type comes from the field's annotation."""
    meta = {"help": help, "aliases": list(aliases)}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every option of a training run (`mproxy train` options map 1:1 onto these fields).

    The defaults are the recipe `mproxy tune` found on real fine-grained photos (birds50, selected and compared
    on validation; README, "Tune"): CosFace (scale 30.7, margin 0.216) with momentum proxies (m 0.637)
    initialised at the class means, avg+max pooling, one warm-up epoch of head and proxies, lr 2.15e-5 with the
    backbone at 0.332 of it, a cosine schedule, and crops of at least half the image. Rounded to 3 digits.
    """

    data: str
    out: str
    backbone: str = option("efficientnet_lite0", "efficientnet_lite0 | resnet50 | inception | googlenet | timm:NAME "
                           "(on CUDA, when not given: resnet50)", aliases=["--backbone_type"])
    pretrained: str = option("default", "default (ImageNet weights) | none")
    weights: str | None = option(None, "pretrained backbone weights file (.pth/.safetensors)")
    feature_dim: int = option(512, "embedding size")
    pooling: str = option("avgmax", "max | avgmax (max + mean pooling)")
    loss: str = option("cos_face", " | ".join(LOSS_NAMES), aliases=["--loss_name"])
    loss_scale: float | None = option(None, "inverse temperature of the loss's logits (None: 30.7 for cos_face, "
                                      "as tuned; the library's for the others)")
    margin: float | None = option(None, "margin of cos_face, arc_face, proxy_anchor (None: 0.216 for cos_face, as "
                                  "tuned; the library's for the others)")
    optimizer: str = option("adam*", "adam* | sgd* (momentum proxies) | adam | sgd", aliases=["--optimizer_type"])
    sgd_momentum: float = option(0.9, "momentum of the SGD optimizer (the original tool: none)")
    momentum: float = option(0.637, "proxy momentum m in the * modes")
    proxy_update: str = option("mean", "mean (class mean) | sum (the original tool)")
    proxy_init: str = option("class_mean", "class_mean | random")
    lr: float = option(2.15e-5, "head learning rate")
    backbone_lr_mult: float = option(0.332, "backbone learning rate = lr x this")
    warmup_epochs: int = option(1, "first epochs train head and proxies only (backbone frozen)")
    milestone_rounding: str = option("round", "round | floor (the original tool's int()) of the multistep milestones")
    schedule: str = option("cosine", "learning-rate schedule: multistep (x0.1 at 50% and 80% of the epochs) | "
                           "cosine (to 0 at the end)")
    aug_scale_min: float = option(0.501, "smallest area fraction of the random-resized training crop")
    batch_size: int = option(64, "batch size per process", aliases=["--batch_size"])
    epochs: int = option(20, "epochs", aliases=["--num_epochs", "--num-epochs"])
    recalls: list[int] = option(help="K of Recall@K", factory=lambda: [1, 2, 4, 8])
    metrics: list[str] = option(help="per-epoch metrics: " + ",".join(METRICS), factory=lambda: ["recall", "map@r"])
    select: str | None = option(None, "val | last | test: which epoch becomes best.pt (None: val when the data has a "
                                "val split, else last; test only to reproduce published tables)")
    select_metric: str = option("map@r", " | ".join(SELECT_METRICS) + " (selection)")
    test_every_epoch: bool = option(False, "also report test metrics every epoch (never selects)")
    final_test: bool = True  # evaluate the selected checkpoint on test at the end (off: tuning trials)
    image_size: int = option(224, "input size in pixels")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto | cpu | cuda")
    workers: int | None = option(None, "loader processes (None: 0 on <= 2 CPU cores, else cores - 1)")
    amp: str = option("none", "none | bf16 | fp16 (CUDA) mixed precision")
    grad_accum: int = option(1, "gradient accumulation steps")
    compile: bool = option(False, "torch.compile the model")
    eval_batch_size: int | None = None
    log_every: int = 10

    @property
    def loss_params(self) -> tuple[float | None, float | None]:
        """(scale, margin) of the loss: the given ones, else the default recipe's for this loss (None: the
        library's)."""
        tuned = LOSS_DEFAULTS.get(self.loss, {})
        return (self.loss_scale if self.loss_scale is not None else tuned.get("loss_scale"),
                self.margin if self.margin is not None else tuned.get("margin"))

    @property
    def momentum_mode(self) -> bool:
        return self.optimizer.endswith("*")

    @property
    def embed_batch_size(self) -> int:
        """Batch size for embedding (no gradients: twice the training batch unless set)."""
        return self.eval_batch_size or 2 * self.batch_size

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_recipe(cls, name: str = "default", **overrides) -> "TrainConfig":
        """The named recipe (`default` or `original`) with `overrides` applied."""
        if name not in RECIPES:
            raise UserError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
        base = {**(ORIGINAL_RECIPE if name == "original" else {}), **overrides}
        return cls(**{"data": "", "out": "", **base})

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    def validate(self) -> None:
        """Raise UserError for any bad option (no torch import, nothing written)."""
        _choice("loss", self.loss, LOSS_NAMES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("pretrained", self.pretrained, ("default", "none"))
        _choice("amp", self.amp, ("none", "bf16", "fp16"))
        _choice("proxy-init", self.proxy_init, ("class_mean", "random"))
        _choice("proxy-update", self.proxy_update, ("mean", "sum"))
        _choice("pooling", self.pooling, POOLINGS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("milestone-rounding", self.milestone_rounding, ("round", "floor"))
        _choice("select-metric", self.select_metric, SELECT_METRICS)
        if self.select is not None:
            _choice("select", self.select, SELECTIONS)
        for name in ("batch_size", "epochs", "feature_dim", "image_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise UserError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 <= self.momentum <= 1.0:
            raise UserError(f"--momentum must be in [0, 1], got {self.momentum}")
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
            _choice("metrics", m, METRICS)
        if not self.metrics:
            raise UserError("--metrics needs at least one metric")
        if not self.recalls or min(self.recalls) < 1:
            raise UserError("--recalls must be positive integers, e.g. 1,2,4,8")
        if self.weights is not None and not Path(self.weights).is_file():
            raise UserError(f"weights file not found: {self.weights}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")

    def epoch_metrics(self) -> list[str]:
        """The metrics computed every epoch: the requested ones plus the one selection needs."""
        needed = "recall" if self.select_metric.startswith("recall@") else self.select_metric
        return list(dict.fromkeys([*self.metrics, needed]))

    def epoch_recalls(self) -> list[int]:
        ks = list(self.recalls)
        return ks if 1 in ks or not self.select_metric.startswith("recall@") else [1, *ks]


def read_config_file(path: str | Path) -> dict:
    """TrainConfig fields from a JSON or YAML file (`train --config FILE`); unknown keys are refused."""
    path = Path(path)
    values = read_mapping_file(path, "config file")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known - {"versions", "data_manifest_sha256", "selection"})
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return {k: v for k, v in values.items() if k in known}


def read_mapping_file(path: str | Path, what: str = "file") -> dict:
    """A mapping from a JSON or YAML file (by suffix: .yaml/.yml, else JSON), or a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a mapping of option names to values")
    return values


def _choice(option: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"unknown --{option} {value!r}; choose from {', '.join(map(str, choices))}")


def run_folder_name(data: str, backbone: str, loss: str, optimizer: str, momentum: float) -> str:
    """Default run-folder name: no shell-special characters (`adam*` becomes `adam-momentum`)."""
    opt = optimizer.replace("*", "-momentum")
    return f"{Path(data).name}_{backbone.replace(':', '-')}_{loss}_{opt}_{momentum:g}"
