"""The validated SEG settings: the one source for UI controls, API forms, infotext and X/Y/Z.

Every constructor path (keyword arguments, the API's named dict, pasted infotext) goes
through :meth:`SegSettings.__post_init__`, which normalises σ and raises
:class:`SettingsError` naming the field and the accepted range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .blur import is_infinite_sigma
from .layers import LayerSpecError, parse_layer_spec

SEG_MODES = ("cond", "uncond")
MAX_SEG_SCALE = 100.0
INFINITY_WORDS = ("inf", "infinity", "∞", "+inf")


class SettingsError(ValueError):
    """A setting out of range or of the wrong type; the message names the field."""


def parse_number(field: str, value: Any) -> float:
    """A finite-or-infinite float from a number or numeric string (bools and NaN rejected)."""
    if isinstance(value, bool) or value is None:
        raise SettingsError(f"{field}: expected a number, got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in INFINITY_WORDS:
            return math.inf
        try:
            value = float(text)
        except ValueError:
            raise SettingsError(f"{field}: expected a number, got {value!r}") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{field}: expected a number, got {value!r}") from None
    if math.isnan(number):
        raise SettingsError(f"{field}: NaN is not allowed")
    return number


def parse_sigma(value: Any) -> float:
    """Blur σ ≥ 0; ``inf``/``∞`` or anything above 9999 is infinite blur (returned as ``inf``)."""
    sigma = parse_number("sigma", value)
    if sigma < 0:
        raise SettingsError(f"sigma: must be ≥ 0 (0 = no blur, 'inf' = mean query), got {sigma}")
    return math.inf if is_infinite_sigma(sigma) else sigma


def format_sigma(sigma: float) -> str:
    return "inf" if math.isinf(sigma) else f"{sigma:g}"


def settings_from_mapping(cls, values: Mapping[str, Any], method: str, *, enabled_default: bool):
    """A settings dataclass from the API's named dict: unknown keys are an error, missing ones
    take the defaults, and ``enabled`` defaults to ``enabled_default``."""
    if not isinstance(values, Mapping):
        raise SettingsError(f"expected a dict of {method} settings, got {type(values).__name__}")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(f"unknown {method} setting(s) {unknown}; known: {sorted(known)}")
    return cls(**{"enabled": enabled_default, **values})


def step_fraction_active(step: int, total_steps: int, start: float, end: float) -> bool:
    """Whether step ``step`` (0-based) of ``total_steps`` lies in ``[start, end)`` of the schedule."""
    if total_steps <= 0:
        return False
    fraction = step / total_steps
    return start <= fraction < end


@dataclass(frozen=True)
class SegSettings:
    """Smoothed Energy Guidance settings (defaults: the paper's and the official code's)."""

    enabled: bool = False
    scale: float = 3.0  #: s, the SEG guidance scale
    sigma: float = math.inf  #: blur σ in tokens of the layer's grid; inf = mean query
    layers: str = "mid"  #: layer spec, see core/layers.py
    start: float = 0.0  #: active from this fraction of the schedule …
    end: float = 1.0  #: … up to (excluding) this one
    mode: str = "cond"  #: "cond" = official code, "uncond" = paper Eq. 10
    hires_scale: float | None = None  #: scale for a hires-fix second pass (None: same as first)
    hires_sigma: float | None = None  #: σ for a hires-fix second pass (None: same as first)

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise SettingsError(f"enabled: expected true or false, got {self.enabled!r}")
        scale = parse_number("scale", self.scale)
        if not 0.0 <= scale <= MAX_SEG_SCALE:
            raise SettingsError(f"scale: must be in [0, {MAX_SEG_SCALE:g}], got {scale}")
        start = parse_number("start", self.start)
        end = parse_number("end", self.end)
        if not 0.0 <= start < end <= 1.0:
            raise SettingsError(f"start/end: need 0 ≤ start < end ≤ 1 (fractions of the steps), got {start}, {end}")
        if self.mode not in SEG_MODES:
            raise SettingsError(f"mode: must be one of {', '.join(SEG_MODES)}, got {self.mode!r}")
        try:
            parse_layer_spec(self.layers)
        except LayerSpecError as error:
            raise SettingsError(f"layers: {error}") from None
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "sigma", parse_sigma(self.sigma))
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        object.__setattr__(self, "layers", self.layers.replace(" ", "").lower())
        if self.hires_scale is not None:
            hires_scale = parse_number("hires_scale", self.hires_scale)
            if not 0.0 <= hires_scale <= MAX_SEG_SCALE:
                raise SettingsError(f"hires_scale: must be in [0, {MAX_SEG_SCALE:g}], got {hires_scale}")
            object.__setattr__(self, "hires_scale", hires_scale)
        if self.hires_sigma is not None:
            object.__setattr__(self, "hires_sigma", parse_sigma(self.hires_sigma))

    @property
    def has_effect(self) -> bool:
        """False when SEG would add nothing (off, scale 0 or σ 0): then no extra rows are run."""
        return self.enabled and self.scale > 0 and self.sigma > 0

    def active_at(self, step: int, total_steps: int) -> bool:
        return self.has_effect and step_fraction_active(step, total_steps, self.start, self.end)

    def for_hires_pass(self) -> SegSettings:
        """The settings of a hires-fix second pass: the overrides applied, if any."""
        return dataclasses.replace(
            self,
            scale=self.scale if self.hires_scale is None else self.hires_scale,
            sigma=self.sigma if self.hires_sigma is None else self.hires_sigma,
            hires_scale=None,
            hires_sigma=None,
        )

    def to_infotext(self) -> dict[str, Any]:
        """Infotext entries (PNG info); empty when SEG is off."""
        if not self.enabled:
            return {}
        values = self.to_dict()
        return {key: values[field] for field, key in INFOTEXT_KEYS.items() if values[field] is not None}

    @classmethod
    def from_infotext(cls, params: Mapping[str, Any]) -> SegSettings:
        """Settings from parsed infotext (``{"SEG scale": "3.0", …}``); disabled when no SEG key."""
        if INFOTEXT_KEYS["scale"] not in params:
            return cls(enabled=False)
        values = {field: params[key] for field, key in INFOTEXT_KEYS.items() if key in params}
        return cls(enabled=True, **values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, enabled_default: bool = True) -> SegSettings:
        """Build from a named dict (API form); unknown keys are an error, missing ones default."""
        return settings_from_mapping(cls, values, "SEG", enabled_default=enabled_default)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["sigma"] = format_sigma(self.sigma)
        if self.hires_sigma is not None:
            values["hires_sigma"] = format_sigma(self.hires_sigma)
        return values


#: Infotext key of each field (written for every image, read back by paste / PNG info).
INFOTEXT_KEYS = {
    "scale": "SEG scale",
    "sigma": "SEG sigma",
    "layers": "SEG layers",
    "start": "SEG start",
    "end": "SEG end",
    "mode": "SEG mode",
    "hires_scale": "SEG hires scale",
    "hires_sigma": "SEG hires sigma",
}
