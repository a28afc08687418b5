"""The validated SEG settings and the value parsers every settings class shares.

Each field of :class:`SegSettings` is defined once with :func:`~.fields.setting`: default,
parser, label, info text, widget, infotext key, X/Y/Z axis. The API's positional and named
forms, infotext, the WebUI's widgets and X/Y/Z axes, and the README's
control table all derive from it (see ``fields.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from . import fields
from .blur import is_infinite_sigma
from .fields import Control, SettingsError, setting, shown
from .layers import LayerSpecError, parse_layer_spec


SEG_MODES = ("cond", "uncond")
MAX_SEG_SCALE = 100.0
INFINITY_WORDS = ("inf", "infinity", "∞", "+inf")
SIGMA_CHOICES = ("inf", "64", "32", "16", "8", "4", "2", "1", "0.5")

def parse_number(field: str, value: Any) -> float:
    """A finite-or-infinite float from a number or numeric string (bools and NaN rejected)."""
    if isinstance(value, bool) or value is None:
        raise SettingsError(f"{field}: expected a number, got {shown(value)}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in INFINITY_WORDS:
            return math.inf
        try:
            value = float(text)
        except ValueError:
            raise SettingsError(f"{field}: expected a number, got {shown(value)}") from None
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float: ±infinity, which range checks then refuse
        number = math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        raise SettingsError(f"{field}: expected a number, got {shown(value)}") from None
    if math.isnan(number):
        raise SettingsError(f"{field}: NaN is not allowed")
    return number


def parse_sigma(value: Any, field: str = "sigma") -> float:
    """Blur σ ≥ 0; ``inf``/``∞`` or anything above 9999 is infinite blur (returned as ``inf``)."""
    sigma = parse_number(field, value)
    if sigma < 0:
        raise SettingsError(f"{field}: must be ≥ 0 (0 = no blur, 'inf' = mean query), got {sigma}")
    return math.inf if is_infinite_sigma(sigma) else sigma


def format_sigma(sigma: float) -> str:
    return "inf" if math.isinf(sigma) else f"{sigma:g}"


def parse_flag(field: str) -> Any:
    def parse(value: Any) -> bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{field}: expected true or false, got {shown(value)}")
        return value

    return parse


def number_in(field: str, low: float, high: float) -> Any:
    """A parser for a number in ``[low, high]``."""

    def parse(value: Any) -> float:
        number = parse_number(field, value)
        if not low <= number <= high:
            raise SettingsError(f"{field}: must be in [{low:g}, {high:g}], got {number:g}")
        return number

    return parse


def plain_number(field: str) -> Any:
    """A number with no range of its own (checked together with other fields)."""
    return lambda value: parse_number(field, value)


def one_of(field: str, choices: tuple[str, ...]) -> Any:
    def parse(value: Any) -> str:
        if value not in choices:
            raise SettingsError(f"{field}: must be one of {', '.join(choices)}, got {shown(value)}")
        return value

    return parse


def optional(parse: Any) -> Any:
    """``parse``, with ``None`` (unset) passed through."""
    return lambda value: None if value is None else parse(value)


def sigma_field(field: str) -> Any:
    return lambda value: parse_sigma(value, field)


def parse_layers(value: Any) -> str:
    try:
        parse_layer_spec(value)
    except LayerSpecError as error:
        raise SettingsError(f"layers: {error}") from None
    return value.replace(" ", "").lower()


def step_fraction_active(step: int, total_steps: int, start: float, end: float) -> bool:
    """Whether step ``step`` (0-based) of ``total_steps`` lies in ``[start, end)`` of the schedule."""
    if total_steps <= 0:
        return False
    fraction = step / total_steps
    return start <= fraction < end


@dataclass(frozen=True)
class SegSettings:
    """Smoothed Energy Guidance settings (defaults: the paper's and the official code's)."""

    METHOD: ClassVar[str] = "SEG"  #: how messages, infotext switches and X/Y/Z axes name the method
    #: What it does and what it costs, in one line (the accordion shows it).
    DESCRIPTION: ClassVar[str] = (
        "Steers sampling away from a prediction made with blurred self-attention, for sharper structure "
        "without a negative prompt. Cost: one more row per image in each guided step (about +50 % time "
        "and memory over CFG).")

    enabled: bool = setting(
        False, label="Smoothed Energy Guidance", control=Control("checkbox"), parse=parse_flag("enabled"),
        info="On/off. Off by default, so requests that do not mention SEG are unchanged.")
    scale: float = setting(
        3.0, label="SEG scale", control=Control("slider", 0.0, 20.0, 0.1), parse=number_in("scale", 0, MAX_SEG_SCALE),
        infotext="SEG scale", axis="[SEG] Scale", api_note="The API accepts up to 100.",
        info="How strongly sampling is pushed away from the blurred prediction. 3 is the paper's value; 0 turns SEG off.")
    sigma: float = setting(
        math.inf, label="Blur σ", control=Control("dropdown", choices=SIGMA_CHOICES, custom_values=True),
        parse=sigma_field("sigma"), format=format_sigma, infotext="SEG sigma", axis="[SEG] Sigma",
        info="Blur width in tokens: inf (σ > 9999) uses the mean query, the strongest and the paper's best; "
             "smaller is gentler, 0 none.")
    layers: str = setting(
        "mid", label="Layers", control=Control("text"), parse=parse_layers, infotext="SEG layers",
        axis="[SEG] Layers",
        info="Self-attention layers whose queries are blurred: mid, down, up, all, or d/m/u with an index or "
             "range, e.g. mid or d4,d5,m0.")
    start: float = setting(
        0.0, label="Start", control=Control("slider", 0.0, 1.0, 0.01), parse=plain_number("start"),
        infotext="SEG start", axis="[SEG] Start",
        info="SEG acts from this fraction of the steps on (step i is guided when start ≤ i/steps < end).")
    end: float = setting(
        1.0, label="End", control=Control("slider", 0.0, 1.0, 0.01), parse=plain_number("end"),
        infotext="SEG end", axis="[SEG] End", info="… up to, not including, this fraction of the steps.")
    mode: str = setting(
        "cond", label="Blurred prediction", control=Control("radio", choices=SEG_MODES), parse=one_of("mode", SEG_MODES),
        infotext="SEG mode", axis="[SEG] Mode",
        info="cond: blur the prompt's prediction (official code); uncond: the negative prompt's (paper Eq. 10).")
    hires_override: bool = setting(
        False, label="Different scale and σ for the hires. fix pass", control=Control("checkbox"),
        parse=parse_flag("hires_override"),
        info="Use the two values below in the hires. fix second pass instead of the first pass's.")
    hires_scale: float | None = setting(
        None, label="Hires SEG scale", control=Control("slider", 0.0, 20.0, 0.1),
        parse=optional(number_in("hires_scale", 0, MAX_SEG_SCALE)), infotext="SEG hires scale",
        only_with="hires_override", api_note="The API accepts up to 100; giving it turns the override on.",
        widget_default=3.0, info="SEG scale of the hires. fix second pass (unset: the first pass's).")
    hires_sigma: float | None = setting(
        None, label="Hires blur σ", control=Control("dropdown", choices=SIGMA_CHOICES, custom_values=True),
        parse=optional(sigma_field("hires_sigma")), format=format_sigma, infotext="SEG hires sigma", only_with="hires_override",
        api_note="Giving it turns the override on.", widget_default="inf",
        info="Blur σ of the hires. fix second pass (unset: the first pass's).")

    def __post_init__(self) -> None:
        fields.validate_fields(self)
        if not 0.0 <= self.start < self.end <= 1.0:
            raise SettingsError(
                f"start/end: need 0 ≤ start < end ≤ 1 (fractions of the steps), got {self.start}, {self.end}")

    @property
    def has_effect(self) -> bool:
        """False when SEG would add nothing (off, scale 0 or σ 0): then no extra rows are run."""
        return self.enabled and self.scale > 0 and self.sigma > 0

    def active_at(self, step: int, total_steps: int) -> bool:
        return self.has_effect and step_fraction_active(step, total_steps, self.start, self.end)

    def for_hires_pass(self) -> SegSettings:
        """The settings of a hires-fix second pass: the override applied, if on."""
        if not self.hires_override:
            return self
        return dataclasses.replace(
            self, scale=self.scale if self.hires_scale is None else self.hires_scale,
            sigma=self.sigma if self.hires_sigma is None else self.hires_sigma,
            hires_override=False, hires_scale=None, hires_sigma=None)

    def to_infotext(self) -> dict[str, Any]:
        """Infotext entries (PNG info); empty when SEG is off."""
        return fields.to_infotext(self)

    @classmethod
    def from_infotext(cls, params: dict[str, Any]) -> SegSettings:
        """Settings from parsed infotext (``{"SEG scale": "3.0", …}``); off without SEG keys."""
        return fields.from_infotext(cls, params)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, enabled_default: bool = True) -> SegSettings:
        """Build from a named dict (API form); unknown keys are an error, missing ones default."""
        return fields.from_mapping(cls, values, enabled_default=enabled_default)

    def to_dict(self) -> dict[str, Any]:
        return {field.name: fields.display(getattr(self, field.name), field) for field in fields.fields_of(type(self))}


#: Infotext key of each field (written for every image, read back by paste / PNG info).
INFOTEXT_KEYS = fields.infotext_keys(SegSettings)
