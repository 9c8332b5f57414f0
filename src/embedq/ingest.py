"""Reading files into documents: what `embedq ingest` turns into rows.

    for path in discover([Path("docs"), Path("notes.md")]):
        for item in read_file(path, root=Path("docs")):
            if isinstance(item, Skipped):
                print(f"skipped {item.path}: {item.reason}")
            else:
                store(item.key, item.text, item.title, item.metadata)

Supported: `.txt`, `.md`/`.markdown`, `.html`/`.htm`, `.pdf` and `.jsonl` (one document per
line: `{"key": ..., "text": ..., "title": ..., "metadata": {...}}`). A bad file never stops a
run: it comes back as `Skipped` with the reason, and so does each bad line of a JSONL file
while the good lines still go in. Nothing here touches the database.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".html", ".htm", ".jsonl"})
SUFFIXES = TEXT_SUFFIXES | {".pdf"}
"""The suffixes `discover` picks up from folders (compared case-insensitively)."""

_SNIFF_BYTES = 8192  # a NUL byte in this much of a "text" file means it is binary


@dataclass(frozen=True)
class SourceDoc:
    """One document read from a file (or one line of a JSONL file), ready to store.

    `key` identifies it within the collection: the path relative to the folder it was found
    in (posix separators), or a JSONL line's `key` field.
    """

    key: str
    text: str
    title: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Skipped:
    """A file, or a line of a JSONL file, that could not be read, and why."""

    path: str
    reason: str


class _Unreadable(Exception):
    """A file's content cannot be made into text; the message is the Skipped reason."""


def discover(paths: list[Path]) -> list[Path]:
    """The files to read under `paths`, sorted and without duplicates.

    Folders are walked recursively for supported suffixes; hidden files and folders (a name
    starting with ".") are left out, and symlinked folders are not followed. A path named
    explicitly is kept whatever its suffix or state, so that `read_file` can say why it
    cannot be read rather than have it vanish.
    """
    found: set[Path] = set()
    for path in paths:
        if not path.is_dir():
            found.add(path)
            continue
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                candidate = Path(folder) / name
                if not name.startswith(".") and candidate.suffix.lower() in SUFFIXES:
                    found.add(candidate)
    return sorted(found)


def read_file(path: Path, root: Path) -> Iterator[SourceDoc | Skipped]:
    """The documents in `path` (one, or one per JSONL line) and what was skipped.

    `root` is the folder keys are relative to (for a file named on its own, its parent).
    Never raises for a bad file: unreadable, binary, empty, corrupt, encrypted, wrong
    suffix all come back as `Skipped`.
    """
    suffix = path.suffix.lower()
    where = str(path)
    if suffix not in SUFFIXES:
        supported = ", ".join(sorted(SUFFIXES))
        yield Skipped(where, f"unsupported file type {suffix or '(none)'}; use {supported}")
        return
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        yield Skipped(where, "is a directory")
        return
    except FileNotFoundError:
        yield Skipped(where, "no such file")
        return
    except PermissionError:
        yield Skipped(where, "permission denied: cannot read the file")
        return
    except OSError as exc:
        yield Skipped(where, f"cannot read the file: {exc.strerror or exc}")
        return
    yield from read_bytes(data, _key(path, root), where)


def read_bytes(data: bytes, key: str, where: str | None = None) -> Iterator[SourceDoc | Skipped]:
    """The documents in one file's bytes, its type read off `key`'s suffix (an upload's file
    name); like `read_file`, a bad file comes back as `Skipped` with the reason."""
    where = where or key
    suffix = PurePosixPath(key).suffix.lower()
    if suffix not in SUFFIXES:
        supported = ", ".join(sorted(SUFFIXES))
        yield Skipped(where, f"unsupported file type {suffix or '(none)'}; use {supported}")
        return
    if not data.strip():
        yield Skipped(where, "empty")
        return
    if suffix == ".jsonl":
        yield from _read_jsonl(data, where)
        return
    try:
        if suffix == ".pdf":
            text, title = _pdf(data)
        else:
            decoded = _decode(data)
            if suffix in (".html", ".htm"):
                text, title = _html(decoded)
            elif suffix in (".md", ".markdown"):
                text, title = decoded, _markdown_title(decoded)
            else:
                text, title = decoded, None
    except _Unreadable as exc:
        yield Skipped(where, str(exc))
        return
    if not text.strip():
        yield Skipped(where, "no text in it" if suffix in (".pdf", ".html", ".htm") else "empty")
        return
    yield SourceDoc(key=key, text=text, title=title, metadata={"path": key, "type": suffix})


def _key(path: Path, root: Path) -> str:
    # lexical, not resolve(): a symlink inside the root keeps its own name as its key
    absolute, base = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        # named outside the root: its own path is the only stable name it has
        return path.as_posix()


