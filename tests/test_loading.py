"""Our packages load as ``seg_tsam.*`` even when foreign ``extension``/``export`` modules exist."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_foreign_extension_and_export_modules_do_not_shadow_ours(tmp_path):
    """Mimic the WebUI: another extension's ``extension``/``export`` packages are already imported,
    then our ``scripts/seg_tsam.py`` is imported by file path with our folder on ``sys.path``."""
    foreign = tmp_path / "other_extension"
    for name in ("extension", "export"):
        (foreign / name / "core").mkdir(parents=True)
        (foreign / name / "__init__.py").write_text("FOREIGN = True\n")
        (foreign / name / "core" / "__init__.py").write_text("FOREIGN = True\n")
    program = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.path.insert(0, {str(foreign)!r})
        import extension, export, extension.core
        sys.path.insert(0, {str(REPO_ROOT)!r})          # the WebUI prepends the extension folder
        spec = importlib.util.spec_from_file_location("seg_tsam.py", {str(REPO_ROOT / "scripts" / "seg_tsam.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.path.remove({str(REPO_ROOT)!r})              # … and removes it after the import
        from seg_tsam.extension.core import blur
        import seg_tsam.export
        assert blur.__file__.startswith({str(REPO_ROOT)!r}), blur.__file__
        assert seg_tsam.export.__file__.startswith({str(REPO_ROOT)!r})
        assert extension.FOREIGN and export.FOREIGN and extension.core.FOREIGN
        assert sys.modules["extension"] is extension and sys.modules["export"] is export
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_second_copy_is_refused(tmp_path):
    from seg_tsam.extension.loader import register_package

    try:
        register_package(tmp_path)
    except ImportError as error:
        assert "another copy" in str(error)
    else:
        raise AssertionError("a second root for seg_tsam was accepted")
