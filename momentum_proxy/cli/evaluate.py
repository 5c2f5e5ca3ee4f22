"""`mproxy evaluate`: every retrieval metric of a run (or of an embeddings file, or against a saved index)."""

from __future__ import annotations

from pathlib import Path

from momentum_proxy.cli.options import CommaList, add_command, add_rerank_options, add_runtime_options, rerank_of
from momentum_proxy.config import DEFAULT_RERANK, DEFAULT_TTA, METRICS
from momentum_proxy.errors import UserError


def add_evaluate(sub) -> None:
    p = add_command(sub, "evaluate", help="all retrieval metrics of a run's best checkpoint or of an embeddings file")
    p.add_argument("run_dir", nargs="?", help="run folder")
    p.add_argument("--embeddings", help="evaluate a .npz (arrays features, labels, optional split) instead")
    p.add_argument("--metrics", type=CommaList(str), default=None, help="recall,precision@1,r_precision,map@r,nmi")
    p.add_argument(
        "--recalls",
        type=CommaList(int),
        default=None,
        help="K of Recall@K, comma-separated (default: the run's, else 1,2,4,8)",
    )
    p.add_argument(
        "--out",
        "--json",
        dest="out",
        help="write the results here (default: RUN_DIR/evaluate-RUNTIME[-TTA][-val][-RERANK].json, "
        f"e.g. evaluate-torch-{'-'.join(p for p in (DEFAULT_TTA, DEFAULT_RERANK) if p != 'none')}.json "
        "with the defaults; the run's "
        "eval.json, its test result from training, is never changed)",
    )
    add_runtime_options(p)
    p.add_argument(
        "--tta",
        default=None,
        help="test-time augmentation: none | flip (each image and its mirror "
        f"image, embeddings averaged; about twice the embedding time); default: "
        f"{DEFAULT_TTA} (an --embeddings file takes none only)",
    )
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="the run's split to evaluate: val to choose settings (e.g. --rerank), test once for the chosen one",
    )
    p.add_argument(
        "--index",
        help="search the run's test photos in this saved index (your real catalogue, built "
        "by `mproxy index`; classes matched by name) instead of the run's own gallery; "
        "writes RUN_DIR/evaluate-RUNTIME[-TTA][-RERANK]-index.json",
    )
    add_rerank_options(p)


def run_evaluate(a) -> None:
    if bool(a.run_dir) == bool(a.embeddings):
        raise UserError("give a run folder or --embeddings FILE.npz (one of them)")
    if a.index and (a.embeddings or a.split != "test"):
        raise UserError(
            "--index scores a run's test photos against the index; give a run folder, without "
            "--embeddings or --split val"
        )
    if a.embeddings and a.split != "test":
        raise UserError("--split applies to a run; an --embeddings file is evaluated on its own rows (its split array)")
    rerank = rerank_of(a)
    if a.embeddings and a.tta not in (None, "none"):
        raise UserError("--tta applies where a run's model embeds images; an --embeddings file is already embedded")
    unknown = [m for m in a.metrics or [] if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if a.out and Path(a.out).is_dir():
        raise UserError(f"--out {a.out} is a folder; a file is expected there")
    from momentum_proxy.evaluation.jobs import (  # job
        describe,
        evaluate_file,
        evaluate_run,
        evaluation_file,
        format_table,
    )

    out = a.out
    if a.index:
        from momentum_proxy.retrieval.catalogue import evaluate_index  # job

        summary = evaluate_index(
            a.run_dir,
            a.index,
            metrics=a.metrics,
            recalls=a.recalls,
            device=a.device,
            runtime=a.runtime,
            tta=a.tta,
            rerank=rerank,
            out=a.out,
        )
        print(describe(summary, a.run_dir))
        res = summary["test"]
        out = a.out or evaluation_file(a.run_dir, summary["runtime"], summary["tta"], rerank=rerank, index=True)
    elif a.embeddings:
        res = evaluate_file(a.embeddings, metrics=a.metrics, recalls=a.recalls, json_out=a.out, rerank=rerank)
        print(f"{a.embeddings}: rerank {rerank}")
    else:
        from momentum_proxy.deploy.runtimes import load_embedder  # job

        tta = a.tta or DEFAULT_TTA
        embedder = load_embedder(a.run_dir, a.runtime, a.device, tta)
        out = a.out or evaluation_file(a.run_dir, embedder.runtime, tta, split=a.split, rerank=rerank)
        summary = evaluate_run(
            a.run_dir, metrics=a.metrics, recalls=a.recalls, out=out, embedder=embedder, split=a.split, rerank=rerank
        )
        print(describe(summary, a.run_dir))
        res = summary[a.split]
    print(format_table(res))
    if out:
        print(f"written: {out}")
