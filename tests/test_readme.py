"""The README's command blocks keep running: every ```bash / ```console command is checked. Each `mproxy` line must
parse with the real parser (a renamed or removed option fails), each `make` target exist, each `pip install` extra
be declared, each tool be installed; the slow test runs the quick start as printed on tiny synthetic photos (the
serve/curl pair against a real server) and checks that the output lines the README shows still start the same."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, run_cli

from momentum_proxy.cli import parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, body) of every ```bash and ```console block."""
    return re.findall(r"^```(bash|console)\n(.*?)^```", markdown, flags=re.M | re.S)


def commands(language: str, body: str) -> list[tuple[list[str], list[str]]]:
    """(argv, the output lines printed under it) of each command of a block: a console block's `$ ` lines, every
    line of a bash block; comments dropped, `\\` continuations joined."""
    found: list[tuple[list[str], list[str]]] = []
    lines = iter(body.splitlines())
    for line in lines:
        if language == "console" and not line.startswith("$ "):
            if found and line:
                found[-1][1].append(line)
            continue
        while line.endswith("\\"):
            line = line[:-1] + next(lines)
        argv = shlex.split(line.removeprefix("$ "), comments=True)
        if argv:
            found.append((argv, []))
    return found


def readme_commands() -> list[tuple[list[str], list[str]]]:
    return [c for language, body in blocks(README.read_text()) for c in commands(language, body)]


def quick_start() -> list[tuple[list[str], list[str]]]:
    """The commands of the README's one console block (the quick start), in order."""
    consoles = [body for language, body in blocks(README.read_text()) if language == "console"]
    assert len(consoles) == 1, "the README should have one console block, its quick start"
    return commands("console", consoles[0])


def test_the_readme_blocks_are_found():
    programs = {argv[0] for argv, _ in readme_commands()}
    assert {"mproxy", "make", "pip", "curl"} <= programs, programs
    assert [argv[:2] for argv, _ in quick_start()][:2] == [["mproxy", "prepare"], ["mproxy", "train"]]


def pip_extras() -> set[str]:
    """The extras of pyproject.toml's [project.optional-dependencies] (tomllib is Python >= 3.11 only)."""
    table = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    return set(re.findall(r"^([\w-]+) = ", table, flags=re.M))


def check_without_running(argv: list[str]) -> None:
    """Fail unless `argv` would be understood: options parsed, target, extras, tool present."""
    program, args = argv[0], argv[1:]
    if program == "mproxy":
        try:
            parser().parse_args(args)
        except SystemExit as e:
            pytest.fail(f"the README's `{shlex.join(argv)}` does not parse (exit {e.code})")
    elif program == "make":
        for target in args:
            assert re.search(rf"^{re.escape(target)}:", (REPO / "Makefile").read_text(), re.M), f"no make {target}"
    elif program == "pip":
        assert args[0] == "install", argv
        for spec in args[1:]:
            extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec)
            assert extras, f"pip installs {spec}, not this checkout"
            unknown = set((extras[1] or "").split(",")) - pip_extras() - {""}
            assert not unknown, f"`{shlex.join(argv)}`: no extra {unknown} in pyproject.toml"
    elif program.startswith(".venv/bin/"):
        tool = Path(sys.executable).with_name(Path(program).name)
        assert tool.exists(), f"{program}: not installed by `make install`"
    elif program == "curl":
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\w+", args[-1]), f"curl of {args[-1]}"
    else:
        pytest.fail(f"the README runs {program}: teach tests/test_readme.py to check it")


@pytest.mark.parametrize("argv", [argv for argv, _ in readme_commands()], ids=shlex.join)
def test_every_readme_command_is_understood(argv):
    check_without_running(argv)


def test_a_renamed_option_would_fail():
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check_without_running(["mproxy", "retrieve", "runs/x", "--query", "q.jpg", "--top-k", "5"])
    with pytest.raises(AssertionError, match="no extra"):
        check_without_running(["pip", "install", ".[servers]"])


def test_the_quick_start_shows_todays_default_post_processing():
    from momentum_proxy.config import DEFAULT_RERANK, DEFAULT_TTA
    from momentum_proxy.retrieval.rerank import Rerank

    shown = "\n".join(line for _, printed in quick_start() for line in printed)
    rerank = Rerank(DEFAULT_RERANK)
    assert f"tta {DEFAULT_TTA}, rerank {rerank}" in shown, "re-run `mproxy evaluate RUN` and paste its output"
    assert f"re-ranked by {rerank}" in shown, "re-run `mproxy retrieve RUN ...` and paste its output"


# --- the quick start, run ------------------------------------------------------------------------------------------

FAST = {"--epochs": "1", "--image-size": "64", "--batch-size": "8"}  # the tiny photos' training: seconds, not minutes


def photos_for(argvs: list[list[str]], tiny_data: Path, folder: Path) -> None:
    """`folder`: tiny_data's species as class folders, with every photo a README command names (`photos/CLASS/FILE`,
    or `data/.../images/CLASS/FILE` once prepared) put in place of a species' first image."""
    named = {
        m.groups()
        for argv in argvs
        for a in argv
        if (m := re.search(r"(?:photos|images)/([^/\s]+)/([^/\s]+\.(?:jpg|jpeg|png))$", a))
    }
    species = sorted((tiny_data / "images").iterdir())
    assert len(named) < len(species)
    for (cls, name), source in zip(sorted(named), species):
        shutil.copytree(source, folder / cls)
        first = sorted((folder / cls).iterdir())[0]
        first.rename(folder / cls / name)
    for source in species[len(named) :]:
        shutil.copytree(source, folder / source.name)


def faster(argv: list[str]) -> list[str]:
    """The README's training options, with FAST's values."""
    return [FAST.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]


def labels(lines: list[str]) -> list[str]:
    """The `label:` beginnings of printed lines (`prepared dataset:`, `index:`), the part no data set changes."""
    return [m[0] for line in lines if (m := re.match(r"[A-Za-z][A-Za-z _-]*:", line))]


def serve_and_curl(index: list[str], curl: list[str], log: Path) -> str:
    """Start `mproxy INDEX` (serve) on a free port, run the curl against it, stop the server; curl's output."""
    from momentum_proxy.serving.app import wait_until_healthy

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "momentum_proxy", *index[1:], "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server, timeout=180, log=log)
        url = re.sub(r":\d+/", f":{port}/", curl[-1])
        return subprocess.run([*curl[:-1], url], capture_output=True, text=True, check=True, timeout=120).stdout
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow
def test_the_quick_start_runs_as_printed(tiny_data, tmp_path, monkeypatch, capsys):
    steps = quick_start()
    work = tmp_path / "readme run"
    photos_for([argv for argv, _ in steps], tiny_data, work / "photos")
    monkeypatch.chdir(work)
    for i, (argv, shown) in enumerate(steps):
        if argv[:2] == ["mproxy", "serve"]:
            curl, curl_shown = steps[i + 1]
            printed = serve_and_curl(argv, curl, tmp_path / "serve.log")
            assert printed.startswith(curl_shown[0].split("…")[0]), printed[:200]
            assert '"results":[{"rank":1' in printed
            continue
        if argv[0] == "curl":
            continue
        code, out, err = run_cli(faster(argv[1:]), capsys)
        assert code == 0, f"{shlex.join(argv)}: exit {code}\n{out}\n{err}"
        printed = (err + out).splitlines()
        missing = [label for label in labels(shown) if not any(p.startswith(label) for p in printed)]
        assert not missing, f"{shlex.join(argv)} no longer prints {missing}:\n{err}{out}"
