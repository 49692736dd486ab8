"""scripts/bench_threads.py with tiny groups: the JSON's structure and positive timings.

The benchmark asserts nothing about speed and neither do these tests (the CPUs are shared).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

from basis_sharing.threads import detect_allowed_cpus

REPO = Path(__file__).resolve().parents[1]
GROUPS = ["24x32x2", "16x8x1"]
REPEATS = 2


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_threads") / "bench.json"
    argv = ["--groups", *GROUPS, "--repeats", str(REPEATS), "--labels", "after", "before"]
    argv += ["--condition-timeout", "240", "--json", str(out)]
    assert load_script("bench_threads").main(argv) == 0
    return json.loads(out.read_text())


def test_every_condition_is_measured_idle_and_with_a_competitor(bench_json):
    after = detect_allowed_cpus().count
    assert bench_json["counts"] == {"after": after, "before": 2 * after}
    names = [c["name"] for c in bench_json["conditions"]]
    assert names == ["after", "before", "after+competitor", "before+competitor"]
    for cond in bench_json["conditions"]:
        assert cond["status"] == "completed"
        assert cond["groups_done"] == cond["groups_planned"] == REPEATS * len(GROUPS)
        expected = after if cond["label"] == "after" else 2 * after
        assert cond["pool"]["chosen"] == cond["pool"]["torch_intra_op"] == expected
        source = "config" if cond["label"] == "before" else detect_allowed_cpus().source
        assert cond["pool"]["source"] == source
        # The competitor got CPU time while it ran; idle conditions had none.
        if cond["competitor"]:
            assert cond["competitor_cpu_s"] > 0
        else:
            assert cond["competitor_cpu_s"] is None


def test_timings_are_positive_and_consistent(bench_json):
    for cond in bench_json["conditions"]:
        assert set(cond["median_by_shape_s"]) == set(GROUPS)
        assert cond["pass_s"] == pytest.approx(sum(cond["median_by_shape_s"].values()), abs=1e-4)
        assert cond["pass_s"] > 0 and cond["timed_s"] > 0 and cond["pass_s_at_least"] is None
        for timing in cond["group_timings"]:
            assert timing["total_s"] > 0 and timing["cpu_s"] >= 0
            steps = timing["whiten_s"] + timing["svd_s"] + timing["truncate_s"]
            assert steps == pytest.approx(timing["total_s"], abs=1e-4)
        assert sorted((t["pass"], t["group"]) for t in cond["group_timings"]) == [
            (p, g) for p in range(REPEATS) for g in range(len(GROUPS))
        ]


def test_comparisons_command_and_machine_are_recorded(bench_json):
    assert set(bench_json["comparison"]) == {
        "after: competitor / idle",
        "before: competitor / idle",
        "before / after",
        "before+competitor / after+competitor",
    }
    by = {c["name"]: c for c in bench_json["conditions"]}
    before = bench_json["comparison"]["before / after"]
    expected = by["before"]["pass_s"] / by["after"]["pass_s"]
    assert before["ratio"] == pytest.approx(expected, rel=1e-3)  # 4 significant digits
    assert all(c["ratio"] > 0 and c["at_least"] is None for c in bench_json["comparison"].values())
    assert bench_json["command"].startswith("python scripts/bench_threads.py --groups 24x32x2")
    assert bench_json["settings"]["groups"] == GROUPS
    assert "os.cpu_count() exceeds its CPU quota" in bench_json["emulates"]
    machine = bench_json["machine"]
    assert machine["allowed_cpus"]["count"] == detect_allowed_cpus().count
    assert machine["os_cpu_count"] >= 1 and machine["unaided_pools"]["torch_intra_op"] >= 1
    assert len(bench_json["loadavg_start"]) == 3 and bench_json["wall_s"] > 0


def test_a_stopped_condition_is_marked_and_bounded(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--groups", "8x8x1", "--repeats", "1", "--labels", "after"]
    argv += ["--condition-timeout", "0.2", "--json", str(out)]
    assert load_script("bench_threads").main(argv) == 0
    result = json.loads(out.read_text())
    for cond in result["conditions"]:  # 0.2 s is less than the worker's imports take
        assert cond["status"] == "timed_out" and cond["pass_s"] is None
        assert cond["groups_done"] == 0 and cond["group_timings"] == []
    assert result["comparison"]["after: competitor / idle"] == {"ratio": None, "at_least": None}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--groups", "576x1536"], "group '576x1536': use D_INxD_OUTxN, e.g. 576x1536x2"),
        (["--groups", "0x8x2"], "group '0x8x2': every size must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--oversubscribe", "1"], "--oversubscribe must be >= 2 (before must exceed after)"),
        (["--condition-timeout", "0"], "--condition-timeout must be > 0"),
        (["--labels", "sometimes"], "invalid choice: 'sometimes'"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        load_script("bench_threads").parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
