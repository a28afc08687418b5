"""What the SEG and T-SAM scripts share: the settings section, request errors, option lookup."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..core import fields
from ..core.fields import SettingsError
from ..core.layers import LayerSpecError

logger = logging.getLogger("seg_tsam")

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


#: Attribute set (True) on our replacement UNets (``sd_unet``): they apply SEG themselves.
REPLACEMENT_UNET_MARKER = "seg_tsam_replacement"


def foreign_replacement_unet() -> str | None:
    """The label of the active "SD Unet" replacement if it is not one of ours, else ``None``.

    SEG's and T-SAM's hooks live on the PyTorch UNet's modules; a foreign replacement UNet (for
    example another extension's TensorRT engine) never runs them, so SEG would change nothing
    and T-SAM would find no attention to align.
    """
    from modules import sd_unet

    current = sd_unet.current_unet
    if current is None or getattr(current, REPLACEMENT_UNET_MARKER, False):
        return None
    return str(getattr(getattr(current, "option", None), "label", None) or type(current).__name__)


def replacement_unet_message(feature: str, label: str) -> str:
    return (f"{feature} needs the checkpoint's own UNet, but the SD Unet setting runs {label!r} instead; "
            f"set Settings → SD Unet to None (or to a [SEG …] UNet of this extension)")


def refuse_foreign_replacement(feature: str, error: type[RequestError]) -> None:
    """Raise ``error`` when the active SD Unet replacement is not ours (call it inside ``p.sample``:
    the WebUI applies the SD Unet setting just before sampling)."""
    foreign = foreign_replacement_unet()
    if foreign is not None:
        raise error(replacement_unet_message(feature, foreign))


def fail_sampling(p: Any, error: RequestError) -> None:
    """Make ``p.sample`` raise ``error``: a bad request fails with its message, and nothing touched the model."""

    def sample(*args: Any, **kwargs: Any) -> Any:
        raise error

    p.sample = sample


def settings_or_fail(p: Any, cls: type, args: Sequence[Any], overrides: Any, error: type[RequestError], title: str,
                     check: Callable[[Any], None]) -> Any | None:
    """A script's validated settings from its arguments (``check`` runs when they have an effect:
    what the model or sampler must allow), or ``None`` after making ``p.sample`` fail with a message
    naming the script. Never lets an error through: the WebUI's script runner would swallow it and
    generate without the script."""
    try:
        settings = fields.from_args(cls, args, overrides)
        if settings.has_effect:
            check(settings)
        return settings
    except (SettingsError, LayerSpecError) as problem:
        logger.error("%s: %s", cls.METHOD, problem)
        fail_sampling(p, error(f"{title}: {problem}"))
    except Exception as problem:
        logger.exception("%s: could not read the arguments", cls.METHOD)
        fail_sampling(p, error(f"{title}: could not read the arguments: {problem!s:.200}"))
    return None


def axis_confirmer(cls: type, error: type[RequestError], title: str,
                   check: Callable[[Any], None] = lambda settings: None) -> Callable[[str, list], None]:
    """``confirm(field, values)`` for :func:`register_xyz_axes`: every value of an X/Y/Z axis
    validated (and ``check``-ed) before a cell runs; a bad one fails with a message naming it."""

    def confirm(field: str, values: list) -> None:
        for value in values:
            try:
                check(fields.from_args(cls, [], {field: value}))
            except (SettingsError, LayerSpecError) as problem:
                raise error(f"{title}: X/Y/Z value {fields.shown(value)}: {problem}") from None

    return confirm


def package_installed(package: str) -> bool:
    """Whether ``package`` can be imported, without importing it (heavy packages stay unloaded)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


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


def register_xyz_axes(overrides_attribute: str, axes: Sequence[tuple[str, type, str, Callable[[], list] | None]],
                      confirm: Callable[[str, list], None] | None = None) -> None:
    """Add ``(label, type, settings field, choices)`` axes to the X/Y/Z plot script, idempotently.

    A cell's value goes into ``p.<overrides_attribute>[field]``, which the script's
    ``process()`` applies over its arguments. ``confirm(field, values)`` checks an axis's values
    before any cell runs (X/Y/Z's own hook): a bad value stops the plot with its message instead
    of filling cells with black images. The WebUI's own scripts load before extensions,
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
    def confirmer(field: str):
        return None if confirm is None else (lambda p, values: confirm(field, list(values)))

    xyz.axis_options.extend(
        xyz.AxisOption(label, kind, setter(field), choices=choices, confirm=confirmer(field))
        for label, kind, field, choices in axes
        if label not in known
    )
