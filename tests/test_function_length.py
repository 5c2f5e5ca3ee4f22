"""Small functions: the body of every function and method of the package is at most MAX_LINES lines long, from its
first statement after the docstring to its last line (comments and blank lines included; the signature, which the
formatter lays out one parameter a line when it is long, the docstring and decorators not)."""

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
                body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
                lines = node.end_lineno - body[0].lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_every_function_is_at_most_60_lines():
    offenders = long_functions(ROOT, MAX_LINES)
    assert not offenders, f"functions longer than {MAX_LINES} lines:\n" + "\n".join(offenders)


def test_a_long_function_is_named(tmp_path):
    statements = [f"        x{i} = {i}" for i in range(61)]
    signature = "".join(f"        a{i},\n" for i in range(30))  # a long signature and a docstring are not counted
    fine = f'    def fine(\n{signature}    ):\n        """Doc.\n\n        More.\n        """\n' + "\n".join(
        statements[1:]
    )
    long = "    def long(self):\n" + "\n".join(statements)
    (tmp_path / "long.py").write_text(f"class C:\n{long}\n\n{fine}\n")
    assert long_functions(tmp_path, MAX_LINES) == [f"{tmp_path.name}/long.py:2 long (61 lines)"]
