"""The one exception type the CLI turns into a one-line error message, and the check for optional extras."""

import importlib.util

# The optional extras of pyproject.toml, each with the top-level modules the code needs from it.
EXTRAS = {
    "serve": ("fastapi", "fastapi_offline", "starlette", "pydantic", "uvicorn", "prometheus_client"),
    "export": ("onnx", "onnxruntime"),
    "tune": ("optuna",),
    "track": ("tensorboard",),
    "milvus": ("pymilvus", "milvus_lite"),
}


class UserError(ValueError):
    """Bad input from the user (missing file, unknown option, ...): the CLI reports it in one line, no traceback.
    A `ValueError`, so that a Python caller of the library API catches it as the bad argument it is."""


def require_extra(extra: str, what: str) -> None:
    """Raise a UserError naming the extra to install when one of `extra`'s modules is not installed (found, not
    imported: the command's cheap path checks still come before any heavy import)."""
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{what} needs the [{extra}] extra: pip install 'momentum-proxy[{extra}]'")
