"""Reading and writing the JSON files users hand us and runs produce: clear errors in, atomic writes out."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from utilities.errors import InputError


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; a missing or unreadable one (a directory, no permission) or one that is not UTF-8
    (a binary file given by mistake) is an InputError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is an InputError naming it."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def not_utf8(path: str | Path) -> InputError:
    """The error for a text file that does not decode as UTF-8, naming its first bad byte and that byte's offset
    in the file (a decoder reading in chunks only knows the offset within its chunk)."""
    try:
        Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        return InputError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        )
    return InputError(f"{path}: not UTF-8 text")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file or a folder to; when the block ends without an
    error it is flushed to disk and renamed over `path` (an existing folder at `path` is replaced), otherwise it
    is removed. Readers never see half a file, and an interrupted write leaves the previous `path` untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.is_dir() and tmp.is_dir():
            os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, content: Any) -> Path:
    """Write `content` as indented JSON through `atomic_path`. NaN and infinity are refused (ValueError naming
    the file, nothing written): JSON has no such values, and a metric that is not a number is a bug upstream."""
    try:
        text = json.dumps(content, indent=2, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"{path}: not written: {e}") from None
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return Path(path)
