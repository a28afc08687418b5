"""What each exported ONNX file was made from: a small JSON file next to it.

The WebUI lists replacement UNets at start-up and on every refresh of the "SD Unet" setting;
reading a 1.7 GB ONNX file to learn its checkpoint would make that slow, so the export writes
``<name>.json`` beside ``<name>.onnx`` (atomically, after the ONNX file is in place) and the
listing reads only these.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import shutil
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from .registry import write_file_atomically

logger = logging.getLogger("seg_tsam")

INFO_SUFFIX = ".json"
_DATA_SUFFIX = re.compile(r"\.[0-9a-f]{8}\.data")  #: after the ONNX file's name: see new_data_file_name


def new_data_file_name(onnx_name: str) -> str:
    """The external data file for a new export ``onnx_name``: ``<name>.<8 hex>.data``, a new name
    each time, so the data of the export being replaced stays intact until the new one is in place."""
    return f"{onnx_name}.{secrets.token_hex(4)}.data"


def data_files_named_for(onnx_path: Path) -> list[Path]:
    """The external data files beside ``onnx_path`` named after it (:func:`new_data_file_name`),
    found by name: reading the model to learn them would parse the whole file (GBs when inline)."""
    name = onnx_path.name
    return sorted(path for path in onnx_path.parent.glob(f"{glob.escape(name)}.*.data")
                  if _DATA_SUFFIX.fullmatch(path.name[len(name):]))


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
    """The exports in ``folder`` whose ONNX file and info file are both present, by file name.

    Found from the ONNX files, so other JSON beside them (the refit maps) is never read as info."""
    exports = []
    for onnx_path in sorted(Path(folder).glob("*.onnx")):
        path = info_path(onnx_path)
        if not path.is_file():
            continue
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            info = OnnxExportInfo(**values)
        except (OSError, ValueError, TypeError) as error:
            logger.warning("SEG: ignoring the unreadable export info %s: %s", path.name, error)
            continue
        if info.onnx_file == onnx_path.name and onnx_path.is_file():
            exports.append(info)
    return exports


#: The working folder of an export in progress: ``.<name>.onnx.<random>.tmp`` (``export_onnx``).
_WORK_FOLDER = re.compile(r"\.[^/]+\.onnx\.[A-Za-z0-9_]+\.tmp")


def remove_interrupted_exports(folder: Path | str) -> list[str]:
    """Delete the working folders that exports killed mid-way left in ``folder`` (GBs for SDXL).

    Call it when no export runs (at start-up): a running export's folder looks the same."""
    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for path in sorted(root.iterdir()):
        if path.is_dir() and not path.is_symlink() and _WORK_FOLDER.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def remove_onnx_export(onnx_path: Path) -> list[str]:
    """Delete an export: its info file first (so a half-deleted export is never listed), then its
    external data (:func:`data_files_named_for`), the ONNX file and its refit map. Returns the
    names removed."""
    from .refit import sidecar_path

    paths = [info_path(onnx_path), *data_files_named_for(onnx_path), onnx_path, sidecar_path(onnx_path)]
    removed = []
    for path in paths:
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    return removed
