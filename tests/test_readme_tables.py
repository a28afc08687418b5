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
