"""The T-SAM script's positional, named and X/Y/Z forms → validated settings; infotext round trip."""

from __future__ import annotations

import math

import pytest

from seg_tsam.extension.core.settings import SettingsError
from seg_tsam.extension.core.tsam import TsamSettings
from seg_tsam.extension.core import fields

POSITIONAL = fields.positional_names(TsamSettings)
INFOTEXT_KEYS = fields.infotext_keys(TsamSettings)
to_infotext = fields.to_infotext


def from_infotext(params):
    return fields.from_infotext(TsamSettings, params)


def settings_from_args(args, overrides=None):
    return fields.from_args(TsamSettings, args, overrides)

#: What the UI sends with every control at its default (gradio sliders send floats).
UI_DEFAULTS = [False, 5.0, 0.6, 1.0, "0,0.2,0.4", 20.0, "official", 3.0, False]


def test_positional_order_matches_the_ui_defaults():
    assert len(UI_DEFAULTS) == len(POSITIONAL)
    assert settings_from_args(UI_DEFAULTS) == TsamSettings()


def test_positional_values():
    args = [True, 40, 0.5, 2, "0, 0.25", 10, "paper", 4, True]
    assert settings_from_args(args) == TsamSettings(
        enabled=True, strength=40.0, active_fraction=0.5, iterations=2, refinement_steps="0,0.25",
        refinement_iterations=10, loss="paper", power=4.0, show_maps=True,
    )


def test_numeric_strings_are_accepted_and_normalised():
    settings = settings_from_args([True, "7.5", "0.4", "3", "none", "0", "official", "3"])
    assert (settings.strength, settings.active_fraction, settings.iterations) == (7.5, 0.4, 3)
    assert settings.refinement_steps == "none" and settings.refinement_fractions == ()


def test_short_positional_list_keeps_defaults():
    assert settings_from_args([True, 10]) == TsamSettings(enabled=True, strength=10)
    assert settings_from_args([]) == TsamSettings()


def test_named_form():
    settings = settings_from_args([{"strength": 40, "loss": "paper", "power": 4}, "ignored"])
    assert settings == TsamSettings(enabled=True, strength=40, loss="paper", power=4)
    assert settings_from_args([{"enabled": False}]).enabled is False
    assert settings_from_args([{}]).enabled is True


def test_named_and_positional_forms_agree():
    named = settings_from_args([{"strength": 12, "active_fraction": 0.3, "refinement_steps": "none"}])
    positional = settings_from_args([True, 12, 0.3, 1, "none"])
    assert named == positional


def test_overrides_turn_tsam_on_and_are_validated():
    settings = settings_from_args(UI_DEFAULTS, {"strength": "20", "loss": "paper"})
    assert settings.enabled and settings.strength == 20.0 and settings.loss == "paper"
    with pytest.raises(SettingsError, match="unknown T-SAM override"):
        settings_from_args(UI_DEFAULTS, {"alpha": 1})
    with pytest.raises(SettingsError, match="iterations"):
        settings_from_args(UI_DEFAULTS, {"iterations": 2.5})


@pytest.mark.parametrize(
    "args, message",
    [
        ([True, "abc"], "strength: expected a number"),
        ([True, -1], r"strength: must be in \[0, 1000\]"),
        ([True, None], "strength: expected a number"),
        ([True, float("nan")], "strength: NaN"),
        ([True, math.inf], "strength: must be in"),
        ([True, 5, 1.5], "active_fraction: must be a fraction"),
        ([True, 5, 0.6, 0], r"iterations: must be in \[1, 50\]"),
        ([True, 5, 0.6, 1.5], "iterations: expected a whole number"),
        ([True, 5, 0.6, 1, "0,1.2"], "refinement_steps: each entry is a fraction"),
        ([True, 5, 0.6, 1, "zero"], "refinement_steps: expected a number"),
        ([True, 5, 0.6, 1, 7], "refinement_steps: expected fractions"),
        ([True, 5, 0.6, 1, "none", -1], "refinement_iterations: must be in"),
        ([True, 5, 0.6, 1, "none", 0, "l2"], "loss: must be one of official, paper"),
        ([True, 5, 0.6, 1, "none", 0, "paper", 0], r"power: must be in \(0, 16\]"),
        ([True, 5, 0.6, 1, "none", 0, "paper", 4, "yes"], "show_maps: expected true or false"),
        (["yes"], "enabled: expected true or false"),
        ([{"strength": 3, "alpha": 1}], "unknown T-SAM setting"),
        ([{"loss": "both"}], "loss: must be one of"),
    ],
)
def test_malformed_arguments_name_the_field(args, message):
    with pytest.raises(SettingsError, match=message):
        settings_from_args(args)


def test_has_effect():
    assert not TsamSettings().has_effect
    assert TsamSettings(enabled=True).has_effect
    assert not TsamSettings(enabled=True, strength=0).has_effect
    assert not TsamSettings(enabled=True, active_fraction=0).has_effect


def test_infotext_keys_cover_every_generation_setting():
    fields = set(TsamSettings().to_dict()) - {"enabled", "show_maps"}
    assert set(INFOTEXT_KEYS) == fields
    assert all(key.startswith("T-SAM ") for key in INFOTEXT_KEYS.values())
    assert len(set(INFOTEXT_KEYS.values())) == len(INFOTEXT_KEYS)


def test_infotext_is_empty_when_off():
    assert to_infotext(TsamSettings()) == {}
    assert from_infotext({"Steps": "20", "SEG scale": "3"}) == TsamSettings(enabled=False)


@pytest.mark.parametrize(
    "settings",
    [
        TsamSettings(enabled=True),
        TsamSettings(enabled=True, strength=40, active_fraction=0.5, iterations=3, refinement_steps="none",
                     refinement_iterations=0, loss="paper", power=4),
        TsamSettings(enabled=True, strength=0.5, refinement_steps="0.1,0.35", refinement_iterations=7, power=2.5),
    ],
)
def test_infotext_round_trip(settings):
    written = to_infotext(settings)
    # What the WebUI's infotext parser gives back: every value as text.
    parsed = {key: str(value) for key, value in written.items()}
    assert from_infotext(parsed) == settings
    assert written["T-SAM strength"] == settings.strength


def test_infotext_round_trip_through_the_webui_quoting():
    """Values with commas are quoted by the WebUI (``json.dumps``) and unquoted on reading; the
    refinement fractions survive either way."""
    settings = TsamSettings(enabled=True, refinement_steps="0,0.2,0.4")
    assert to_infotext(settings)["T-SAM refinement steps"] == "0,0.2,0.4"
    assert from_infotext({"T-SAM strength": "5.0", "T-SAM refinement steps": "0,0.2,0.4"}) == settings


def test_partial_infotext_takes_defaults():
    assert from_infotext({"T-SAM strength": "9"}) == TsamSettings(enabled=True, strength=9)


def test_bad_infotext_value_raises():
    with pytest.raises(SettingsError, match="loss"):
        from_infotext({"T-SAM strength": "5", "T-SAM loss": "fancy"})
