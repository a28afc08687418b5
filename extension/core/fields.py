"""Settings fields that carry their own metadata: the one definition every surface derives from.

A settings class (:class:`~.settings.SegSettings`, :class:`~.tsam.TsamSettings`) is a frozen
dataclass whose fields are made with :func:`setting`. Each field says once:

- its default and how a raw value becomes a valid one (``parse``: raises
  :class:`SettingsError` naming the field);
- how a person sees it: ``label``, one line of ``info``, and a :class:`Control` (widget kind,
  range or choices);
- its infotext key (``infotext``), its X/Y/Z axis label (``axis``), and ``only_with``: the
  name of a boolean field without which it does not apply (the hires-fix override).

Users change the defaults the WebUI way, with Settings → Defaults (the WebUI saves the
widgets' values; no settings of our own duplicate that).

From that, this module derives the API's positional order (the field order) and named form,
infotext in and out, and the README's control tables; the WebUI glue derives widgets,
``infotext_fields`` and the X/Y/Z axes. Adding a field is one
:func:`setting` line plus its use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages (a 10 000-digit value stays readable)."""
    if isinstance(value, int) and value.bit_length() > 3 * limit:  # repr() refuses > 4300 digits
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SettingsError(ValueError):
    """A setting out of range or of the wrong type; the message names the field."""


@dataclass(frozen=True)
class Control:
    """The widget a field is shown with: ``kind`` is checkbox, slider, dropdown, text or radio."""

    kind: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    custom_values: bool = False  #: a dropdown that also takes typed values


@dataclass(frozen=True)
class FieldSpec:
    """Everything about one setting except its name and default (see the module docstring)."""

    label: str
    info: str
    control: Control
    parse: Callable[[Any], Any]
    infotext: str | None = None
    axis: str | None = None
    only_with: str | None = None
    api_note: str = ""  #: what the API accepts beyond the widget's range, for the docs
    widget_default: Any = None  #: what the widget shows for a field whose default is unset (None)
    format: Callable[[Any], Any] | None = None  #: how a value is written (infotext, API dicts, docs)


def setting(default: Any, **spec: Any) -> Any:
    """A dataclass field with its :class:`FieldSpec` (keyword arguments) as metadata."""
    return dataclasses.field(default=default, metadata={"spec": FieldSpec(**spec)})


@dataclass(frozen=True)
class Field:
    name: str
    default: Any
    spec: FieldSpec


def fields_of(cls: type) -> tuple[Field, ...]:
    """The settings fields of ``cls`` in their positional (API and UI) order."""
    return tuple(Field(f.name, f.default, f.metadata["spec"]) for f in dataclasses.fields(cls))


def field_named(cls: type, name: str) -> Field:
    return next(field for field in fields_of(cls) if field.name == name)


def axis_type(field: Field) -> type:
    """The X/Y/Z axis type: int/float for numeric fields (so ranges like ``1-5 (+1)`` work), else str
    (σ takes ``inf``)."""
    default = field.default
    if isinstance(default, bool) or not isinstance(default, (int, float)) or not math.isfinite(default):
        return str
    return type(default)


def gates(cls: type) -> dict[str, list[Field]]:
    """Each flag other fields need (their ``only_with``), with the fields that need it."""
    needed: dict[str, list[Field]] = {}
    for field in fields_of(cls):
        if field.spec.only_with:
            needed.setdefault(field.spec.only_with, []).append(field)
    return needed


def positional_names(cls: type) -> tuple[str, ...]:
    return tuple(field.name for field in fields_of(cls))


def validate_fields(settings: Any) -> None:
    """Run every field's parser on a frozen dataclass instance and store the normalised values.

    A field with an ``only_with`` flag that is set (not its default) turns that flag on; the
    positional form, where the flag is a checkbox of its own, drops such values first when the
    checkbox is off (:func:`from_args`)."""
    cls = type(settings)
    values = {field.name: field.spec.parse(getattr(settings, field.name)) for field in fields_of(cls)}
    for field in fields_of(cls):
        if field.spec.only_with and values[field.name] != field.spec.parse(field.default):
            values[field.spec.only_with] = True
    for name, value in values.items():
        object.__setattr__(settings, name, value)


