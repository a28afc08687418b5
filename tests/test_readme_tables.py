"""The README's control tables are the settings fields' own (one source of truth).

Each table sits between ``<!-- controls:Class … -->`` and ``<!-- /controls:Class -->``; when a
field changes, paste the expected table this test prints.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from seg_tsam.extension.core import fields
from seg_tsam.extension.core.settings import SegSettings
from seg_tsam.extension.core.tsam import TsamSettings

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("cls", [SegSettings, TsamSettings], ids=lambda cls: cls.__name__)
def test_readme_control_table_is_generated_from_the_fields(cls):
    match = re.search(rf"<!-- controls:{cls.__name__}[^>]*-->\n(.*?)\n<!-- /controls:{cls.__name__} -->",
                      README.read_text(), re.S)
    assert match, f"no controls table for {cls.__name__} in the README"
    expected = fields.markdown_table(cls)
    assert match.group(1) == expected, f"the README's table is out of date; it should read:\n{expected}"


@pytest.mark.parametrize("cls", [SegSettings, TsamSettings], ids=lambda cls: cls.__name__)
def test_every_field_has_its_metadata(cls):
    """Each field: a label and info text, a parser that accepts its own default, and an infotext
    key and axis label of this method's own (no clash with another field)."""
    seen_keys, seen_axes = set(), set()
    for field in fields.fields_of(cls):
        spec = field.spec
        assert spec.label and spec.info.endswith("."), field.name
        assert spec.parse(field.default) == field.default or field.default is None
        for value, seen in ((spec.infotext, seen_keys), (spec.axis, seen_axes)):
            if value:
                assert value not in seen, value
                seen.add(value)
        assert spec.only_with is None or fields.field_named(cls, spec.only_with).default is False


def test_a_new_field_is_one_definition():
    """Adding a field is one ``setting(...)`` line: the positional and named API forms, infotext in
    and out, the X/Y/Z axis and the README table all pick it up (the WebUI widgets, Settings
    default and axis registration are built from the same list in the glue)."""
    import dataclasses
    import math

    from seg_tsam.extension.core.fields import Control, setting
    from seg_tsam.extension.core.settings import number_in

    @dataclasses.dataclass(frozen=True)
    class WithRescale(SegSettings):
        rescale: float = setting(0.0, label="Rescale", info="Rescale the guided prediction.", infotext="SEG rescale",
                                 axis="[SEG] Rescale", control=Control("slider", 0.0, 1.0, 0.05),
                                 parse=number_in("rescale", 0, 1))

    names = fields.positional_names(WithRescale)
    assert names[-1] == "rescale" and names[:-1] == fields.positional_names(SegSettings)
    positional = fields.from_args(WithRescale, [True, 3, "inf", "mid", 0, 1, "cond", False, None, None, 0.5])
    named = fields.from_args(WithRescale, [{"rescale": "0.5"}])
    assert positional == named and named.rescale == 0.5 and named.sigma == math.inf
    written = named.to_infotext()
    assert written["SEG rescale"] == 0.5
    assert fields.from_infotext(WithRescale, {key: str(value) for key, value in written.items()}) == named
    axis = [field for field in fields.fields_of(WithRescale) if field.spec.axis == "[SEG] Rescale"]
    assert len(axis) == 1 and fields.axis_type(axis[0]) is float
    assert "| Rescale | 10 / `rescale` | `0.0` | `SEG rescale` | [SEG] Rescale |" in fields.markdown_table(WithRescale)
    with pytest.raises(fields.SettingsError, match="rescale: must be in"):
        fields.from_args(WithRescale, [{"rescale": 2}])
