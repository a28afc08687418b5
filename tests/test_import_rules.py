"""The folders show the layers, and this test keeps them honest.

Layers, lowest first; each may import only the ones before it (and itself):

1. ``extension/core``: the methods' math, pure torch, no host;
2. ``extension/adapters``: hosts' models and sampling loops (diffusers, A1111's ldm/sgm) in the
   core's terms;
3. ``export/``: the ONNX/TensorRT library; it knows UNets, not WebUIs;
4. ``extension/webui`` (the glue) and ``scripts/``: wire it all into a WebUI.

Only the glue imports the WebUI's ``modules.*`` (and gradio). Every import is read from the
source with ``ast``, relative ones resolved, function-level (lazy) ones included.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: layer name → (folder, the layers it may import)
LAYERS = {
    "core": ("extension/core", {"core"}),
    "adapters": ("extension/adapters", {"core", "adapters"}),
    "export": ("export", {"core", "adapters", "export"}),
    "trt_plugins": ("trt_plugins", {"trt_plugins"}),
    "glue": ("extension/webui", {"core", "adapters", "export", "glue", "trt_plugins"}),
    "scripts": ("scripts", {"core", "adapters", "export", "glue", "trt_plugins", "loader"}),
    "cli": ("extension/cli.py", {"core", "adapters"}),
    "loader": ("extension/loader.py", set()),
}
WEBUI_PACKAGES = ("modules", "gradio")
MAY_IMPORT_WEBUI = {"glue", "scripts"}


def layer_of_module(dotted: str) -> str | None:
    """The layer of ``extension.core.blur``-style names (relative to the repository root)."""
    path = dotted.replace(".", "/")
    for name, (folder, _) in LAYERS.items():
        folder = folder.removesuffix(".py")
        if path == folder or path.startswith(folder + "/"):
            return name
    return None


def source_files():
    for name, (folder, _) in LAYERS.items():
        root = REPO / folder
        for path in [root] if root.suffix == ".py" else sorted(root.rglob("*.py")):
            yield name, path


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute dotted name)`` of every import in ``path``; ours relative to the repository root."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
                # "from . import x" imports the module x
                names = [f"{target}.{alias.name}" for alias in node.names] if node.module is None else [target]
            else:
                names = [node.module]
            found += [(node.lineno, name) for name in names]
    return [(line, name.removeprefix("seg_tsam.")) for line, name in found]


CASES = [(layer, path) for layer, path in source_files()]


@pytest.mark.parametrize(("layer", "path"), CASES, ids=[str(path.relative_to(REPO)) for _, path in CASES])
def test_imports_follow_the_layers(layer, path):
    allowed = LAYERS[layer][1] | {layer}
    broken = []
    for line, name in imports_of(path):
        if name.split(".")[0] in WEBUI_PACKAGES and layer not in MAY_IMPORT_WEBUI:
            broken.append(f"line {line}: {name} (only the WebUI glue imports the WebUI)")
        target = layer_of_module(name)
        if target is not None and target not in allowed:
            broken.append(f"line {line}: {name} ({layer} may import {sorted(allowed)})")
    assert not broken, f"{path.relative_to(REPO)}:\n" + "\n".join(broken)


def test_the_rules_see_every_kind_of_import(tmp_path, monkeypatch):
    """The reader resolves relative, lazy and package imports (else the test above could pass vacuously)."""
    folder = tmp_path / "extension" / "core"
    folder.mkdir(parents=True)
    (folder / "x.py").write_text(
        "from ..webui import seg_script\nfrom . import blur\nimport torch\n"
        "def f():\n    from modules import shared\n    from ...export.registry import EngineRegistry\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    names = [name for _, name in imports_of(folder / "x.py")]
    assert names == ["extension.webui", "extension.core.blur", "torch", "modules", "export.registry"]
    assert [layer_of_module(name) for name in names] == ["glue", "core", None, None, "export"]
