"""Reading and writing the JSON files users hand us and runs produce: clear errors in, atomic writes out."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from utilities.errors import InputError


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is an InputError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def write_json_atomic(path: str | Path, content: Any) -> Path:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)
    return path
