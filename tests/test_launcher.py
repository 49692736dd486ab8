"""Sweeps through the submitit launchers (conf/hydra/launcher/): local executor end to end, SLURM's
sbatch script built without a cluster. Needs the optional extra: pip install -e ".[slurm]"."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import REPO
from test_run import run_py, tiny_args

pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher",
    reason='the submitit launcher is the optional extra: pip install -e ".[slurm]"',
)


@pytest.mark.slow
def test_two_job_sweep_runs_through_the_submitit_local_executor(
    tiny_model_dir, tiny_mirror, tmp_path
):
    sweep = tmp_path / "sweep"
    proc = run_py(
        *tiny_args(tiny_model_dir, tiny_mirror, tmp_path),
        "eval.max_windows=1",
        "eval.ppl_datasets=[wikitext2]",
        "hydra/launcher=local",
        "hydra.launcher.timeout_min=5",  # the job processes end themselves if this test times out
        "ratio=0.2,0.3",
        f"hydra.sweep.dir={sweep}",
        "-m",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr

    records = {}
    for path in sorted(sweep.glob("*/results.json")):
        record = json.loads(path.read_text())
        assert record["status"] == "completed" and record["error"] is None
        assert record["method"] == "dense" and "wikitext2" in record["metrics"]["perplexity"]
        records[record["config"]["ratio"]] = path.parent
    assert sorted(records) == [0.2, 0.3]

    # Each job ran in its own submitit process: Hydra took the job id from submitit's job
    # environment (the local executor's id is the pid of the job's controller process; Hydra's
    # in-process basic launcher would give "job_id_for_<n>"), and that job's folder holds
    # submitit's pickles and logs.
    submitit_dir = sweep / ".submitit"
    job_ids = set()
    for ratio, job_dir in records.items():
        hydra_cfg = read_hydra_yaml(job_dir)
        job_id = str(hydra_cfg["hydra"]["job"]["id"])
        assert job_id.isdigit(), job_id
        assert f"ratio={ratio}" in hydra_cfg["hydra"]["overrides"]["task"]
        folder = submitit_dir / job_id
        for suffix in ("submitted.pkl", "0_result.pkl", "0_log.out", "0_log.err"):
            assert (folder / f"{job_id}_{suffix}").is_file(), sorted(os.listdir(folder))
        # submitit's job log: the job started from its pickle, wrote this results.json, and ended.
        log = (folder / f"{job_id}_0_log.out").read_text()
        for line in (
            f"Starting with JobEnvironment(job_id={job_id},",
            f"Run summary ({job_dir / 'results.json'})",
            "Job completed successfully",
        ):
            assert line in log, log[-2000:]
        job_ids.add(job_id)
    assert len(job_ids) == 2


def read_hydra_yaml(job_dir: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "hydra.yaml"))


class _Submitted(Exception):
    """Raised in place of calling sbatch, carrying the script submitit wrote."""


def test_slurm_launcher_writes_a_one_gpu_sbatch_array(tmp_path, monkeypatch):
    """The slurm config through the plugin's own launcher, up to the sbatch call (no cluster)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor

    def submit(executor, command):
        raise _Submitted(executor._make_submission_file_text(command, "uid"))

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is here"
    monkeypatch.setattr(SlurmExecutor, "_submit_command", submit)
    monkeypatch.setenv("BASIS_SHARING_SLURM_PARTITION", "gpu-a100")
    monkeypatch.delenv("BASIS_SHARING_SLURM_ACCOUNT", raising=False)
    overrides = ["hydra/launcher=slurm", "hydra.launcher.timeout_min=90"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
            cfg = compose(
                "config", [*overrides, f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True
            )
    finally:
        GlobalHydra.instance().clear()
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(_Submitted) as submitted:
        launcher.launch([["ratio=0.2"], ["ratio=0.3"]], initial_job_idx=0)
    script = str(submitted.value)
    for line in (
        "#SBATCH --job-name=basis-sharing",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=128GB",
        "#SBATCH --time=90",
        "#SBATCH --partition=gpu-a100",
        "#SBATCH --array=0-1%2",
        f"#SBATCH --output={tmp_path}/.submitit/%A_%a/%A_%a_0_log.out",
    ):
        assert line in script, script
    assert "--account" not in script
