"""Post-processing (test-time flip, re-ranking) across the collection regimes users have, chosen on validation.

Regimes, each on the development species of a folder of class folders (never its test species):
- large: every photo of every class, leave-one-out (the protocol of docs: Benchmarks, retrieval quality);
- small-N: every class cut to N = 2, 3, 5 photos (a random subset per seed), leave-one-out;
- longtail: class sizes drawn log-uniformly from 1 to 60 (heavy-tailed; a class of 1 queries nothing), leave-one-out;
- new-M: for each class, M = 1 or 2 of its photos added to an index of every other class; its other photos query it
  (found at top 1 and within the top 5);
- duplicates: indexed photos re-encoded (resized to 80 %, JPEG quality 90) at another path query the full index:
  share whose original comes first (or a photo that the set holds twice under another name: cosine 1 to the
  original), and the lowest raw cosine of a top hit;
- no-match: half the classes (per seed) are left out of the index; AUROC of the top hit's raw cosine for "has a
  match" (queries of indexed classes, each left out of its own search) against queries of the left-out classes,
  and the raw cosine at 95 % precision for "has a match".

Stages (resumable; everything under OUT, which holds one model):

    python benchmarks/regimes.py embed --src ../shared/data/birds50 --out O   # run (pretrained or --epochs N), features
    python benchmarks/regimes.py val   --out O --seeds 0,1,2                   # every regime x setting -> records.jsonl
    python benchmarks/regimes.py table --out O                                 # mean +- 95 % CI per regime (markdown)
    python benchmarks/regimes.py test  --out O --pick "none none"              # a chosen setting on test species, once
    python benchmarks/regimes.py cost  --out O                                 # ms per query at 20k / 100k / 1M items

Species (`embed` writes them to OUT/species.json with the model; `val`, `test` and `table` read them there): test
species are the second half of the class folders by name (`prepare folder`'s test side: never trained on). With the
pretrained start (`--epochs 0`) the development species are the whole first half. A trained model (`--epochs N`)
trains on the first half minus `--val-classes` (a count or share of it, `prepare folder --val-classes`), and its
development species are those val classes only (read from data/manifest.csv; training chooses its epoch on them
too), never a species it trained on. An OUT without species.json (made before it existed) keeps the halves, its model
read from run/config.json. `val --settings` measures a few settings instead of SETTINGS. A setting is "TTA RERANK",
RERANK a `quality.py` grid entry (method/k=../alpha=../keep=..; keep 1: the plain cosine top hit stays first and the
re-ranking orders the rest, `Rerank.keep`).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
from quality import T95, append_record, parse_rerank, read_records

from momentum_proxy.config import DEFAULT_RERANK
from momentum_proxy.data.manifest import name_some, parse_val_classes, read_manifest
from momentum_proxy.data.prepare import IMAGE_EXTS
from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.embedding.inference import embed_files
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation.metrics import evaluate_embeddings
from momentum_proxy.fileio import read_json, write_json
from momentum_proxy.retrieval.rerank import rerank_knn
from momentum_proxy.vectors import knn, l2_normalize

SETTINGS = [
    "none none",
    "flip none",
    "none dba/k=5/alpha=3/keep=1",
    "flip dba/k=5/alpha=3/keep=1",
    "flip dba/k=5/alpha=3/keep=0",
    "flip dba+aqe/k=10/alpha=0/keep=0",
    "flip dba+aqe/k=10/alpha=0/keep=1",
    "flip dba+aqe/k=5/alpha=3/keep=0",
    "flip aqe/k=5/alpha=3/keep=0",
    "none dba+aqe/k=10/alpha=0/keep=0",
]
SMALL = (2, 3, 5)
NEW = (1, 2)
DUPLICATES = 100  # re-encoded photos per dataset
SPECIES = "species.json"  # OUT's model and its development / test species


def species(src: Path) -> tuple[list[str], list[str]]:
    names = sorted(p.name for p in src.iterdir() if p.is_dir())
    half = len(names) // 2
    return names[:half], names[half:]


def val_classes_option(text: str) -> str:
    """`--val-classes` as given (a count or a share; what species.json records), once `prepare` would accept it."""
    try:
        parse_val_classes(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def prepared_species(data: Path) -> dict[str, list[str]]:
    """The class names of each split of a prepared dataset (train, val, test), sorted."""
    df = read_manifest(data)
    return {s: sorted(set(df.loc[df["split"] == s, "class_name"])) for s in ("train", "val", "test")}


def model_name(epochs: int, val_classes: str | None) -> str:
    return "pretrained start" if epochs == 0 else f"trained {epochs} epoch(s), val-classes {val_classes}"


def run_species(a) -> dict:
    """The model of `a` and its development / test species: the first / second half of the class folders for the
    pretrained start; for a trained model the val classes of its prepared data (never trained on) / the test ones."""
    if a.epochs == 0:
        dev, test = species(a.src)
        return {
            "model": model_name(0, None),
            "epochs": 0,
            "val_classes": None,
            "trained_on": [],
            "dev": dev,
            "test": test,
        }
    split = prepared_species(a.out / "data")
    if not split["val"]:
        raise SystemExit(f"--val-classes {a.val_classes} made no val classes: no development species to measure on")
    assert not set(split["val"]) & set(split["train"]) and not set(split["test"]) & set(split["train"])
    return {
        "model": model_name(a.epochs, a.val_classes),
        "epochs": a.epochs,
        "val_classes": a.val_classes,
        "trained_on": split["train"],
        "dev": split["val"],
        "test": split["test"],
    }


def read_species(out: Path) -> dict:
    """OUT's model and species (species.json); an OUT made before species.json: the halves, as `prepare folder`
    split them (dev: its train + val classes, test: its test classes), and the epochs of its run."""
    if (out / SPECIES).exists():
        return read_json(out / SPECIES)
    split = prepared_species(out / "data")
    epochs = read_json(out / "run" / "config.json")["epochs"]
    model = model_name(0, None) if epochs == 0 else f"trained {epochs} epoch(s) on the development species (invalid)"
    dev = sorted(split["train"] + split["val"])
    return {"model": model, "epochs": epochs, "val_classes": None, "dev": dev, "test": split["test"]}


def check_model(a) -> None:
    """Refuse to mix models in one OUT (its species.json, or an OUT made before it, must match `a`'s model), and a
    trained model without development species."""
    if a.epochs and not parse_val_classes(a.val_classes):
        raise SystemExit("--epochs N > 0 needs --val-classes > 0: they are the development species")
    if (a.out / SPECIES).exists():
        held = read_species(a.out)
        if (held["epochs"], held["val_classes"]) != (a.epochs, a.val_classes if a.epochs else None):
            raise SystemExit(
                f"{a.out} holds the {held['model']} model; use another --out for {model_name(a.epochs, a.val_classes)}"
            )
    elif (a.out / "data").exists() and a.epochs:
        raise SystemExit(
            f"{a.out} holds data but no species.json (an older OUT); use another --out for a trained model"
        )


def photos(src: Path, names: list[str]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for y, name in enumerate(names):
        files = sorted(p for p in (src / name).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        paths += [str(p) for p in files]
        labels += [y] * len(files)
    return paths, np.array(labels)


def reencode(paths: list[str], out: Path) -> list[str]:
    """Each photo resized to 80 % and saved as JPEG quality 90 under `out` (another path, other bytes)."""
    made = []
    for p in paths:
        dst = out / Path(p).parent.name / (Path(p).stem + "-copy.jpg")
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(p) as im:
                im = im.convert("RGB")
                im.resize((round(im.width * 0.8), round(im.height * 0.8)), Image.BICUBIC).save(dst, quality=90)
        made.append(str(dst))
    return made


def prepare_data(a) -> Path:
    """`prepare folder`'s class-disjoint split of --src: first half train (minus --val-classes of it, with
    --epochs N), second half test."""
    data = a.out / "data"
    if not (data / "manifest.csv").exists():
        val = ["--val-classes", a.val_classes] if a.epochs else []  # the pretrained start: prepare's default
        subprocess.run(
            [
                sys.executable,
                "-m",
                "momentum_proxy",
                "prepare",
                "folder",
                "--src",
                str(a.src),
                "--out",
                str(data),
                *val,
            ],
            check=True,
        )
    return data


def make_run(a, data: Path) -> Path:
    """A run of the pretrained start (--epochs 0) or a short training on `data`'s train classes."""
    run = a.out / "run"
    if not (run / "checkpoints").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "momentum_proxy",
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                "--epochs",
                str(a.epochs),
                "--no-final-test",
                *a.train_args,
            ],
            check=True,
        )
    return run


