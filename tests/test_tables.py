"""Tables from the results store: golden renderings, never-filled cells, plots, the SmolLM table.

Golden files (tests/data/golden/) are the expected output for the fixture store
(tests/data/store/); after an intended change of layout, regenerate them with

    python scripts/make_table.py table1 table4 table6 --runs tests/data/store \
        --out /tmp/golden --no-plot   # then copy the .md/.csv/.tex files and review the diff
"""

from __future__ import annotations

from pathlib import Path

import pytest

from basis_sharing.tables import build_table, get_spec, load_paper, make_table
from basis_sharing.tables.render import to_csv, to_latex, to_markdown
from basis_sharing.tracking.store import load_runs

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
STORE = DATA / "store"
GOLDEN = DATA / "golden"
PAPER = REPO / "results" / "paper"


@pytest.fixture(scope="module")
def runs():
    return load_runs(STORE)


@pytest.fixture(scope="module")
def paper():
    return load_paper(PAPER)


def built(name, runs, paper):
    return build_table(get_spec(name), runs, paper)


@pytest.mark.parametrize(
    "name,suffix",
    [("table1", "md"), ("table1", "csv"), ("table1", "tex"), ("table4", "md"), ("table6", "md")],
)
def test_rendering_matches_the_golden_file(runs, paper, name, suffix):
    render = {"md": to_markdown, "csv": to_csv, "tex": to_latex}[suffix]
    expected = (GOLDEN / f"{name}.{suffix}").read_text(encoding="utf-8")
    assert render(built(name, runs, paper)) == expected


def cell(result, row_label: str, column_label: str, ratio: float | None = None):
    for cells in result.cells:
        for c in cells:
            if (c.row.label, c.column.label) == (row_label, column_label) and c.ratio == ratio:
                return c
    raise KeyError((row_label, column_label, ratio))


def test_cells_hold_exactly_the_matching_run(runs, paper):
    result = built("table1", runs, paper)
    bs20 = cell(result, "Basis Sharing", "WikiText-2", 0.2)
    # Group size 2 without update: the method.update=True run (7.5) is not this row.
    assert bs20.reproduced == 7.7012 and bs20.reported.value == 7.74
    assert bs20.difference == pytest.approx(7.7012 - 7.74)
    assert bs20.run == "llama7b/table1/method=basis_sharing,ratio=0.2/results.json"
    # Two runs of the same cell: the later-finished one, and the count is kept.
    bs30 = cell(result, "Basis Sharing", "WikiText-2", 0.3)
    assert bs30.reproduced == 9.31 and bs30.n_runs == 2
    assert bs30.run.startswith("llama7b/table1_rerun/")
    # Partial protocol is flagged, not hidden.
    bs40 = cell(result, "Basis Sharing", "Avg", 0.4)
    assert bs40.truncated and bs40.reproduced == pytest.approx(2.72 / 7)  # recorded mean_acc
    # The dense row: the mean accuracy recorded by the run, against the paper's 0.52.
    original = cell(result, "Original", "Avg")
    assert original.reproduced == pytest.approx(0.5188571428571429)


def test_missing_cells_are_never_filled(runs, paper):
    result = built("table1", runs, paper)
    # FWSVD at 50 % failed: no value, even though a record exists.
    fwsvd50 = cell(result, "FWSVD", "WikiText-2", 0.5)
    assert fwsvd50.reproduced is None and fwsvd50.n_runs == 0 and fwsvd50.difference is None
    # Basis Sharing at 20 % has no zero-shot numbers: the accuracy cells stay empty.
    assert cell(result, "Basis Sharing", "PIQA", 0.2).reproduced is None
    markdown = to_markdown(result)
    assert "| 50%   | SVD           | — / 131715" in markdown
    assert "— / 0.71" in markdown  # Basis Sharing PIQA at 20 %: reported only
    table4 = built("table4", runs, paper)
    oom = cell(table4, "FWSVD", "LLaMA-13B", 0.2)
    assert (
        oom.reproduced is None and oom.reported.value is None and "— / OOM" in to_markdown(table4)
    )


