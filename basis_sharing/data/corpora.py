"""Evaluation and calibration corpora, read from a local mirror or the Hugging Face hub.

Each corpus is a list of rows in the hub dataset's schema (e.g. WikiText-2's ``text`` rows, where a
blank line is ``""`` and any other line keeps its trailing newline). Perplexity and calibration
join the rows with ``"\\n\\n"`` (docs/methods.md §2.1, §7.1), so mirror and hub give identical
token ids.

Mirror layout (``paths.data_dir``; ``../shared/assets/README.md`` documents the files):

    wikitext-2-raw-v1/wiki.{train,valid,test}.raw
    ptb/ptb.{train,valid,test}.txt
    c4/c4-{train.00000-of-01024,validation.00000-of-00008}.json.gz
    alpaca/alpaca_data.json
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basis_sharing.data.rows import (
    REPAIR_HINT,
    element_line,
    gzip_lines,
    json_kind,
    json_line_objects,
    read_json_list,
    read_text_file,
)
from basis_sharing.errors import BadDataError, DataNotFoundError, unknown_choice
from basis_sharing.hub import hub_available

log = logging.getLogger(__name__)

PREPARE_HINT = (
    "Provide it with `python scripts/prepare_data.py --out {data_dir}` on a machine that reaches "
    "the Hugging Face hub, or point paths.data_dir at a mirror that has it "
    "(`make data MIRROR=<dir>` links one to ./data)."
)


def read_wikitext_raw(path: Path) -> list[str]:
    """Rows of a WikiText raw release file as the hub serves them.

    The release marks paragraph breaks with lines holding a single space; the hub turns those into
    empty rows and keeps the newline on every other line.
    """
    lines = read_text_file(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return ["" if not line.strip() else line + "\n" for line in lines]


def read_ptb_txt(path: Path) -> list[str]:
    """Rows of Mikolov's PTB text file: the hub's ``ptb_text_only`` strips every line."""
    lines = read_text_file(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def read_json_lines_gz(path: Path) -> list[str]:
    """The ``text`` field of each record of a gzipped JSON-lines shard (C4).

    Raises:
        BadDataError: not gzip or truncated, or a line that is not a JSON object with a string
            ``text``; names the file and the line.
    """
    rows = []
    for number, record in json_line_objects(gzip_lines(path), path):
        text = record.get("text")
        if not isinstance(text, str):
            raise BadDataError(
                f"{path} line {number} has no string field 'text' (found "
                f"{json_kind(text) if 'text' in record else 'no such field'}). " + REPAIR_HINT
            )
        rows.append(text)
    return rows


def alpaca_text(record: dict[str, str]) -> str:
    """The ``text`` column of tatsu-lab/alpaca: the Stanford Alpaca prompt with its response."""
    if record.get("input"):
        head = (
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{record['instruction']}\n\n### Input:\n{record['input']}"
        )
    else:
        head = (
            "Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{record['instruction']}"
        )
    return f"{head}\n\n### Response:\n{record['output']}"


def alpaca_problem(record: Any) -> str | None:
    """What makes ``record`` unusable as an Alpaca record, or None when it is fine."""
    if not isinstance(record, dict):
        return f"is a JSON {json_kind(record)}, not an object"
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            return f"has no string field '{key}'"
    if not isinstance(record.get("input"), str | None):
        return f"has a field 'input' that is a JSON {json_kind(record['input'])}, not a string"
    return None


def read_alpaca_json(path: Path) -> list[str]:
    """Rows of the Stanford Alpaca release: a JSON list of {instruction, input, output} records.

    Raises:
        BadDataError: not JSON, not a list, or a record without string fields; names the file,
            the record (1-based) and its line.
    """
    text, records = read_json_list(path)
    for index, record in enumerate(records):
        problem = alpaca_problem(record)
        if problem is not None:
            raise BadDataError(
                f"{path} record {index + 1} of {len(records)} (line {element_line(text, index)}) "
                f"{problem}; an Alpaca record has string fields instruction, input and output. "
                + REPAIR_HINT
            )
    return [alpaca_text(r) for r in records]


@dataclass(frozen=True)
class SplitSource:
    """Where one split lives: mirror files tried in order, and the hub split name."""

    mirror_files: tuple[str, ...]
    hub_split: str
    hub_data_files: str | None = None  # a file inside the hub repo, for sharded datasets


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    title: str
    hub_path: str
    hub_name: str | None
    hub_field: str
    read_mirror: Callable[[Path], list[str]]
    splits: dict[str, SplitSource] = field(default_factory=dict)
    hub_revision: str | None = None


CORPORA: dict[str, CorpusSpec] = {
    spec.name: spec
    for spec in (
        CorpusSpec(
            name="wikitext2",
            title="WikiText-2 (raw)",
            hub_path="wikitext",
            hub_name="wikitext-2-raw-v1",
            hub_field="text",
            read_mirror=read_wikitext_raw,
            splits={
                "train": SplitSource(("wikitext-2-raw-v1/wiki.train.raw",), "train"),
                "validation": SplitSource(("wikitext-2-raw-v1/wiki.valid.raw",), "validation"),
                "test": SplitSource(("wikitext-2-raw-v1/wiki.test.raw",), "test"),
            },
        ),
        CorpusSpec(
            name="ptb",
            title="Penn Treebank (text only)",
            hub_path="ptb_text_only",
            hub_name="penn_treebank",
            hub_field="sentence",
            # datasets>=4 no longer runs loading scripts; the hub's parquet conversion has the rows.
            hub_revision="refs/convert/parquet",
            read_mirror=read_ptb_txt,
            splits={
                "train": SplitSource(("ptb/ptb.train.txt",), "train"),
                "validation": SplitSource(("ptb/ptb.valid.txt",), "validation"),
                "test": SplitSource(("ptb/ptb.test.txt",), "test"),
            },
        ),
        CorpusSpec(
            name="c4",
            title="C4 (en)",
            hub_path="allenai/c4",
            hub_name=None,
            hub_field="text",
            read_mirror=read_json_lines_gz,
            splits={
                "train": SplitSource(
                    ("c4/c4-train.00000-of-01024.json.gz",),
                    "train",
                    "en/c4-train.00000-of-01024.json.gz",
                ),
                # The shared offline mirror holds a 2000-document sample under a suffixed name.
                "validation": SplitSource(
                    (
                        "c4/c4-validation.00000-of-00008.json.gz",
                        "c4/c4-validation.00000-of-00008.sample-2000.json.gz",
                    ),
                    "validation",
                    "en/c4-validation.00000-of-00008.json.gz",
                ),
            },
        ),
        CorpusSpec(
            name="alpaca",
            title="Alpaca",
            hub_path="tatsu-lab/alpaca",
            hub_name=None,
            hub_field="text",
            read_mirror=read_alpaca_json,
            splits={
                "train": SplitSource(
                    ("alpaca/alpaca_data.json", "alpaca/alpaca_data.sample-2000.json"), "train"
                ),
            },
        ),
    )
}


@dataclass
class Corpus:
    """Rows of one split, and where they came from (recorded in results.json)."""

    name: str
    split: str
    rows: list[str]
    source: str  # mirror file path or "hub:<path>[/<name>]@<revision>"

    def text(self, join: str = "\n\n", max_rows: int | None = None) -> str:
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        return join.join(rows)

    def describe(self) -> str:
        """e.g. ``wikitext2/test (data/wikitext-2-raw-v1/wiki.test.raw)``, for messages."""
        return f"{self.name}/{self.split} ({self.source})"

    def provenance(self) -> dict[str, Any]:
        return {
            "dataset": self.name,
            "split": self.split,
            "rows": len(self.rows),
            "source": self.source,
        }


def get_corpus_spec(name: str) -> CorpusSpec:
    if name not in CORPORA:
        raise unknown_choice("dataset", name, list(CORPORA))
    return CORPORA[name]


def split_source(name: str, split: str) -> SplitSource:
    spec = get_corpus_spec(name)
    if split not in spec.splits:
        raise unknown_choice(f"split of dataset {name}", split, list(spec.splits))
    return spec.splits[split]


def find_mirror_file(data_dir: str | Path, name: str, split: str) -> Path | None:
    """The first mirror file of (name, split) present under ``data_dir``, else None."""
    for rel in split_source(name, split).mirror_files:
        path = Path(data_dir).expanduser() / rel
        if path.is_file():
            return path
    return None


def load_corpus(name: str, split: str, data_dir: str | Path, offline: bool = False) -> Corpus:
    """Rows of ``name``/``split``: from the mirror when the file is there, else from the hub.

    Raises:
        ConfigError: unknown dataset or split (the message lists the valid ones).
        DataNotFoundError: not in the mirror and the hub is unreachable; names the file and the
            command that provides it.
    """
    spec = get_corpus_spec(name)
    source = split_source(name, split)
    path = find_mirror_file(data_dir, name, split)
    if path is not None:
        corpus = Corpus(name, split, spec.read_mirror(path), str(path))
        require_text(corpus, spec, REPAIR_HINT)
        return corpus
    if not hub_available(offline):
        expected = Path(data_dir).expanduser() / source.mirror_files[0]
        raise DataNotFoundError(
            f"{spec.title} split '{split}' is not in the data mirror: expected {expected}; "
            "the Hugging Face hub is unreachable (or offline=true), so it cannot be downloaded. "
            + PREPARE_HINT.format(data_dir=data_dir)
        )
    corpus = Corpus(name, split, load_hub_rows(spec, source), hub_label(spec, source))
    require_text(corpus, spec, "Check the hub dataset, or provide the split in the data mirror.")
    return corpus


def require_text(corpus: Corpus, spec: CorpusSpec, hint: str) -> None:
    """Refuse a split with no text: it would give a NaN perplexity or no calibration block.

    Raises:
        BadDataError: the split has no rows, only blank ones, or (hub) a row that is not a
            string; names the file or hub dataset.
    """
    bad = next((i for i, row in enumerate(corpus.rows) if not isinstance(row, str)), None)
    if bad is not None:
        raise BadDataError(
            f"{spec.title} split '{corpus.split}' from {corpus.source}: row {bad + 1} is "
            f"{json_kind(corpus.rows[bad])}, not text. {hint}"
        )
    if not any(row.strip() for row in corpus.rows):
        held = "no rows" if not corpus.rows else f"only blank rows ({len(corpus.rows)})"
        raise BadDataError(
            f"{spec.title} split '{corpus.split}' at {corpus.source} holds {held}: there is "
            f"no text to evaluate or calibrate on. {hint}"
        )


def hub_label(spec: CorpusSpec, source: SplitSource) -> str:
    """e.g. ``hub:wikitext/wikitext-2-raw-v1@main`` or ``hub:allenai/c4@main:en/c4-...json.gz``."""
    name = f"/{spec.hub_name}" if spec.hub_name else ""
    files = f":{source.hub_data_files}" if source.hub_data_files else ""
    return f"hub:{spec.hub_path}{name}@{spec.hub_revision or 'main'}{files}"


def load_hub_rows(spec: CorpusSpec, source: SplitSource) -> list[str]:
    """The split's rows from the hub with ``datasets.load_dataset``."""
    import datasets  # heavy import, only when the hub is actually used

    log.info("Downloading %s/%s from the Hugging Face hub", spec.hub_path, source.hub_split)
    kwargs: dict[str, Any] = {"split": source.hub_split}
    if spec.hub_revision:
        kwargs["revision"] = spec.hub_revision
    if source.hub_data_files:
        kwargs["data_files"] = {source.hub_split: source.hub_data_files}
    rows = datasets.load_dataset(spec.hub_path, spec.hub_name, **kwargs)
    return list(rows[spec.hub_field])
