"""Damaged or empty data is refused before the model loads, with a message naming the file.

Each run test damages one file of a fresh tiny mirror, runs the pipeline on a tiny local model with
``load_model`` replaced by a test failure, and checks the message and the failed record.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config, synthetic_lines, tiny_run_overrides, write_tiny_mirror

from basis_sharing import pipeline
from basis_sharing.data import corpora
from basis_sharing.data.corpora import load_corpus, read_json_lines_gz
from basis_sharing.data.rows import element_line
from basis_sharing.data.tokens import tokenize_text
from basis_sharing.errors import BadDataError, CalibrationError, UserError
from basis_sharing.evaluation.perplexity import perplexity

WIKI_TEST = "wikitext-2-raw-v1/wiki.test.raw"
WIKI_VALID = "wikitext-2-raw-v1/wiki.valid.raw"
PTB_TEST = "ptb/ptb.test.txt"
C4_VALID = "c4/c4-validation.00000-of-00008.json.gz"
ALPACA = "alpaca/alpaca_data.json"
ARC_EASY = "lm-eval/arc_easy/test.jsonl"


@pytest.fixture
def mirror(tmp_path) -> Path:
    """A fresh tiny mirror per test, so each test damages its own copy."""
    return write_tiny_mirror(tmp_path / "mirror")


def run_config(model_dir: Path, mirror: Path, tmp_path: Path, *overrides: str):
    return compose_config(
        *tiny_run_overrides(model_dir, mirror, f"paths.cache_dir={tmp_path}/cache", *overrides)
    )


def calibration_overrides(dataset: str = "wikitext2_cpu") -> tuple[str, ...]:
    return (
        "method=svd_llm",
        "ratio=0.4",
        "ratio_tolerance=0.05",  # rank rounding on the tiny model (the rank plan is checked first)
        f"calibration={dataset}",
        "calibration.n_samples=2",
        "calibration.seq_len=32",
    )


def refused(cfg, tmp_path: Path, error=BadDataError) -> str:
    """Run ``cfg``; it must fail with ``error`` before load_model. Returns the message."""
    out = tmp_path / "run"
    with pytest.raises(error) as info:
        pipeline.run(cfg, out_dir=out)
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "failed"
    assert record["error"] == {"type": error.__name__, "message": str(info.value)}
    assert "load_model" not in record["stages"]
    return str(info.value)


def write_gzip(path: Path, data: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(data)


# --- 1. empty evaluation and calibration splits ---------------------------------------------


@pytest.mark.parametrize(
    ("rel", "dataset", "content", "held"),
    [
        (WIKI_TEST, "wikitext2", b"", "holds no rows"),
        (WIKI_TEST, "wikitext2", b" \n \n\n", "holds only blank rows (3)"),
        (PTB_TEST, "ptb", b"\n   \n", "holds only blank rows (2)"),
        (C4_VALID, "c4", None, "holds no rows"),  # a valid gzip of nothing
    ],
)
def test_empty_eval_split_is_refused_naming_the_file(
    no_model_load, tiny_model_dir, mirror, tmp_path, rel, dataset, content, held
):
    path = mirror / rel
    if content is None:
        write_gzip(path, b"")
    else:
        path.write_bytes(content)
    cfg = run_config(tiny_model_dir, mirror, tmp_path, f"eval.ppl_datasets=[{dataset}]")
    message = refused(cfg, tmp_path)
    title = corpora.CORPORA[dataset].title
    split = "validation" if dataset == "c4" else "test"
    assert message.startswith(f"{title} split '{split}' at {path} {held}: there is no text")


def test_empty_calibration_split_is_refused_naming_the_file(
    no_model_load, tiny_model_dir, mirror, tmp_path
):
    (mirror / WIKI_VALID).write_text(" \n", encoding="utf-8")
    cfg = run_config(
        tiny_model_dir, mirror, tmp_path, "eval.ppl_datasets=[ptb]", *calibration_overrides()
    )
    message = refused(cfg, tmp_path)
    assert message.startswith(
        f"WikiText-2 (raw) split 'validation' at {mirror / WIKI_VALID} holds only blank rows (1)"
    )


def test_split_of_one_token_is_refused_at_tokenize_time(
    no_model_load, tiny_model_dir, tiny_tokenizer, mirror, tmp_path
):
    (mirror / PTB_TEST).write_text(" a \n", encoding="utf-8")
    assert tokenize_text(tiny_tokenizer, "a").numel() == 1
    cfg = run_config(tiny_model_dir, mirror, tmp_path, "eval.ppl_datasets=[wikitext2,ptb]")
    message = refused(cfg, tmp_path)
    assert message.startswith(
        f"The text of ptb/test ({mirror / PTB_TEST}) tokenizes to 1 token(s); perplexity needs "
        "at least 2"
    )
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "tokenize" in record["stages"] and "perplexity" not in record["metrics"]


def test_perplexity_raises_on_zero_windows_instead_of_nan():
    for n in (0, 1):
        with pytest.raises(BadDataError) as info:
            perplexity(None, torch.zeros(n, dtype=torch.long), 64, dataset="wikitext2")
        assert str(info.value) == (
            f"Perplexity on wikitext2: {n} token(s) give no window with a token to predict "
            "(at least 2 are needed)."
        )


def test_empty_split_from_cli_exits_1_with_the_message(tiny_model_dir, mirror, tmp_path):
    """The defect as a user saw it: `nan (0/0 windows)` and exit 0."""
    (mirror / WIKI_TEST).write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "run.py", *cli_args(tiny_model_dir, mirror, tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "perplexity nan" not in output, output[-3000:]
    assert f"split 'test' at {mirror / WIKI_TEST} holds no rows" in output
    record = json.loads((tmp_path / "r" / "results.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "BadDataError"
    assert "load_model" not in record["stages"]


def cli_args(model_dir: Path, mirror: Path, tmp_path: Path) -> list[str]:
    return tiny_run_overrides(
        model_dir, mirror, "eval.ppl_datasets=[wikitext2]", f"hydra.run.dir={tmp_path}/r"
    )


# --- 2. files that are not UTF-8 ------------------------------------------------------------


def latin1_lines(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("latin-1")


@pytest.mark.parametrize(("rel", "dataset"), [(WIKI_TEST, "wikitext2"), (PTB_TEST, "ptb")])
def test_text_file_not_utf8_names_file_line_and_byte(
    no_model_load, tiny_model_dir, mirror, tmp_path, rel, dataset
):
    (mirror / rel).write_bytes(latin1_lines([" the king ", " ", " caf\xe9 song "]))
    cfg = run_config(tiny_model_dir, mirror, tmp_path, f"eval.ppl_datasets=[{dataset}]")
    message = refused(cfg, tmp_path)
    # " caf" is 4 bytes, so the 0xe9 of the third line is its 5th byte
    assert message.startswith(
        f"{mirror / rel} is not UTF-8 text: line 3, byte 5 (0xe9) cannot be decoded "
        "(invalid continuation byte). Mirror files must be UTF-8."
    )


def test_c4_line_not_utf8_names_file_and_line(no_model_load, tiny_model_dir, mirror, tmp_path):
    rows = [json.dumps({"text": t}) for t in ("one", "two")] + ['{"text": "\xff"}']
    write_gzip(mirror / C4_VALID, latin1_lines(rows))
    cfg = run_config(tiny_model_dir, mirror, tmp_path, "eval.ppl_datasets=[c4]")
    message = refused(cfg, tmp_path)
    assert message.startswith(
        f"{mirror / C4_VALID} is not UTF-8 text: line 3, byte 11 (0xff) cannot be decoded "
        "(invalid start byte)."
    )


def test_task_file_not_utf8_names_file_and_line(no_model_load, tiny_model_dir, mirror, tmp_path):
    path = mirror / ARC_EASY
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"question": "', b'"question": "\xe9', 1)
    path.write_bytes(b"".join(lines))
    cfg = run_config(tiny_model_dir, mirror, tmp_path, "eval.zeroshot.tasks=[arc_easy]")
    message = refused(cfg, tmp_path)
    byte = lines[1].index(b"\xe9") + 1
    assert message.startswith(f"{path} is not UTF-8 text: line 2, byte {byte} (0xe9)")


def test_alpaca_not_utf8_names_file_and_line(no_model_load, tiny_model_dir, mirror, tmp_path):
    records = [{"instruction": "caf\xe9", "input": "", "output": "x"}]
    (mirror / ALPACA).write_bytes(
        json.dumps(records, indent=1, ensure_ascii=False).encode("cp1252")
    )
    cfg = run_config(tiny_model_dir, mirror, tmp_path, *calibration_overrides("alpaca"))
    message = refused(cfg, tmp_path)
    assert message.startswith(f"{mirror / ALPACA} is not UTF-8 text: line 3, byte 22 (0xe9)")


# --- 3. C4 gzip and JSON rows, lm-eval task rows, Alpaca records ----------------------------


def test_c4_file_that_is_not_gzip(no_model_load, tiny_model_dir, mirror, tmp_path):
    (mirror / C4_VALID).write_text(json.dumps({"text": "plain"}) + "\n", encoding="utf-8")
    cfg = run_config(tiny_model_dir, mirror, tmp_path, "eval.ppl_datasets=[c4]")
    message = refused(cfg, tmp_path)
    assert message.startswith(
        f"{mirror / C4_VALID} is not a valid gzip file (Not a gzipped file (b'{{\"')); "
        "a .json.gz mirror file holds gzip-compressed JSON lines."
    )


def test_truncated_c4_gzip_names_the_last_complete_line(
    no_model_load, tiny_model_dir, mirror, tmp_path
):
    path = mirror / C4_VALID
    cut = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(cut)
    complete = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    assert 0 < complete < 60
    cfg = run_config(tiny_model_dir, mirror, tmp_path, "eval.ppl_datasets=[c4]")
    message = refused(cfg, tmp_path)
    assert message.startswith(
        f"{path} is truncated: its gzip stream ends without its end marker after line {complete}."
    )


def test_c4_crc_mismatch_is_refused(tmp_path):
    path = tmp_path / "c4.json.gz"
    write_gzip(path, b'{"text": "a"}\n')
    data = path.read_bytes()
    path.write_bytes(data[:-8] + bytes(4) + data[-4:])  # zero the stored CRC32
    with pytest.raises(BadDataError, match=r"is not a valid gzip file \(CRC check failed"):
        read_json_lines_gz(path)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ('{"text": "broken"', "line 2 is not valid JSON (Expecting ',' delimiter at column 18)."),
        ('["text", "a list"]', "line 2 is a JSON list, not an object;"),
        ('{"url": "u9"}', "line 2 has no string field 'text' (found no such field)."),
        ('{"text": null}', "line 2 has no string field 'text' (found null)."),
    ],
)
def test_broken_c4_row_names_file_and_line(
    no_model_load, tiny_model_dir, mirror, tmp_path, row, problem
):
    rows = [json.dumps({"text": "fine"}), row, json.dumps({"text": "after"})]
    write_gzip(mirror / C4_VALID, ("\n".join(rows) + "\n").encode())
    cfg = run_config(tiny_model_dir, mirror, tmp_path, "eval.ppl_datasets=[c4]")
    assert refused(cfg, tmp_path).startswith(f"{mirror / C4_VALID} {problem}")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda row: "{not json",
            "line 3 is not valid JSON (Expecting property name enclosed in double quotes at "
            "column 2).",
        ),
        (
            lambda row: json.dumps({k: v for k, v in row.items() if k != "answerKey"}),
            "line 3 lacks answerKey (null or absent)",
        ),
        (
            lambda row: json.dumps({**row, "choices": {"text": row["choices"]["text"]}}),
            "line 3 lacks choices.label (null or absent)",
        ),
        (lambda row: json.dumps({**row, "question": None}), "line 3 lacks question"),
    ],
)
def test_broken_task_row_names_file_and_line(
    no_model_load, tiny_model_dir, mirror, tmp_path, change, problem
):
    path = mirror / ARC_EASY
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = change(json.loads(lines[2]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = run_config(tiny_model_dir, mirror, tmp_path, "eval.zeroshot.tasks=[arc_easy]")
    message = refused(cfg, tmp_path)
    if "lacks" in problem:
        assert message.startswith(f"Zero-shot task arc_easy: {path} {problem}")
        fields = "question, choices.text, choices.label, answerKey"
        assert f"lm-eval's arc/arc_easy.yaml reads {fields} from every row." in message
    else:
        assert message.startswith(f"{path} {problem}")


def test_empty_task_file_is_refused(no_model_load, tiny_model_dir, mirror, tmp_path):
    path = mirror / ARC_EASY
    path.write_text("\n\n", encoding="utf-8")
    cfg = run_config(tiny_model_dir, mirror, tmp_path, "eval.zeroshot.tasks=[arc_easy]")
    message = refused(cfg, tmp_path)
    assert message.startswith(
        f"Zero-shot task arc_easy: {path} holds no rows, so there is nothing to score."
    )


def test_alpaca_that_is_not_json(no_model_load, tiny_model_dir, mirror, tmp_path):
    (mirror / ALPACA).write_text('[\n {"instruction": "a",\n  "output": }\n]', encoding="utf-8")
    cfg = run_config(tiny_model_dir, mirror, tmp_path, *calibration_overrides("alpaca"))
    message = refused(cfg, tmp_path)
    assert message.startswith(
        f"{mirror / ALPACA} is not valid JSON: Expecting value at line 3, column 13."
    )


def test_alpaca_that_is_not_a_list(no_model_load, tiny_model_dir, mirror, tmp_path):
    (mirror / ALPACA).write_text('{"instruction": "a", "output": "b"}', encoding="utf-8")
    cfg = run_config(tiny_model_dir, mirror, tmp_path, *calibration_overrides("alpaca"))
    message = refused(cfg, tmp_path)
    assert message.startswith(f"{mirror / ALPACA} holds a JSON object, not a list of records.")


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("a string", "is a JSON string, not an object"),
        ({"instruction": "a", "input": ""}, "has no string field 'output'"),
        ({"instruction": 3, "output": "b"}, "has no string field 'instruction'"),
        (
            {"instruction": "a", "input": ["x"], "output": "b"},
            "has a field 'input' that is a JSON list, not a string",
        ),
    ],
)
def test_bad_alpaca_record_names_record_and_line(
    no_model_load, tiny_model_dir, mirror, tmp_path, bad, problem
):
    path = mirror / ALPACA
    records = json.loads(path.read_text(encoding="utf-8"))
    records[2] = bad
    text = json.dumps(records, indent=1)
    path.write_text(text, encoding="utf-8")
    # indent=1: "[" on line 1, then each record spans 5 lines (a string, 1)
    assert element_line(text, 2) == 12
    cfg = run_config(tiny_model_dir, mirror, tmp_path, *calibration_overrides("alpaca"))
    message = refused(cfg, tmp_path)
    assert message.startswith(f"{path} record 3 of {len(records)} (line 12) {problem}")


def test_element_line_counts_lines_of_nested_records():
    text = '[{"a": [1,\n2]},\n\n "s", {"b":\n {}}\n]'
    assert [element_line(text, i) for i in range(3)] == [1, 4, 4]


# --- 4. a calibration split shorter than one block ------------------------------------------


def test_calibration_split_shorter_than_one_block(
    no_model_load, tiny_model_dir, tiny_tokenizer, mirror, tmp_path
):
    (mirror / WIKI_VALID).write_text(" \n the king of the north \n", encoding="utf-8")
    n_tokens = tokenize_text(
        tiny_tokenizer, load_corpus("wikitext2", "validation", mirror).text()
    ).numel()
    assert 0 < n_tokens < 32
    cfg = run_config(
        tiny_model_dir, mirror, tmp_path, "eval.ppl_datasets=[ptb]", *calibration_overrides()
    )
    message = refused(cfg, tmp_path, CalibrationError)
    assert message == (
        f"wikitext2/validation ({mirror / WIKI_VALID}) holds {n_tokens} tokens, fewer than one "
        "calibration block of calibration.seq_len=32 tokens, so no calibration sample can be cut "
        "from it. Use a larger calibration split or a shorter calibration.seq_len."
    )


# --- the hub path: rows are not files, so the message names the hub dataset ------------------


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([], "at hub:wikitext/wikitext-2-raw-v1@main holds no rows"),
        (["", " \n"], "at hub:wikitext/wikitext-2-raw-v1@main holds only blank rows (2)"),
        (["a\n", None], "from hub:wikitext/wikitext-2-raw-v1@main: row 2 is null, not text"),
    ],
)
def test_bad_hub_rows_name_the_hub_dataset(monkeypatch, tmp_path, rows, problem):
    monkeypatch.setattr(corpora, "hub_available", lambda offline: True)
    monkeypatch.setattr(corpora, "load_hub_rows", lambda spec, source: list(rows))
    with pytest.raises(BadDataError) as info:
        load_corpus("wikitext2", "test", tmp_path)
    assert str(info.value).startswith(f"WikiText-2 (raw) split 'test' {problem}")
    assert isinstance(info.value, UserError)


def test_good_hub_rows_still_load(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "hub_available", lambda offline: True)
    monkeypatch.setattr(corpora, "load_hub_rows", lambda spec, source: ["", "a b\n"])
    corpus = load_corpus("wikitext2", "test", tmp_path)
    assert corpus.rows == ["", "a b\n"] and corpus.source == "hub:wikitext/wikitext-2-raw-v1@main"


# --- the checked readers give the rows plain reads gave -------------------------------------


def test_checked_readers_keep_the_rows_of_plain_reads(tmp_path):
    """CRLF and CR read as LF (Python's text mode); C4 rows and Alpaca records unchanged."""
    raw = tmp_path / "wiki.raw"
    raw.write_bytes(b" = T = \r\n \r\n caf\xc3\xa9 \r last \n")
    plain = raw.read_text(encoding="utf-8").split("\n")[:-1]
    assert corpora.read_wikitext_raw(raw) == ["" if not x.strip() else x + "\n" for x in plain]
    assert corpora.read_ptb_txt(raw) == [x.strip() for x in plain]
    c4 = tmp_path / "c4.json.gz"
    texts = synthetic_lines(20, 11)
    lines = "\r\n".join(json.dumps({"text": t, "u": 1}, ensure_ascii=False) for t in texts)
    write_gzip(c4, (lines + "\n\n").encode())
    assert read_json_lines_gz(c4) == texts


def test_checked_readers_match_plain_reads_on_the_real_mirror(shared_assets):
    for rel, reader in (
        (WIKI_TEST, corpora.read_wikitext_raw),
        ("ptb/ptb.test.txt", corpora.read_ptb_txt),
    ):
        lines = (shared_assets / rel).read_text(encoding="utf-8").split("\n")[:-1]
        rows = reader(shared_assets / rel)
        assert len(rows) == len(lines) and [r.strip() for r in rows] == [x.strip() for x in lines]
    c4 = shared_assets / "c4" / "c4-validation.00000-of-00008.sample-2000.json.gz"
    with gzip.open(c4, "rt", encoding="utf-8") as f:
        assert read_json_lines_gz(c4) == [json.loads(x)["text"] for x in f if x.strip()]
    alpaca = shared_assets / "alpaca" / "alpaca_data.sample-2000.json"
    records = json.loads(alpaca.read_text(encoding="utf-8"))
    assert corpora.read_alpaca_json(alpaca) == [corpora.alpaca_text(r) for r in records]
