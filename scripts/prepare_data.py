"""Build the local data mirror from the Hugging Face hub, so later runs need no network.

Usage::

    python scripts/prepare_data.py --out DIR [--datasets wikitext2 ptb c4 alpaca lm-eval]
                                   [--c4-train] [--force]
    python scripts/prepare_data.py --verify DIR

The files land in exactly the layout that ``basis_sharing.data.corpora`` reads (the first entry of
each split's ``SplitSource.mirror_files``), written so that its readers give back the hub rows:

* ``wikitext-2-raw-v1/wiki.{train,valid,test}.raw``: the release format. An empty hub row was a
  line holding a single space, every other row already ends with ``"\\n"``; ``read_wikitext_raw``
  inverts this exactly, and on the real release files the written file is byte-identical.
* ``ptb/ptb.{train,valid,test}.txt``: one hub row per line, framed by single spaces as in
  Mikolov's release files (the hub's ``ptb_text_only`` strips them, ``read_ptb_txt`` too), so
  the written file is byte-identical to the release and the rows round-trip.
* ``c4/c4-validation.00000-of-00008.json.gz`` (and, with ``--c4-train``, the ~300 MB
  ``c4-train.00000-of-01024.json.gz``): a byte-exact copy of the allenai/c4 shard.
* ``alpaca/alpaca_data.json``: the ``{instruction, input, output}`` records of tatsu-lab/alpaca;
  ``alpaca_text`` rebuilds the hub's ``text`` column from them.
* ``lm-eval/<task>/<split>.jsonl``: the rows of the hub dataset that lm-evaluation-harness's
  standard task YAML reads, one JSON object per line (see ``LM_EVAL_TASKS``).

Every file is written atomically (temporary file, then ``os.replace``), so an interrupted run
never leaves a truncated file that a later run would skip as present. ``MANIFEST.json`` at the
mirror root records the size and SHA-256 of every file; ``--verify`` recomputes them.

Exit codes: 0 success, 1 ``--verify`` found a mismatch, 2 the hub is needed but unreachable or a
download failed (argparse usage errors also exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# scripts/ is not a package and basis_sharing need not be installed: run from a checkout.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from basis_sharing.data.corpora import (  # noqa: E402
    CORPORA,
    CorpusSpec,
    SplitSource,
    alpaca_text,
    load_hub_rows,
)
from basis_sharing.errors import HubUnreachableError  # noqa: E402
from basis_sharing.files import new_file_mode  # noqa: E402
from basis_sharing.hashing import file_sha256  # noqa: E402
from basis_sharing.hub import hub_available  # noqa: E402

log = logging.getLogger("prepare_data")

MANIFEST_NAME = "MANIFEST.json"
# Suffix of the temporary files of atomic writes: never recorded in the manifest.
TMP_SUFFIX = ".prepare-tmp"
ALPACA_FIELDS = ("instruction", "input", "output")


@dataclass(frozen=True)
class LmEvalSource:
    """A hub dataset split, as lm-evaluation-harness 0.4.x's standard task YAML names it."""

    hub_path: str
    hub_name: str | None
    split: str


