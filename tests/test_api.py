"""The public Python API: every name `momentum_proxy` exports resolves, and importing the package loads no torch."""

import importlib
import subprocess
import sys

import pytest

import momentum_proxy


def test_every_public_name_resolves_to_the_object_in_its_module():
    for name, module in momentum_proxy._PUBLIC.items():
        assert getattr(momentum_proxy, name) is getattr(importlib.import_module(module), name), name
    assert set(momentum_proxy.__all__) == {"__version__", *momentum_proxy._PUBLIC}


def test_importing_the_package_imports_no_torch_until_a_name_is_used():
    code = (
        "import sys, momentum_proxy; assert 'torch' not in sys.modules; "
        "momentum_proxy.TrainConfig; assert 'torch' not in sys.modules; "
        "momentum_proxy.MomentumProxyUpdate; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = momentum_proxy.nope
