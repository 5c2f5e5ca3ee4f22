"""A retrieval index in Milvus: Milvus Lite (`milvus:PATH.db`, a local folder, the engine running in this process)
or a Milvus server or cluster (`milvus://HOST:PORT/[DATABASE/]COLLECTION`, its token from $MPROXY_MILVUS_TOKEN).

A store named NAME (`mproxy` in a Milvus Lite file) is an alias of the two collections of one build:
- `NAME_<build>`: a row per item: `id` (INT64, the item id), `vector` (its unit embedding; index FLAT, metric IP:
  exact cosine search), `path`, `label` (UNKNOWN when not known) and `class_name` ("" when not known);
- `NAME_<build>_meta`: key/value rows: `info` (JSON: format, kind, feature_dim, whether labelled, the next id, the
  largest label, the `model` dict, the image folders indexed, the attachments), `class/<label>` (a class name),
  `sha256/<hash>` (the id of the item whose image file has that content; stores from before it have none) and
  the attachments (`IndexStore.attach`, e.g. re-ranking's neighbour lists): `attachment/<name>/<sha256[:16]>/<i>`,
  their bytes in base64, CHUNK_BYTES a row.
Milvus persists each write it acknowledges; `save` writes the attachments that changed (under new keys), records
`info` (which names them: the commit point), deletes the attachment rows it no longer names, and for a new build
points the alias at its collections and drops the previous ones: a build or `--rebuild` killed at any moment leaves
the previous store or the new one (collections of a killed build are dropped by the next one); a save killed
midway leaves the previous attachments named. Removed items are deleted from the
collection; ids are never given twice (the next id is recorded before items are inserted). One process writes a
store at a time: `stores.writer_lock` holds a Milvus Lite store's lock file; for a server, the operator sees to it.

Calls that cannot reach the server raise `StoreUnavailable` and drop the connection; the next call connects anew
(and loads the collections again, as a restarted Milvus Lite needs).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from momentum_proxy.errors import UserError
from momentum_proxy.paths import MILVUS_TOKEN_ENV, MilvusLocation, milvus_location
from momentum_proxy.retrieval.store import UNKNOWN, IndexStore, StoreUnavailable, checked_items
from momentum_proxy.vectors import as_features, l2_normalize

for _name in ("pymilvus", "pymilvus.milvus_client", "milvus_lite.server_manager"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)  # their error logs; our errors say it in one line

FORMAT_VERSION = 1
CONNECT_FAILED = 2  # pymilvus Status.CONNECT_FAILED
MAX_TOPK = 16_384  # Milvus's most results per query
MAX_TEXT = 65_535  # longest VARCHAR
CHUNK = 1_000  # rows per insert or per path query
CONNECT_TIMEOUT, CALL_TIMEOUT = 10.0, 120.0  # seconds
MAX_ID = 2**63 - 1
INFO, CLASS, CONTENT, ATTACHMENT = "info", "class/", "sha256/", "attachment/"
CHUNK_BYTES = 48_000  # attachment bytes a row (64,000 characters of base64, within MAX_TEXT)
PARAMS = {"index_type": "FLAT", "metric_type": "IP"}


def literal(text: str) -> str:
    """`text` as a string literal of a Milvus filter expression."""
    for char, escaped in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        text = text.replace(char, escaped)
    return f'"{text}"'


def unreachable(error: BaseException | None) -> bool:
    """Whether a pymilvus or gRPC error (or one it was raised from) says the server cannot be reached."""
    while error is not None:
        if isinstance(error, grpc.RpcError) and error.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ):
            return True
        if isinstance(error, MilvusException) and error.code == CONNECT_FAILED:
            return True
        error = error.__cause__ or error.__context__
    return False


@dataclass
class Commit:
    """A store's `info` record, taken by `snapshot`; `write` records it (and points the alias at a new build)."""

    store: MilvusStore
    info: dict
    attachments: dict[str, bytes]

    def write(self, location) -> MilvusLocation:
        if (location if isinstance(location, MilvusLocation) else milvus_location(location)) != self.store.location:
            raise UserError(f"a Milvus store is saved where it lives ({self.store.location}), not in {location}")
        self.store._commit(self.info, self.attachments)
        return self.store.location


