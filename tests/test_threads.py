"""The run's thread count: the allowed-CPU rule on fake cgroup files and environments, threads=."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose_config, tiny_run_overrides
from omegaconf import OmegaConf

from basis_sharing import pipeline, threads
from basis_sharing.errors import ConfigError
from basis_sharing.threads import CpuLimit, allowed_cpus, cgroup_cpus, quota_cpus
from basis_sharing.tracking.resume import config_fingerprint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_threads():
    """Put torch's and the BLAS libraries' pools back as they were (apply_threads is global)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    intra = torch.get_num_threads()
    pools = {pool["prefix"]: pool["num_threads"] for pool in threadpool_info()}
    yield
    torch.set_num_threads(intra)
    threadpool_limits(limits=pools)


# ---- the pure rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [
        (150000, 100000, 1),  # 1.5 CPUs: floor, a second thread would be throttled
        (200000, 100000, 2),
        (250000, 100000, 2),
        (50000, 100000, 1),  # half a CPU: still one thread
        (400000, 50000, 8),
        (None, 100000, None),  # v2 "max"
        (-1, 100000, None),  # v1 unlimited
    ],
)
def test_quota_is_floored_and_at_least_one(quota, period, expected):
    assert quota_cpus(quota, period) == expected


def test_smallest_limit_wins_and_names_its_source():
    slurm = allowed_cpus(4, None, {"SLURM_CPUS_PER_TASK": "2"}, 64)
    assert (slurm.count, slurm.source) == (2, "SLURM_CPUS_PER_TASK")
    assert slurm.limits == {
        "affinity": 4,
        "cgroup": None,
        "SLURM_CPUS_PER_TASK": 2,
        "OMP_NUM_THREADS": None,
        "os.cpu_count": 64,
    }
    quota = allowed_cpus(8, 1, {"SLURM_CPUS_PER_TASK": "4"}, 64)
    assert (quota.count, quota.source) == (1, "cgroup")
    assert allowed_cpus(3, None, {"SLURM_CPUS_PER_TASK": "16"}, 64).source == "affinity"
    omp = allowed_cpus(8, None, {"OMP_NUM_THREADS": "3,1"}, 64)  # nested: the outer pool
    assert (omp.count, omp.source) == (3, "OMP_NUM_THREADS")


def test_unlimited_quota_leaves_the_affinity():
    limit = allowed_cpus(6, quota_cpus(None, 100000), {}, 32)
    assert limit == CpuLimit(6, "affinity", limit.limits)


