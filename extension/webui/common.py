"""What the SEG and T-SAM scripts share: the settings section, request errors, option lookup."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def add_settings(options: dict[str, Any]) -> None:
    """Register ``{key: shared.OptionInfo}`` in the "SEG / T-SAM" settings section."""
    from modules import shared

    for key, info in options.items():
        info.section = SETTINGS_SECTION
        shared.opts.add_option(key, info)


def register_xyz_axes(overrides_attribute: str, axes: Sequence[tuple[str, type, str, Callable[[], list] | None]]) -> None:
    """Add ``(label, type, settings field, choices)`` axes to the X/Y/Z plot script, idempotently.

    A cell's value goes into ``p.<overrides_attribute>[field]``, which the script's
    ``process()`` applies over its arguments. The WebUI's own scripts load before extensions,
    so this works at import, before any UI is built, in UI and in API-only mode.
    """
    from modules import scripts

    xyz = next((data.module for data in scripts.scripts_data if data.script_class.__module__ == "xyz_grid.py"), None)
    if xyz is None:
        return

    def setter(field: str):
        def apply(p, value, values):
            setattr(p, overrides_attribute, {**getattr(p, overrides_attribute, {}), field: value})

        return apply

    known = {axis.label for axis in xyz.axis_options}
    xyz.axis_options.extend(
        xyz.AxisOption(label, kind, setter(field), choices=choices)
        for label, kind, field, choices in axes
        if label not in known
    )
