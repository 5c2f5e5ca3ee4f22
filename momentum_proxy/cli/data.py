"""`mproxy prepare`: prepared datasets (images + manifest.csv) from generated or downloaded raw data."""

from __future__ import annotations

from pathlib import Path

from momentum_proxy.cli.options import add_command


def add_prepare(sub) -> None:
    p = add_command(sub, "prepare", help="make a prepared dataset (images + manifest.csv)")
    kinds = p.add_subcommands(dest="kind", required=True, metavar="KIND")
    s = add_command(kinds, "synthetic", help="generate the embedded fine-grained default dataset")
    s.add_argument("--classes", type=int, default=40, help="species (classes) to draw")
    s.add_argument("--per-class", type=int, default=30, help="images of each class")
    s.add_argument("--size", type=int, default=128, help="side of the square images, in pixels")
    s.add_argument("--seed", type=int, default=0, help="drawing and the choice of val classes")
    add_output_options(s, val_default="0.2")
    for kind, text in [
        ("folder", "an ImageFolder tree (one sub-folder per class)"),
        ("car", "Stanford Cars (cars_annos.mat + car_ims/)"),
        ("cub", "CUB-200-2011 (images.txt, ... , images/)"),
        ("sop", "Stanford Online Products (Ebay_train.txt, Ebay_test.txt)"),
        ("isc", "In-shop Clothes (list_eval_partition.txt, img/)"),
    ]:
        k = add_command(kinds, kind, help=text)
        k.add_argument("--src", required=True, help="the raw dataset folder")
        k.add_argument(
            "--max-side",
            "--short-side",
            dest="short_side",
            type=int,
            default=256,
            metavar="MAX_SIDE",
            help="resize once so the short side is at most this (0: keep originals' size)",
        )
        k.add_argument("--workers", type=int, default=1, help="processes for re-encoding (1 or 2)")
        if kind in ("car", "cub"):
            k.add_argument("--crop", action="store_true", help="cut each image to its annotated box")
        if kind == "folder":
            k.add_argument(
                "--split",
                choices=("classes", "images"),
                default="classes",
                help="classes: class-disjoint train/val/test classes (the benchmark protocol); images: "
                "every class in train, val and test, its photos divided (a model for your own "
                "catalogue; docs: Datasets)",
            )
            k.add_argument(
                "--val-fraction",
                type=float,
                default=0.2,
                help="--split images: share of each class's photos in val (0: none; so does --val-classes 0)",
            )
            k.add_argument(
                "--test-fraction", type=float, default=0.3, help="--split images: share of each class's photos in test"
            )
            k.add_argument("--split-file", help="CSV lines 'class_name,split' (train/val/test) instead of halves")
        k.add_argument(
            "--val-seed",
            type=int,
            default=0,
            help="seed of the choice of val classes (of each class's photos with --split images)",
        )
        add_output_options(k, val_default="0.2" if kind == "folder" else "0")


def add_output_options(p, val_default: str) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--val-classes",
        default=val_default,
        help="validation classes carved out of the train classes: a count (5) or a fraction (0.2); 0: none",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a prepared dataset already in --out")


def run_prepare(a) -> None:
    from momentum_proxy.data.manifest import parse_val_classes  # job
    from momentum_proxy.data.prepare import check_output  # job

    val = parse_val_classes(a.val_classes)
    check_output(Path(a.out), a.overwrite)
    if a.kind == "synthetic":
        from momentum_proxy.data.synthetic import generate_synthetic  # job

        out = generate_synthetic(
            a.out,
            classes=a.classes,
            per_class=a.per_class,
            size=a.size,
            seed=a.seed,
            val_classes=val,
            overwrite=a.overwrite,
        )
    else:
        from momentum_proxy.data.prepare import PREPARERS  # job

        kwargs = {
            "short_side": a.short_side or None,
            "workers": a.workers,
            "val_classes": val,
            "val_seed": a.val_seed,
            "overwrite": a.overwrite,
        }
        if a.kind in ("car", "cub"):
            kwargs["crop"] = a.crop
        if a.kind == "folder":
            kwargs.update(
                split_file=a.split_file, split=a.split, val_fraction=a.val_fraction, test_fraction=a.test_fraction
            )
        out = PREPARERS[a.kind](a.src, a.out, **kwargs)
    from momentum_proxy.data.manifest import describe_protocol, read_manifest, split_protocol  # job
    from momentum_proxy.data.prepare import split_counts  # job

    df = read_manifest(out)
    counts = split_counts(df)
    per_split = ", ".join(
        f"{s} {n} images / {counts['classes_per_split'][s]} classes" for s, n in counts["counts"].items()
    )
    print(f"prepared dataset: {out}: {counts['images']} images, {counts['classes']} classes ({per_split})")
    print(describe_protocol(split_protocol(df), "val" in counts["counts"]))
