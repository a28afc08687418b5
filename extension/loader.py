"""Register this repository as the package ``seg_tsam`` and import its sub-packages.

The WebUI imports ``scripts/*.py`` by file path, with the extension folder on ``sys.path``
only during that import. Our sub-packages have generic names (``extension``, ``export``)
that other extensions also use, so a bare ``import extension`` could return a foreign
module already in ``sys.modules``. Instead the repository root becomes the ``__path__`` of
a uniquely named namespace package, ``seg_tsam``, and everything inside imports through it
(``seg_tsam.extension.core.blur``) or relatively.

This file is loaded by path (``importlib``), so it must not import anything of ours.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE_NAME = "seg_tsam"
REPO_ROOT = Path(__file__).resolve().parent.parent


def register_package(root: Path = REPO_ROOT) -> ModuleType:
    """Return the ``seg_tsam`` package rooted at ``root``, creating it on first use."""
    root = root.resolve()
    existing = sys.modules.get(PACKAGE_NAME)
    if existing is not None:
        paths = [Path(p).resolve() for p in getattr(existing, "__path__", [])]
        if root not in paths:
            raise ImportError(
                f"another copy of this extension is already loaded as {PACKAGE_NAME!r} "
                f"from {paths}; remove the duplicate from the extensions folder"
            )
        return existing
    spec = importlib.machinery.ModuleSpec(PACKAGE_NAME, None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(root)]
    sys.modules[PACKAGE_NAME] = package
    return package


def load(submodule: str, root: Path = REPO_ROOT) -> ModuleType:
    """Import ``seg_tsam.<submodule>`` (e.g. ``"extension.webui.script"``) from ``root``."""
    register_package(root)
    return importlib.import_module(f"{PACKAGE_NAME}.{submodule}")
