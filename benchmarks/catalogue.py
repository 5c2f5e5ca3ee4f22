"""A catalogue of N synthetic vectors in a faiss index and in Milvus Lite (a measurement, not a timed test).

N d-dimensional unit vectors with class structure are generated chunk by chunk from seeds (never held whole):
super-classes of about 100 classes, classes of 5-10 items (as in Stanford Online Products), each item its class
centre plus a variation in a low-dimensional subspace plus a little isotropic noise, so that, as in real
embeddings, an item's nearest neighbours are its class and then the classes nearest it. They go into each store
through the `IndexStore` API: faiss as the `--budget`'s choice (`faiss_store.plan_index`: autofaiss's rules; at
1M x 512 within 1 GiB that is IVF-PQ), trained on its first part and extended chunk by chunk; Milvus Lite (a FLAT,
exact collection) in the same chunks.

Per store: insert rate (the whole build, training included), peak RAM (VmHWM) of the process that built it and
of a fresh process that opens and searches it, size on disk, search latency p50/p99 with 1 and 16 concurrent
clients (threads calling `search`, one query each, the query's own item left out, as the service does), and
recall@10 against exact search. The queries are `--queries` of the stored vectors; their exact neighbours are
computed once by streaming every generated vector past them (`faiss.knn` per chunk, merged). The faiss index's
nprobe / efSearch is tuned on those queries after the last chunk (`FaissStore.tune`), and an IVF index is also
searched memory-mapped (`--mmap`: its lists stay in the file). With `--serve`, each store is then served by
`mproxy serve` (a random-weight run is made for it, whose identity the stores record; searches send embeddings,
so the model never runs) and searched over HTTP at the same concurrency, with /stats showing the recall.

    python benchmarks/catalogue.py --n 1000000 --dim 512 --budget 1GiB --stores faiss,milvus --clients 1,16 \
        --queries 1000 --serve --out /tmp/catalogue --json catalogue.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CHUNK = 65_536  # vectors generated (and added) at a time
K = 10
CLASS_LATENT, ITEM_LATENT = 64, 32  # dimensions of the class centres' and of the items' variation
CLASSES_PER_SUPER = 100
GOALS = {"faiss_ram_gib": 1.0, "recall": 0.95, "p50_ms": 10.0}


class Catalogue:
    """N unit vectors with class structure, generated a chunk at a time from (seed, chunk number): chunk i is
    always the same vectors. Labels (4 bytes an item) and the class latents (64 floats a class) are held."""

    def __init__(self, n: int, dim: int, seed: int = 0):
        self.n, self.dim, self.seed = n, dim, seed
        rng = np.random.default_rng(seed)
        sizes = rng.integers(5, 11, n // 5 + 1)
        self.labels = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)[:n]
        rng.shuffle(self.labels)
        classes = int(self.labels.max()) + 1
        supers = rng.standard_normal((max(1, classes // CLASSES_PER_SUPER), CLASS_LATENT), dtype=np.float32)
        self.class_latent = supers[rng.integers(0, len(supers), classes)]
        self.class_latent += 0.6 * rng.standard_normal((classes, CLASS_LATENT), dtype=np.float32)
        self.to_centre = rng.standard_normal((CLASS_LATENT, dim), dtype=np.float32) / np.sqrt(CLASS_LATENT * dim)
        self.to_item = rng.standard_normal((ITEM_LATENT, dim), dtype=np.float32) * (0.5 / np.sqrt(ITEM_LATENT * dim))
        self.noise = np.float32(0.25 / np.sqrt(dim))

    @property
    def chunks(self) -> int:
        return -(-self.n // CHUNK)

    def chunk(self, i: int) -> np.ndarray:
        """The unit vectors of items i*CHUNK .. (i+1)*CHUNK - 1."""
        start, stop = i * CHUNK, min(self.n, (i + 1) * CHUNK)
        rng = np.random.default_rng([self.seed, i])
        x = self.class_latent[self.labels[start:stop]] @ self.to_centre
        x += rng.standard_normal((stop - start, ITEM_LATENT), dtype=np.float32) @ self.to_item
        x += self.noise * rng.standard_normal((stop - start, self.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def parts(self, first: int):
        """(start, vectors) of the items: the first `first` in one array (filled chunk by chunk: one copy), then
        the rest a chunk (or less) at a time."""
        buf, at = np.empty((min(first, self.n), self.dim), np.float32), 0
        for i in range(self.chunks):
            x = self.chunk(i)
            if at < len(buf):
                take = min(len(buf) - at, len(x))
                buf[at : at + take] = x[:take]
                at += take
                if at < len(buf):
                    continue
                yield 0, buf
                buf, x = buf[:0], x[take:]
                if not len(x):
                    continue
            yield at, x
            at += len(x)


def paths_of(start: int, count: int) -> list[str]:
    return [f"/catalogue/item-{i:09d}.jpg" for i in range(start, start + count)]


# --------------------------------------------------------------------------------------------- exact neighbours
def exact_truth(data: Catalogue, queries: int, seed: int = 1) -> dict:
    """A sample of `queries` item ids, their vectors and their exact top-K ids (each leaving itself out), the
    vectors streamed chunk by chunk (`faiss_store.exact_neighbours`)."""
    from momentum_proxy.retrieval.faiss_store import exact_neighbours

    ids = np.sort(np.random.default_rng(seed).choice(data.n, min(queries, data.n), replace=False))
    q = np.concatenate([data.chunk(i)[ids[ids // CHUNK == i] - i * CHUNK] for i in np.unique(ids // CHUNK)])
    chunks = ((np.arange(i * CHUNK, i * CHUNK + len(x)), x) for i in range(data.chunks) for x in [data.chunk(i)])
    return {"ids": ids, "queries": q, "truth": exact_neighbours(q, ids, chunks, K)}


def recall_of(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(t, f[f >= 0])) / len(t) for t, f in zip(truth, found)]))


# --------------------------------------------------------------------------------------------- memory
def memory_status(field: str, pid: int | str = "self") -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


def tree_rss(pid: int) -> int:
    """Resident memory of a process and its descendants, now."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += memory_status("VmRSS", p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return total


