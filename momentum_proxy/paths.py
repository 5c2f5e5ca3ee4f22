"""The names of the files the toolkit reads and writes, and cheap checks that a path holds what a command needs.

Plain Python (no torch, pandas or faiss), so the command line refuses a wrong path in a fraction of a second,
before any heavy library is imported; the modules that own these files read them fully later.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from momentum_proxy.errors import UserError

MANIFEST = "manifest.csv"  # a prepared dataset (data.manifest)
CONFIG, METRICS, EMBEDDINGS, EVAL, LOG = "config.json", "metrics.csv", "embeddings.npz", "eval.json", "train.log"
LAST, BEST = "checkpoints/last.pt", "checkpoints/best.pt"  # a run folder (runs)
META_FILE = "meta.json"  # a saved index (retrieval.faiss_store)
MILVUS_TOKEN_ENV = "MPROXY_MILVUS_TOKEN"  # the token of a Milvus server: "user:password" or an API key
LITE_COLLECTION = "mproxy"  # the collection of a Milvus Lite file
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")  # a Milvus collection or database name


@dataclass(frozen=True)
class MilvusLocation:
    """Where a Milvus index store lives: a Milvus Lite file (`uri` its absolute path) or a server (`uri`
    http(s)://HOST:PORT, `db_name` its database or ""); `collection` is the name (an alias) searched."""

    uri: str
    collection: str
    db_name: str = ""

    @property
    def lite(self) -> bool:
        return not self.uri.startswith(("http://", "https://"))

    @property
    def local_folder(self) -> Path:
        """The folder of this machine that keeps the store's files (uploaded images, reports): beside a Milvus
        Lite file (`x.db` -> `x.files`), else `COLLECTION.files` in the current directory."""
        return Path(self.uri).with_suffix(".files") if self.lite else Path.cwd() / f"{self.collection}.files"

    def __str__(self) -> str:
        if self.lite:
            return f"milvus:{self.uri}"
        scheme, _, address = self.uri.partition("://")
        tls = "+https" if scheme == "https" else ""
        return f"milvus{tls}://{address}/{self.db_name + '/' if self.db_name else ''}{self.collection}"


def milvus_location(location: str | Path) -> MilvusLocation | None:
    """The Milvus store that `location` names (None for a folder: a faiss index): `milvus:PATH.db` (Milvus Lite),
    `milvus://HOST:PORT/[DATABASE/]COLLECTION` or `milvus+https://...` (a server or cluster). Syntax only: no
    file or network is touched."""
    text = str(location)
    match = re.fullmatch(r"milvus(\+https)?://([^/]+)/(?:([^/]+)/)?([^/]+)", text)
    if match:
        tls, address, db_name, collection = match.groups()
        for name in (db_name, collection):
            if name is not None and not _NAME.fullmatch(name):
                raise UserError(f"{text}: {name!r} is not a Milvus name (letters, digits and _, not first a digit)")
        if not re.fullmatch(r"[^:@\s]+:\d+", address):
            raise UserError(f"{text}: give the server as HOST:PORT (e.g. milvus://localhost:19530/products)")
        return MilvusLocation(f"{'https' if tls else 'http'}://{address}", collection, db_name or "")
    if text.startswith(("milvus://", "milvus+https://")):
        raise UserError(f"{text} is not a Milvus server location: milvus://HOST:PORT/[DATABASE/]COLLECTION")
    if text.startswith("milvus:"):
        path = text.removeprefix("milvus:")
        if not path.endswith(".db") or path == ".db":
            raise UserError(f"{text}: a Milvus Lite location is milvus:PATH.db (the file name ends in .db)")
        return MilvusLocation(os.path.abspath(path), LITE_COLLECTION)
    return None


def check_dataset(path: str | Path) -> None:
    """A prepared dataset: a folder holding manifest.csv."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data folder not found: {path}")
    if not path.is_dir():
        raise UserError(f"data path is not a folder: {path}")
    if not (path / MANIFEST).is_file():
        hint = " (empty folder)" if not any(path.iterdir()) else ""
        raise UserError(f"no {MANIFEST} in {path}{hint}; prepare it first with `mproxy prepare ...`")


def check_run(path: str | Path) -> None:
    """A trained run: config.json and the selected checkpoint."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise UserError(f"{path} is not a run folder (no {CONFIG})")
    if not (path / BEST).is_file():
        raise UserError(f"{path} has no trained model yet ({BEST}); train it first, or --resume it")


def check_index(path: str | Path) -> None:
    """A saved retrieval index: a folder holding meta.json, an existing Milvus Lite file, or a well-formed Milvus
    server location (not contacted here)."""
    milvus = milvus_location(path)
    if milvus is not None:
        if milvus.lite and not os.path.exists(milvus.uri):
            raise UserError(
                f"no Milvus Lite index at {milvus.uri}; make one with `mproxy index RUN --images DIR --out {path}`"
            )
        return
    if not (Path(path) / META_FILE).is_file():
        raise UserError(
            f"no retrieval index in {path} (no {META_FILE}); make one with `mproxy index RUN --images DIR --out {path}`"
        )


def check_file(path: str | Path, what: str) -> None:
    if Path(path).is_dir():
        raise UserError(f"{what} {path} is a folder; a file is expected")
    if not Path(path).is_file():
        raise UserError(f"{what} not found: {path}")


def check_folder(path: str | Path, what: str) -> None:
    if not Path(path).is_dir():
        raise UserError(
            f"{what} not found: {path}" if not Path(path).exists() else f"{path} is a file; a {what} is expected"
        )
