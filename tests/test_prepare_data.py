"""scripts/prepare_data.py, offline: the hub libraries are replaced by in-memory fakes.

The fakes stand in for ``datasets.load_dataset`` and ``huggingface_hub.hf_hub_download`` rather
than for the script's own fetch functions, so the script's real call code (and corpora's
``load_hub_rows``) runs and its arguments are checked.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import load_script

from basis_sharing.data.corpora import alpaca_text, load_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MIRROR = REPO_ROOT.parent / "shared" / "assets"


prep = load_script("prepare_data")


class FakeDataset:
    """The two ways the script reads a ``datasets.Dataset``: a column, and iteration over rows."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self._rows = rows

    def __getitem__(self, column: str) -> list[Any]:
        return [row[column] for row in self._rows]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter([dict(row) for row in self._rows])


class FakeHub:
    """Hub tables keyed by (path, name, split), hub files by filename, and a log of the calls."""

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}
        self.files: dict[str, Path] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.error: Exception | None = None

    def load_dataset(self, path: str, name: str | None = None, **kwargs: Any) -> FakeDataset:
        self.calls.append(("load_dataset", path, name, kwargs))
        if self.error is not None:
            raise self.error
        return FakeDataset(self.tables[(path, name, kwargs["split"])])

    def hf_hub_download(self, repo_id: str, filename: str, **kwargs: Any) -> str:
        self.calls.append(("hf_hub_download", repo_id, filename, kwargs))
        if self.error is not None:
            raise self.error
        return str(self.files[filename])

    def set_rows(self, path: str, name: str | None, split: str, column: str, rows: list) -> None:
        self.tables[(path, name, split)] = [{column: row} for row in rows]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import huggingface_hub

    fake = FakeHub()
    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake.load_dataset)
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(prep, "hub_available", lambda *a, **k: True)
    return fake


WIKI_ROWS = {
    "train": ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 : é ü 日本 \n", ""],
    "validation": [" = Homarus gammarus = \n", "", "  two leading spaces , trailing  \n"],
    "test": ["", " = Robert Boulter = \n", "", " Tab\there and ½ @-@ 1 \n"],
}
PTB_ROWS = {
    "train": ["aer banknote berlitz", "pierre <unk> N years old", "", "naïve café 日本"],
    "validation": ["consumers may want to move", "a b  c"],
    "test": ["no it was n't black monday"],
}


def test_wikitext_and_ptb_round_trip(hub: FakeHub, tmp_path: Path) -> None:
    for split, rows in WIKI_ROWS.items():
        hub.set_rows("wikitext", "wikitext-2-raw-v1", split, "text", rows)
        hub.set_rows("ptb_text_only", "penn_treebank", split, "sentence", PTB_ROWS[split])

    assert prep.main(["--out", str(tmp_path), "--datasets", "wikitext2", "ptb"]) == 0

    for split in WIKI_ROWS:
        assert load_corpus("wikitext2", split, tmp_path).rows == WIKI_ROWS[split]
        assert load_corpus("ptb", split, tmp_path).rows == PTB_ROWS[split]
    assert (tmp_path / "wikitext-2-raw-v1/wiki.valid.raw").is_file()
    ptb_text = (tmp_path / "ptb/ptb.train.txt").read_text(encoding="utf-8")
    assert ptb_text.startswith(" aer banknote berlitz \n")  # the release layout
    ptb_calls = [c for c in hub.calls if c[1] == "ptb_text_only"]
    assert {c[3]["revision"] for c in ptb_calls} == {"refs/convert/parquet"}


def test_alpaca_round_trip(hub: FakeHub, tmp_path: Path) -> None:
    records = [
        {"instruction": "Give three tips.", "input": "", "output": "1. Eat.\n2. Sleep."},
        {"instruction": "Translate", "input": "«Grüß Gott» 日本", "output": "Hello"},
    ]
    hub.tables[("tatsu-lab/alpaca", None, "train")] = [
        {**r, "text": alpaca_text(r)} for r in records
    ]

    assert prep.main(["--out", str(tmp_path), "--datasets", "alpaca"]) == 0

    path = tmp_path / "alpaca/alpaca_data.json"
    assert json.loads(path.read_text(encoding="utf-8")) == records  # no `text` column
    assert "日本" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert load_corpus("alpaca", "train", tmp_path).rows == [alpaca_text(r) for r in records]


def test_c4_shard_is_copied_byte_exact(hub: FakeHub, tmp_path: Path) -> None:
    docs = [{"text": "First doc.\nSecond line é", "timestamp": "t", "url": "u"}, {"text": "Two"}]
    shard = tmp_path / "cache" / "shard.json.gz"
    shard.parent.mkdir()
    shard.write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in docs).encode()))
    hub.files["en/c4-validation.00000-of-00008.json.gz"] = shard
    mirror = tmp_path / "mirror"

    assert prep.main(["--out", str(mirror), "--datasets", "c4"]) == 0

    copied = mirror / "c4/c4-validation.00000-of-00008.json.gz"
    assert copied.read_bytes() == shard.read_bytes()
    assert load_corpus("c4", "validation", mirror).rows == [d["text"] for d in docs]
    assert hub.calls == [
        (
            "hf_hub_download",
            "allenai/c4",
            "en/c4-validation.00000-of-00008.json.gz",
            {"repo_type": "dataset", "revision": None},
        )
    ]
    assert not (mirror / "c4/c4-train.00000-of-01024.json.gz").exists()


