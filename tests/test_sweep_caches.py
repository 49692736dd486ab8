"""The caches a sweep's jobs share have one owner: run.py's process, or whoever calls the pipeline.

Nothing is kept in module globals: run.py creates one SweepCaches and hands it to every job of a
-m sweep; pipeline.run without one gives the job a fresh one; a method reads it from its context.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import compose_config, tiny_run_overrides

from basis_sharing import pipeline
from basis_sharing.methods.caches import SweepCaches

REPO = Path(__file__).resolve().parents[1]

# run.py with pipeline.main replaced by a recorder: which caches object each job was given.
RECORD_JOBS = """
import json, runpy, sys
import basis_sharing.pipeline as pipeline
seen = []
pipeline.main = lambda cfg, caches: seen.append(
    {"ratio": cfg.ratio, "id": id(caches), "type": type(caches).__name__}
)
sys.argv = ["run.py", *sys.argv[1:]]
runpy.run_path("run.py", run_name="__main__")
print(json.dumps(seen))
"""


def test_run_py_gives_every_job_of_a_sweep_the_same_caches(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RECORD_JOBS,
            "ratio=0.2,0.3,0.4",
            f"hydra.sweep.dir={tmp_path}/sweep",
            "-m",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [j["ratio"] for j in jobs] == [0.2, 0.3, 0.4]
    assert {j["type"] for j in jobs} == {"SweepCaches"}
    assert len({j["id"] for j in jobs}) == 1


def test_pipeline_run_without_caches_gives_each_job_its_own(
    tiny_model_dir, tiny_mirror, tmp_path, monkeypatch
):
    given = []
    monkeypatch.setattr(pipeline, "run_stages", lambda state, stages: given.append(state.caches))
    cfg = compose_config(*tiny_run_overrides(tiny_model_dir, tiny_mirror))
    mine = SweepCaches()
    pipeline.run(cfg, out_dir=tmp_path / "a", caches=mine)
    pipeline.run(cfg, out_dir=tmp_path / "b", caches=mine)
    pipeline.run(cfg, out_dir=tmp_path / "c")
    pipeline.run(cfg, out_dir=tmp_path / "d")
    assert given[0] is mine and given[1] is mine
    assert all(isinstance(c, SweepCaches) for c in given[2:])
    assert given[2] is not given[3] and mine not in given[2:]


def test_two_pipeline_runs_with_one_owner_decompose_once(tiny_model_dir, tiny_mirror, tmp_path):
    common = tiny_run_overrides(
        tiny_model_dir,
        tiny_mirror,
        "method=svd_llm",
        f"paths.cache_dir={tmp_path}/cache",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=8",
        "calibration.seq_len=32",
        "ratio_tolerance=0.05",
    )
    caches = SweepCaches()
    decompositions = caches.decompositions
    first = pipeline.run(
        compose_config(*common, "ratio=0.3"), out_dir=tmp_path / "r3", caches=caches
    )
    groups = len(first["method_info"]["groups"])
    # The tiny LLaMA: 4 layers x 7 projections, one group each for SVD-LLM.
    assert groups == 28 and (decompositions.misses, decompositions.hits) == (28, 0)
    second = pipeline.run(
        compose_config(*common, "ratio=0.5"), out_dir=tmp_path / "r5", caches=caches
    )
    assert (decompositions.misses, decompositions.hits) == (28, 28)  # only truncated again
    assert len(caches.sensitivity) == 0  # ASVD's table: not this method's
    for record in (first, second):
        assert record["status"] == "completed"
        assert abs(record["params"]["achieved_ratio"] - record["target_ratio"]) <= 0.05
