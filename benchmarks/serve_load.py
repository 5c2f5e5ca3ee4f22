"""Load test of `mproxy serve` (a measurement, not a timed test).

Starts the server on 127.0.0.1 over a copy of INDEX, then for each concurrency level (default 1, 4, 16 clients)
sends image searches for a bounded time while one more client adds an image every `--add-every` seconds.
Reports throughput, p50/p95/p99 latency and errors per level, checks afterwards that every acknowledged add is
found by its own image, and measures, in the same run, the bare model's batch-1 time and its best batched
embedding rate (before the server starts and after it stops, so the two never share the cores; the goals use
the fastest). On a multi-core CPU it also measures two model copies embedding side by side, a context figure
that the goals do not use (they are set against one copy; the server's two model processes are such a pair).
`--runs N` repeats all of it.

    python benchmarks/serve_load.py --index index/flowers12 [--seconds 20 --levels 1,4,16 --runs 3 --json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "load-test"


def bare_model(index_dir: Path, images: list[bytes], device: str) -> dict:
    """The model alone on pre-decoded inputs, run in the main thread and in a worker thread (as the server's
    batcher runs it; on a busy 2-core machine the two differ a lot): the better batch-1 time and batched rate.
    On a multi-core CPU also the joint rate of two model copies side by side (`measure_copies`), which the
    goals do not use: they are set against one copy (the server's two model processes are such a pair)."""
    from momentum_proxy.embedding.inference import resolve_device

    runs = [measure_model(index_dir, images, device)]
    worker = threading.Thread(target=lambda: runs.append(measure_model(index_dir, images, device)))
    worker.start()
    worker.join()
    out = {**best_of(runs), "main_thread": runs[0], "worker_thread": runs[1]}
    if resolve_device(device).type == "cpu" and (os.cpu_count() or 1) >= 2:
        out["copies"] = in_fresh_process("measure_copies", str(index_dir), device)
        out["copies_ips"] = out["copies"]["best_ips"]
    return out


def in_fresh_process(name: str, *args):
    """`name(*args)` of this module in a new Python process (JSON in and out), whose threads start from
    nothing, as in a newly started server."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import serve_load; "
        f"print(json.dumps(serve_load.{name}(*json.loads(sys.argv[1]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    if out.returncode:
        sys.exit(f"{name} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def measure_copies(index_dir: str, device: str, copies: int = 2, batches=(4, 8, 16), seconds: float = 2.0) -> dict:
    """The joint images/s of `copies` copies of the model embedding side by side, each in its own thread with
    an equal share of the CPU threads (set before it runs anything, so that GNU OpenMP never holds more
    threads than cores), per batch size of each copy."""
    import torch

    from momentum_proxy.data.loading import to_batch
    from momentum_proxy.embedding.inference import load_model
    from momentum_proxy.perf import share_heap, tune_allocator
    from momentum_proxy.retrieval.build import open_index
    from momentum_proxy.serving.searcher import decode_image

    tune_allocator()
    share_heap()
    index, run_dir = open_index(Path(index_dir))
    threads = max(1, torch.get_num_threads() // copies)
    start, counts = threading.Barrier(copies), []

    def copy() -> None:
        try:
            torch.set_num_threads(threads)
            model, cfg, _ = load_model(run_dir, device)
            arrays = [decode_image(Path(p).read_bytes(), cfg.image_size)[0] for p in index.paths[:16]]
            with torch.inference_mode():
                for b in batches:
                    batch = to_batch((arrays * b)[:b])
                    model(batch)
                    start.wait()
                    t0, n = time.perf_counter(), 0
                    while time.perf_counter() - t0 < seconds:
                        model(batch)
                        n += b
                    counts.append((b, n, time.perf_counter() - t0))
                    start.wait()
        except BaseException:
            start.abort()  # the other copies stop waiting for this one
            raise

    workers = [threading.Thread(target=copy) for _ in range(copies)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if len(counts) != copies * len(batches):
        raise RuntimeError("a model copy failed (see above)")
    out = {"copies": copies, "threads_each": threads}
    for b in batches:
        done = [(n, t) for size, n, t in counts if size == b]
        out[f"batch{b}_ips"] = sum(n for n, _ in done) / max(t for _, t in done)
    out["best_ips"] = max(v for k, v in out.items() if k.endswith("_ips"))
    return out


def best_of(runs: list[dict]) -> dict:
    """The fastest figures of several measurements: the smallest batch-1 time, the largest rates."""
    return {
        k: (min if k == "batch1_ms" else max)(r[k] for r in runs) for k in runs[0] if not isinstance(runs[0][k], dict)
    }


def measure_model(index_dir: Path, images: list[bytes], device: str, batches=(1, 8, 16, 32, 64)) -> dict:
    """Median batch-1 time (ms) and the best images/s over batch sizes."""
    import torch

    from momentum_proxy.data.loading import to_batch
    from momentum_proxy.embedding.inference import load_model
    from momentum_proxy.retrieval.build import open_index
    from momentum_proxy.serving.searcher import decode_image

    _, run_dir = open_index(index_dir)
    model, cfg, _ = load_model(run_dir, device)
    dev = next(model.parameters()).device
    arrays = [decode_image(b, cfg.image_size)[0] for b in images[:64]]
    out = {"image_size": cfg.image_size}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for b in batches:
            batch = to_batch((arrays * (b // len(arrays) + 1))[:b])
            for _ in range(2):
                model(batch.to(dev))
            sync()
            times = []
            while len(times) < 3 or sum(times) < 1.0:  # at least 3 runs and 1 s per batch size
                t0 = time.perf_counter()
                model(batch.to(dev)).cpu()
                sync()
                times.append(time.perf_counter() - t0)
            if b == 1:
                out["batch1_ms"] = 1000 * float(np.median(times))
            out[f"batch{b}_ips"] = b / float(np.median(times))
    out["best_ips"] = max(v for k, v in out.items() if k.endswith("_ips"))
    return out


def start_server(index_dir: Path, port: int, log: Path, device: str, model_processes: str) -> subprocess.Popen:
    from momentum_proxy.serving.app import wait_until_healthy

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "momentum_proxy",
            "serve",
            str(index_dir),
            "--port",
            str(port),
            "--token",
            TOKEN,
            "--device",
            device,
            "--model-processes",
            model_processes,
        ],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", proc, timeout=300, log=log)
    except RuntimeError as e:
        sys.exit(str(e))
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(image: bytes, fields: dict) -> tuple[bytes, str]:
    """A multipart/form-data body with `fields` and the file field "image", and its content type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def search_loop(
    url: str, bodies: list[tuple[bytes, str]], until: float, seed: int, latencies: list, errors: list
) -> None:
    """One client: image searches (k=10) on one keep-alive connection until `until`. The standard library's
    http.client with bodies encoded beforehand costs the load generator about 0.3 ms of CPU per search
    against about 2 ms for httpx, CPU that the server would otherwise lose on a shared machine."""
    rng = random.Random(seed)
    host, port = url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    while time.perf_counter() < until:
        body, content_type = rng.choice(bodies)
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/search", body, {"Content-Type": content_type})
            r = conn.getresponse()
            payload = r.read()
            ok = r.status == 200 and len(json.loads(payload)["results"]) == 10
            error = None if ok else f"{r.status} {payload[:200]!r}"
        except (OSError, http.client.HTTPException, ValueError) as e:
            ok, error = False, f"{type(e).__name__}: {e}"
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
        (latencies if ok else errors).append(time.perf_counter() - t0 if ok else error)
    conn.close()


def add_loop(url: str, stop: threading.Event, every: float, acked: list, errors: list, seed: int) -> None:
    """Add new images (distinct: random pixels on a flower) until stopped; record what was acknowledged."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        while not stop.wait(every):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            try:
                r = client.post("/items", files={"images": ("new.jpg", buf.getvalue(), "image/jpeg")})
                if r.status_code == 200:
                    acked.append((r.json()["items"][0]["id"], buf.getvalue()))
                else:
                    errors.append(f"add: {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"add: {e}")


def batch_totals(url: str) -> tuple[float, float]:
    """(queries embedded, batches run) so far, from the server's /metrics."""
    lines = httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
    value = {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("mproxy_embed_batch_size_")}
    return value.get("mproxy_embed_batch_size_sum", 0.0), value.get("mproxy_embed_batch_size_count", 0.0)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) used so far by process `pid` and its child processes (the server's model
    processes), or by this process."""
    if pid is None:
        return time.process_time()
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_level(
    url: str, clients: int, seconds: float, bodies: list[tuple[bytes, str]], add_every: float, server_pid: int
) -> dict:
    latencies, errors, acked = [], [], []
    embedded, batches = batch_totals(url)
    stop = threading.Event()
    adder = threading.Thread(target=add_loop, args=(url, stop, add_every, acked, errors, clients))
    until = time.perf_counter() + seconds
    threads = [
        threading.Thread(target=search_loop, args=(url, bodies, until, i, latencies, errors)) for i in range(clients)
    ]
    t0, server0, client0 = time.perf_counter(), cpu_seconds(server_pid), cpu_seconds()
    adder.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    server_cpu, client_cpu = cpu_seconds(server_pid) - server0, cpu_seconds() - client0
    stop.set()
    adder.join()
    ms = 1000 * np.array(latencies)
    embedded_after, batches_after = batch_totals(url)
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "searches": len(latencies),
        "throughput": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": len(errors),
        "error_examples": errors[:3],
        "adds": len(acked),
        "acked": acked,
        "mean_batch": (embedded_after - embedded) / max(1.0, batches_after - batches),
        "server_cpu_ms": 1000 * server_cpu / max(1, len(latencies)),
        "client_cpu_ms": 1000 * client_cpu / max(1, len(latencies)),
    }


def check_adds(url: str, acked: list) -> int:
    """How many acknowledged adds are not found first by their own image (should be 0)."""
    missing = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for item_id, data in acked:
            best = client.post("/search", files={"image": ("a.jpg", data, "image/jpeg")}, data={"k": "1"}).json()[
                "results"
            ][0]
            missing += best["id"] != item_id
    return missing


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{name} ({os.cpu_count()} cores{', avx512_vnni' if 'avx512_vnni' in info else ''})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="an index built by `mproxy index`")
    p.add_argument("--queries", help="folder of query images (default: up to 200 of the index's own images)")
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--seconds", type=float, default=20.0, help="per level")
    p.add_argument("--add-every", type=float, default=1.0, help="seconds between two adds")
    p.add_argument("--runs", type=int, default=1, help="repeat the whole measurement (bare model, server, bare model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--model-processes", default="auto", help="the server's --model-processes")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args()

    from momentum_proxy.errors import UserError
    from momentum_proxy.fileio import write_json
    from momentum_proxy.perf import flush_denormals, tune_allocator

    try:  # every bad option before anything is measured, as one line
        files = check_options(a)
    except UserError as e:
        print(f"serve_load: error: {e}", file=sys.stderr)
        sys.exit(2)
    tune_allocator()  # as in the server process (`mproxy` does this at start)
    flush_denormals()
    images = [f.read_bytes() for f in random.Random(0).sample(files, min(200, len(files)))]
    runs = [one_run(a, images) for _ in range(a.runs)]
    if a.runs > 1:
        summary(runs)
    if a.json:
        for run in runs:
            run["levels"] = [{k: v for k, v in r.items() if k != "acked"} for r in run["levels"]]
        write_json(a.json, {"cpu": cpu_name(), "runs": runs})


def check_options(a) -> list[Path]:
    """The query images (from --queries, else the index's own), with `a.levels` parsed; UserError for a bad
    option."""
    from momentum_proxy.embedding.inference import resolve_device
    from momentum_proxy.embedding.processes import check_model_processes
    from momentum_proxy.errors import UserError
    from momentum_proxy.fileio import check_writable_folder
    from momentum_proxy.retrieval.faiss_store import FaissStore

    try:
        a.levels = [int(c) for c in a.levels.split(",")]
    except ValueError:
        raise UserError(f"--levels must be comma-separated client counts, got {a.levels!r}") from None
    if min(a.levels) < 1 or a.runs < 1 or a.seconds <= 0 or a.add_every <= 0:
        raise UserError("--levels and --runs must be at least 1, --seconds and --add-every above 0")
    resolve_device(a.device)  # an unknown device, or cuda without CUDA
    check_model_processes(a.model_processes, a.device, "torch")
    if a.json:
        if Path(a.json).is_dir():
            raise UserError(f"--json {a.json} is a folder; give a file name")
        check_writable_folder(Path(a.json).absolute().parent, "the folder of --json")
    index = FaissStore.load(a.index)
    if not a.queries:
        return [Path(x) for x in index.paths]
    if not Path(a.queries).is_dir():
        raise UserError(f"--queries {a.queries} is not a folder")
    files = sorted(Path(a.queries).rglob("*.jpg"))
    if not files:
        raise UserError(f"no .jpg images below --queries {a.queries}")
    return files


def one_run(a, images: list[bytes]) -> dict:
    """The bare model, the server under each load level, the bare model again; printed as it goes."""
    load_before = f"{os.getloadavg()[0]:.1f}"
    before = bare_model(Path(a.index), images, a.device)
    print(f"bare model: batch-1 {before['batch1_ms']:.1f} ms, best batched {before['best_ips']:.1f} img/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        copy = Path(tmp) / "index"
        shutil.copytree(a.index, copy)
        port = free_port()
        proc = start_server(copy, port, Path(tmp) / "server.log", a.device, a.model_processes)
        url = f"http://127.0.0.1:{port}"
        try:
            bodies = [multipart(data, {"k": "10"}) for data in images]
            run_level(url, 2, 3, bodies, 100, proc.pid)  # warm-up
            levels = []
            for clients in a.levels:
                levels.append(run_level(url, clients, a.seconds, bodies, a.add_every, proc.pid))
                print(
                    f"{clients:3d} clients: {levels[-1]['throughput']:.1f} req/s, p50 {levels[-1]['p50_ms']:.0f} ms, "
                    f"errors {levels[-1]['errors']}",
                    flush=True,
                )
            acked = [x for level in levels for x in level["acked"]]
            not_found = check_adds(url, acked)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    after = bare_model(Path(a.index), images, a.device)  # again: the machine's speed drifts on shared hosts
    run = {
        "bare": {**best_of([before, after]), "before": before, "after": after},
        "levels": levels,
        "adds": len(acked),
        "not_found": not_found,
        "load_before": load_before,
        "load_after": f"{os.getloadavg()[0]:.1f}",
    }
    report(a, run)
    return run


def goals(run: dict) -> dict:
    """The service's goals: the top level's throughput at least 80 % of the bare best rate, with its p99 at most
    200 ms; the lowest level's p50 at most twice the bare batch-1 time; every acknowledged add found."""
    bare, levels = run["bare"], run["levels"]
    top, one = max(levels, key=lambda r: r["clients"]), min(levels, key=lambda r: r["clients"])
    ratio, times = top["throughput"] / bare["best_ips"], one["p50_ms"] / bare["batch1_ms"]
    return {
        "top": top,
        "one": one,
        "ratio": ratio,
        "ratio_met": ratio >= 0.8,
        "p99_met": top["p99_ms"] <= 200,
        "times": times,
        "times_met": times <= 2,
        "adds_met": run["not_found"] == 0,
    }


def report(a, run: dict) -> None:
    bare, levels, g = run["bare"], run["levels"], goals(run)
    print(
        f"\nCPU: {cpu_name()}; index {a.index} ({bare['image_size']} px); {a.seconds:g} s per level, "
        f"one add every {a.add_every:g} s meanwhile"
    )
    sizes = ", ".join(f"b{k[5:-4]} {v:.0f}" for k, v in bare.items() if k.startswith("batch") and k.endswith("_ips"))
    print(
        f"bare model, the fastest of 4 measurements (main and worker thread, before and after the server): "
        f"batch-1 {bare['batch1_ms']:.1f} ms; best batched {bare['best_ips']:.1f} img/s ({sizes})"
    )
    for when in ("before", "after"):
        m, w = bare[when]["main_thread"], bare[when]["worker_thread"]
        print(
            f"  {when}: main thread {m['batch1_ms']:.0f} ms, {m['best_ips']:.0f} img/s; "
            f"worker thread {w['batch1_ms']:.0f} ms, {w['best_ips']:.0f} img/s"
        )
    if "copies_ips" in bare:
        c = bare["before"]["copies"]
        print(
            f"two model copies side by side ({c['threads_each']} thread(s) each; the fastest of before and after): "
            f"{bare['copies_ips']:.1f} img/s, {bare['copies_ips'] / bare['best_ips']:.2f}x one copy's best "
            f"(not used by the goals, which are set against one copy)"
        )
    print(f"load average before / after: {run['load_before']} / {run['load_after']} (other jobs share the machine)\n")
    print(
        "| clients | searches/s | vs best batched model | p50 ms | p95 ms | p99 ms | errors | adds | mean batch "
        "| CPU ms/search: server | load generator |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in levels:
        print(
            f"| {r['clients']} | {r['throughput']:.1f} | {r['throughput'] / bare['best_ips']:.0%} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | {r['adds']} | "
            f"{r['mean_batch']:.1f} | {r['server_cpu_ms']:.1f} | {r['client_cpu_ms']:.1f} |"
        )
    print(f"\nacknowledged adds: {run['adds']}, not found by their own image afterwards: {run['not_found']}")
    print(
        f"goal {g['top']['clients']} clients >= 80% of best batched rate: "
        f"{'met' if g['ratio_met'] else 'NOT met'} ({g['ratio']:.0%})"
    )
    print(
        f"goal {g['top']['clients']} clients p99 <= 200 ms: {'met' if g['p99_met'] else 'NOT met'} "
        f"({g['top']['p99_ms']:.0f} ms; with closed-loop clients the mean latency is clients / throughput, "
        f"{1000 * g['top']['clients'] / g['top']['throughput']:.0f} ms here)"
    )
    print(
        f"goal {g['one']['clients']} client p50 <= 2x batch-1 time: {'met' if g['times_met'] else 'NOT met'} "
        f"({g['times']:.2f}x)"
    )
    print(f"goal every acknowledged add found by its own image: {'met' if g['adds_met'] else 'NOT met'}")
    if "copies_ips" in bare:
        print(
            f"{g['top']['clients']} clients against two model copies side by side: "
            f"{g['top']['throughput'] / bare['copies_ips']:.0%}"
        )
    for r in levels:
        for e in r["error_examples"]:
            print(f"error ({r['clients']} clients): {e}")


def summary(runs: list[dict]) -> None:
    """One row per run, and how many runs met each goal."""
    print(f"\n{len(runs)} runs:\n")
    print(
        "| run | bare batch-1 ms | bare best img/s | lowest level p50 | top level searches/s | vs bare best "
        "| top level p99 ms | errors | adds found | two copies img/s | top level vs two copies |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    met = [goals(run) for run in runs]
    for i, (run, g) in enumerate(zip(runs, met), 1):
        bare, errors = run["bare"], sum(r["errors"] for r in run["levels"])
        print(
            f"| {i} | {bare['batch1_ms']:.1f} | {bare['best_ips']:.1f} | {g['one']['p50_ms']:.0f} ms "
            f"({g['times']:.2f}x) | {g['top']['throughput']:.1f} | {g['ratio']:.0%} | {g['top']['p99_ms']:.0f} "
            f"| {errors} | "
            f"{run['adds'] - run['not_found']} of {run['adds']} | "
            + (
                f"{bare['copies_ips']:.1f} | {g['top']['throughput'] / bare['copies_ips']:.0%} |"
                if "copies_ips" in bare
                else "- | - |"
            )
        )
    ratios = sorted(g["ratio"] for g in met)
    print(
        f"\nthroughput goal met in {sum(g['ratio_met'] for g in met)} of {len(runs)} runs (median "
        f"{ratios[len(ratios) // 2]:.0%}); p99 goal in {sum(g['p99_met'] for g in met)}; latency goal in "
        f"{sum(g['times_met'] for g in met)}; adds goal in {sum(g['adds_met'] for g in met)} of {len(runs)}"
    )


if __name__ == "__main__":
    main()
