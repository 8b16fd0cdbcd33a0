"""Reading the small JSON files of checkpoints and artifacts, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from dlmc.errors import DlmcError


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise DlmcError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DlmcError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DlmcError(f"{path}: expected a JSON object")
    return data
