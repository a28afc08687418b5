"""Switches in ``infotext_fields``: a name the WebUI's "Send to" matches and a function of pasted infotext."""

from __future__ import annotations

from seg_tsam.extension.core import fields
from seg_tsam.extension.core.settings import SegSettings
from seg_tsam.extension.core.tsam import TsamSettings
from seg_tsam.extension.webui.infotext_switch import InfotextSwitch


def test_a_switch_is_a_name_and_a_function():
    switch = InfotextSwitch(fields.switch_key(SegSettings, "enabled"), lambda params: "SEG scale" in params)
    assert switch == "SEG enabled" and isinstance(switch, str)
    assert switch in ["Prompt", "SEG enabled"]  # how the WebUI picks what "Send to img2img" copies
    assert callable(switch) and switch({"SEG scale": "3.0"}) is True and switch({"Steps": "20"}) is False


def test_switch_names_and_what_turns_them_on():
    assert fields.switch_key(SegSettings, "hires_override") == "SEG hires override"
    assert fields.switch_key(TsamSettings, "enabled") == "T-SAM enabled"
    written = SegSettings(enabled=True, hires_sigma=8).to_infotext()
    params = {key: str(value) for key, value in written.items()}
    assert fields.enabled_in_infotext(SegSettings, params) and fields.gate_in_infotext(SegSettings, "hires_override", params)
    assert not fields.gate_in_infotext(SegSettings, "hires_override", SegSettings(enabled=True).to_infotext())
    assert not fields.enabled_in_infotext(TsamSettings, params)  # SEG's keys do not turn T-SAM on
