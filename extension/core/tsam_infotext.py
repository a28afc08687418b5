"""T-SAM settings ↔ infotext (the ``Key: value`` text the WebUI writes into every image).

Parallel to :meth:`SegSettings.to_infotext`/:meth:`SegSettings.from_infotext`, kept beside the
core's :class:`TsamSettings` so that the settings object stays the one source of truth: the
keys below are written for every image T-SAM changed, and read back by PNG info, the paste
button and the API's ``infotext`` field. "Show maps" is a display choice, not a generation
parameter, so it is not written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .tsam import TsamSettings

#: Infotext key of each field.
INFOTEXT_KEYS = {
    "strength": "T-SAM strength",
    "active_fraction": "T-SAM active fraction",
    "iterations": "T-SAM iterations",
    "refinement_steps": "T-SAM refinement steps",
    "refinement_iterations": "T-SAM refinement iterations",
    "loss": "T-SAM loss",
    "power": "T-SAM power",
}


def to_infotext(settings: TsamSettings) -> dict[str, Any]:
    """Infotext entries; empty when T-SAM is off."""
    if not settings.enabled:
        return {}
    values = settings.to_dict()
    return {key: values[field] for field, key in INFOTEXT_KEYS.items()}


def from_infotext(params: Mapping[str, Any]) -> TsamSettings:
    """Settings from parsed infotext (``{"T-SAM strength": "5.0", …}``); disabled without the strength key."""
    if INFOTEXT_KEYS["strength"] not in params:
        return TsamSettings(enabled=False)
    values = {field: params[key] for field, key in INFOTEXT_KEYS.items() if key in params}
    return TsamSettings(enabled=True, **values)
