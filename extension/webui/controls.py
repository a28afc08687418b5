"""Gradio widgets, ``infotext_fields``, Settings options and X/Y/Z axes derived from settings fields.

Both scripts build their accordions with these from the fields' metadata
(:mod:`~seg_tsam.extension.core.fields`): a label, info text, range or choices and infotext key
are written once, on the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from ..core import fields
from ..core.fields import Field
from .common import option


def default_option_key(prefix: str, name: str) -> str:
    """The Settings key of a field's user default, e.g. ``seg_default_scale``."""
    return f"{prefix}_default_{name}"


def widget_value(field: Field, prefix: str) -> Any:
    """What a widget starts at: the user's default from Settings, else the field's default."""
    default = field.spec.widget_default if field.default is None else fields.display(field.default, field)
    if field.spec.user_default:
        default = option(default_option_key(prefix, field.name), default)
    return str(default) if field.spec.control.kind == "dropdown" else default


def component(field: Field, value: Any, elem_id: str) -> Any:
    """The gradio component for ``field`` (created inside the current layout block)."""
    spec, control = field.spec, field.spec.control
    common = dict(label=spec.label, info=spec.info, value=value, elem_id=elem_id)
    if control.kind == "checkbox":
        return gr.Checkbox(**common)
    if control.kind == "slider":
        return gr.Slider(minimum=control.minimum, maximum=control.maximum, step=control.step, **common)
    if control.kind == "dropdown":
        return gr.Dropdown(choices=list(control.choices), allow_custom_value=control.custom_values, **common)
    if control.kind == "radio":
        return gr.Radio(choices=list(control.choices), **common)
    if control.kind == "text":
        return gr.Textbox(**common)
    raise ValueError(f"{field.name}: unknown control kind {control.kind!r}")


def build_row(cls: type, names: Sequence[str], prefix: str, elem_id: Callable[[str], str]) -> dict[str, Any]:
    """One ``gr.Row`` with the widgets of ``names``; returns ``{name: component}``."""
    built = {}
    with gr.Row():
        for name in names:
            field = fields.field_named(cls, name)
            built[name] = component(field, widget_value(field, prefix), elem_id(name))
    return built


def infotext_fields(cls: type, widgets: dict[str, Any]) -> list[tuple[Any, Any]]:
    """The script's ``infotext_fields``: each field's widget with its infotext key; the on/off
    switch and every flag that other fields need are set from whether their keys are present."""
    entries: list[tuple[Any, Any]] = [(widgets["enabled"], lambda params: fields.enabled_in_infotext(cls, params))]
    gates = {field.spec.only_with for field in fields.fields_of(cls) if field.spec.only_with}
    for field in fields.fields_of(cls):
        if field.name in gates:
            entries.append((widgets[field.name], lambda params, gate=field.name: fields.gate_in_infotext(cls, gate, params)))
        elif field.spec.infotext:
            entries.append((widgets[field.name], field.spec.infotext))
    return entries


def settings_options(cls: type, prefix: str, method: str) -> dict[str, Any]:
    """``{key: shared.OptionInfo}`` for the fields with ``user_default``: Settings → SEG / T-SAM."""
    from modules import shared

    options = {}
    for field in fields.fields_of(cls):
        if not field.spec.user_default:
            continue
        control = field.spec.control
        component_args: dict[str, Any] = {}
        component = None
        if control.kind == "slider":
            component, component_args = gr.Slider, {"minimum": control.minimum, "maximum": control.maximum,
                                                    "step": control.step}
        elif control.kind == "radio":
            component, component_args = gr.Radio, {"choices": list(control.choices)}
        default = fields.display(field.default, field)
        options[default_option_key(prefix, field.name)] = shared.OptionInfo(
            str(default) if control.kind == "dropdown" else default, f"{method}: default {field.spec.label.lower()}",
            component, component_args).info(field.spec.info)
    return options


def xyz_axes(cls: type) -> list[tuple[str, type, str, Callable[[], list] | None]]:
    """``(axis label, type, field, choices)`` of every field with an X/Y/Z axis."""
    axes = []
    for field in fields.fields_of(cls):
        if field.spec.axis:
            choices = list(field.spec.control.choices)
            axes.append((field.spec.axis, fields.axis_type(field), field.name,
                         (lambda choices=choices: choices) if field.spec.control.kind == "radio" else None))
    return axes
