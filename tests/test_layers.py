"""The package's shape is its architecture: imports run one way, from a layer to the layers below it.

Every import counts, those inside functions too, and each import inside a function says why it is there
(a comment on its line or the line above): such imports are kept for option parsing without torch and for
optional extras.
"""

import ast
from pathlib import Path

import momentum_proxy

ROOT = Path(momentum_proxy.__file__).parent
# Lowest first. Plain modules of the package root are the foundation; the application sits on top.
FOUNDATION = ("errors", "fileio", "paths", "perf", "config", "vectors", "plots", "runs", "distributed")
LAYERS = [
    FOUNDATION,
    ("data",),
    ("models",),
    ("embedding",),
    ("evaluation",),
    ("training",),
    ("deploy",),
    ("retrieval",),
    ("serving",),
    ("experiments",),
    ("demo", "cli", "__main__", "__init__"),  # cli: the package momentum_proxy/cli/, every module of it
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(("momentum_proxy", *parts)), path


def imports(path: Path):
    """(imported momentum_proxy module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if n is not f
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = (
                [node.module]
                if node.module != "momentum_proxy"
                else [
                    f"momentum_proxy.{a.name}"
                    if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").is_file()
                    else "momentum_proxy"
                    for a in node.names
                ]
            )
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in in_function


def layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return LAYER_OF[top]


def test_every_module_has_a_layer():
    for module, _ in modules():
        layer(module)  # KeyError names a module (or package) that belongs to no layer


def test_imports_run_down_the_layers_only():
    upward = []
    for module, path in modules():
        for name, line, _ in imports(path):
            if name.startswith("momentum_proxy.") and layer(name) > layer(module):
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} {module} imports {name}")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {module: set() for module, _ in modules()}
    for module, path in modules():
        for name, _, _ in imports(path):
            target = name if name in graph else f"{name}.__init__"
            if target in graph and target != module:
                graph[module].add(target)
    done, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node) :] + [node]))
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_imports_inside_functions_say_why():
    lines = {}
    silent = []
    for _, path in modules():
        text = lines.setdefault(path, path.read_text().splitlines())
        for name, line, inside in imports(path):
            if inside and "#" not in text[line - 1] and "#" not in text[line - 2]:
                silent.append(f"{path.relative_to(ROOT.parent)}:{line} import {name}")
    assert not silent, "imports inside functions without a reason:\n" + "\n".join(silent)
