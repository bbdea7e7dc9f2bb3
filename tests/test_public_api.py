"""The public surface: names, docstrings, the exception tree, packaging bits."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import tempest

PUBLIC_MODULES = ["tempest", "tempest.queues", "tempest.exceptions", "tempest.systemd",
                  "tempest.queues.protocol", "tempest.queues.sqlite",
                  "tempest.queues.postgres", "tempest.queues.redis", "tempest.testing"]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_is_sorted_and_matches_exports(module_name):
    """Each public module's __all__ is sorted and names only what it defines."""
    module = importlib.import_module(module_name)
    assert list(module.__all__) == sorted(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.{name} is in __all__ but missing"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module_name):
    """Users can read help() on every public class, function and method."""
    module = importlib.import_module(module_name)
    assert module.__doc__
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        assert obj.__doc__, f"{module_name}.{name} has no docstring"
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_"):
                    continue
                func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                if inspect.isfunction(func) or isinstance(value, property):
                    assert getattr(value, "__doc__", None) or func.__doc__, (
                        f"{module_name}.{name}.{attr} has no docstring")


def test_exception_tree():
    """TaskTimeout escapes `except Exception`; the library's errors share one root."""
    assert issubclass(tempest.TaskTimeout, BaseException)
    assert not issubclass(tempest.TaskTimeout, Exception)
    for error in (tempest.ConfigurationError, tempest.UnknownTask, tempest.TooManyAbandoned):
        assert issubclass(error, tempest.TempestError)
    assert issubclass(tempest.TempestError, Exception)
    assert str(tempest.TaskTimeout())  # a readable message even without arguments


def test_package_is_typed():
    """The package ships py.typed so type checkers use its annotations."""
    assert (Path(tempest.__file__).parent / "py.typed").exists()


def test_version_is_a_string():
    """tempest.__version__ is the installed version string."""
    assert isinstance(tempest.__version__, str) and tempest.__version__.count(".") >= 1
