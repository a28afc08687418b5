"""The Forge-family live tests reuse the AUTOMATIC1111 live suite's helpers (``test_live_seg``):
its folder goes on ``sys.path`` (as pytest does for ``tests/webui`` itself)."""

import sys
from pathlib import Path

WEBUI_TESTS = str(Path(__file__).resolve().parent.parent / "webui")
if WEBUI_TESTS not in sys.path:
    sys.path.insert(0, WEBUI_TESTS)
