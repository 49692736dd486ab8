"""Runs started together: their own directories, one cache filled safely, records never lost."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compose_config, tiny_run_overrides
from test_run import REPO, tiny_args

from basis_sharing import pipeline
from basis_sharing.errors import UserError
from basis_sharing.files import DirectoryInUseError, directory_lock, exclusive_lock
from basis_sharing.models import gguf_cache
from basis_sharing.stages import evaluate as evaluate_stages
from basis_sharing.tracking import record as record_module
from basis_sharing.tracking.record import PENDING_FILE, PREVIOUS_FILE


def start_run(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_two_runs_started_together_share_a_cold_cache(tiny_model_dir, tiny_mirror, tmp_path):
    """Same second, same command, one empty cache: two complete records, one valid stats file."""
    cache = tmp_path / "cache"
    args = [
        *tiny_args(tiny_model_dir, tiny_mirror, tmp_path / "out", method="basis_sharing"),
        "calibration=wikitext2",
        "calibration.split=validation",
        "calibration.n_samples=2",
        "calibration.seq_len=32",
        "ratio_tolerance=0.05",
        f"paths.cache_dir={cache}",
    ]
    procs = [start_run(*args) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
    records = sorted((tmp_path / "out" / "runs").glob("*/*/results.json"))
    assert len(records) == 2, records  # the default run directories no longer collide
    data = [json.loads(r.read_text()) for r in records]
    assert all(d["status"] == "completed" for d in data)
    assert data[0]["run_dir"] != data[1]["run_dir"]
    ppl = [d["metrics"]["perplexity"]["wikitext2"]["ppl"] for d in data]
    assert ppl[0] == ppl[1]  # both computed (or one reused) the very same statistics
    keys = {d["calibration"]["stats_key"] for d in data}
    assert len(keys) == 1
    stats = list((cache / "stats").glob("*.safetensors"))
    assert len(stats) >= 1 and not list((cache / "stats").glob(".*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    for path in stats:  # readable by the group and others, as any new file under the umask
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def _fake_convert(gguf: Path, dtype: str, target: Path) -> None:
    """Stands in for the 17 s dequantisation: slow enough for the two processes to overlap."""
    log = target.parent / "conversions.log"
    with log.open("a") as f:
        f.write(f"{os.getpid()}\n")
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"x" * 1000)
    time.sleep(1.0)
    gguf_cache.write_manifest(tmp, source=str(gguf))
    gguf_cache._publish(tmp, target)


def _ensure(args: tuple[str, str, str]) -> tuple[str, bool]:
    gguf, cache, _ = args
    gguf_cache.convert_gguf = _fake_convert
    path, info = gguf_cache.ensure_converted(Path(gguf), "float32", Path(cache))
    return str(path), info["cache_hit"]


def test_concurrent_conversions_convert_once_and_both_get_the_entry(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF fake")
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(_ensure, [(str(gguf), str(cache), str(i)) for i in range(2)])
    assert results[0][0] == results[1][0]
    assert sorted(hit for _, hit in results) == [False, True]  # one converted, one waited
    conversions = (cache / "models" / "conversions.log").read_text().split()
    assert len(conversions) == 1
    assert gguf_cache.verify_entry(Path(results[0][0])) is None


def test_a_lost_rename_race_keeps_the_winners_valid_entry(tmp_path):
    """Without working locks the second rename fails on the first's directory: that is fine."""
    target = tmp_path / "entry"
    for name in ("entry", "entry.tmp-1"):
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"weights")
        gguf_cache.write_manifest(d, source="x")
    gguf_cache._publish(tmp_path / "entry.tmp-1", target)
    assert gguf_cache.verify_entry(target) is None
    (target / "model.safetensors").write_bytes(b"damaged")  # a broken winner is not hidden
    with pytest.raises(OSError):
        gguf_cache._publish(tmp_path / "entry.tmp-1", target)


def _hold_lock(path: str, ready, release) -> None:
    with directory_lock(Path(path)):
        ready.set()
        release.wait(30)


