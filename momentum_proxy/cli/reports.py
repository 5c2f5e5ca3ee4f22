"""`mproxy plot`, `report` and `demo`: figures and tables of runs, and the few-minute demo."""

from __future__ import annotations

from momentum_proxy.cli.options import DEVICE_HELP, add_command


def add_plot(sub) -> None:
    p = add_command(sub, "plot", help="figures: R@1 against momentum over a sweep, or one run's curves")
    p.add_argument(
        "what",
        choices=("momentum", "curves"),
        help="momentum: R@1 against the proxy momentum over a sweep; curves: one run's metrics by epoch",
    )
    p.add_argument("folder", help="a sweep folder (momentum) or a run folder (curves)")
    p.add_argument("--out", help="output path without extension (PNG and PDF are written)")


def run_plot(a) -> None:
    from momentum_proxy.experiments.sweep import plot_curves, plot_momentum  # job

    paths = (plot_momentum if a.what == "momentum" else plot_curves)(a.folder, a.out)
    print("\n".join(str(p) for p in paths))


def add_report(sub) -> None:
    p = add_command(sub, "report", help="Markdown Benchmarks table of all runs below a folder")
    p.add_argument("folder", help="folder searched for run folders (at any depth)")
    p.add_argument("--out", help="Markdown file (default: FOLDER/benchmarks.md)")


def run_report(a) -> None:
    from momentum_proxy.experiments.sweep import report  # job

    print(report(a.folder, a.out))


def add_demo(sub) -> None:
    p = add_command(sub, "demo", help="synthetic data -> train -> evaluate -> retrieve, in a few minutes on CPU")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's dataset, run and pictures")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def run_demo(a) -> None:
    from momentum_proxy.demo import demo  # job

    demo(a.out, epochs=a.epochs, device=a.device)
