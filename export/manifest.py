"""Writing an exported model directory's manifest.json (its layout and the reading side: serve.model_dir)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from serve.model_dir import MANIFEST

_NUMBER = r"-?[0-9][0-9.eE+-]*"
_NUMBER_LIST = re.compile(r"\[\s+((?:" + _NUMBER + r",\s+)*" + _NUMBER + r")\s+\]")


def write_manifest(model_dir: str | Path, manifest: dict) -> Path:
    """Write DIR/manifest.json atomically (temp file + rename); lists of numbers on one line each."""
    path = Path(model_dir) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps({k: v for k, v in manifest.items() if k != "dir"}, indent=1)
    text = _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return path