def _decode(data: bytes) -> str:
    """UTF-8 text (a byte-order mark dropped) with newlines as "\\n", or `_Unreadable`."""
    if b"\0" in data[:_SNIFF_BYTES]:
        raise _Unreadable("binary or not UTF-8 text")
    try:
        # utf-8-sig reads plain UTF-8 too; it only also drops a leading byte-order mark
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Unreadable(
            f"binary or not UTF-8 text (byte {exc.start}); convert it to UTF-8 first"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- Markdown ------------------------------------------------------------------------------

_ATX_H1 = re.compile(r"^ {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _markdown_title(text: str) -> str | None:
    """The first level-one `# heading`, skipping fenced code (where `#` starts a comment)."""
    fence: str | None = None
    for line in text.split("\n"):
        opened = _FENCE.match(line)
        if opened:
            marker = opened.group(1)
            fence = None if fence == marker else fence or marker
            continue
        if fence is None and (heading := _ATX_H1.match(line)):
            return heading.group(1).strip() or None
    return None


# --- HTML ----------------------------------------------------------------------------------

_INVISIBLE = ("script", "style", "noscript", "template", "head", "svg", "iframe", "object")
_BLOCKS = (
    "address", "article", "aside", "blockquote", "dd", "details", "div", "dl", "dt",
    "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
    "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table",
    "ul",
)  # fmt: skip
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def _html(markup: str) -> tuple[str, str | None]:
    """The visible text of a page, a blank line between blocks, and its <title>."""
    from bs4 import BeautifulSoup

    try:
        soup = BeautifulSoup(markup, "html.parser")
    except Exception as exc:  # html.parser on hostile markup: any failure means unreadable
        raise _Unreadable(f"cannot parse the HTML: {exc}") from None
    title_tag = soup.find("title")
    title = " ".join(title_tag.get_text().split()) if title_tag is not None else ""
    for tag in soup.find_all(_INVISIBLE):
        tag.decompose()
    # blank lines around blocks let the chunker split between paragraphs, not inside them
    for tag in soup.find_all(_BLOCKS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    for tag in soup.find_all(("br", "tr")):
        tag.insert_after("\n")
    for tag in soup.find_all(("td", "th")):
        tag.insert_after(" ")
    lines = (_SPACES.sub(" ", line).strip() for line in soup.get_text().split("\n"))
    text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
    return text, title or None


# --- PDF -----------------------------------------------------------------------------------


def _pdf(data: bytes) -> tuple[str, str | None]:
    """The text of every page, a blank line between pages, and the title in its metadata."""
    from pypdf import PasswordType, PdfReader

    # pypdf raises many kinds of exception on damaged files (its own, ValueError, KeyError,
    # RecursionError...): whatever it raises, this file cannot be read, the next one may.
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise _Unreadable(
                "encrypted PDF that needs a password; decrypt it first "
                "(e.g. qpdf --decrypt --password=... in.pdf out.pdf)"
            )
        pages = [page.extract_text() or "" for page in reader.pages]
        metadata = reader.metadata
        title = metadata.title if metadata is not None else None
    except _Unreadable:
        raise
    except Exception as exc:
        raise _Unreadable(f"corrupt or unreadable PDF: {str(exc) or type(exc).__name__}") from None
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    title = " ".join(str(title).split()) if title else None
    return text, title or None


# --- JSONL ---------------------------------------------------------------------------------


def _read_jsonl(data: bytes, where: str) -> Iterator[SourceDoc | Skipped]:
    try:
        text = _decode(data)
    except _Unreadable as exc:
        yield Skipped(where, str(exc))
        return
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            doc = _jsonl_doc(line)
        except _Unreadable as exc:
            yield Skipped(where, f"line {number}: {exc}")
            continue
        if doc.key in first_line:
            yield Skipped(
                where,
                f"line {number}: duplicate key {doc.key!r} (first on line "
                f"{first_line[doc.key]}); keys must be unique",
            )
            continue
        first_line[doc.key] = number
        yield doc


def _jsonl_doc(line: str) -> SourceDoc:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _Unreadable(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _Unreadable(f"expected a JSON object, got {type(record).__name__}")
    # embedq's own lines carry "key"; BEIR corpora "_id" (their "metadata" is kept too)
    key = record.get("key", record.get("_id"))
    text = record.get("text")
    title, metadata = record.get("title"), record.get("metadata")
    if not isinstance(key, str) or not key.strip():
        raise _Unreadable('"key" (or BEIR\'s "_id") is missing or not a non-empty string')
    if not isinstance(text, str):
        raise _Unreadable('"text" is missing or not a string')
    if title is not None and not isinstance(title, str):
        raise _Unreadable('"title" must be a string or null')
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise _Unreadable('"metadata" must be a JSON object')
    if not text.strip() and not (title and title.strip()):
        raise _Unreadable('"text" is empty and there is no "title"')
    return SourceDoc(key=key, text=text, title=title or None, metadata=metadata)