def test_a_run_directory_in_use_is_refused_naming_the_holder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(DirectoryInUseError, match=f"another run \\(pid {holder.pid}\\)"):
            with directory_lock(tmp_path):
                pass
    finally:
        release.set()
        holder.join(30)
    with directory_lock(tmp_path):  # released when its holder ended
        pass
    assert issubclass(DirectoryInUseError, UserError)


def test_exclusive_lock_serialises_writers(tmp_path):
    with exclusive_lock(tmp_path / "x.lock", "x"):
        assert (tmp_path / "x.lock").exists()
    with exclusive_lock(tmp_path / "x.lock", "x"):  # re-entrant across uses, not held forever
        pass


def test_the_run_token_tells_apart_runs_of_the_same_second():
    a = compose_config("hydra.run.dir=${now:%H}-${bs_run_token:}")
    assert a is not None
    from basis_sharing.config import run_token

    tokens = {run_token() for _ in range(50)}
    assert len(tokens) == 50 and all(len(t) == 6 for t in tokens)
    text = (REPO / "conf" / "config.yaml").read_text()
    assert text.count("${now:%H-%M-%S}-${bs_run_token:}") == 2  # run and sweep directories


def compose_dense(model_dir, mirror, tmp_path, *overrides: str):
    return compose_config(
        *tiny_run_overrides(
            model_dir,
            mirror,
            f"paths.cache_dir={tmp_path}/cache",
            "eval.ppl_datasets=[wikitext2]",
            *overrides,
        )
    )


def test_a_failed_forced_rerun_keeps_the_completed_record(
    tiny_model_dir, tiny_mirror, tmp_path, monkeypatch
):
    out = tmp_path / "job"
    first = pipeline.run(compose_dense(tiny_model_dir, tiny_mirror, tmp_path), out_dir=out)
    before = (out / "results.json").read_text()

    def broken(*_a, **_k):
        raise UserError("evaluation broke")

    monkeypatch.setattr(evaluate_stages, "perplexity", broken)
    cfg = compose_dense(tiny_model_dir, tiny_mirror, tmp_path, "force=true")
    with pytest.raises(UserError, match="evaluation broke"):
        pipeline.run(cfg, out_dir=out)
    assert (out / "results.json").read_text() == before  # untouched, still completed
    failed = json.loads((out / PENDING_FILE).read_text())
    assert failed["status"] == "failed" and failed["error"]["message"] == "evaluation broke"
    monkeypatch.undo()
    second = pipeline.run(cfg, out_dir=out)  # a forced rerun that completes replaces it
    assert json.loads((out / "results.json").read_text())["started_at"] == second["started_at"]
    assert json.loads((out / PREVIOUS_FILE).read_text())["started_at"] == first["started_at"]
    assert not (out / PENDING_FILE).exists()
    assert second["metrics"] == first["metrics"]


def test_resume_recomputes_a_run_that_saved_no_model_when_asked_to_save(
    tiny_model_dir, tiny_mirror, tmp_path, monkeypatch
):
    # started_at has one-second resolution and a tiny run takes less: number the starts so a
    # recomputed record is told from a resumed one by its start, not by the wall clock
    starts = iter(f"2026-01-01T00:00:{n:02d}+00:00" for n in range(60))
    monkeypatch.setattr(record_module, "_now", lambda: next(starts))
    out = tmp_path / "job"
    first = pipeline.run(compose_dense(tiny_model_dir, tiny_mirror, tmp_path), out_dir=out)
    skipped = pipeline.run(compose_dense(tiny_model_dir, tiny_mirror, tmp_path), out_dir=out)
    assert skipped["started_at"] == first["started_at"]  # resumed: same record returned
    saving = compose_dense(tiny_model_dir, tiny_mirror, tmp_path, "save_model=true")
    assert saving.save_model and first["fingerprint"] == pipeline.config_fingerprint(
        json.loads(json.dumps(dict(first["config"]), default=str)) | {"save_model": True}
    )
    second = pipeline.run(saving, out_dir=out)
    assert second["started_at"] != first["started_at"] and second["saved_model"]
    third = pipeline.run(saving, out_dir=out)  # now it has its model: resumed
    assert third["started_at"] == second["started_at"]