def stage_embed(a) -> None:
    check_model(a)
    data = prepare_data(a)
    held = run_species(a)
    write_json(a.out / SPECIES, held)
    run = make_run(a, data)
    print(f"model: {held['model']}; dev species {len(held['dev'])}, test species {len(held['test'])}", flush=True)
    rng = np.random.default_rng(0)
    for part in ("dev", "test"):
        paths, labels = photos(a.src, held[part])
        picked = np.sort(rng.choice(len(paths), min(DUPLICATES, len(paths)), replace=False))
        copies = reencode([paths[i] for i in picked], a.out / f"copies-{part}")
        for tta in a.ttas:
            cache = a.out / f"features-{part}-{tta}.npz"
            if part == "test" and not a.test or cache.exists():
                continue
            embedder = load_embedder(run, "torch", "cpu", tta)
            feats, kept, skipped = embed_files(embedder, paths + copies)
            if skipped:
                raise SystemExit(f"unreadable images: {skipped[:3]}")
            np.savez(cache, features=feats[: len(paths)], labels=labels, copies=feats[len(paths) :], copied=picked)
            print(f"{cache.name}: {len(paths)} photos + {len(copies)} copies", flush=True)


def setting(text: str):
    tta, rerank = text.split()
    r = parse_rerank(rerank)
    return tta, (r if r.active else None)


