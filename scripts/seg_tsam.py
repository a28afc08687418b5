"""WebUI entry point. Thin on purpose: load our packages as ``seg_tsam.*`` and expose the scripts.

The WebUI imports this file by path; ``extension/loader.py`` is loaded the same way, so a
foreign ``extension`` or ``export`` module in ``sys.modules`` cannot shadow ours. Outside the
WebUI (no ``modules.scripts``) it only registers the package.
"""

import importlib.util
from pathlib import Path

_loader_spec = importlib.util.spec_from_file_location(
    "seg_tsam_loader", Path(__file__).resolve().parent.parent / "extension" / "loader.py"
)
_loader = importlib.util.module_from_spec(_loader_spec)
_loader_spec.loader.exec_module(_loader)
_loader.register_package()

try:
    import modules.scripts  # noqa: F401  (exists only inside the WebUI)
except ImportError:
    pass
else:
    _seg_script = _loader.load("extension.webui.seg_script")
    _seg_script.register_callbacks()
    SegScript = _seg_script.SegScript
    _tsam_script = _loader.load("extension.webui.tsam_script")
    _tsam_script.register_callbacks()
    TsamScript = _tsam_script.TsamScript
    _export_tab = _loader.load("extension.webui.export_tab")
    _export_tab.register_callbacks()
    if not _loader.load("extension.webui.host").HOST.is_forge:  # the Forge family never runs SD Unet replacements
        _loader.load("extension.webui.unet_options").register_callbacks()
