"""WebUI entry point. Thin on purpose: it only makes our packages importable as ``seg_tsam.*``.

The WebUI imports this file by path; ``extension/loader.py`` is loaded the same way, so a
foreign ``extension`` or ``export`` module in ``sys.modules`` cannot shadow ours.
"""

import importlib.util
from pathlib import Path

_loader_spec = importlib.util.spec_from_file_location(
    "seg_tsam_loader", Path(__file__).resolve().parent.parent / "extension" / "loader.py"
)
_loader = importlib.util.module_from_spec(_loader_spec)
_loader_spec.loader.exec_module(_loader)
_loader.register_package()
