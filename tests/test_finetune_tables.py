"""Tables 7 (after LoRA) and 8 (after full fine-tuning) from fixture records.

The fixture store (tests/data/store_finetune/) holds hand-written records of fine-tuned runs, one
run without fine-tuning and one LoRA run placed where a Table 8 cell would be; golden files
(tests/data/golden_finetune/) are their expected rendering. Regenerate after an intended change:

    python scripts/make_table.py table7 table8 --runs tests/data/store_finetune \\
        --out /tmp/golden --no-plot   # then copy table7.md, table7.csv, table8.md and review
"""

from __future__ import annotations

from pathlib import Path

import pytest

from basis_sharing.tables import build_table, get_spec, load_paper, make_table
from basis_sharing.tables.render import to_csv, to_markdown
from basis_sharing.tracking.schema import validate_record
from basis_sharing.tracking.store import load_runs

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "tests" / "data" / "store_finetune"
GOLDEN = REPO / "tests" / "data" / "golden_finetune"
PAPER = REPO / "results" / "paper"


@pytest.fixture(scope="module")
def runs():
    return load_runs(STORE)


@pytest.fixture(scope="module")
def paper():
    return load_paper(PAPER)


def cells(name, runs, paper) -> dict[tuple[str, str], object]:
    result = build_table(get_spec(name), runs, paper)
    return {(c.row.label, c.column.label): c for row in result.cells for c in row}


@pytest.mark.parametrize("name,suffix", [("table7", "md"), ("table7", "csv"), ("table8", "md")])
def test_rendering_matches_the_golden_file(runs, paper, name, suffix):
    render = {"md": to_markdown, "csv": to_csv}[suffix]
    result = build_table(get_spec(name), runs, paper)
    assert render(result) == (GOLDEN / f"{name}.{suffix}").read_text(encoding="utf-8")


def test_the_fixture_records_are_valid():
    import json

    for path in sorted(STORE.rglob("results.json")):
        assert validate_record(json.loads(path.read_text())) == [], path


def test_cells_hold_only_runs_of_their_fine_tuner(runs, paper):
    lora, full = cells("table7", runs, paper), cells("table8", runs, paper)
    assert lora[("n = 2", "20%")].reproduced == 7.21
    assert lora[("n = 2", "20%")].reported.value == 7.14
    assert lora[("n = 2", "20%")].run == (
        "llama7b/table7/finetune=lora,method.group_size=2,ratio=0.2/results.json"
    )
    assert lora[("n = 2", "50%")].reproduced == 10.5  # the LoRA run, in Table 7
    assert lora[("n = 2", "30%")].reproduced is None  # finetune=none fills no cell of Table 7
    assert lora[("n = 8", "40%")].truncated  # 16 windows: flagged, not comparable
    assert full[("n = 2", "20%")].reproduced == 6.6
    assert full[("n = 2", "50%")].reproduced is None  # a LoRA run fills no cell of Table 8
    assert full[("n = 4", "30%")].reported.value == 7.39


def test_make_table_writes_tables_7_and_8(tmp_path):
    for name in ("table7", "table8"):
        written = {p.name for p in make_table(name, STORE, PAPER, tmp_path)}
        assert {f"{name}.md", f"{name}.csv", f"{name}.tex"} <= written


@pytest.mark.parametrize(
    ("name", "job", "finetuner"),
    [
        ("table7", ["finetune=lora", "method.group_size=1", "ratio=0.2"], "LoraFinetuner"),
        ("table8", ["finetune=full", "method.group_size=2", "ratio=0.2"], "FullFinetuner"),
    ],
)
def test_the_first_job_of_tables_7_and_8_validates_with_the_paper_settings(
    name, job, finetuner, tiny_mirror, tmp_path
):
    import shutil

    from conftest import compose_config

    from basis_sharing import pipeline
    from basis_sharing.errors import DataNotFoundError

    mirror = tmp_path / "mirror"
    shutil.copytree(tiny_mirror, mirror)
    overrides = [f"experiment={name}", *job, f"paths.data_dir={mirror}", "offline=true"]
    with pytest.raises(DataNotFoundError, match="wiki.train.raw"):
        pipeline.validate(compose_config(*overrides))
    wiki = mirror / "wikitext-2-raw-v1"
    shutil.copy(wiki / "wiki.valid.raw", wiki / "wiki.train.raw")
    plan = pipeline.validate(compose_config(*overrides))
    assert type(plan.finetuner).__name__ == finetuner
    cfg = plan.finetuner.cfg
    assert (cfg.train_split, cfg.eval_split, cfg.block_len, cfg.steps_per_epoch) == (
        "train",
        "validation",
        None,
        None,
    )
    if name == "table7":
        assert (cfg.r, cfg.alpha, cfg.lr, cfg.epochs, cfg.targets) == (8, 32.0, 1e-4, 2, "paper")
    else:
        assert (cfg.lr, cfg.epochs, cfg.grad_accum, cfg.max_grad_norm) == (2e-6, 3, 8, 0.01)
        assert (cfg.weight_decay, cfg.batch_size) == (0.001, 1)
