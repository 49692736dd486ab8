"""Checked reading of data files: UTF-8 text, gzip streams, JSON lines and JSON lists.

A file that is present but unusable (not UTF-8, not gzip or cut short, a row that is not JSON or
lacks a field) raises ``BadDataError`` naming the file and, where there is one, the line (1-based,
as an editor numbers them), so a damaged mirror fails before any model is loaded instead of with
a traceback halfway through a run.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from basis_sharing.errors import BadDataError

REPAIR_HINT = (
    "Restore it from a good copy of the mirror (`python scripts/prepare_data.py --verify <mirror>` "
    "checks every file against the mirror's manifest), or rewrite it with "
    "`python scripts/prepare_data.py --out <mirror> --force` on a machine that reaches the "
    "Hugging Face hub."
)


def json_kind(value: Any) -> str:
    """JSON's name for the type of a decoded value (for messages)."""
    kinds = ((dict, "object"), (list, "list"), (str, "string"), (bool, "boolean"))
    for cls, name in kinds:
        if isinstance(value, cls):
            return name
    return "null" if value is None else "number"


def decode_utf8(data: bytes, path: Path, first_line: int = 1) -> str:
    """``data`` (the file, or one line of it starting at ``first_line``) decoded as UTF-8.

    Raises:
        BadDataError: names the file, the line and the byte that is not UTF-8.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = first_line + data.count(b"\n", 0, exc.start)
        raise BadDataError(
            f"{path} is not UTF-8 text: line {line}, byte {exc.start - line_start + 1} "
            f"(0x{data[exc.start]:02x}) cannot be decoded ({exc.reason}). Mirror files must be "
            "UTF-8. " + REPAIR_HINT
        ) from None


def read_text_file(path: Path) -> str:
    """The file as UTF-8 text with "\\r\\n" and "\\r" read as "\\n" (as Python's text mode does)."""
    text = decode_utf8(path.read_bytes(), path)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def gzip_lines(path: Path) -> Iterator[bytes]:
    """The decompressed lines of a gzip file, each with its b"\\n".

    Raises:
        BadDataError: the file is not gzip, is corrupt, or ends before the gzip stream does.
    """
    count = 0
    try:
        with gzip.open(path, "rb") as stream:
            for line in stream:
                count += 1
                yield line
    except gzip.BadGzipFile as exc:
        raise BadDataError(
            f"{path} is not a valid gzip file ({exc}); a .json.gz mirror file holds "
            "gzip-compressed JSON lines. " + REPAIR_HINT
        ) from None
    except EOFError:
        raise BadDataError(
            f"{path} is truncated: its gzip stream ends without its end marker after line "
            f"{count}. " + REPAIR_HINT
        ) from None
    except (zlib.error, OSError) as exc:
        raise BadDataError(
            f"{path} cannot be decompressed after line {count} ({exc}). " + REPAIR_HINT
        ) from None


def json_line_objects(lines: Iterable[bytes], path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file.

    Raises:
        BadDataError: a line is not UTF-8, not JSON, or not a JSON object; names file and line.
    """
    for number, raw in enumerate(lines, start=1):
        text = decode_utf8(raw, path, number)
        if not text.strip():
            continue
        try:
            row = json.loads(text.rstrip("\r\n"))  # so the error's column is on this line
        except json.JSONDecodeError as exc:
            raise BadDataError(
                f"{path} line {number} is not valid JSON ({exc.msg} at column {exc.colno}). "
                + REPAIR_HINT
            ) from None
        if not isinstance(row, dict):
            raise BadDataError(
                f"{path} line {number} is a JSON {json_kind(row)}, not an object; a JSON-lines "
                "file holds one object per line. " + REPAIR_HINT
            )
        yield number, row


def json_lines_file(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of an uncompressed JSON-lines file."""
    with path.open("rb") as stream:
        yield from json_line_objects(stream, path)


def missing_fields(row: dict[str, Any], fields: Iterable[str]) -> list[str]:
    """The ``fields`` that ``row`` lacks or holds as null; ``a.b`` names field b of object a."""
    missing = []
    for dotted in fields:
        value: Any = row
        for key in dotted.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            missing.append(dotted)
    return missing


def read_json_list(path: Path) -> tuple[str, list[Any]]:
    """The file's text and its top-level JSON list.

    Raises:
        BadDataError: the file is not UTF-8, not JSON (names line and column), or not a list.
    """
    text = read_text_file(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadDataError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
            + REPAIR_HINT
        ) from None
    if not isinstance(value, list):
        raise BadDataError(
            f"{path} holds a JSON {json_kind(value)}, not a list of records. " + REPAIR_HINT
        )
    return text, value


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def element_line(text: str, index: int) -> int:
    """The line on which element ``index`` of the top-level JSON list in ``text`` starts.

    Only called on text that ``json.loads`` has already read as a list with that element.
    """
    decoder = json.JSONDecoder()
    pos = _skip_space(text, _skip_space(text, 0) + 1)  # past "["
    for _ in range(index):
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_space(text, _skip_space(text, pos) + 1)  # past ","
    return text.count("\n", 0, pos) + 1
