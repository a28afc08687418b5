"""The SEG script's positional, named and X/Y/Z forms → validated settings."""

from __future__ import annotations

import math

import pytest

from seg_tsam.extension.core.settings import SegSettings, SettingsError
from seg_tsam.extension.core import fields

POSITIONAL = fields.positional_names(SegSettings)


def settings_from_args(args, overrides=None):
    return fields.from_args(SegSettings, args, overrides)


UI_DEFAULTS = [False, 3.0, "inf", "mid", 0.0, 1.0, "cond", False, 3.0, "inf"]


def test_positional_order_matches_the_ui_defaults():
    assert len(UI_DEFAULTS) == len(POSITIONAL)
    assert settings_from_args(UI_DEFAULTS) == SegSettings()


def test_positional_values():
    args = [True, 4, "8", "d4,m0", 0.2, 0.8, "uncond", True, 2, "16"]
    settings = settings_from_args(args)
    assert settings == SegSettings(enabled=True, scale=4, sigma=8, layers="d4,m0", start=0.2, end=0.8,
                                   mode="uncond", hires_override=True, hires_scale=2, hires_sigma=16)


def test_hires_values_ignored_without_override():
    settings = settings_from_args([True, 3, "inf", "mid", 0, 1, "cond", False, "garbage", "garbage"])
    assert not settings.hires_override and settings.hires_scale is None and settings.hires_sigma is None


def test_short_positional_list_keeps_defaults():
    assert settings_from_args([True, 5]) == SegSettings(enabled=True, scale=5)


def test_named_form():
    settings = settings_from_args([{"scale": 3, "sigma": "inf", "layers": "mid"}, 99, "ignored"])
    assert settings == SegSettings(enabled=True)
    assert settings_from_args([{"enabled": False}]).enabled is False


def test_overrides_turn_seg_on():
    settings = settings_from_args(UI_DEFAULTS, {"sigma": "4"})
    assert settings.enabled and settings.sigma == 4.0
    with pytest.raises(SettingsError, match="unknown SEG override"):
        settings_from_args(UI_DEFAULTS, {"blur": 1})


@pytest.mark.parametrize(
    "args, message",
    [
        ([True, "abc"], "scale: expected a number"),
        ([True, 3, -2], "sigma: must be ≥ 0"),
        ([True, 3, float("nan")], "sigma: NaN"),
        ([True, 3, "inf", "z9"], "layers: unknown layer"),
        ([True, 3, "inf", "mid", 0.9, 0.1], "start/end"),
        ([{"scale": 3, "bogus": 1}], "unknown SEG setting"),
        (["yes"], "enabled: expected true or false"),
    ],
)
def test_bad_arguments(args, message):
    with pytest.raises(SettingsError, match=message):
        settings_from_args(args)


def test_infinite_sigma_from_a_large_number():
    assert settings_from_args([True, 3, 1e9]).sigma == math.inf