def in_child(spec: dict) -> dict:
    """Run `child(spec)` in a fresh Python process; return its result with the peak resident memory of it and
    its descendants (sampled every 50 ms) beside its own VmHWM."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    peak, out = 0, []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))
    reader.start()
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.05)
    reader.join()
    if proc.returncode:
        sys.exit(f"{spec['job']} of {spec['store']} failed (exit {proc.returncode})")
    result = json.loads(out[0].strip().splitlines()[-1])
    result["peak_tree_rss_mib"] = round(max(peak, result["vmhwm_mib"] * 2**20) / 2**20, 1)
    return result


def mib(x: int) -> float:
    return round(x / 2**20, 1)


def folder_size(location: str) -> int:
    path = Path(location.removeprefix("milvus:"))
    path = path.parent if location.startswith("milvus:") else path
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------- child jobs
def child(spec: dict) -> dict:
    data = Catalogue(spec["n"], spec["dim"], spec["seed"])
    truth = np.load(spec["truth"])
    return (build if spec["job"] == "build" else search)(spec, data, truth)


def build(spec: dict, data: Catalogue, truth) -> dict:
    """Insert the catalogue into the store; tune (faiss) and measure recall; save."""
    from momentum_proxy.config import parse_memory
    from momentum_proxy.retrieval.faiss_store import FaissStore, default_nlist, plan_index

    location, model = spec["location"], spec["model"]
    start, first_s, plan = time.perf_counter(), None, None
    if spec["store"] == "faiss":
        plan = plan_index(data.n, data.dim, parse_memory(spec["budget"]))
        first = data.n if plan.kind in ("exact", "hnsw") else min(data.n, max(39 * default_nlist(data.n), CHUNK))
    else:
        from momentum_proxy.paths import milvus_location
        from momentum_proxy.retrieval.milvus_store import MilvusStore

        first = min(data.n, CHUNK)
    store = None
    for at, x in data.parts(first):
        labels = data.labels[at : at + len(x)].tolist()
        if store is None and spec["store"] == "faiss":
            store = FaissStore.build(x, paths_of(at, len(x)), labels, plan=plan, model=model, recall_queries=0)
            first_s = time.perf_counter() - start
        elif store is None:
            store = MilvusStore.build(milvus_location(location), x, paths_of(at, len(x)), labels, model=model)
            first_s = time.perf_counter() - start
        else:
            store.add(x, paths_of(at, len(x)), labels)
        del x
    insert_s = time.perf_counter() - start
    tune_start = time.perf_counter()
    if spec["store"] == "faiss":
        store.tune(truth["queries"], truth["ids"], truth["truth"])
    tune_s = time.perf_counter() - tune_start
    save_start = time.perf_counter()
    store.save(location)
    save_s = time.perf_counter() - save_start
    out = {
        "kind": store.kind,
        "params": store.params,
        "recall_at_build": store.recall_info(),
        "first_part": first,
        "first_part_s": round(first_s, 2),
        "insert_s": round(insert_s, 2),
        "insert_per_s": round(data.n / insert_s),
        "tune_s": round(tune_s, 2),
        "save_s": round(save_s, 2),
        "plan": plan.to_dict() if plan else None,
        "vmhwm_mib": mib(memory_status("VmHWM")),
    }
    store.close()
    return out


def search(spec: dict, data: Catalogue, truth) -> dict:
    """Open the store in this fresh process and search it: latency at each concurrency, recall."""
    from momentum_proxy.retrieval.faiss_store import FaissStore
    from momentum_proxy.retrieval.stores import open_store

    base = memory_status("VmRSS")
    start = time.perf_counter()
    store = FaissStore.load(spec["location"], mmap=True) if spec.get("mmap") else open_store(spec["location"])
    open_s = time.perf_counter() - start
    opened = memory_status("VmRSS")
    queries, ids = truth["queries"], truth["ids"]
    levels = {}
    for clients in spec["clients"]:
        start = time.perf_counter()
        lat, found = latencies(store, queries, ids, clients)
        levels[str(clients)] = {
            "p50_ms": round(1000 * float(np.percentile(lat, 50)), 2),
            "p99_ms": round(1000 * float(np.percentile(lat, 99)), 2),
            "searches_per_s": round(len(lat) / (time.perf_counter() - start), 1),
        }
    out = {
        "open_s": round(open_s, 2),
        "rss_after_open_mib": mib(opened),
        "rss_before_open_mib": mib(base),
        "recall": round(recall_of(found, truth["truth"]), 4),
        "levels": levels,
        "vmhwm_mib": mib(memory_status("VmHWM")),
    }
    store.close()
    return out


def latencies(store, queries, ids, clients: int) -> tuple[np.ndarray, np.ndarray]:
    """Each of `clients` threads searches its share of the queries one at a time (own item left out); the
    per-search seconds and the ids found, in query order."""
    lat = np.zeros(len(queries))
    found = np.full((len(queries), K), -1, np.int64)

    def client(rows):
        for r in rows:
            t0 = time.perf_counter()
            got = store.search(queries[r : r + 1], K, exclude={int(ids[r])})[1][0]
            lat[r] = time.perf_counter() - t0
            found[r, : len(got)] = got

    threads = [threading.Thread(target=client, args=(range(c, len(queries), clients),)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, found


# --------------------------------------------------------------------------------------------- mproxy serve
def make_run(folder: Path, dim: int) -> dict:
    """A random-weight run (Lite0, 64 px, `dim`-d; no training) and the model dict a store built for it holds."""
    import torch

    from momentum_proxy.models.net import EmbeddingNet
    from momentum_proxy.runs import BEST, RunDir, model_identity
    from momentum_proxy.training.config import TrainConfig

    cfg = TrainConfig(
        data=str(folder / "no-data"),
        out=str(folder),
        backbone="efficientnet_lite0",
        pretrained="none",
        image_size=64,
        feature_dim=dim,
    )
    run = RunDir(folder)
    run.start(cfg, overwrite=True)
    torch.manual_seed(0)
    run.save_checkpoint(BEST, {"epoch": 0, "model": EmbeddingNet(cfg.backbone, dim, weights=None).state_dict()})
    return {**model_identity(folder), "runtime": "torch", "verified": True, "tta": "none"}


def served(location: str, run: Path, truth, clients: list[int], mmap: bool, log: Path) -> dict:
    """`mproxy serve` over the store: /stats, then HTTP searches by embedding at each concurrency, the server's
    peak memory."""
    from momentum_proxy.serving.app import wait_until_healthy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "momentum_proxy",
            "serve",
            location,
            "--run",
            str(run),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--model-processes",
            "0",
            *(["--mmap"] if mmap else []),
        ],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        start = time.perf_counter()
        wait_until_healthy(f"http://127.0.0.1:{port}", proc, timeout=600, log=log)
        ready_s = time.perf_counter() - start
        rss_ready = memory_status("VmRSS", proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/stats")
        stats = json.loads(conn.getresponse().read())
        conn.close()
        bodies = [json.dumps({"embedding": q.tolist(), "k": K}).encode() for q in truth["queries"]]
        levels = {}
        for n in clients:
            lat = http_latencies(port, bodies, n)
            levels[str(n)] = {
                "p50_ms": round(1000 * float(np.percentile(lat, 50)), 2),
                "p99_ms": round(1000 * float(np.percentile(lat, 99)), 2),
            }
        return {
            "ready_s": round(ready_s, 1),
            "rss_ready_mib": mib(rss_ready),
            "vmhwm_mib": mib(memory_status("VmHWM", proc.pid)),
            "stats_recall": stats.get("recall"),
            "stats_kind": stats.get("kind"),
            "levels": levels,
        }
    finally:
        proc.kill()
        proc.wait()


def http_latencies(port: int, bodies: list[bytes], clients: int) -> np.ndarray:
    lat = np.zeros(len(bodies))

    def client(rows):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for r in rows:
            t0 = time.perf_counter()
            conn.request("POST", "/search", bodies[r], {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                raise RuntimeError(f"search answered {response.status}: {payload[:200]!r}")
            lat[r] = time.perf_counter() - t0
        conn.close()

    threads = [threading.Thread(target=client, args=(range(c, len(bodies), clients),)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the catalogue")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--budget", default="1GiB", help="faiss's --max-memory")
    p.add_argument("--stores", default="faiss,milvus", help="comma-separated: faiss, milvus")
    p.add_argument("--clients", default="1,16", help="concurrent clients, comma-separated")
    p.add_argument("--queries", type=int, default=1000, help="queries (a sample of the stored vectors)")
    p.add_argument("--serve", action="store_true", help="also serve each store with mproxy serve and search it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the stores (default: a temporary one, removed)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return {}
    stores = [s.strip() for s in a.stores.split(",") if s.strip()]
    clients = [int(c) for c in a.clients.split(",")]
    if not stores or set(stores) - {"faiss", "milvus"} or a.n < 2 or min(clients) < 1:
        p.error("--stores takes faiss and/or milvus; --n at least 2; --clients positive")
    out = Path(a.out or tempfile.mkdtemp(prefix="catalogue-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        return run_all(a, stores, clients, out)
    finally:
        if a.out is None:
            shutil.rmtree(out, ignore_errors=True)


def run_all(a, stores: list[str], clients: list[int], out: Path) -> dict:
    data = Catalogue(a.n, a.dim, a.seed)
    start = time.perf_counter()
    truth = exact_truth(data, a.queries)
    np.savez(out / "truth.npz", **truth)
    report = {
        "n": a.n,
        "dim": a.dim,
        "budget": a.budget,
        "queries": len(truth["ids"]),
        "k": K,
        "cpus": os.cpu_count(),
        "exact_truth_s": round(time.perf_counter() - start, 1),
        "stores": {},
    }
    model = make_run(out / "run", a.dim) if a.serve else {"run": "synthetic", "feature_dim": a.dim}
    base = {
        "n": a.n,
        "dim": a.dim,
        "seed": a.seed,
        "truth": str(out / "truth.npz"),
        "model": model,
        "budget": a.budget,
        "clients": clients,
    }
    for store in stores:
        location = str(out / "faiss") if store == "faiss" else f"milvus:{out / 'milvus' / 'catalogue.db'}"
        (out / "milvus").mkdir(exist_ok=True)
        print(f"{store}: building {a.n:,} vectors ...", file=sys.stderr, flush=True)
        built = in_child({**base, "job": "build", "store": store, "location": location})
        row = {"location": location, "build": built, "disk_mib": mib(folder_size(location)), "search": {}}
        variants = [("loaded", False)] + ([("mmap", True)] if built["kind"] in ("ivf", "ivfpq") else [])
        for name, mmap in variants:
            print(f"{store}: searching ({name}) ...", file=sys.stderr, flush=True)
            row["search"][name] = in_child(
                {**base, "job": "search", "store": store, "location": location, "mmap": mmap}
            )
            report["stores"][store] = row
            save(report, a.json)  # what was measured so far survives a later failure
            if a.serve:
                try:
                    row["search"][name]["serve"] = served(
                        location, out / "run", truth, clients, mmap, out / f"serve-{store}-{name}.log"
                    )
                except RuntimeError as e:  # recorded, and the other measurements go on
                    row["search"][name]["serve_error"] = str(e)
                save(report, a.json)
        report["stores"][store] = row
    print_table(report)
    save(report, a.json)
    return report


def save(report: dict, path: str | None) -> None:
    """The report so far, written atomically."""
    if path:
        from momentum_proxy.fileio import write_json  # lazy: the module imports nothing of the package at the top

        write_json(path, report)


def print_table(report: dict) -> None:
    levels = [str(c) for c in report["stores"][next(iter(report["stores"]))]["search"]["loaded"]["levels"]]
    head = [
        "store",
        "kind",
        "insert/s",
        "build peak MiB",
        "search peak MiB",
        "RSS after open MiB",
        "disk MiB",
        "recall@10",
        *[f"p50/p99 ms ({c} cl.)" for c in levels],
    ]
    print(
        f"\n{report['n']:,} x {report['dim']} vectors, faiss budget {report['budget']}, {report['queries']} "
        f"queries, {report['cpus']} CPUs\n"
    )
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, row in report["stores"].items():
        b = row["build"]
        for variant, s in row["search"].items():
            label = name if variant == "loaded" else f"{name} (mmap)"
            kind = b["kind"] + (f" {b['params']}" if b["params"] else "")
            cells = [
                label,
                kind,
                f"{b['insert_per_s']:,}",
                b["peak_tree_rss_mib"],
                s["peak_tree_rss_mib"],
                s["rss_after_open_mib"],
                row["disk_mib"],
                s["recall"],
                *[f"{s['levels'][c]['p50_ms']} / {s['levels'][c]['p99_ms']}" for c in levels],
            ]
            print("| " + " | ".join(map(str, cells)) + " |")
            if "serve" in s:
                v = s["serve"]
                cells = [
                    f"{label} via mproxy serve",
                    v["stats_kind"],
                    "",
                    "",
                    v["vmhwm_mib"],
                    v["rss_ready_mib"],
                    "",
                    (v["stats_recall"] or {}).get("recall"),
                    *[f"{v['levels'][c]['p50_ms']} / {v['levels'][c]['p99_ms']}" for c in levels],
                ]
                print("| " + " | ".join(map(str, cells)) + " |")
    faiss_row = report["stores"].get("faiss")
    if faiss_row:
        s = faiss_row["search"]["loaded"]
        met = {
            "faiss search process within 1 GiB": s["peak_tree_rss_mib"] <= GOALS["faiss_ram_gib"] * 1024,
            "recall@10 >= 0.95": s["recall"] >= GOALS["recall"],
            "p50 <= 10 ms (1 client)": s["levels"][levels[0]]["p50_ms"] <= GOALS["p50_ms"],
        }
        print("\ngoals: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in met.items()))
        report["goals"] = met


if __name__ == "__main__":
    main()