def test_c4_train_only_on_request() -> None:
    default = [f.rel for f in prep.plan_files(["c4"])]
    with_train = [f.rel for f in prep.plan_files(["c4"], c4_train=True)]
    assert default == ["c4/c4-validation.00000-of-00008.json.gz"]
    assert sorted(with_train) == sorted(default + ["c4/c4-train.00000-of-01024.json.gz"])


def test_lm_eval_rows_round_trip(hub: FakeHub, tmp_path: Path) -> None:
    expected = {}
    for i, (task, src) in enumerate(prep.LM_EVAL_TASKS.items()):
        rows = [
            {"id": f"{task}-{i}", "question": "Which? «é» 日本\nline two", "label": i},
            {"choices": {"text": ["a", "b"], "label": ["A", "B"]}, "ind": None, "ok": True},
        ]
        hub.tables[(src.hub_path, src.hub_name, src.split)] = rows
        expected[f"lm-eval/{task}/{src.split}.jsonl"] = rows

    assert prep.main(["--out", str(tmp_path), "--datasets", "lm-eval"]) == 0

    assert "lm-eval/hellaswag/validation.jsonl" in expected
    for rel, rows in expected.items():
        text = (tmp_path / rel).read_text(encoding="utf-8")
        assert "日本" in text and text.endswith("\n")
        assert [json.loads(line) for line in text.split("\n")[:-1]] == rows


def _write_ptb(hub: FakeHub, mirror: Path, rows: list[str], *flags: str) -> int:
    for split in ("train", "validation", "test"):
        hub.set_rows("ptb_text_only", "penn_treebank", split, "sentence", rows)
    return prep.main(["--out", str(mirror), "--datasets", "ptb", *flags])


def test_manifest_and_verify(hub: FakeHub, tmp_path: Path) -> None:
    assert _write_ptb(hub, tmp_path, ["a b c", "d e"]) == 0

    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert sorted(manifest) == ["ptb/ptb.test.txt", "ptb/ptb.train.txt", "ptb/ptb.valid.txt"]
    data = (tmp_path / "ptb/ptb.test.txt").read_bytes()
    assert manifest["ptb/ptb.test.txt"] == {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert prep.main(["--verify", str(tmp_path)]) == 0

    (tmp_path / "ptb/ptb.test.txt").write_bytes(b"A" + data[1:])  # one byte changed
    assert prep.main(["--verify", str(tmp_path)]) == 1
    assert prep.verify_manifest(tmp_path) == ["ptb/ptb.test.txt: sha256 differs from the manifest"]


def test_existing_files_skipped_unless_force(hub: FakeHub, tmp_path: Path) -> None:
    assert _write_ptb(hub, tmp_path, ["old rows"]) == 0
    hub.calls.clear()

    assert _write_ptb(hub, tmp_path, ["new rows"]) == 0
    assert hub.calls == []
    assert load_corpus("ptb", "test", tmp_path).rows == ["old rows"]

    assert _write_ptb(hub, tmp_path, ["new rows"], "--force") == 0
    assert len(hub.calls) == 3
    assert load_corpus("ptb", "test", tmp_path).rows == ["new rows"]
    assert prep.main(["--verify", str(tmp_path)]) == 0  # the manifest follows the rewrite
    assert not list(tmp_path.rglob(f"*{prep.TMP_SUFFIX}"))


def test_hub_unavailable_exits_2(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(prep, "hub_available", lambda *a, **k: False)
    caplog.set_level(logging.INFO)

    assert prep.main(["--out", str(tmp_path / "m"), "--datasets", "ptb", "alpaca"]) == 2

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "hub" in errors[0] and "ptb, alpaca" in errors[0]
    assert hub.calls == [] and not (tmp_path / "m").exists()


def test_hub_failure_is_one_line_naming_the_dataset(
    hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub.error = ConnectionError("Max retries exceeded\nwith url: /datasets/ptb_text_only")
    caplog.set_level(logging.INFO)

    assert _write_ptb(hub, tmp_path, ["x"]) == 2

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith("ptb: downloading ptb_text_only split 'train'")
    assert "Hugging Face hub" in errors[0] and "ConnectionError" in errors[0]
    assert not list(tmp_path.rglob("*.txt"))


def test_renderers_refuse_rows_that_would_not_round_trip() -> None:
    for rows in (["no newline"], ["two\nlines\n"], ["   \n"], ["cr\r\n"]):
        with pytest.raises(ValueError, match="WikiText row 0"):
            prep.render_wikitext(rows)
    for rows in ([" leading"], ["trailing "], ["two\nlines"]):
        with pytest.raises(ValueError, match="PTB row 0"):
            prep.render_ptb(rows)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "file.txt"
    with pytest.raises(FileNotFoundError):
        prep.write_atomic(dest, tmp_path / "does-not-exist")
    assert list((tmp_path / "sub").iterdir()) == []


@pytest.mark.skipif(not SHARED_MIRROR.is_dir(), reason="no shared data mirror here")
@pytest.mark.parametrize("name", ["wikitext2", "ptb"])
@pytest.mark.parametrize("split", ["test", "validation"])
def test_writer_inverts_reader_on_the_release_files(name: str, split: str, tmp_path: Path) -> None:
    corpus = load_corpus(name, split, SHARED_MIRROR, offline=True)
    out = tmp_path / "release.txt"
    render = prep.render_wikitext if name == "wikitext2" else prep.render_ptb

    prep.write_atomic(out, prep.encode(render(corpus.rows)))

    assert out.read_bytes() == Path(corpus.source).read_bytes()