def test_empty_store_renders_the_paper_alone(paper, tmp_path):
    result = build_table(get_spec("table3"), load_runs(tmp_path), paper)
    assert all(c.reproduced is None for c in result.flat())
    assert "No completed runs in the store yet: `python run.py experiment=table3 -m`" in (
        to_markdown(result)
    )


def test_table2_lists_the_unplaced_fragments(paper, tmp_path):
    result = build_table(get_spec("table2"), load_runs(tmp_path), paper)
    assert len(result.unplaced) == 32  # 4 perplexities + 14 WikiText-2 / 14 Alpaca accuracies
    markdown = to_markdown(result)
    assert "ptb ppl 97.40, S from wikitext2" in markdown
    assert cell(result, "Basis Sharing (S: WikiText-2)", "WikiText-2", 0.5).reported.text == "21.3"
    assert cell(result, "Basis Sharing (S: Alpaca)", "WikiText-2", 0.5).reported is None


def test_make_table_writes_every_format_and_the_plots(tmp_path):
    written = make_table("table1", STORE, PAPER, tmp_path)
    names = sorted(p.name for p in written)
    assert names == [
        "table1.csv",
        "table1.md",
        "table1.png",
        "table1.tex",
        "table1_acc.png",
        "table1_rel.png",
    ]
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    # A single-ratio table gets a bar chart instead of curves.
    assert [p.name for p in make_table("table4", STORE, PAPER, tmp_path) if p.suffix == ".png"] == [
        "table4.png"
    ]


def test_relative_png_only_for_ratio_sweeps_with_svd_llm(tmp_path):
    # Table 6 sweeps the ratio but has no SVD-LLM row; Table 4 has one but a single ratio.
    for name in ("table6", "table4"):
        pngs = [p.name for p in make_table(name, STORE, PAPER, tmp_path) if p.suffix == ".png"]
        assert pngs == [f"{name}.png"]
    assert not list(tmp_path.glob("*_rel.png"))


def relative_oracle(result, column_label: str, label: str, reported: bool):
    """The ratio of the two table cells, at every ratio where both have a value."""
    points = []
    for ratio in (0.2, 0.3, 0.4, 0.5):
        mine, ref = (
            cell(result, label, column_label, ratio),
            cell(result, "SVD-LLM", column_label, ratio),
        )
        if reported:
            mine = mine.reported.value if mine.reported else None
            ref = ref.reported.value if ref.reported else None
        else:
            mine, ref = mine.reproduced, ref.reproduced
        if mine is not None and ref is not None:
            points.append((ratio, mine / ref))
    return tuple(points)


def test_relative_series_are_ratios_of_the_table_cells(runs, paper):
    from basis_sharing.tables.relative import relative_to_svd_llm

    result = built("table1", runs, paper)
    panels = relative_to_svd_llm(result)
    assert [p.title for p in panels] == ["WikiText-2", "PTB", "C4"]
    for panel in panels:
        # No SVD-LLM series (it is the 1 line), no Original (no ratio); reproduced only where
        # both cells were run; the paper gives every baseline at every ratio.
        assert set(panel.series) == {
            ("Basis Sharing", False),
            *((m, True) for m in ("SVD", "FWSVD", "ASVD", "Basis Sharing")),
        }
        assert panel.mismatched == ()
        for (label, reported), points in panel.series.items():
            assert points == relative_oracle(result, panel.title, label, reported)
    wikitext = panels[0].series
    # Basis Sharing has a 30 % run (9.31) but SVD-LLM has none there: no point, never filled.
    assert wikitext[("Basis Sharing", False)] == ((0.2, 7.7012 / 7.9812),)
    assert wikitext[("ASVD", True)][1] == (0.3, 51.0 / 9.56)
    assert len(wikitext[("Basis Sharing", True)]) == 4