# task -> hub source; the same dataset_path/dataset_name/split as lm-eval's task YAMLs, so a local
# task YAML only swaps the data source (see ../shared/assets/README.md).
LM_EVAL_TASKS: dict[str, LmEvalSource] = {
    "arc_easy": LmEvalSource("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": LmEvalSource("allenai/ai2_arc", "ARC-Challenge", "test"),
    "openbookqa": LmEvalSource("allenai/openbookqa", "main", "test"),
    "winogrande": LmEvalSource("allenai/winogrande", "winogrande_xl", "validation"),
    "piqa": LmEvalSource("baber/piqa", None, "validation"),
    "hellaswag": LmEvalSource("Rowan/hellaswag", None, "validation"),
    "mathqa": LmEvalSource("regisss/math_qa", None, "test"),
}

DATASETS = ("wikitext2", "ptb", "c4", "alpaca", "lm-eval")

# What a mirror file holds before it is written: its bytes, or a downloaded file to copy.
Content = bytes | Path
T = TypeVar("T")


@dataclass(frozen=True)
class MirrorFile:
    """One file of the mirror and how to produce it; producing it is what contacts the hub."""

    rel: str  # POSIX path under the mirror root
    dataset: str  # CLI dataset name, for messages
    produce: Callable[[], Content]


# ---------------------------------------------------------------------------------------------
# Rendering: hub rows -> file text that the corpora readers turn back into the same rows.
# ---------------------------------------------------------------------------------------------


def render_wikitext(rows: Sequence[str]) -> str:
    """WikiText raw release text whose ``read_wikitext_raw`` rows are exactly ``rows``.

    Raises ValueError for a row the reader could not give back (no trailing newline, an inner line
    break, or whitespace only), rather than writing a mirror that silently differs from the hub.
    """
    lines = []
    for i, row in enumerate(rows):
        if row == "":
            lines.append(" \n")
            continue
        body = row[:-1]
        if not row.endswith("\n") or "\n" in body or "\r" in body or not body.strip():
            raise ValueError(f"WikiText row {i} cannot be stored losslessly: {row[:80]!r}")
        lines.append(row)
    return "".join(lines)


def render_ptb(rows: Sequence[str]) -> str:
    """The release layout: each sentence framed by single spaces, one per line.

    The hub strips the spaces (``read_ptb_txt`` does the same), so rows round-trip and a mirror
    written from the hub is byte-identical to Mikolov's ``ptb.*.txt``.
    """
    for i, row in enumerate(rows):
        if row != row.strip() or "\n" in row or "\r" in row:
            raise ValueError(f"PTB row {i} is not a stripped single line: {row[:80]!r}")
    return "".join(f" {row} \n" for row in rows)


def render_alpaca(records: Sequence[dict[str, str]]) -> str:
    """The Stanford ``alpaca_data.json`` layout: a JSON list of instruction records."""
    return json.dumps(list(records), ensure_ascii=False, indent=4) + "\n"


def render_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    """JSON lines (what lm-eval's ``dataset_path: json`` reads); json escapes any newline."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# ---------------------------------------------------------------------------------------------
# Hub access. The only functions that touch the network; tests replace the hub libraries.
# ---------------------------------------------------------------------------------------------


def one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace so an error from the hub libraries fits on one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def from_hub(dataset: str, what: str, fetch: Callable[[], T]) -> T:
    """Run a hub download; any failure becomes one line naming the dataset and the hub.

    Whatever goes wrong inside ``datasets``/``huggingface_hub`` (DNS, HTTP 404, gated repo, a
    script-only dataset) the user can only act on "this dataset needs the hub", so the library's
    traceback is reduced to its message.
    """
    try:
        return fetch()
    except Exception as exc:
        raise HubUnreachableError(
            f"{dataset}: downloading {what} from the Hugging Face hub failed "
            f"({type(exc).__name__}: {one_line(str(exc))}); prepare_data.py needs the hub."
        ) from exc


def fetch_corpus_rows(spec: CorpusSpec, source: SplitSource) -> list[str]:
    """A corpus split's rows, fetched as ``load_corpus`` fetches them when the mirror lacks them."""
    return load_hub_rows(spec, source)


def fetch_alpaca_records(spec: CorpusSpec, source: SplitSource) -> list[dict[str, str]]:
    """tatsu-lab/alpaca records without the derived ``text`` column.

    A record whose ``text`` differs from ``alpaca_text(record)`` means the mirror would not give
    the hub rows back; that is logged (not fatal: the records themselves are the source data).
    """
    import datasets  # heavy import, only when downloading

    kwargs: dict[str, Any] = {"split": source.hub_split}
    if spec.hub_revision:
        kwargs["revision"] = spec.hub_revision
    rows = datasets.load_dataset(spec.hub_path, spec.hub_name, **kwargs)
    records, differ = [], 0
    for row in rows:
        record = {key: row[key] for key in ALPACA_FIELDS}
        if "text" in row and alpaca_text(record) != row["text"]:
            differ += 1
        records.append(record)
    if differ:
        log.warning(
            "alpaca: %d of %d hub rows have a `text` that alpaca_text() does not rebuild",
            differ,
            len(records),
        )
    return records


def fetch_hub_file(spec: CorpusSpec, source: SplitSource) -> Path:
    """Download one file of a dataset repo (a C4 shard) into the hub cache; returns its path."""
    from huggingface_hub import hf_hub_download

    if source.hub_data_files is None:
        raise ValueError(f"{spec.name}/{source.hub_split} names no file in the hub repo")
    path = hf_hub_download(
        repo_id=spec.hub_path,
        filename=source.hub_data_files,
        repo_type="dataset",
        revision=spec.hub_revision,
    )
    return Path(path)


def fetch_task_rows(source: LmEvalSource) -> list[dict[str, Any]]:
    """An lm-eval task split's rows, unchanged."""
    import datasets  # heavy import, only when downloading

    rows = datasets.load_dataset(source.hub_path, source.hub_name, split=source.split)
    return [dict(row) for row in rows]


# ---------------------------------------------------------------------------------------------
# Planning: which files each dataset contributes.
# ---------------------------------------------------------------------------------------------


def corpus_producer(name: str, spec: CorpusSpec, source: SplitSource) -> Callable[[], Content]:
    """How one corpus split's file is produced: download, then render (C4: copy as is)."""
    what = f"{spec.hub_path} split '{source.hub_split}'"
    if name == "c4":
        return lambda: from_hub(name, what, lambda: fetch_hub_file(spec, source))
    if name == "alpaca":
        return lambda: encode(
            render_alpaca(from_hub(name, what, lambda: fetch_alpaca_records(spec, source)))
        )
    render = render_wikitext if name == "wikitext2" else render_ptb
    return lambda: encode(render(from_hub(name, what, lambda: fetch_corpus_rows(spec, source))))


def encode(text: str) -> bytes:
    """UTF-8 bytes, written as such: no platform newline translation can alter the file."""
    return text.encode("utf-8")


def corpus_files(name: str, c4_train: bool = False) -> list[MirrorFile]:
    """The mirror files of one ``CORPORA`` entry: the first ``mirror_files`` name of each split."""
    spec = CORPORA[name]
    return [
        MirrorFile(source.mirror_files[0], name, corpus_producer(name, spec, source))
        for split, source in spec.splits.items()
        if not (name == "c4" and split == "train" and not c4_train)
    ]


def task_producer(task: str, source: LmEvalSource) -> Callable[[], Content]:
    name = f"/{source.hub_name}" if source.hub_name else ""
    what = f"{source.hub_path}{name} split '{source.split}' (task {task})"
    return lambda: encode(render_jsonl(from_hub("lm-eval", what, lambda: fetch_task_rows(source))))


def lm_eval_files() -> list[MirrorFile]:
    """``lm-eval/<task>/<split>.jsonl`` for every task of ``LM_EVAL_TASKS``."""
    return [
        MirrorFile(f"lm-eval/{task}/{source.split}.jsonl", "lm-eval", task_producer(task, source))
        for task, source in LM_EVAL_TASKS.items()
    ]


def plan_files(datasets: Iterable[str], c4_train: bool = False) -> list[MirrorFile]:
    """Every mirror file of the chosen datasets, in CLI order."""
    files: list[MirrorFile] = []
    for dataset in dict.fromkeys(datasets):  # drop repeats, keep order
        files += lm_eval_files() if dataset == "lm-eval" else corpus_files(dataset, c4_train)
    return files


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------


def write_atomic(dest: Path, content: Content) -> None:
    """Write bytes, or copy a file, to ``dest`` so that it is either complete or absent.

    The temporary file sits in ``dest``'s directory, so ``os.replace`` is a same-filesystem rename.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(content, Path):
                with content.open("rb") as src:
                    shutil.copyfileobj(src, out, length=1 << 20)
            else:
                out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, new_file_mode())  # mkstemp would give 0600
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pending_files(root: Path, files: Sequence[MirrorFile], force: bool) -> list[MirrorFile]:
    """The files to write: all with ``force``, else those not yet in the mirror."""
    todo = [f for f in files if force or not (root / f.rel).exists()]
    if skipped := len(files) - len(todo):
        log.info("Skipping %d file(s) already in %s (--force rewrites them)", skipped, root)
    return todo


def write_files(root: Path, files: Sequence[MirrorFile]) -> None:
    """Produce (download) and write each file, with a progress bar over the files."""
    with logging_redirect_tqdm(loggers=[log]):
        for mirror_file in tqdm(files, desc="Mirror files", unit="file"):
            log.info("Writing %s", mirror_file.rel)
            write_atomic(root / mirror_file.rel, mirror_file.produce())


# ---------------------------------------------------------------------------------------------
# Manifest.
# ---------------------------------------------------------------------------------------------


def mirror_paths(root: Path) -> list[str]:
    """Every file under ``root`` (POSIX, relative), except the manifest and temporary files."""
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and not path.name.endswith(TMP_SUFFIX) and path != root / MANIFEST_NAME
    )


def build_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> {"bytes", "sha256"} for every file of the mirror."""
    return {
        rel: {"bytes": (root / rel).stat().st_size, "sha256": file_sha256(root / rel)}
        for rel in mirror_paths(root)
    }


def write_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """Record the mirror's files, so a copied or linked mirror can be checked with --verify."""
    manifest = build_manifest(root)
    write_atomic(root / MANIFEST_NAME, encode(json.dumps(manifest, indent=2) + "\n"))
    log.info("Wrote %s (%d files)", root / MANIFEST_NAME, len(manifest))
    return manifest


def verify_manifest(root: Path) -> list[str]:
    """Differences between ``MANIFEST.json`` and the files: one message per bad file."""
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        return [f"{manifest_path} does not exist (prepare_data.py --out writes one)"]
    expected: dict[str, dict[str, Any]] = json.loads(manifest_path.read_text(encoding="utf-8"))
    present = set(mirror_paths(root))
    problems = []
    for rel, entry in sorted(expected.items()):
        if rel not in present:
            problems.append(f"{rel}: missing")
            continue
        size = (root / rel).stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{rel}: {size} bytes, manifest says {entry['bytes']}")
        elif file_sha256(root / rel) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    problems += [f"{rel}: not in the manifest" for rel in sorted(present - expected.keys())]
    return problems


# ---------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build the local data mirror from the Hugging Face hub, or verify one."
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, metavar="DIR", help="mirror root to write")
    mode.add_argument("--verify", type=Path, metavar="DIR", help="check DIR against its manifest")
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=DATASETS,
        default=list(DATASETS),
        metavar="NAME",
        help=f"datasets to write (default: all of {' '.join(DATASETS)})",
    )
    parser.add_argument(
        "--c4-train", action="store_true", help="also copy the ~300 MB C4 train shard"
    )
    parser.add_argument("--force", action="store_true", help="rewrite files that already exist")
    return parser.parse_args(argv)


