"""Reading the JSON files of a checkpoint directory (config.json, tokenizer_config.json, ...)."""

from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: str | Path) -> dict:
    """The JSON object in `path`; a malformed file or one that is not an object is a ValueError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