def test_relative_series_leave_out_cells_on_another_protocol(runs, paper):
    from basis_sharing.tables.relative import relative_to_svd_llm

    result = built("table1", runs, paper)
    cell(result, "SVD-LLM", "WikiText-2", 0.2).truncated = True  # as if run on max_windows
    wikitext, ptb = relative_to_svd_llm(result)[:2]
    assert ("Basis Sharing", False) not in wikitext.series
    assert wikitext.mismatched == ("Basis Sharing 20%",)
    assert wikitext.series[("Basis Sharing", True)][0] == (0.2, 7.74 / 7.94)  # the paper's stay
    assert ptb.series[("Basis Sharing", False)] == ((0.2, 17.9 / 17.6),)


def test_relative_series_empty_without_an_svd_llm_row(runs, paper):
    from basis_sharing.tables.relative import relative_to_svd_llm

    assert relative_to_svd_llm(built("table6", runs, paper)) == []
    assert relative_to_svd_llm(built("table2", runs, paper)) == []


def test_relative_series_refuse_two_svd_llm_rows_at_one_ratio(paper, tmp_path):
    import dataclasses

    from basis_sharing.tables.relative import relative_to_svd_llm
    from basis_sharing.tables.specs import method_row

    spec = get_spec("table1")
    spec = dataclasses.replace(spec, rows=(*spec.rows, method_row("svd_llm", 0.2)))
    result = build_table(spec, load_runs(tmp_path), paper)
    with pytest.raises(ValueError, match="Two SVD-LLM rows at 20% in column 'WikiText-2'"):
        relative_to_svd_llm(result)


def test_smollm_relative_panel_keeps_the_axis_for_the_whitened_methods(paper):
    import matplotlib.pyplot as plt

    from basis_sharing.tables.plots import _relative_panel
    from basis_sharing.tables.relative import relative_to_svd_llm

    result = build_table(get_spec("table-smollm"), load_runs(REPO / "results" / "runs"), paper)
    (panel,) = relative_to_svd_llm(result)
    for label in ("Basis Sharing", "SVD-LLM + update", "ASVD", "SVD"):
        assert panel.series[(label, False)] == relative_oracle(result, "WikiText-2", label, False)
    fig, ax = plt.subplots()
    try:
        _relative_panel(ax, panel, {}, with_paper=False)
        drawn = [line.get_label() for line in ax.get_lines()]
        notes = "\n".join(t.get_text() for t in ax.texts)
        low, high = ax.get_ylim()
    finally:
        plt.close(fig)
    # SVD (1e8 perplexity) and FWSVD are beyond 2x everywhere: named, not drawn.
    named = [label for label in drawn if not label.startswith("_")]  # "_": edge triangles
    assert named == [
        "SVD-LLM (= 1)",
        "ASVD",
        "SVD-LLM + update",
        "Basis Sharing",
        "Basis Sharing + update",
    ]
    svd_min = min(y for _, y in panel.series[("SVD", False)])
    assert f"SVD (>= {svd_min:.3g}×)" in notes and "FWSVD (>= " in notes
    # ASVD's 30-50 % points are triangles at the edge with their value.
    assert len(drawn) - len(named) == 3
    asvd = dict(panel.series[("ASVD", False)])
    assert f"{asvd[0.5]:.3g}×" in notes and "points above 2×" in notes
    shown = [y for (_, _), pts in panel.series.items() for _, y in pts if 0.5 <= y <= 2.0]
    assert low < min(shown) and max(shown) < high < 2.0


def test_committed_smollm_table_is_what_the_store_gives(tmp_path):
    """results/tables/table-smollm.md is what the committed records give (make table-smollm),
    and every file the table writes (the relative-to-SVD-LLM plot too) is committed."""
    written = make_table("table-smollm", REPO / "results" / "runs", PAPER, tmp_path)
    tables = REPO / "results" / "tables"
    assert sorted(p.name for p in written if not (tables / p.name).is_file()) == [], (
        "run `make table-smollm` and commit its files"
    )
    assert (tmp_path / "table-smollm_rel.png").is_file()
    committed = tables / "table-smollm.md"
    assert committed.read_text(encoding="utf-8") == (tmp_path / "table-smollm.md").read_text(
        encoding="utf-8"
    ), "results/tables/table-smollm.md is stale: run `make table-smollm`"


