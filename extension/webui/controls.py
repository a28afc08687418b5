"""Gradio widgets, ``infotext_fields``, paste names and X/Y/Z axes derived from settings fields.

Both scripts build their accordions with these from the fields' metadata
(:mod:`~seg_tsam.extension.core.fields`): a label, info text, range or choices and infotext key
are written once, on the field. Defaults are the fields' own; users change them with the
WebUI's Settings → Defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from ..core import fields
from ..core.fields import Field
from .infotext_switch import InfotextSwitch


def widget_value(field: Field) -> Any:
    """What a widget starts at: the field's default (``widget_default`` where that is unset)."""
    default = field.spec.widget_default if field.default is None else fields.display(field.default, field)
    return str(default) if field.spec.control.kind == "dropdown" else default


def component(field: Field, elem_id: str, *, interactive: bool = True) -> Any:
    """The gradio component for ``field`` (created inside the current layout block)."""
    spec, control = field.spec, field.spec.control
    common = dict(label=spec.label, info=spec.info, value=widget_value(field), elem_id=elem_id, interactive=interactive)
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


def build_row(cls: type, names: Sequence[str], elem_id: Callable[[str], str]) -> dict[str, Any]:
    """One ``gr.Row`` with the widgets of ``names``; returns ``{name: component}``. A widget whose
    field applies only with a flag starts greyed out (the flags start off); see :func:`link_gates`."""
    built = {}
    with gr.Row():
        for name in names:
            field = fields.field_named(cls, name)
            built[name] = component(field, elem_id(name), interactive=field.spec.only_with is None)
    return built


def link_gates(cls: type, widgets: dict[str, Any]) -> None:
    """Each flag's checkbox makes the widgets that need it editable, or greys them out. Outside a
    UI (the API builds the widgets only for their default values) there is nothing to link."""
    if getattr(gr.context.Context, "root_block", None) is None:
        return
    for gate, needing in fields.gates(cls).items():
        dependents = [widgets[field.name] for field in needing]
        widgets[gate].change(fn=lambda on, count=len(dependents): [gr.update(interactive=bool(on))] * count,
                             inputs=[widgets[gate]], outputs=dependents, show_progress=False)


def infotext_fields(cls: type, widgets: dict[str, Any]) -> list[tuple[Any, Any]]:
    """The script's ``infotext_fields``: each field's widget with its infotext key; the on/off
    switch and every flag that other fields need under an :class:`InfotextSwitch`."""
    gates = fields.gates(cls)
    entries: list[tuple[Any, Any]] = []
    for field in fields.fields_of(cls):
        if field.name == "enabled":
            entries.append((widgets[field.name], InfotextSwitch(
                fields.switch_key(cls, field.name), lambda params: fields.enabled_in_infotext(cls, params))))
        elif field.name in gates:
            entries.append((widgets[field.name], InfotextSwitch(
                fields.switch_key(cls, field.name),
                lambda params, gate=field.name: fields.gate_in_infotext(cls, gate, params))))
        elif field.spec.infotext:
            entries.append((widgets[field.name], field.spec.infotext))
    return entries


def paste_field_names(entries: list[tuple[Any, Any]]) -> list[str]:
    """What "Send to img2img/txt2img" copies: every named entry, switches included."""
    return [str(key) for _, key in entries if isinstance(key, str)]


def xyz_axes(cls: type) -> list[tuple[str, type, str, Callable[[], list] | None]]:
    """``(axis label, type, field, choices)`` of every field with an X/Y/Z axis."""
    axes = []
    for field in fields.fields_of(cls):
        if field.spec.axis:
            choices = list(field.spec.control.choices)
            axes.append((field.spec.axis, fields.axis_type(field), field.name,
                         (lambda choices=choices: choices) if field.spec.control.kind == "radio" else None))
    return axes