def ranked(query, gallery, k, rerank, exclude_self=False) -> np.ndarray:
    """Gallery indices of each query's top k under `rerank` (None: raw cosine)."""
    if rerank is None:
        return knn(query, gallery, k, exclude_self=exclude_self)[1]
    return rerank_knn(query, gallery, k, rerank, exclude_self=exclude_self)[1]


def loo(x, y, rerank) -> dict:
    res = evaluate_embeddings(x, y, metrics=("recall", "map@r"), recalls=(1,), rerank=rerank)
    return {"recall@1": res["recall@1"], "map@r": res["map@r"]}


def subsample(y, sizes: dict, rng) -> np.ndarray:
    keep = [rng.choice(np.flatnonzero(y == c), min(n, int((y == c).sum())), replace=False) for c, n in sizes.items()]
    return np.sort(np.concatenate(keep))


def regimes(x, y, copies, copied, rerank, seed) -> dict:
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    out = {"large": loo(x, y, rerank)} if seed == 0 else {}  # the full set does not depend on the seed
    for n in SMALL:
        keep = subsample(y, {c: n for c in classes}, rng)
        out[f"small-{n}"] = loo(x[keep], y[keep], rerank)
    sizes = {c: int(np.clip(round(math.exp(rng.uniform(0, math.log(60)))), 1, 60)) for c in classes}
    keep = subsample(y, sizes, rng)
    out["longtail"] = loo(x[keep], y[keep], rerank)
    for m in NEW:
        top1 = top5 = total = 0
        for c in classes:
            own = rng.permutation(np.flatnonzero(y == c))
            gallery = np.concatenate([np.flatnonzero(y != c), own[:m]])
            top = ranked(x[own[m:]], x[gallery], 5, rerank)
            hit = y[gallery][top] == c
            top1, top5, total = top1 + hit[:, 0].sum(), top5 + hit.any(1).sum(), total + len(hit)
        out[f"new-{m}"] = {"top1": top1 / total, "top5": top5 / total}
    if seed == 0:
        top = ranked(copies, x, 1, rerank)[:, 0]
        same = (top == copied) | (np.sum(x[top] * x[copied], 1) >= 0.999)  # or a photo the set holds twice
        out["duplicates"] = {"first": float(np.mean(same)), "min_top_cosine": float(np.min(np.sum(copies * x[top], 1)))}
    out["no-match"] = no_match(x, y, rerank, rng)
    return out