def test_smollm_table_picks_up_new_records(tmp_path):
    """A record added under wikitext2_16w (as the ASVD jobs were) fills its cell automatically."""
    import json
    import shutil

    committed = REPO / "results" / "runs" / "smollm2_135m" / "wikitext2_16w"
    asvd_jobs = sorted(p.name for p in committed.glob("*method=asvd,*"))
    assert len(asvd_jobs) == 4
    store = tmp_path / "runs"
    shutil.copytree(
        committed.parent, store / "smollm2_135m", ignore=shutil.ignore_patterns("*method=asvd,*")
    )
    spec, paper = get_spec("table-smollm"), load_paper(PAPER)
    before = build_table(spec, load_runs(store), paper)
    assert cell(before, "ASVD", "WikiText-2", 0.2).reproduced is None
    job = "method.sensitivity_samples=1,method=asvd,ratio=0.2"
    shutil.copytree(committed / job, store / "smollm2_135m" / "wikitext2_16w" / job)
    after = build_table(spec, load_runs(store), paper)
    asvd = cell(after, "ASVD", "WikiText-2", 0.2)
    recorded = json.loads((committed / job / "results.json").read_text())
    assert asvd.reproduced == recorded["metrics"]["perplexity"]["wikitext2"]["ppl"]
    assert asvd.truncated and asvd.run == f"smollm2_135m/wikitext2_16w/{job}/results.json"
    assert cell(after, "ASVD", "WikiText-2", 0.3).reproduced is None
    assert cell(after, "Original", "WikiText-2").reproduced == pytest.approx(20.713508755269686)


def test_filters_match_none_floats_and_absent_columns():
    import pandas as pd

    from basis_sharing.tables.build import matching

    frame = pd.DataFrame(
        {"method": ["dense", "svd", "svd"], "target_ratio": [None, 0.2, 0.30000000000000004]}
    )
    assert matching(frame, {"target_ratio": None}).tolist() == [True, False, False]
    assert matching(frame, {"target_ratio": 0.3}).tolist() == [False, False, True]
    assert matching(frame, {"method": "svd", "target_ratio": 0.2}).tolist() == [False, True, False]
    # A column no run has: only a "must be missing" filter matches, and later filters still apply.
    assert matching(frame, {"acc.mean": None, "method": "svd"}).tolist() == [False, True, True]
    assert not matching(frame, {"acc.mean": 0.5}).any()


def test_the_fips_table_reads_the_committed_records_and_draws_no_relative_plot(paper, tmp_path):
    import json

    store = REPO / "results" / "runs"
    result = build_table(get_spec("table-fips-smollm"), load_runs(store), paper)
    cells = {
        (c.row.label, c.ratio, c.column.label): c.reproduced
        for c in result.flat()
        if c.row.runs.get("ratio_of", "kinds") == "kinds"  # the MLP-budget rows
    }
    record = json.loads(
        (
            store
            / "smollm2_135m/fips_smollm/method.sparsity=0.5,method=fips_smollm,ratio=0.2"
            / "results.json"
        ).read_text()
    )
    assert (
        cells[("FiPS, s = 0.5", 0.2, "WikiText-2")]
        == record["metrics"]["perplexity"]["wikitext2"]["ppl"]
    )
    assert (
        cells[("FiPS, s = 0.5", 0.2, "MLP ratio")] == record["params"]["budget"]["achieved_ratio"]
    )
    written = make_table("table-fips-smollm", store, PAPER, tmp_path)
    assert not any(p.name.endswith("_rel.png") for p in written)
