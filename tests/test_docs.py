"""The repository's own notes (docs/) are self-contained and every citation of them resolves.

Docstrings, comments, configs, the README and the data notes cite ``docs/<file>.md §N.M``; each
cited file must exist and have a heading numbered ``N.M``. Inside a note a bare ``§N.M`` is one of
its own sections, and a paper's section is written with the paper's abbreviation (``BS §4.1``).
Nothing may point at the notes that lived outside the repository before docs/ existed.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# Spelled in pieces so that this file does not match itself.
FORBIDDEN = ("method" + "-spec", "DESIGN" + ".md")
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "outputs", "data", "wandb"}

SECTIONS = r"((?:[ \t]*\n?[ \t]*(?:,|and|to|-)?[ \t]*\n?[ \t]*§\d+(?:\.\d+)*)+)"
DOC_CITATION = re.compile(r"(?<![\w/.])docs/([\w./-]+?\.md)" + SECTIONS + "?")
PAPER_CITATION = re.compile(r"\b(?:BS|SVD-LLM|FWSVD|ASVD)" + SECTIONS)
NUMBER = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6} (\d+(?:\.\d+)*) ", re.MULTILINE)


def repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (what a clone or a commit would hold)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [REPO / name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        paths = [
            p
            for p in REPO.rglob("*")
            if not (SKIP_DIRS & set(p.relative_to(REPO).parts))
            and not any(part.endswith(".egg-info") for part in p.parts)
        ]
    return sorted(p for p in paths if p.is_file() and not p.is_symlink())


def texts() -> Iterator[tuple[Path, str]]:
    for path in repository_files():
        try:
            yield path, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # binary files (safetensors, PNG) cite nothing
            continue


def headings(name: str) -> list[str]:
    return HEADING.findall((DOCS / name).read_text(encoding="utf-8"))


def citations() -> list[tuple[str, str, str | None]]:
    """(citing file, cited doc, section number or None) for every docs/ citation."""
    found = []
    for path, text in texts():
        where = str(path.relative_to(REPO))
        for match in DOC_CITATION.finditer(text):
            doc, numbers = match.group(1), NUMBER.findall(match.group(2) or "")
            found += [(where, doc, n) for n in numbers] or [(where, doc, None)]
    return found


def test_nothing_cites_the_notes_outside_the_repository():
    offending = [
        f"{path.relative_to(REPO)}:{text[: text.index(word)].count(chr(10)) + 1}: {word}"
        for path, text in texts()
        for word in FORBIDDEN
        if word in text
    ]
    assert offending == []


def test_the_file_listing_sees_the_code_and_the_notes():
    """Guards the test above against a listing that silently finds nothing."""
    names = {str(p.relative_to(REPO)) for p in repository_files()}
    assert {"basis_sharing/pipeline.py", "README.md", "docs/methods.md"} <= names
    assert "tests/test_docs.py" in names


def test_every_docs_citation_points_to_an_existing_section():
    found = citations()
    assert len(found) >= 60  # the code cites the notes throughout; a broken regex finds none
    assert {"methods.md", "architecture.md", "paper-tables.md"} <= {doc for _, doc, _ in found}
    missing = [
        f"{where}: docs/{doc}" + (f" §{number}" if number else "")
        for where, doc, number in found
        if not (DOCS / doc).is_file() or (number is not None and number not in headings(doc))
    ]
    assert missing == []


@pytest.mark.parametrize("name", ["methods.md", "architecture.md", "paper-tables.md"])
def test_section_numbers_are_unique(name):
    numbers = headings(name)
    assert numbers and len(numbers) == len(set(numbers))


@pytest.mark.parametrize("name", ["methods.md", "architecture.md", "paper-tables.md"])
def test_bare_section_references_inside_a_note_exist(name):
    text = (DOCS / name).read_text(encoding="utf-8")
    for pattern in (DOC_CITATION, PAPER_CITATION):  # blank out citations of other documents
        text = pattern.sub(lambda m: " " * len(m.group(0)), text)
    bare = set(NUMBER.findall(text))
    assert bare, f"{name} refers to none of its own sections"
    assert sorted(bare - set(headings(name))) == []


def test_the_citation_pattern_reads_lists_and_line_breaks():
    text = "docs/methods.md §3.4-§3.6, §4.1 and docs/paper-tables.md\n§7; `docs/architecture.md`"
    found = [(m.group(1), NUMBER.findall(m.group(2) or "")) for m in DOC_CITATION.finditer(text)]
    assert found == [
        ("methods.md", ["3.4", "3.6", "4.1"]),
        ("paper-tables.md", ["7"]),
        ("architecture.md", []),
    ]
    assert [m.group(0) for m in PAPER_CITATION.finditer("(BS §3.1, §4.1) and §2.2")] == [
        "BS §3.1, §4.1"
    ]