def no_match(x, y, rerank, rng) -> dict:
    classes = rng.permutation(np.unique(y))
    indexed = np.isin(y, classes[: len(classes) // 2])
    g = np.flatnonzero(indexed)
    top_in = ranked(x[g], x[g], 1, rerank, exclude_self=True)[:, 0]
    top_out = ranked(x[~indexed], x[g], 1, rerank)[:, 0]
    s_in = np.sum(x[g] * x[g][top_in], 1)
    s_out = np.sum(x[~indexed] * x[g][top_out], 1)
    scores, truth = np.concatenate([s_in, s_out]), np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    order = np.argsort(-scores)
    precision = np.cumsum(truth[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(precision >= 0.95)
    return {
        "auroc": float(roc_auc_score(truth, scores)),
        "cosine_at_p95": float(scores[order][ok[-1]]) if len(ok) else float("nan"),
    }


def dev_features(out: Path, settings: list[str]) -> None:
    """Refuse, before measuring anything, a setting that does not parse or whose TTA `embed` did not make."""
    for text in settings:
        tta, _ = setting(text)
        if not (out / f"features-dev-{tta}.npz").exists():
            raise SystemExit(
                f"{out / f'features-dev-{tta}.npz'} missing: run embed with --ttas {tta} (setting {text!r})"
            )


def stage_val(a) -> None:
    settings = a.settings or SETTINGS
    dev_features(a.out, settings)
    model = read_species(a.out)["model"]
    done = {(r["setting"], r["seed"]) for r in read_records(a.out)}
    for text in settings:
        tta, rerank = setting(text)
        saved = np.load(a.out / f"features-dev-{tta}.npz")
        x, y = l2_normalize(saved["features"]), saved["labels"]
        copies, copied = l2_normalize(saved["copies"]), saved["copied"]
        for seed in a.seeds:
            if (text, seed) in done:
                continue
            start = time.perf_counter()
            res = regimes(x, y, copies, copied, rerank, seed)
            append_record(
                a.out, {"setting": text, "seed": seed, "split": "dev", "model": model, "items": len(x), **res}
            )
            print(f"{text} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)


COLUMNS = [
    ("large", "recall@1"),
    ("large", "map@r"),
    *[(f"small-{n}", "recall@1") for n in SMALL],
    ("small-3", "map@r"),
    ("longtail", "recall@1"),
    ("longtail", "map@r"),
    ("new-1", "top1"),
    ("new-2", "top1"),
    ("new-2", "top5"),
    ("duplicates", "first"),
    ("duplicates", "min_top_cosine"),
    ("no-match", "auroc"),
    ("no-match", "cosine_at_p95"),
]


def cell(values: list[float], percent: bool) -> str:
    scale = 100 if percent else 1
    m = float(np.mean(values)) * scale
    if len(values) < 2:
        return f"{m:.1f}" if percent else f"{m:.3f}"
    half = T95[len(values) - 1] * float(np.std(values, ddof=1)) / math.sqrt(len(values)) * scale
    return f"{m:.1f} ± {half:.1f}" if percent else f"{m:.3f} ± {half:.3f}"


def stage_table(a) -> None:
    held = read_species(a.out)
    names = held[a.split]
    print(f"model: {held['model']}; {a.split} species ({len(names)}): {name_some(names, 5)}\n")
    records = [r for r in read_records(a.out) if r["split"] == a.split]
    settings = list(dict.fromkeys(r["setting"] for r in records))
    head = "| setting | " + " | ".join(f"{reg} {m}" for reg, m in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for s in settings:
        rows = [r for r in records if r["setting"] == s]
        cells = []
        for reg, m in COLUMNS:
            values = [r[reg][m] for r in rows if reg in r]
            cells.append(cell(values, m not in ("min_top_cosine", "cosine_at_p95", "auroc")) if values else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


def stage_test(a) -> None:
    model = read_species(a.out)["model"]
    for text in a.pick:
        tta, rerank = setting(text)
        saved = np.load(a.out / f"features-test-{tta}.npz")
        x, y = l2_normalize(saved["features"]), saved["labels"]
        for seed in a.seeds:
            res = regimes(x, y, l2_normalize(saved["copies"]), saved["copied"], rerank, seed)
            append_record(
                a.out, {"setting": text, "seed": seed, "split": "test", "model": model, "items": len(x), **res}
            )
        print(f"{text}: test recorded", flush=True)


def stage_cost(a) -> None:
    """Milliseconds per query (batch of 64 queries) of raw cosine search and of each re-ranking's search, and the
    seconds to compute a collection's neighbour lists, on clustered random 512-d vectors."""
    from momentum_proxy.retrieval.faiss_store import FaissStore  # lazy: only this stage builds stores
    from momentum_proxy.retrieval.rerank import Rerank, rerank_store, store_neighbours

    rng = np.random.default_rng(0)
    for n in a.sizes:
        centres = rng.standard_normal((max(1, n // 60), 512)).astype(np.float32)
        x = l2_normalize(
            centres[rng.integers(0, len(centres), n)]
            + 1.2 * rng.standard_normal((n, 512)).astype(np.float32) / math.sqrt(512) * math.sqrt(512) * 0.05
        )
        store = FaissStore.build(x, [f"{i}.jpg" for i in range(n)], None)
        q = x[rng.choice(n, 64, replace=False)]
        start = time.perf_counter()
        store.search(q, 10)
        rec = {"items": n, "plain_ms": 1000 * (time.perf_counter() - start) / len(q)}
        if n <= a.rerank_up_to:
            r = Rerank(DEFAULT_RERANK)  # the default: dba, k 5, alpha 3, keep 1
            start = time.perf_counter()
            store_neighbours(store, r.list_size + 1)
            rec["neighbour_lists_s"] = time.perf_counter() - start
            start = time.perf_counter()
            rerank_store(store, q, 10, r)
            rec["rerank_ms"] = 1000 * (time.perf_counter() - start) / len(q)
        append_record(a.out, {"split": "cost", **rec})
        print(json.dumps(rec), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    sub = p.add_subparsers(dest="stage", required=True)
    for name in ("embed", "val", "table", "test", "cost"):
        s = sub.add_parser(name, allow_abbrev=False)
        s.add_argument("--out", type=Path, required=True)
        s.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1, 2])
    sub.choices["embed"].add_argument("--src", type=Path, required=True)
    sub.choices["embed"].add_argument("--epochs", type=int, default=0, help="0: the pretrained start")
    sub.choices["embed"].add_argument(
        "--val-classes",
        type=val_classes_option,
        default="0.5",
        help="with --epochs N > 0: first-half species kept out of training (a count or share, `prepare folder "
        "--val-classes`); they are the development species",
    )
    sub.choices["embed"].add_argument("--test", action="store_true", help="also embed the test species")
    sub.choices["embed"].add_argument("--ttas", nargs="+", default=["none", "flip"], choices=("none", "flip"))
    sub.choices["embed"].add_argument(
        "--train-args", nargs=argparse.REMAINDER, default=[], help="the rest of the line goes to mproxy train"
    )
    sub.choices["val"].add_argument("--settings", nargs="+", help='e.g. "none none" (default: SETTINGS)')
    sub.choices["table"].add_argument("--split", default="dev", choices=("dev", "test"))
    sub.choices["test"].add_argument("--pick", nargs="+", required=True)
    sub.choices["cost"].add_argument(
        "--sizes", type=lambda t: [int(v) for v in t.split(",")], default=[20_000, 100_000, 1_000_000]
    )
    sub.choices["cost"].add_argument("--rerank-up-to", type=int, default=100_000)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    {"embed": stage_embed, "val": stage_val, "table": stage_table, "test": stage_test, "cost": stage_cost}[a.stage](a)


if __name__ == "__main__":
    main()