def test_ties_go_to_the_first_limit_in_order():
    limit = allowed_cpus(2, 2, {"SLURM_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "2"}, 8)
    assert (limit.count, limit.source) == (2, "affinity")
    assert allowed_cpus(None, 2, {"SLURM_CPUS_PER_TASK": "2"}, 8).source == "cgroup"


def test_no_limit_falls_back_to_cpu_count():
    assert allowed_cpus(None, None, {}, 12) == CpuLimit(
        12,
        "os.cpu_count",
        {
            "affinity": None,
            "cgroup": None,
            "SLURM_CPUS_PER_TASK": None,
            "OMP_NUM_THREADS": None,
            "os.cpu_count": 12,
        },
    )
    assert allowed_cpus(None, None, {}, None).count == 1  # os.cpu_count() may be None


@pytest.mark.parametrize("value", ["abc", "0", "-3", "2.5"])
def test_unreadable_environment_counts_are_ignored_with_a_warning(value, caplog):
    with caplog.at_level(logging.WARNING, logger="basis_sharing.threads"):
        limit = allowed_cpus(4, None, {"SLURM_CPUS_PER_TASK": value}, 8)
    assert (limit.count, limit.source) == (4, "affinity")
    assert f"Ignoring SLURM_CPUS_PER_TASK={value!r}: not a positive CPU count." in caplog.text


def test_empty_environment_values_are_unset():
    assert allowed_cpus(4, None, {"SLURM_CPUS_PER_TASK": "", "OMP_NUM_THREADS": " "}, 8).count == 4


# ---- cgroup files ---------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota(tmp_path):
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", "150000 100000\n")
    assert cgroup_cpus(tmp_path / "proc", tmp_path / "cg") == 1
    write(tmp_path / "cg" / "cpu.max", "300000 100000\n")
    assert cgroup_cpus(tmp_path / "proc", tmp_path / "cg") == 3


def test_cgroup_v2_max_is_no_limit(tmp_path):
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")
    assert cgroup_cpus(tmp_path / "proc", tmp_path / "cg") is None


def test_cgroup_v2_tightest_ancestor_wins(tmp_path):
    write(tmp_path / "proc", "0::/slice/job/step\n")
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "slice" / "cpu.max", "800000 100000\n")
    write(tmp_path / "cg" / "slice" / "job" / "cpu.max", "200000 100000\n")
    write(tmp_path / "cg" / "slice" / "job" / "step" / "cpu.max", "max 100000\n")
    assert cgroup_cpus(tmp_path / "proc", tmp_path / "cg") == 2


def test_cgroup_v2_hidden_path_reads_the_namespace_root(tmp_path):
    # Inside a container the host's path is listed but the namespace root is the cgroup.
    write(tmp_path / "proc", "0::/kubepods/pod42/container\n")
    write(tmp_path / "cg" / "cpu.max", "400000 100000\n")
    assert cgroup_cpus(tmp_path / "proc", tmp_path / "cg") == 4


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    write(tmp_path / "proc", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n2:cpuset:/\n")
    group = tmp_path / "cg" / "cpu,cpuacct" / "docker" / "abc"
    write(group / "cpu.cfs_quota_us", "250000\n")
    write(group / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpus(tmp_path / "proc", tmp_path / "cg") == 2
    write(group / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpus(tmp_path / "proc", tmp_path / "cg") is None


def test_cgroup_v1_cpu_mount_without_cpuacct(tmp_path):
    write(tmp_path / "proc", "1:cpu:/\n0::/\n")
    write(tmp_path / "cg" / "cpu" / "cpu.cfs_quota_us", "100000\n")
    write(tmp_path / "cg" / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpus(tmp_path / "proc", tmp_path / "cg") == 1


@pytest.mark.parametrize("text", ["", "garbage\n", "100000\n", "lots 100000\n", "1 x\n"])
def test_malformed_cpu_max_is_no_limit(tmp_path, text):
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", text)
    assert cgroup_cpus(tmp_path / "proc", tmp_path / "cg") is None


def test_missing_cgroup_files_are_no_limit(tmp_path):
    assert cgroup_cpus(tmp_path / "no_proc", tmp_path / "no_cg") is None
    write(tmp_path / "proc", "0::/\n")
    assert cgroup_cpus(tmp_path / "proc", tmp_path / "no_cg") is None


def test_detect_combines_affinity_cgroup_and_environment(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: 3)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    limit = threads.detect_allowed_cpus()
    assert (limit.count, limit.source) == (2, "SLURM_CPUS_PER_TASK")
    assert (limit.limits["affinity"], limit.limits["cgroup"]) == (4, 3)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert threads.detect_allowed_cpus().source == "cgroup"


# ---- threads= -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -2])
def test_threads_below_one_is_refused(value):
    with pytest.raises(ConfigError) as info:
        threads.check_threads(value)
    assert str(info.value) == (
        f"threads={value} must be an integer >= 1, or null to follow the CPUs this process is "
        "allowed (affinity, cgroup quota, SLURM_CPUS_PER_TASK)."
    )


def test_apply_sets_the_requested_count(restore_threads):
    from threadpoolctl import threadpool_info

    info = threads.apply_threads(1)
    assert (info["requested"], info["chosen"], info["source"]) == (1, 1, "config")
    assert torch.get_num_threads() == 1 and info["torch_intra_op"] == 1
    assert info["torch_inter_op"] == torch.get_num_interop_threads()
    assert {pool["num_threads"] for pool in threadpool_info()} == {1}
    assert {pool["num_threads"] for pool in info["blas"]} == {1}


def test_the_openmp_wait_policy_is_recorded(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert threads.apply_threads(1)["omp_wait_policy"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert threads.apply_threads(1)["omp_wait_policy"] is None


def test_apply_follows_the_allowed_cpus(monkeypatch, restore_threads):
    limit = CpuLimit(1, "cgroup", {"affinity": 2, "cgroup": 1})
    monkeypatch.setattr(threads, "detect_allowed_cpus", lambda: limit)
    info = threads.apply_threads(None)
    assert (info["requested"], info["chosen"], info["source"]) == (None, 1, "cgroup")
    assert info["allowed"] == {"count": 1, "source": "cgroup", "limits": limit.limits}
    assert torch.get_num_threads() == 1


def test_more_threads_than_allowed_warns(monkeypatch, restore_threads, caplog):
    monkeypatch.setattr(threads, "detect_allowed_cpus", lambda: CpuLimit(1, "affinity", {}))
    with caplog.at_level(logging.WARNING, logger="basis_sharing.threads"):
        info = threads.apply_threads(2)
    assert info["chosen"] == 2 and torch.get_num_threads() == 2
    assert "threads=2 is more than the 1 CPUs this process is allowed (affinity)" in caplog.text


# ---- in a run -------------------------------------------------------------------------------


def tiny_overrides(model_dir: Path, mirror: Path, *extra: str) -> list[str]:
    return tiny_run_overrides(model_dir, mirror, "eval.ppl_datasets=[wikitext2]", *extra)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_run_with_bad_threads_fails_before_anything_loads(tmp_path, value):
    cfg = compose_config("model=local", "model.local_path=/does/not/exist", f"threads={value}")
    with pytest.raises(ConfigError, match=rf"^threads={value} must be an integer >= 1"):
        pipeline.run(cfg, out_dir=tmp_path)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("value", ["many", "1.5"])
def test_non_integer_threads_is_refused_when_composed(value):
    from hydra.errors import ConfigCompositionException

    message = f"^Error merging override threads={value}$"
    with pytest.raises(ConfigCompositionException, match=message):
        compose_config(f"threads={value}")


def test_run_records_the_thread_count(tiny_model_dir, tiny_mirror, tmp_path, restore_threads):
    cfg = compose_config(*tiny_overrides(tiny_model_dir, tiny_mirror, "threads=1"))
    record = pipeline.run(cfg, out_dir=tmp_path)
    assert record["status"] == "completed"
    saved = json.loads((tmp_path / "results.json").read_text())["environment"]
    assert saved["threads"]["chosen"] == 1 and saved["threads"]["source"] == "config"
    assert saved["threads"]["torch_intra_op"] == 1 and saved["torch_threads"] == 1
    assert saved["threads"]["allowed"]["count"] == threads.detect_allowed_cpus().count


def test_automatic_is_the_default(tiny_model_dir, tiny_mirror, tmp_path, restore_threads):
    record = pipeline.run(
        compose_config(*tiny_overrides(tiny_model_dir, tiny_mirror)), out_dir=tmp_path
    )
    expected = threads.detect_allowed_cpus()
    info = record["environment"]["threads"]
    assert info["requested"] is None
    assert (info["chosen"], info["source"]) == (expected.count, expected.source)


def test_threads_change_neither_fingerprint_nor_job_directory():
    plain = compose_config()
    assert plain.threads is None

    def fingerprint(*overrides: str) -> str:
        cfg = compose_config(*overrides)
        return config_fingerprint(OmegaConf.to_container(cfg, resolve=False))

    assert fingerprint("threads=3") == fingerprint()
    assert fingerprint("seed=1") != fingerprint()  # the fingerprint does see real settings
    hydra_cfg = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["hydra"]
    assert "threads" in hydra_cfg["job"]["config"]["override_dirname"]["exclude_keys"]
