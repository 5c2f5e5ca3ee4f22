"""Small functions: every function and method of the package is at most MAX_LINES lines long, from its `def` line
to its last line (docstring and comments included, decorators not)."""
import ast
from pathlib import Path

import momentum_proxy

ROOT = Path(momentum_proxy.__file__).parent
MAX_LINES = 60


def long_functions(root: Path, limit: int) -> list[str]:
    """`path:line name (N lines)` for each function below `root` longer than `limit` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_every_function_is_at_most_60_lines():
    offenders = long_functions(ROOT, MAX_LINES)
    assert not offenders, f"functions longer than {MAX_LINES} lines:\n" + "\n".join(offenders)


def test_a_long_function_is_named(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(60))
    (tmp_path / "long.py").write_text(f"def short():\n    return 1\n\n\nclass C:\n    def long(self):\n{body}\n")
    assert long_functions(tmp_path, MAX_LINES) == [f"{tmp_path.name}/long.py:6 long (61 lines)"]
