"""What the SEG and T-SAM scripts share: the settings section, request errors, option lookup."""

from __future__ import annotations

from typing import Any

#: Settings → "SEG / T-SAM" (both scripts add their options here).
SETTINGS_SECTION = ("seg_tsam", "SEG / T-SAM")


class RequestError(RuntimeError):
    """Raised from ``p.sample`` so a bad request fails with a clear message.

    The WebUI's API error handler answers with the instance's ``status_code`` and ``detail``.
    """

    def __init__(self, message: str, status_code: int = 422):
        super().__init__(message)
        self.status_code = status_code
        self.detail = message


def option(key: str, default: Any) -> Any:
    """A WebUI setting, or ``default`` before the setting is registered or set."""
    from modules import shared

    return shared.opts.data.get(key, default)
