"""Index jobs: embed any image collection with a trained model into a saved faiss index, and search it."""
from __future__ import annotations

from pathlib import Path


from momentum_proxy.data.manifest import MANIFEST, read_manifest
from momentum_proxy.data.prepare import IMAGE_EXTS
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import read_json, write_json
from momentum_proxy.index import KINDS, RetrievalIndex, file_sha256
from momentum_proxy.inference import embed_files
from momentum_proxy.retrieval import Result, is_query, known_label, save_retrieval
from momentum_proxy.runs import BEST, RunDir


UNKNOWN = -1  # label of an indexed image whose class is not known


def model_identity(run_dir: str | Path) -> dict:
    """What an index records about the model that embedded it; a mismatch means the index is unusable."""
    run = RunDir(run_dir)
    cfg = run.config()
    return {"run": str(run.path.resolve()), "backbone": cfg.backbone, "feature_dim": cfg.feature_dim,
            "checkpoint_sha256": file_sha256(run / BEST)}


def collect_images(source: str | Path) -> tuple[list[str], list[int] | None]:
    """Image paths (and labels) of a prepared dataset, or every image file below a folder (no labels)."""
    source = Path(source)
    if (source / MANIFEST).exists():
        df = read_manifest(source)
        return [str(source / p) for p in df["path"]], df["label"].astype(int).tolist()
    if not source.is_dir():
        raise UserError(f"image folder not found: {source}")
    paths = sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise UserError(f"no images found in {source}")
    return paths, None


def build_index(run_dir: str | Path, images: str | Path, out: str | Path, *, kind: str = "exact",
                batch_size: int = 64, device: str = "auto", runtime: str = "torch") -> dict:
    """Embed `images` with the run's best model (in `runtime`) into the index at `out` (created, or extended
    when present; runtimes mix only as `runtime.check_mix` allows)."""
    from momentum_proxy.runtime import check_mix, load_embedder

    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    identity = model_identity(run_dir)
    out = Path(out)
    existing = RetrievalIndex.load(out, expect_model=identity) if (out / "meta.json").exists() else None
    paths, labels = collect_images(images)
    embedder = load_embedder(run_dir, runtime, device)
    mixed = check_mix(existing.model, embedder.identity) if existing is not None else runtime
    feats, kept, skipped = embed_files(embedder, paths, embedder.image_size, embedder.device, batch_size)
    if not kept:
        raise UserError(f"none of the {len(paths)} images in {images} could be read")
    if labels is not None:
        keep = set(kept)
        labels = [y for p, y in zip(paths, labels) if p in keep]
    if existing is None:
        index = RetrievalIndex.build(feats, kept, labels, kind=kind,
                                     model={**identity, "runtime": runtime, "verified": embedder.identity["verified"]})
    else:  # items without a known class get label -1 in a labelled index
        index = existing
        index.model["runtime"] = mixed
        if index.labels is None:
            labels = None
        elif labels is None:
            labels = [UNKNOWN] * len(kept)
        index.add(feats, kept, labels)
    index.save(out)
    if skipped:
        write_json(out / "skipped.json", [{"path": p, "reason": r} for p, r in skipped])
    summary = {"index": str(out), "kind": index.kind, "added": len(kept), "total": len(index),
               "skipped": len(skipped)}
    if index.kind != "exact":
        summary["recall@10_vs_exact"] = round(index.recall_vs_exact(10), 4)
    return summary


def retrieve_from_index(index_dir: str | Path, query: str | Path, k: int, out_dir: str | Path, *,
                        device: str = "auto", runtime: str = "torch") -> Path:
    """Top-k of a query image in a saved index: `out_dir/retrieval.png` + `out_dir/results.json`."""
    from momentum_proxy.runtime import check_mix, load_embedder

    query = Path(query)
    if not query.is_file():
        raise UserError(f"query image not found: {query}")
    meta_path = Path(index_dir) / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"no retrieval index in {index_dir}")
    run_dir = read_json(meta_path)["model"].get("run")
    if not run_dir or not RunDir(run_dir).has_run():
        raise UserError(f"the run that built {index_dir} ({run_dir}) is not available")
    index = RetrievalIndex.load(index_dir, expect_model=model_identity(run_dir))
    embedder = load_embedder(run_dir, runtime, device)
    check_mix(index.model, embedder.identity)
    feats, _, skipped = embed_files(embedder, [query], embedder.image_size, embedder.device)
    if skipped:
        raise UserError(f"cannot read query image {query}: {skipped[0][1]}")
    same = is_query(query, index.paths)
    label = known_label(same, index.labels)
    label = None if label == UNKNOWN else label
    hits = [h for h in index.hits(*index.search(feats, k + 1))[0] if not same[h.index]][:k]
    results = [Result(i + 1, h.path, h.label, h.score, None if label is None or h.label == UNKNOWN else h.label == label)
               for i, h in enumerate(hits)]
    return save_retrieval(query, label, results, out_dir)