def prepare(root: Path, datasets: Sequence[str], c4_train: bool, force: bool) -> int:
    """Write the missing mirror files, then the manifest; returns the exit code."""
    todo = pending_files(root, plan_files(datasets, c4_train), force)
    if todo and not hub_available():
        needed = ", ".join(dict.fromkeys(f.dataset for f in todo))
        log.error(
            "%s: the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set), and "
            "prepare_data.py needs the hub to download them; run it on a machine that reaches "
            "the hub, or copy an existing mirror.",
            needed,
        )
        return 2
    root.mkdir(parents=True, exist_ok=True)
    code = 0
    try:
        write_files(root, todo)
    except HubUnreachableError as exc:
        log.error("%s", exc)
        code = 2
    write_manifest(root)  # describe what is on disk, also after a partial run
    return code


def verify(root: Path) -> int:
    """Report every file that differs from the manifest; exit code 1 if any."""
    problems = verify_manifest(root)
    for problem in problems:
        log.error("%s", problem)
    if problems:
        log.error("%s: %d mismatch(es) with %s", root, len(problems), MANIFEST_NAME)
        return 1
    log.info("%s: every file matches %s", root, MANIFEST_NAME)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.verify is not None:
        return verify(args.verify.expanduser())
    return prepare(args.out.expanduser(), args.datasets, args.c4_train, args.force)


if __name__ == "__main__":
    sys.exit(main())
