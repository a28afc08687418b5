"""The key under which a switch (on/off, or a flag other controls need) sits in ``infotext_fields``.

The WebUI reads an ``infotext_fields`` key two ways: as a *function* of the pasted parameters
(PNG info, the paste button, the API's ``infotext``) and as a *name* matched against the
script's ``paste_field_names`` ("Send to img2img/txt2img" copies those widgets). A plain
function key is never sent across tabs, so the SEG checkbox stayed behind; a plain name would
need a value written into the infotext. :class:`InfotextSwitch` is both: a ``str`` that can be
called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class InfotextSwitch(str):
    """A name (``"SEG enabled"``) that, called with pasted parameters, says whether the switch is on."""

    function: Callable[[Mapping[str, Any]], bool]

    def __new__(cls, name: str, function: Callable[[Mapping[str, Any]], bool]) -> InfotextSwitch:
        switch = super().__new__(cls, name)
        switch.function = function
        return switch

    def __call__(self, params: Mapping[str, Any]) -> bool:
        return bool(self.function(params))
