"""scripts/bench_gram_fold.py at small widths: the report's structure and its exact parts.

The benchmark asserts nothing about speed and neither do these tests (the CPUs are shared); what
they check is exact: the multiply share from the block layout and the equality of the two Grams.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

from basis_sharing.calibration.grams import gram_blocks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_gram_fold") / "bench.json"
    argv = ["--widths", "100", "384", "--tokens", "64", "--batches", "2", "--repeats", "2"]
    argv += ["--dtype", "float64", "--json", str(out)]
    assert load_script("bench_gram_fold").main(argv) == 0
    return json.loads(out.read_text())


def test_report_lists_every_width_with_its_blocks(report):
    assert report["benchmark"] == "gram_fold" and report["dtype"] == "float64"
    assert [row["width"] for row in report["widths"]] == [100, 384]
    for row in report["widths"]:
        assert row["blocks"] == len(gram_blocks(row["width"]))
        assert len(row["full_s"]) == len(row["triangle_s"]) == 2
        assert all(t > 0 for t in row["full_s"] + row["triangle_s"])


def test_multiply_share_counts_the_upper_block_triangle(report):
    one_block, two_blocks = report["widths"]
    assert one_block["blocks"] == 1 and one_block["multiply_share"] == 1.0
    # 384 = 192 + 192: strips 192 x 384 and 192 x 192, three of the four block products.
    assert two_blocks["blocks"] == 2
    assert two_blocks["multiply_share"] == 0.75


def test_both_folds_give_the_same_gram(report):
    for row in report["widths"]:
        assert row["max_relative_difference"] < 1e-13
