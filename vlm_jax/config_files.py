"""Loading `configs/*.py` files (each defines `get_config() -> ml_collections.ConfigDict`) from Python.

The command line loads them with `ml_collections.config_flags`; variants, tests and notebooks use these.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config_file(path: str | os.PathLike, argument: str | None = None) -> ml_collections.ConfigDict:
    """Runs the config file at `path` and returns its `get_config()` (`get_config(argument)` when given, as
    ``--config path:argument`` does)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist (expected a configs/*.py file with get_config())")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config()")
    return module.get_config() if argument is None else module.get_config(argument)


def load_sibling(config_file: str, name: str) -> ml_collections.ConfigDict:
    """`get_config()` of `name`.py in the folder of `config_file` (a variant's base: pass `__file__`)."""
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py"))