def _without_gated_off(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Positional values of fields whose flag is off do not apply: dropped unvalidated (off means off)."""
    gates = {field.name: field.spec.only_with for field in fields_of(cls)}
    return {name: value for name, value in values.items() if not gates[name] or values.get(gates[name])}


def from_mapping(cls: type, values: Mapping[str, Any], *, enabled_default: bool = True):
    """Settings from the API's named dict: unknown keys are an error, missing ones take the
    defaults, ``enabled`` defaults to ``enabled_default``."""
    if not isinstance(values, Mapping):
        raise SettingsError(f"expected a dict of {cls.METHOD} settings, got {type(values).__name__}")
    known = positional_names(cls)
    unknown = sorted(str(key) for key in set(values) - set(known))
    if unknown:
        raise SettingsError(f"unknown {cls.METHOD} setting(s) {unknown}; known: {sorted(known)}")
    return cls(**{"enabled": enabled_default, **values})


def from_args(cls: type, args: Sequence[Any], overrides: Mapping[str, Any] | None = None):
    """Settings from a script's arguments: positional in field order, or one named dict first.

    ``overrides`` (X/Y/Z cells) replace fields and turn the method on. A method that is off reads
    nothing but its switch: off means off, whatever the other values are (the UI keeps the
    values of a switched-off accordion, the API's defaults may be anything)."""
    named = bool(args) and isinstance(args[0], Mapping)
    values = dict(args[0]) if named else dict(zip(positional_names(cls), args))
    enabled = values.get("enabled", named)
    if overrides:
        enabled = True
    if enabled is False:
        return cls()
    fields_of(cls)[0].spec.parse(enabled)  # a switch that is neither true nor false is an error
    if named:
        settings = from_mapping(cls, values)
    else:
        settings = cls(**_without_gated_off(cls, values))
    if overrides:
        unknown = sorted(set(overrides) - set(positional_names(cls)))
        if unknown:
            raise SettingsError(f"unknown {cls.METHOD} override(s) {unknown}")
        settings = dataclasses.replace(settings, **{**overrides, "enabled": True})
    return settings


def infotext_keys(cls: type) -> dict[str, str]:
    """``{field: infotext key}`` of the fields written into the generation info."""
    return {field.name: field.spec.infotext for field in fields_of(cls) if field.spec.infotext}


def display(value: Any, field: Field) -> Any:
    """How ``field``'s value is written out (infotext, API dicts, docs): its ``format``, else
    infinities as ``inf``; unset (None) stays None."""
    if value is None:
        return None
    if field.spec.format is not None:
        return field.spec.format(value)
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def to_infotext(settings: Any) -> dict[str, Any]:
    """Infotext entries; empty when the method is off. Fields whose flag is off are left out."""
    if not settings.enabled:
        return {}
    entries = {}
    for field in fields_of(type(settings)):
        gate = field.spec.only_with
        value = getattr(settings, field.name)
        if field.spec.infotext and value is not None and (gate is None or getattr(settings, gate)):
            entries[field.spec.infotext] = display(value, field)
    return entries


def enabled_in_infotext(cls: type, params: Mapping[str, Any]) -> bool:
    return any(key in params for key in infotext_keys(cls).values())


def gate_in_infotext(cls: type, gate: str, params: Mapping[str, Any]) -> bool:
    """Whether pasted infotext turns the flag ``gate`` on: any of the keys that need it is there."""
    return any(field.spec.infotext in params for field in gates(cls)[gate] if field.spec.infotext)


def switch_key(cls: type, name: str) -> str:
    """The infotext_fields name of a switch (``enabled`` or a flag others need), e.g. ``SEG enabled``.

    Switches are not written into the infotext: pasting sets them from whether the keys they
    govern are there (:func:`enabled_in_infotext`, :func:`gate_in_infotext`). The name lets the
    WebUI's "Send to img2img/txt2img", which copies widgets by name, copy the switch too."""
    return f"{cls.METHOD} {name.replace('_', ' ')}"


def from_infotext(cls: type, params: Mapping[str, Any]):
    """Settings from parsed infotext (``{"SEG scale": "3.0", …}``); off when none of its keys is there."""
    if not enabled_in_infotext(cls, params):
        return cls(enabled=False)
    values = {name: params[key] for name, key in infotext_keys(cls).items() if key in params}
    return cls(**{"enabled": True, **values})


def markdown_table(cls: type) -> str:
    """The README's control table of ``cls``: one row per field, in positional order."""
    rows = ["| control | API index / key | default | infotext | X/Y/Z axis | what it does |",
            "|---|---|---|---|---|---|"]
    for index, field in enumerate(fields_of(cls)):
        spec = field.spec
        info = spec.info + (f" {spec.api_note}" if spec.api_note else "")
        rows.append(f"| {spec.label} | {index} / `{field.name}` | `{'unset' if field.default is None else display(field.default, field)}` | "
                    f"{f'`{spec.infotext}`' if spec.infotext else '–'} | {spec.axis or '–'} | {info} |")
    return "\n".join(rows)
