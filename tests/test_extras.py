"""Optional extras: with their modules unimportable, as in a core-only install (`pip install momentum-proxy`), the
core commands work and each other command says, in one line, which extra to install.

The real `mproxy` runs in a subprocess whose import system does not find the modules of any extra
(`errors.EXTRAS`) nor pretrainedmodels (BN-Inception is defined in the project): `import onnx` fails and
`importlib.util.find_spec("onnx")` is None, as where they are not installed.
"""

import json
import subprocess
import sys

import pytest

from momentum_proxy.errors import EXTRAS

MISSING = sorted({m for modules in EXTRAS.values() for m in modules} | {"pretrainedmodels"})
CORE_ONLY_MPROXY = f"""
import sys
from importlib.machinery import PathFinder


class CoreOnly(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in {MISSING!r} else super().find_spec(name, path, target)


sys.meta_path[:] = [CoreOnly if finder is PathFinder else finder for finder in sys.meta_path]
from momentum_proxy.cli import main

main()
"""


def mproxy(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CORE_ONLY_MPROXY, *map(str, args)], capture_output=True, text=True, timeout=600
    )


def succeeds(*args) -> str:
    proc = mproxy(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def core_run(tiny_data, tmp_path_factory):
    """BN-Inception trained one epoch at 32 px without any extra."""
    run = tmp_path_factory.mktemp("core") / "run"
    succeeds(
        "train",
        "--data",
        tiny_data,
        "--out",
        run,
        "--backbone",
        "inception",
        "--pretrained",
        "none",
        "--epochs",
        1,
        "--image-size",
        32,
        "--batch-size",
        8,
        "--feature-dim",
        16,
        "--device",
        "cpu",
    )
    return run


def test_the_finder_makes_extras_unimportable():
    check = "import importlib.util; assert importlib.util.find_spec('onnx') is None; import optuna"
    proc = subprocess.run(
        [sys.executable, "-c", CORE_ONLY_MPROXY.replace("main()", check)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and "ModuleNotFoundError: No module named 'optuna'" in proc.stderr


NEXT = "--- next command ---"


def succeed_in_turn(*command_lines) -> list[str]:
    """The command lines run one after another by one core-only `mproxy` process (one start-up, not one each);
    the output of each."""
    many = f"import json\nfor line in json.loads(sys.argv[1]):\n    main(line)\n    print({NEXT!r}, flush=True)\n"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CORE_ONLY_MPROXY.replace("main()\n", many),
            json.dumps([[str(a) for a in line] for line in command_lines]),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = proc.stdout.split(NEXT + "\n")
    assert len(outputs) == len(command_lines) + 1 and outputs[-1] == "", proc.stdout[-3000:]
    return outputs[:-1]


@pytest.mark.slow  # five commands in fresh processes with the extras hidden: about 20 s; `.ci/run` runs it
def test_core_commands_need_no_extra(core_run, tiny_data, tmp_path):
    query = tiny_data / "images" / "species_04" / "0002.jpg"
    evaluated, retrieved, _, retrieved_from_index, _ = succeed_in_turn(
        ["evaluate", core_run, "--device", "cpu"],
        ["retrieve", core_run, "--query", query, "-k", 3, "--out", tmp_path / "r", "--device", "cpu"],
        ["index", core_run, "--images", tiny_data, "--out", tmp_path / "index", "--device", "cpu"],
        ["retrieve", "--index", tmp_path / "index", "--query", query, "--out", tmp_path / "r2", "--device", "cpu"],
        ["export", core_run, "--format", "torchscript", "--out", tmp_path / "model.pt"],
    )
    assert "map@r" in evaluated
    assert "retrieval picture:" in retrieved and (tmp_path / "r").is_dir()
    assert "retrieval picture:" in retrieved_from_index and (tmp_path / "index" / "meta.json").is_file()
    assert (tmp_path / "model.pt").is_file()


@pytest.mark.parametrize(
    "args,what,extra",
    [
        (["serve", "{run}/index"], "mproxy serve", "serve"),
        (["tune", "--data", "{data}", "--out", "{tmp}/study", "--trials", "1"], "mproxy tune", "tune"),
        (["tune-rerank", "{run}", "--out", "{tmp}/study", "--trials", "1"], "mproxy tune-rerank", "tune"),
        (["export", "{run}", "--out", "{tmp}/model.onnx"], "mproxy export", "export"),
        (["bench", "--data", "{data}"], "mproxy bench", "export"),
        (["evaluate", "{run}", "--runtime", "onnx"], "mproxy evaluate --runtime onnx", "export"),
        (["retrieve", "{run}", "--query", "q.png", "--runtime", "onnx"], "mproxy retrieve --runtime onnx", "export"),
        (["index", "{run}", "--out", "{tmp}/index", "--runtime", "onnx"], "mproxy index --runtime onnx", "export"),
        (
            ["train", "--data", "{data}", "--out", "{tmp}/run", "--log", "tensorboard"],
            "mproxy train --log tensorboard",
            "track",
        ),
        (
            ["index", "{run}", "--images", "{data}", "--out", "milvus:{tmp}/shop.db"],
            "mproxy index with a Milvus index",
            "milvus",
        ),
        (
            ["retrieve", "--index", "milvus://localhost:19530/shop", "--query", "q.png"],
            "mproxy retrieve with a Milvus index",
            "milvus",
        ),
    ],
)
def test_a_command_whose_extra_is_missing_names_it_in_one_line(core_run, tiny_data, tmp_path, args, what, extra):
    proc = mproxy(*[a.format(run=core_run, data=tiny_data, tmp=tmp_path) for a in args])
    assert proc.returncode == 2
    assert proc.stderr == f"mproxy: error: {what} needs the [{extra}] extra: pip install 'momentum-proxy[{extra}]'\n"
    assert not any(tmp_path.iterdir())  # refused before doing anything
