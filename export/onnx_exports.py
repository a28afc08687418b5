"""What each exported ONNX file was made from: a small JSON file next to it.

The WebUI lists replacement UNets at start-up and on every refresh of the "SD Unet" setting;
reading a 1.7 GB ONNX file to learn its checkpoint would make that slow, so the export writes
``<name>.json`` beside ``<name>.onnx`` (atomically, after the ONNX file is in place) and the
listing reads only these.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .registry import write_file_atomically

logger = logging.getLogger("seg_tsam")

INFO_SUFFIX = ".json"


@dataclass(frozen=True)
class OnnxExportInfo:
    onnx_file: str  #: the file's name inside the ONNX folder
    checkpoint_hash: str  #: the WebUI's short hash of the checkpoint the UNet came from
    checkpoint_name: str
    family: str  #: "sd1", "sd2" or "sdxl"
    seg_layers: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.checkpoint_name or self.checkpoint_hash} ({self.seg_layers}, {self.precision})"


def info_path(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(INFO_SUFFIX)


def write_export_info(onnx_path: Path, info: OnnxExportInfo) -> None:
    write_file_atomically(info_path(onnx_path), json.dumps(asdict(info), indent=1).encode())


def list_onnx_exports(folder: Path | str) -> list[OnnxExportInfo]:
    """The exports in ``folder`` whose ONNX file and info file are both present, by file name."""
    exports = []
    for path in sorted(Path(folder).glob(f"*{INFO_SUFFIX}")):
        onnx_path = path.with_suffix(".onnx")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            info = OnnxExportInfo(**values)
        except (OSError, ValueError, TypeError) as error:
            logger.warning("SEG: ignoring the unreadable export info %s: %s", path.name, error)
            continue
        if info.onnx_file == onnx_path.name and onnx_path.is_file():
            exports.append(info)
    return exports


def remove_onnx_export(onnx_path: Path, external_data: Iterable[str] = ()) -> list[str]:
    """Delete an export: its info file first (so a half-deleted export is never listed), then the
    external data files named in ``external_data``, the ONNX file and its refit map. Returns the
    names removed."""
    from .refit import sidecar_path

    folder = onnx_path.parent
    paths = [info_path(onnx_path), *(folder / Path(name).name for name in external_data), onnx_path,
             sidecar_path(onnx_path)]
    removed = []
    for path in paths:
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    return removed
