"""The T-SAM script's arguments → :class:`TsamSettings` (no WebUI imports, so it is unit-tested).

Positional form, in the UI's order (``alwayson_scripts`` args)::

    [enabled, strength, active_fraction, iterations, refinement_steps, refinement_iterations,
     loss, power, show_maps]

Named form: one dict as the first argument, e.g. ``{"strength": 5, "loss": "paper", "power": 4}``
(keys as in :class:`TsamSettings`; ``enabled`` defaults to true; missing keys take defaults).
X/Y/Z axes put ``{field: value}`` overrides on ``p.tsam_overrides``; an axis turns T-SAM on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.settings import SettingsError
from ..core.tsam import TsamSettings

POSITIONAL = ("enabled", "strength", "active_fraction", "iterations", "refinement_steps", "refinement_iterations",
              "loss", "power", "show_maps")


def settings_from_args(args: Sequence[Any], overrides: Mapping[str, Any] | None = None) -> TsamSettings:
    """Validate the script's arguments; raise :class:`SettingsError` with a message for the user."""
    if args and isinstance(args[0], Mapping):
        settings = TsamSettings.from_mapping(args[0])
    else:
        settings = TsamSettings(**dict(zip(POSITIONAL, args)))
    if overrides:
        unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(TsamSettings)})
        if unknown:
            raise SettingsError(f"unknown T-SAM override(s) {unknown}")
        settings = dataclasses.replace(settings, **{**overrides, "enabled": True})
    return settings