class MilvusStore(IndexStore):
    """Exact cosine retrieval over a Milvus collection (see the module's text)."""

    kind, params, remote, writes_through = "exact", PARAMS, True, True

    def __init__(self, location: MilvusLocation, name: str | None = None):
        self.location, self.name = location, name
        self.staged = False  # a new build, not yet behind the alias
        self.model, self.classes, self.sources = {}, {}, []
        self.dim, self.next_id, self.max_label, self._labelled = 0, 0, UNKNOWN, False
        self.attached: dict[str, dict] = {}  # the saved attachments: name -> {"sha256", "chunks"}
        self._client: MilvusClient | None = None
        self._connecting = threading.RLock()  # _connect may drop a connection it made (`_error`)

    # ------------------------------------------------------------------------------------------- connection
    def _connect(self) -> MilvusClient:
        with self._connecting:
            if self._client is None:
                where = self.location
                if where.lite and not os.path.isdir(os.path.dirname(where.uri)):
                    raise UserError(f"the folder of {where.uri} does not exist")
                try:
                    client = MilvusClient(
                        where.uri,
                        token="" if where.lite else os.environ.get(MILVUS_TOKEN_ENV, ""),
                        db_name=where.db_name,
                        timeout=CONNECT_TIMEOUT,
                        dedicated=True,
                    )
                except MilvusException as e:
                    if where.lite:
                        raise UserError(
                            f"cannot open the Milvus Lite file {where.uri}: another process (e.g. "
                            "mproxy serve) has it open; Milvus Lite lets one process use a file at a "
                            "time"
                        ) from None
                    raise self._error(e) from None
                self._client = client
                if self.name and not self.staged:
                    self._load()
            return self._client

    def _load(self) -> None:
        """Load the collections into the server's memory for searches (a restarted Milvus Lite has them
        released; loading a loaded collection does nothing)."""
        client = self._connect()  # the client being made, when called while connecting
        try:
            for name in (self.collection, self.meta_name):
                client.load_collection(name, timeout=CALL_TIMEOUT)
        except (MilvusException, grpc.RpcError) as e:
            raise self._error(e) from None

    def _disconnect(self) -> None:
        with self._connecting:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass

    def _error(self, error: Exception) -> UserError:
        """The one-line error for a failed call; an unreachable server also drops the connection."""
        message = getattr(error, "message", None) or str(error).splitlines()[0]
        if unreachable(error):
            self._disconnect()
            return StoreUnavailable(f"the Milvus store {self.location} cannot be reached: {message}")
        return UserError(f"Milvus ({self.location}): {message}")

    def _call(self, method: str, *args, **kwargs):
        client = self._connect()
        try:
            return getattr(client, method)(*args, timeout=CALL_TIMEOUT, **kwargs)
        except (MilvusException, grpc.RpcError) as e:
            raise self._error(e) from None

    def _scan(self, collection: str, filter: str, fields: list[str]) -> list[dict]:
        """Every row of `collection` that `filter` selects, in batches (more than one query may return)."""
        client, rows = self._connect(), []
        try:
            it = client.query_iterator(
                collection, batch_size=CHUNK, filter=filter, output_fields=fields, timeout=CALL_TIMEOUT
            )
            try:
                while batch := it.next():
                    rows.extend(batch)
            finally:
                it.close()
        except (MilvusException, grpc.RpcError) as e:
            raise self._error(e) from None
        return rows

    def close(self) -> None:
        self._disconnect()

    @property
    def collection(self) -> str:
        """The items' collection (a store is opened or built before it is searched or changed)."""
        if self.name is None:
            raise RuntimeError(f"the Milvus store {self.location} is used before it was opened or built")
        return self.name

    @property
    def meta_name(self) -> str:
        return f"{self.collection}_meta"

    def _target(self) -> str | None:
        """The collection behind the store's alias (None when there is no store)."""
        if self.location.collection not in self._call("list_aliases").get("aliases", []):
            return None
        return self._call("describe_alias", self.location.collection)["collection_name"]

    # ------------------------------------------------------------------------------------------- open, build, save
    @classmethod
    def present(cls, location: MilvusLocation) -> bool:
        """Whether `location` holds a store (a Milvus Lite file that does not exist is not created)."""
        if location.lite and not os.path.exists(location.uri):
            return False
        store = cls(location)
        try:
            return store._target() is not None
        finally:
            store.close()

    @classmethod
    def open(cls, location: MilvusLocation, expect_model: dict | None = None) -> MilvusStore:
        """The store at `location`; refused when a key of `expect_model` differs from what it was built with."""
        store = cls(location)
        try:
            store.name = store._target()
            if store.name is None:
                raise UserError(
                    f"no retrieval index in {location}; make one with `mproxy index RUN --images DIR --out {location}`"
                )
            store._load()
            rows = store._call("get", store.meta_name, ids=[INFO], output_fields=["value"])
            info = json.loads(rows[0]["value"]) if rows else {}
            if info.get("format_version") != FORMAT_VERSION:
                raise UserError(f"{location} is not a retrieval index of format {FORMAT_VERSION}; rebuild it")
            store._load_info(info)
            built_with = {**store.model, "feature_dim": store.dim}
            for key, value in (expect_model or {}).items():
                if built_with.get(key) != value:
                    raise UserError(
                        f"index in {location} was built with {key}={built_with.get(key)!r}, not "
                        f"{value!r}; rebuild it for this model"
                    )
            store.classes = {
                int(row["key"][len(CLASS) :]): row["value"]
                for row in store._scan(store.meta_name, f'key like "{CLASS}%"', ["key", "value"])
            }
            store._read_attachments()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def build(
        cls,
        location: MilvusLocation,
        features,
        paths,
        labels=None,
        *,
        kind: str = "exact",
        model: dict | None = None,
        classes: dict[int, str] | None = None,
    ) -> MilvusStore:
        """A new build of the store at `location` holding `features` (n, d) for `paths` (and `labels`, named by
        `classes`); searched once `save` puts it behind the alias (the previous build goes then)."""
        if kind != "exact":
            raise UserError(f"a Milvus index searches exactly (FLAT); --kind {kind} is for a faiss index folder")
        x = l2_normalize(as_features(features))
        paths, labels = checked_items(paths, labels, len(x))
        store = cls(location, f"{location.collection}_{secrets.token_hex(4)}")
        store.staged, store.model, store.dim = True, dict(model or {}), x.shape[1]
        store.classes, store._labelled = dict(classes or {}), labels is not None
        try:
            store._create()
            store._put_classes(store.classes)
            store._add(x, paths, labels)
        except BaseException:
            store.close()
            raise
        return store

    def _create(self) -> None:
        """The build's two collections (strong consistency: a search sees every acknowledged write)."""
        items = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        items.add_field("id", DataType.INT64, is_primary=True)
        items.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        items.add_field("path", DataType.VARCHAR, max_length=MAX_TEXT)
        items.add_field("label", DataType.INT64)
        items.add_field("class_name", DataType.VARCHAR, max_length=MAX_TEXT)
        meta = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        meta.add_field("key", DataType.VARCHAR, is_primary=True, max_length=512)
        meta.add_field("value", DataType.VARCHAR, max_length=MAX_TEXT)
        meta.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # unused: a Milvus collection needs a vector field
        for name, schema, metric in ((self.name, items, "IP"), (self.meta_name, meta, "L2")):
            index = MilvusClient.prepare_index_params()
            index.add_index(field_name="vector", index_type="FLAT", metric_type=metric)
            self._call("create_collection", name, schema=schema, index_params=index, consistency_level="Strong")

    def snapshot(self) -> Commit:
        return Commit(self, self._info(), self.attachments())

    def _commit(self, info: dict, attachments: dict[str, bytes]) -> None:
        """Write the attachments that changed, record `info` naming them, delete the attachment rows it does not
        name; for a new build, point the alias at it and drop the previous build and killed ones."""
        records = {name: self._put_attachment(name, data) for name, data in attachments.items()}
        self._put_meta([(INFO, json.dumps({**info, "attachments": records}))])
        self.attached = records
        named = [[name, r["sha256"][:16]] for name, r in records.items()]
        stale = [
            row["key"]
            for row in self._scan(self.meta_name, f'key like "{ATTACHMENT}%"', ["key"])
            if row["key"].split("/")[1:3] not in named
        ]
        if stale:
            self._call("delete", self.meta_name, ids=stale)
        if not self.staged:
            return
        alias, old = self.location.collection, self._target()
        self._call("alter_alias" if old else "create_alias", self.name, alias)
        self.staged = False
        for name in self._call("list_collections"):
            if re.fullmatch(rf"{re.escape(alias)}_[0-9a-f]{{8}}(_meta)?", name) and not name.startswith(self.name):
                self._call("drop_collection", name)

    def _put_attachment(self, name: str, data: bytes) -> dict:
        """Write `data` as attachment rows under its hash (not again when saved already); its record."""
        sha = hashlib.sha256(data).hexdigest()
        chunks = -(-len(data) // CHUNK_BYTES)
        record = {"sha256": sha, "chunks": chunks}
        if self.attached.get(name) != record:
            prefix = f"{ATTACHMENT}{name}/{sha[:16]}/"
            for start in range(0, chunks, CHUNK):
                self._put_meta(
                    [
                        (f"{prefix}{i}", base64.b64encode(data[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]).decode())
                        for i in range(start, min(chunks, start + CHUNK))
                    ]
                )
        return record

    def _read_attachments(self) -> None:
        """Read the attachments `info` names; one whose rows do not match its sha256 is left out (its layer
        computes it again)."""
        for name, record in self.attached.items():
            keys = [f"{ATTACHMENT}{name}/{record['sha256'][:16]}/{i}" for i in range(record["chunks"])]
            rows: dict[str, str] = {}
            for start in range(0, len(keys), CHUNK):
                found = self._call("get", self.meta_name, ids=keys[start : start + CHUNK], output_fields=["value"])
                rows.update((row["key"], row["value"]) for row in found)
            data = b"".join(base64.b64decode(rows.get(key, "")) for key in keys)
            if hashlib.sha256(data).hexdigest() == record["sha256"]:
                self.attach(name, data)

    def _info(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "metric": "cosine",
            "feature_dim": self.dim,
            "params": self.params,
            "labelled": self._labelled,
            "next_id": self.next_id,
            "max_label": self.max_label,
            "model": self.model,
            "sources": list(self.sources),
            "attachments": self.attached,
        }

    def _load_info(self, info: dict) -> None:
        self.dim, self._labelled, self.next_id = info["feature_dim"], info["labelled"], info["next_id"]
        self.max_label, self.model, self.sources = info["max_label"], info["model"], info["sources"]
        self.attached = dict(info.get("attachments") or {})

    def _put_meta(self, pairs: list[tuple[str, str]]) -> None:
        if pairs:
            self._call("upsert", self.meta_name, [{"key": k, "value": v, "vector": [0.0, 0.0]} for k, v in pairs])

    def _put_classes(self, classes: dict[int, str]) -> None:
        self._put_meta([(f"{CLASS}{label}", name) for label, name in classes.items()])

    # ------------------------------------------------------------------------------------------- the interface
    @property
    def feature_dim(self) -> int:
        return self.dim

    @property
    def ntotal(self) -> int:
        return self.next_id

    def __len__(self) -> int:
        return int(self._call("query", self.name, filter="", output_fields=["count(*)"])[0]["count(*)"])

    @property
    def labelled(self) -> bool:
        return self._labelled

    def _add(self, x: np.ndarray, paths: list[str], labels: list | None) -> list[int]:
        if (labels is None) == self._labelled:
            raise UserError(
                "labels must be given for every item or for none"
                if self._labelled
                else "this index has no labels; add items without labels"
            )
        first, max_label = self.next_id, self.max_label
        self.next_id += len(paths)
        self.max_label = max([max_label, *(labels or [])])
        try:
            self._put_meta([(INFO, json.dumps(self._info()))])  # the ids are taken before any row is written
        except BaseException:
            self.next_id, self.max_label = first, max_label
            raise
        ids = list(range(first, self.next_id))
        labels = labels if labels is not None else [UNKNOWN] * len(paths)
        for start in range(0, len(ids), CHUNK):
            rows = [
                {"id": i, "vector": v, "path": p, "label": int(y), "class_name": self.classes.get(int(y), "")}
                for i, v, p, y in zip(
                    ids[start : start + CHUNK],
                    x[start : start + CHUNK].tolist(),
                    paths[start : start + CHUNK],
                    labels[start : start + CHUNK],
                )
            ]
            self._call("insert", self.name, rows)
        return ids

    def record_hashes(self, by_id: dict[int, str]) -> None:
        """Kept as meta rows `sha256/<hash>` -> id (a row whose item was removed since is ignored)."""
        self._put_meta([(f"{CONTENT}{h}", str(int(i))) for i, h in by_id.items() if h])

    def content_ids(self, hashes) -> dict[str, int]:
        keys = sorted({f"{CONTENT}{h}" for h in hashes})
        rows = self._call("get", self.meta_name, ids=keys, output_fields=["value"]) if keys else []
        found = {row["key"][len(CONTENT) :]: int(row["value"]) for row in rows}
        live = self.items(found.values())
        return {h: i for h, i in found.items() if i in live}

    def label_for(self, class_name: str) -> int:
        """The label of `class_name`, a new one (recorded now) when the store does not know it."""
        for label, name in self.classes.items():
            if name == class_name:
                return label
        label = max([*self.classes, self.max_label, UNKNOWN]) + 1
        self._put_classes({label: class_name})
        self.classes[label], self._labelled = class_name, True
        return label

    def remove(self, item_id: int) -> None:
        self.item(item_id)
        self._call("delete", self.name, ids=[int(item_id)])

    def items(self, ids) -> dict[int, dict]:
        ids = sorted({int(i) for i in ids if 0 <= int(i) <= MAX_ID})
        if not ids:
            return {}
        rows = self._call("get", self.name, ids=ids, output_fields=["path", "label", "class_name"])
        return {int(r["id"]): self._item(r) for r in rows}

    @staticmethod
    def _item(row: dict) -> dict:
        label = int(row["label"])
        return {
            "id": int(row["id"]),
            "path": row["path"],
            "label": None if label == UNKNOWN else label,
            "class_name": row["class_name"] or None,
        }

    def exists(self, item_id: int) -> bool:
        return bool(self.items([item_id]))

    def item(self, item_id: int) -> dict:
        found = self.items([item_id])
        if not found:
            raise UserError(f"no item with id {item_id}")
        return found[int(item_id)]

    def vector(self, item_id: int) -> np.ndarray:
        inside = 0 <= int(item_id) <= MAX_ID
        rows = self._call("get", self.name, ids=[int(item_id)], output_fields=["vector"]) if inside else []
        if not rows:
            raise UserError(f"no item with id {item_id}")
        return np.asarray(rows[0]["vector"], np.float32)[None]

    def ids_of(self, paths: list[str]) -> dict[str, int]:
        found = {}
        for start in range(0, len(paths), CHUNK):
            chunk = ", ".join(literal(p) for p in paths[start : start + CHUNK])
            for row in self._call("query", self.name, filter=f"path in [{chunk}]", output_fields=["path"]):
                found[row["path"]] = int(row["id"])
        return found

    def file_ids(self, path) -> set[int]:
        """Ids of the items stored with `path`, as given (absolute) or with its links resolved."""
        return set(self.ids_of(sorted({os.path.abspath(path), os.path.realpath(path)})).values())

    def live_items(self) -> list[dict]:
        rows = self._scan(self.collection, "id >= 0", ["path", "label", "class_name"])
        return [self._item(r) for r in sorted(rows, key=lambda r: r["id"])]

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, unit vectors) of the live items, in id order, read in batches (for re-ranking)."""
        rows = sorted(self._scan(self.collection, "id >= 0", ["vector"]), key=lambda r: r["id"])
        ids = np.array([r["id"] for r in rows], np.int64)
        return ids, np.asarray([r["vector"] for r in rows], np.float32).reshape(len(rows), self.feature_dim)

    def search(self, query_features, k: int, exclude=()) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and ids of the k best items per query (at most 16,384), each (n_queries, width):
        width is the longest row found (at most k); ids in `exclude` are left out."""
        q = as_features(query_features, "query features")
        if q.shape[1] != self.feature_dim:
            raise UserError(f"query features have {q.shape[1]} dimensions, the index {self.feature_dim}")
        hidden = sorted({int(i) for i in exclude if 0 <= int(i) <= MAX_ID})
        rows = (
            self._call(
                "search",
                self.name,
                data=l2_normalize(q).tolist(),
                limit=max(1, min(int(k), MAX_TOPK)),
                filter=f"id not in [{', '.join(map(str, hidden))}]" if hidden else "",
                anns_field="vector",
                search_params={"metric_type": "IP"},
            )
            if k >= 1
            else []
        )
        width = max((len(r) for r in rows), default=0)
        if width == 0:
            raise UserError("k must be at least 1 and the index must not be empty")
        scores = np.full((len(q), width), -np.inf, np.float32)
        ids = np.full((len(q), width), -1, np.int64)
        for n, row in enumerate(rows):
            scores[n, : len(row)] = [hit["distance"] for hit in row]
            ids[n, : len(row)] = [hit["id"] for hit in row]
        return scores, ids
