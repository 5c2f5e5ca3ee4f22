"""The configuration the layers below training share — plain Python, no torch import: the default retrieval
pipeline, the choices of the model and evaluation options, and `ModelConfig`, a trained model's settings as the
layers that load, embed with and evaluate a run read them from its config.json. The training options
(`TrainConfig`, its recipes and validation) extend it in `training/config.py`.

Every option is checked before anything is written or any heavy library is loaded, so a bad value costs the user
a one-line error, not a claimed run folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TypeVar

import yaml

from momentum_proxy.errors import UserError

POOLINGS = ("max", "avgmax")
METRICS = ("recall", "precision@1", "r_precision", "map@r", "nmi")
RETRIEVAL_METRICS = ("recall", "precision@1", "r_precision", "map@r")
TTAS = ("none", "flip")  # --tta: test-time augmentation wherever images are embedded (embedding/tta.py)
# The default retrieval pipeline, chosen on the validation species of birds50 and flowers12 across collection
# regimes (docs: Choosing post-processing): what `evaluate` and `index` (and so `retrieve` and `serve` over an
# index) use unless told otherwise.
DEFAULT_TTA = "none"
DEFAULT_RERANK = "dba"  # its parameters: retrieval.rerank.DEFAULTS (k 5, alpha 3), and DEFAULT_KEEP
DEFAULT_KEEP = 1  # plain cosine hits that a re-ranking keeps first (`retrieval.rerank.Rerank.keep`)
DEFAULT_RERANK_MAX_ITEMS = 100_000  # larger collections are searched without the default re-ranking
# The backbone when none is given, by the type of the device that trains (`ModelConfig.for_device`).
DEFAULT_BACKBONES = {"cpu": "efficientnet_lite0", "cuda": "resnet50"}


def option(default=None, help: str = "", *, aliases: list[str] = (), factory=None):
    """A configuration field that is also an `mproxy train` option: `--name-with-dashes`, then `aliases` (the
    original tool's spellings), with `help`; its type comes from the field's annotation."""
    meta = {"help": help, "aliases": list(aliases)}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


ConfigT = TypeVar("ConfigT", bound="ModelConfig")  # a ModelConfig or TrainConfig, kept as such


@dataclass
class ModelConfig:
    """A trained model's settings, as the layers that load, embed with and evaluate a run read them from its
    config.json (`runs.RunDir.config`): its dataset, the network (backbone, embedding size, pooling, input size)
    and how images are embedded and evaluated. `training.config.TrainConfig` adds the training options; both are
    in config.json, and `from_dict` leaves out the keys that are no field here.
    """

    data: str
    backbone: str | None = option(
        None,
        "efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2 | resnet50 | "
        "inception | googlenet | timm:NAME (None: efficientnet_lite0, or resnet50 on CUDA)",
        aliases=["--backbone_type"],
    )
    feature_dim: int = option(512, "embedding size")
    pooling: str = option("avgmax", "max | avgmax (max + mean pooling)")
    image_size: int | None = option(
        None,
        "input size in pixels (None: the backbone's native size, e.g. 224 for "
        "efficientnet_lite0, 240 lite1, 260 lite2, timm's pretrained_cfg for timm:NAME)",
    )
    batch_size: int = option(64, "batch size per process", aliases=["--batch_size"])
    eval_batch_size: int | None = option(None, "batch size of embedding (None: twice --batch-size)")
    loader_workers: int | None = option(None, "data-loader processes (None: 0 on <= 2 CPU cores, else cores - 1)")
    recalls: list[int] = option(help="K of Recall@K", factory=lambda: [1, 2, 4, 8])

    def for_device(self: ConfigT, device_type: str) -> ConfigT:
        """This configuration with the backbone decided for a `device_type` ("cpu", "cuda") when not given:
        efficientnet_lite0, or resnet50 on CUDA."""
        if self.backbone is not None:
            return self
        return self.with_(backbone=DEFAULT_BACKBONES.get(device_type, DEFAULT_BACKBONES["cpu"]))

    @property
    def embed_batch_size(self) -> int:
        """Batch size for embedding (no gradients: twice the training batch unless set)."""
        return self.eval_batch_size or 2 * self.batch_size

    @classmethod
    def from_dict(cls: type[ConfigT], d: dict) -> ConfigT:
        """The configuration of a mapping (a run's config.json); keys that are no field are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self: ConfigT, **changes) -> ConfigT:
        return replace(self, **changes)

    def validate(self) -> None:
        """Raise UserError for a bad value of these fields (no torch import, nothing written)."""
        check_choice("pooling", self.pooling, POOLINGS)
        for name in ("batch_size", "feature_dim", "image_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.recalls or min(self.recalls) < 1:
            raise UserError("--recalls must be positive integers, e.g. 1,2,4,8")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise UserError(f"--loader-workers must be >= 0, got {self.loader_workers}")


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


def check_tta(tta: str | None) -> None:
    """Refuse an unknown `--tta` (None: the one an index was built with, or none)."""
    if tta is not None:
        check_choice("tta", tta, TTAS)


MEMORY_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(text: str | int, option: str = "--max-memory") -> int:
    """A memory size in bytes from `2GB`, `1.5GiB`, `512MB`, `800M` or a plain number of bytes (KB, MB, GB are
    powers of 1000; KiB, MiB, GiB and K, M, G powers of 1024); a one-line UserError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match and match.group(2).lower()
        if not match or unit not in MEMORY_UNITS:
            raise UserError(f"{option} takes a size such as 512MB, 2GB or 1.5GiB, got {text!r}")
        size = int(float(match.group(1)) * MEMORY_UNITS[unit])
    if size < 1:
        raise UserError(f"{option} must be positive, got {text!r}")
    return size


def check_choice(option: str, value, choices) -> None:
    """Refuse a `--option` value that is not one of `choices`, naming them."""
    if value not in choices:
        raise UserError(f"unknown --{option} {value!r}; choose from {', '.join(map(str, choices))}")
