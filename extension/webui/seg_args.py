"""The SEG script's arguments → :class:`SegSettings` (no WebUI imports, so it is unit-tested).

Positional form, in the UI's order (``alwayson_scripts`` args)::

    [enabled, scale, sigma, layers, start, end, mode, hires_override, hires_scale, hires_sigma]

Named form: one dict as the first argument, e.g. ``{"scale": 3, "sigma": "inf", "layers": "mid"}``
(keys as in :class:`SegSettings`; ``enabled`` defaults to true; missing keys take defaults).
X/Y/Z axes put ``{field: value}`` overrides on ``p.seg_overrides``; an axis turns SEG on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.settings import SegSettings, SettingsError

POSITIONAL = ("enabled", "scale", "sigma", "layers", "start", "end", "mode", "hires_override", "hires_scale",
              "hires_sigma")


def settings_from_args(args: Sequence[Any], overrides: Mapping[str, Any] | None = None) -> SegSettings:
    """Validate the script's arguments; raise :class:`SettingsError` with a message for the user."""
    if args and isinstance(args[0], Mapping):
        settings = SegSettings.from_mapping(args[0])
    else:
        values = dict(zip(POSITIONAL, args))
        hires_override = values.pop("hires_override", False)
        if not hires_override:
            values.pop("hires_scale", None)
            values.pop("hires_sigma", None)
        settings = SegSettings(**values)
    if overrides:
        unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(SegSettings)})
        if unknown:
            raise SettingsError(f"unknown SEG override(s) {unknown}")
        settings = dataclasses.replace(settings, **{**overrides, "enabled": True})
    return settings
