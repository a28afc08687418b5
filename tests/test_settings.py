"""SEG settings validation: every bad value gets a clear error naming the field."""

from __future__ import annotations

import math

import pytest
import torch

from seg_tsam.extension.core.settings import SegSettings, SettingsError, parse_sigma, step_fraction_active


def test_defaults_are_the_papers():
    settings = SegSettings()
    assert (settings.scale, settings.sigma, settings.layers, settings.mode) == (3.0, math.inf, "mid", "cond")
    assert not settings.enabled and not settings.has_effect


@pytest.mark.parametrize(
    "value, expected",
    [("inf", math.inf), ("∞", math.inf), (" Infinity ", math.inf), (1e5, math.inf), (9999, 9999.0),
     (9999.5, math.inf), ("2.5", 2.5), (0, 0.0), (10, 10.0)],
)
def test_sigma_parsing(value, expected):
    assert parse_sigma(value) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sigma=-1), "sigma: must be ≥ 0"),
        (dict(sigma="nan"), "sigma: NaN"),
        (dict(sigma=float("nan")), "sigma: NaN"),
        (dict(sigma="big"), "sigma: expected a number"),
        (dict(sigma=True), "sigma: expected a number"),
        (dict(scale=-0.5), r"scale: must be in \[0, 100\]"),
        (dict(scale=math.inf), "scale: must be in"),
        (dict(scale=None), "scale: expected a number"),
        (dict(start=0.5, end=0.5), "start/end"),
        (dict(start=-0.1), "start/end"),
        (dict(end=1.5), "start/end"),
        (dict(mode="both"), "mode: must be one of cond, uncond"),
        (dict(layers="m3x"), "layers: unknown layer"),
        (dict(layers=7), "layers: layers must be a string"),
        (dict(enabled="yes"), "enabled: expected true or false"),
    ],
)
def test_bad_values(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        SegSettings(**kwargs)


def test_named_form_round_trip():
    settings = SegSettings.from_mapping({"scale": "4", "sigma": "inf", "layers": "D4, m0-9"})
    assert settings.enabled and settings.scale == 4.0 and settings.layers == "d4,m0-9"
    assert SegSettings.from_mapping(settings.to_dict()) == settings


def test_named_form_rejects_unknown_keys():
    with pytest.raises(SettingsError, match=r"unknown SEG setting\(s\) \['blur'\]"):
        SegSettings.from_mapping({"blur": 3})
    with pytest.raises(SettingsError, match="expected a dict"):
        SegSettings.from_mapping([1, 2])


@pytest.mark.parametrize(
    "start, end, active",
    [(0.0, 1.0, list(range(10))), (0.0, 0.5, [0, 1, 2, 3, 4]), (0.25, 0.75, [3, 4, 5, 6, 7]), (0.95, 1.0, [])],
)
def test_active_range_is_a_fraction_of_the_steps(start, end, active):
    assert [step for step in range(10) if step_fraction_active(step, 10, start, end)] == active


def test_no_effect_when_scale_or_sigma_is_zero():
    assert not SegSettings(enabled=True, scale=0).has_effect
    assert not SegSettings(enabled=True, sigma=0).has_effect
    assert SegSettings(enabled=True).has_effect


def test_hires_overrides():
    settings = SegSettings(enabled=True, scale=3, sigma=4, hires_scale="5", hires_sigma="inf")
    hires = settings.for_hires_pass()
    assert (hires.scale, hires.sigma, hires.hires_scale, hires.hires_sigma) == (5.0, math.inf, None, None)
    assert settings.hires_override and not hires.hires_override  # a hires value given by name turns the override on
    assert SegSettings(enabled=True, sigma=4).for_hires_pass().sigma == 4.0
    with pytest.raises(SettingsError, match="hires_scale"):
        SegSettings(hires_scale=-1)
    with pytest.raises(SettingsError, match="sigma"):
        SegSettings(hires_sigma="x")


def test_infotext_round_trip_through_text():
    """Write infotext entries as the WebUI does (``Key: value``), parse them back as strings."""
    settings = SegSettings(enabled=True, scale=2.5, sigma=8, layers="d4,d5,m0-9", start=0.1, end=0.9,
                           mode="uncond", hires_sigma=16)
    entries = settings.to_infotext()
    as_text = {key: str(value) for key, value in entries.items()}  # what a PNG's parameters hold
    assert SegSettings.from_infotext(as_text) == settings
    assert "SEG hires scale" not in entries
    assert SegSettings.from_infotext({"Steps": "20"}) == SegSettings(enabled=False)
    assert SegSettings().to_infotext() == {}


# --- off means off; numbers at the edges (issue: "What a WebUI user meets", defects 1 and 3) -----------


def test_a_switched_off_method_reads_nothing_but_its_switch():
    from seg_tsam.extension.core import fields
    from seg_tsam.extension.core.tsam import TsamSettings

    assert fields.from_args(SegSettings, [False, 3, "inf", "z9"]) == SegSettings()
    assert fields.from_args(SegSettings, [{"enabled": False, "layers": "z9", "typo": 1}]) == SegSettings()
    assert fields.from_args(TsamSettings, [False, 5, 0.6, 1, "abc"]) == TsamSettings()
    with pytest.raises(SettingsError, match="enabled: expected true or false"):
        fields.from_args(SegSettings, ["yes", 3, "inf", "mid"])
    with pytest.raises(SettingsError, match="layers: unknown layer 'z9'"):  # an X/Y/Z cell turns it on
        fields.from_args(SegSettings, [False, 3, "inf", "z9"], {"scale": 2})


@pytest.mark.parametrize("sigma", [1e-200, 1e-300, 5e-324, 1e-163])
def test_a_sigma_too_small_to_blur_is_the_identity(sigma):
    from seg_tsam.extension.core.blur import blur_matrix, blur_queries

    for axis in (1, 2, 7):
        assert torch.equal(blur_matrix(axis, parse_sigma(sigma), dtype=torch.float64), torch.eye(axis, dtype=torch.float64))
    queries = torch.randn(2, 5 * 3, 4)
    assert torch.equal(blur_queries(queries, (5, 3), parse_sigma(sigma)), queries)


def test_integers_too_large_for_a_float_have_their_meaning_or_a_message():
    from seg_tsam.extension.core import fields
    from seg_tsam.extension.core.tsam import TsamSettings

    huge = 10**400
    assert SegSettings(enabled=True, sigma=huge).sigma == math.inf  # σ > 9999 is ∞
    for field in ("scale", "start"):
        with pytest.raises(SettingsError, match=f"^{field}"):
            SegSettings(enabled=True, **{field: huge})
    with pytest.raises(SettingsError, match=r"^iterations: expected a whole number, got an integer of about 401 digits"):
        fields.from_args(TsamSettings, [{"iterations": huge}])
    with pytest.raises(SettingsError, match="^strength"):
        fields.from_args(TsamSettings, [{"strength": -huge}])
    with pytest.raises(SettingsError, match="^layers: layer index in 'd9999.*more than 4 digits"):
        SegSettings(enabled=True, layers="d" + "9" * 5000)
    with pytest.raises(SettingsError, match="^sigma: expected a number, got 'xxxx") as error:
        parse_sigma("x" * 5000)
    assert len(str(error.value)) < 100  # long values are cut in messages
