"""Data-parallel calibration (torchrun): real 2-process Gloo runs against one process.

The oracle is the single-process computation on an identical copy of the model and the same
calibration ids. Each rank passes the very batches one process would (shards are whole batches),
so the per-rank partial statistics are what one process accumulates over those batches; only
the order of the cross-rank sum differs. Measured here (float64 everywhere, one thread per rank):
the reduced Grams agree to 1.1e-15 relative, ASVD's abs_mean and the Fisher rows to 2e-16, the
Basis Sharing weights compressed from them to 4.6e-13 (the logits of this test happened to be
bit-equal); not bit for bit, since a sum of two partial Grams is not the sequential sum of the
batches. Token and batch counts, ASVD's maxima and the FiPS MLP input rows are exact. The
asserted tolerances (1e-10 relative) leave room for other BLAS builds.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_VOCAB, compose_config, make_tiny_model
from omegaconf import OmegaConf

from basis_sharing.calibration import collect_forward, collect_statistics
from basis_sharing.calibration.batching import choose_batch_size, resident_bytes, sample_bytes
from basis_sharing.calibration.grams import GRAM
from basis_sharing.calibration.statistics import ForwardStatistic, check_data_parallel
from basis_sharing.errors import CalibrationError, ConfigError
from basis_sharing.methods import METHODS
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.families import get_family
from basis_sharing.runtime import BlockRunner, distributed
from basis_sharing.runtime.distributed import World, launch_env, resolve_backend, shard_bounds

F64, CPU = torch.float64, torch.device("cpu")
IDENT = {"model": "tiny-llama"}
CALIB = "d" * 64
N_SAMPLES, SEQ, BATCH = 10, 16, 3  # 4 batches (the last one short): ranks get 2 + 2
STATS = ["fisher", "gram", "mlp_inputs", "scale"]
RATIO = 0.4


def _ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, TINY_VOCAB, (N_SAMPLES, SEQ), generator=generator)


def _eval_ids() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest entry."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join(rank: int, size: int, port: int) -> None:
    """What torchrun does for one process: its place in the environment, one thread."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def _spawn(fn, *args) -> None:
    """``fn(rank, 2, port, *args)`` in 2 processes, as torchrun would start them.

    Forked rather than spawned: the children inherit the imported modules (a spawned child spends
    ~10 s importing transformers on a busy 2-core machine, and the work is under a second). Each
    child sets its own thread count to 1 before any op, as DataLoader workers do.
    """
    mp.start_processes(fn, args=(2, _free_port(), *args), nprocs=2, join=True, start_method="fork")


def _compress(stats: dict, ids: torch.Tensor) -> tuple[dict, torch.Tensor, dict]:
    """Basis Sharing at RATIO of a fresh tiny LLaMA from ``stats``: (weights, logits, info)."""
    model, family = make_tiny_model("llama", dtype=F64), get_family("llama")
    cls = METHODS["basis_sharing"]
    method = cls(OmegaConf.merge(OmegaConf.structured(cls.schema), {"name": "basis_sharing"}))
    ctx = CompressionContext(
        ratio=RATIO,
        device=CPU,
        calibration_ids=ids,
        calib_batch_size=BATCH,
        stats=stats,
        gram_dtype=F64,
    )
    info = method.compress(model, family, ctx)
    with torch.no_grad():
        logits = model(input_ids=_eval_ids()).logits
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, logits, info


# ---------------------------------------------------------------- the 2-process calibration


def _calibrate_on_ranks(rank: int, size: int, port: int, out: str) -> None:
    _join(rank, size, port)
    world = distributed.init("cpu")
    try:
        assert (world.rank, world.size, world.backend) == (rank, size, "gloo")
        model, family = make_tiny_model("llama", dtype=F64), get_family("llama")
        ids, cache = _ids(), Path(out) / f"cache{rank}"
        collected = collect_statistics(
            STATS, model, family, ids, BATCH, "float64", IDENT, CALIB, cache, world=world
        )
        sequential = collect_forward(
            [GRAM], model, family, ids, BATCH, "float64", BlockRunner(model, family, CPU),
            world=world,
        )["gram"]  # fmt: skip
        again = collect_statistics(
            ["gram"], model, family, ids, BATCH, "float64", IDENT, CALIB, cache, world=world
        )["gram"]
        try:  # each rank claims other calibration ids: refused on both, nothing computed
            other = str(rank) * 64
            collect_statistics(
                ["gram"], model, family, ids, BATCH, "float64", IDENT, other, cache, world=world
            )
            mismatch = None
        except CalibrationError as exc:
            mismatch = str(exc)
        # model.calib_batch_size=auto: rank 0's memory holds 4 samples, rank 1's 2; both take 2
        per_sample = sample_bytes(model, family, SEQ, "float64")
        resident = resident_bytes(model, family, "float64", sequential=False)
        free = resident + (4 if rank == 0 else 2) * per_sample + per_sample // 2
        auto = choose_batch_size(
            model, family, ids, CPU, "float64", 1.0, False, world=world, free=free
        )
        result = {
            "auto_batch": (auto.batch_size, auto.limit),
            "stats": {name: c.value for name, c in collected.items()},
            "hits": {name: c.cache_hit for name, c in collected.items()},
            "sequential": sequential,
            "again": (again.cache_hit, again.value is None),
            "cache_files": sorted(p.name for p in cache.glob("stats/*.safetensors")),
            "mismatch": mismatch,
        }
        if world.is_main:
            result["compressed"] = _compress(result["stats"], ids)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, one_process):
    """Both ranks' results of one 2-process Gloo calibration (and rank 0's compression).

    After ``one_process``: the forked ranks inherit the modules it imported.
    """
    out = tmp_path_factory.mktemp("two_ranks")
    _spawn(_calibrate_on_ranks, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    model, family = make_tiny_model("llama", dtype=F64), get_family("llama")
    cache = tmp_path_factory.mktemp("single_cache")
    collected = collect_statistics(
        STATS, model, family, _ids(), BATCH, "float64", IDENT, CALIB, cache
    )
    stats = {name: c.value for name, c in collected.items()}
    return stats, _compress(stats, _ids())


def test_auto_batch_size_is_the_smallest_ranks_choice(two_ranks):
    # rank 0 alone would take 4, rank 1 2; a rank's limit is its share of the samples (10 // 2)
    assert [r["auto_batch"] for r in two_ranks] == [(2, 5), (2, 5)]


def test_reduced_grams_equal_the_single_process_ones(two_ranks, one_process):
    single = one_process[0]["gram"]
    for result in two_ranks:  # every rank holds the statistics of all samples
        for grams in (result["stats"]["gram"], result["sequential"]):  # runtime=full, sequential
            assert grams.tokens == single.tokens == N_SAMPLES * SEQ
            assert grams.dtype == "float64" and set(grams.grams) == set(single.grams)
            for key, gram in single.grams.items():
                assert _rel(grams.grams[key], gram) < 1e-10, key


def test_reduced_scales_fisher_and_mlp_inputs_equal_the_single_process_ones(two_ranks, one_process):
    single = one_process[0]
    for result in two_ranks:
        scales, fisher = result["stats"]["scale"], result["stats"]["fisher"]
        assert (scales.tokens, scales.batches) == (single["scale"].tokens, 4)
        for key, mean in single["scale"].abs_mean.items():
            assert _rel(scales.abs_mean[key], mean) < 1e-12, key
            assert torch.equal(scales.abs_max[key], single["scale"].abs_max[key]), key  # a max
        assert (fisher.batches, fisher.tokens) == (4, N_SAMPLES * SEQ)
        for key, row in single["fisher"].rows.items():
            assert _rel(fisher.rows[key], row) < 1e-10, key
        rows = result["stats"]["mlp_inputs"]
        assert rows.tokens == N_SAMPLES * SEQ
        for layer, x in single["mlp_inputs"].inputs.items():  # rows in calibration order
            assert torch.equal(rows.inputs[layer], x), layer


def test_compression_from_reduced_statistics_equals_the_single_process_one(two_ranks, one_process):
    weights, logits, info = two_ranks[0]["compressed"]
    ref_weights, ref_logits, ref_info = one_process[1]
    assert info["groups"] == ref_info["groups"]  # the same plan, ranks included
    assert set(weights) == set(ref_weights)
    for name, ref in ref_weights.items():
        assert _rel(weights[name], ref) < 1e-10, name
    assert _rel(logits, ref_logits) < 1e-10


def test_only_rank_0_reads_and_writes_the_cache(two_ranks):
    main, other = two_ranks
    assert all(not hit for hit in main["hits"].values()) and not any(other["hits"].values())
    assert len(main["cache_files"]) == len(STATS) and other["cache_files"] == []
    assert main["again"] == (True, False)  # rank 0 read its cache ...
    # ... and rank 1, whose own cache is empty, followed rank 0's decision (no pass, no value).
    assert other["again"] == (True, True)


def test_ranks_with_different_calibration_ids_are_all_refused(two_ranks):
    for result in two_ranks:
        assert result["mismatch"].startswith("rank(s) [1] sampled other calibration token ids")
        assert "every process must read the same data mirror" in result["mismatch"]
    assert len(two_ranks[0]["cache_files"]) == len(STATS)  # nothing more was cached


# ---------------------------------------------------------------- the pipeline on 2 ranks


def _pipeline_overrides(model_dir: Path, mirror: Path, cache: Path) -> list[str]:
    return [
        "method=basis_sharing",
        f"ratio={RATIO}",
        "ratio_tolerance=0.05",
        "model=local",
        f"model.local_path={model_dir}",
        "model.context_length=32",
        "model.dtype=float64",
        "model.calib_batch_size=2",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=6",  # 3 batches: ranks get 2 + 1
        "calibration.seq_len=32",
        "calibration.gram_dtype=float64",
        f"paths.data_dir={mirror}",
        f"paths.cache_dir={cache}",
        "eval=ppl",
        "eval.ppl_datasets=[wikitext2]",
        "eval.max_windows=2",
        "threads=1",
    ]


def _pipeline_on_ranks(rank: int, size: int, port: int, overrides: list[str], out: str) -> None:
    from basis_sharing import pipeline

    _join(rank, size, port)
    try:
        cfg = compose_config(*overrides)
        first = pipeline.run(cfg, out_dir=Path(out) / f"rank{rank}")
        second = pipeline.run(cfg, out_dir=Path(out) / f"rank{rank}")  # rank 0 resumes it
        dense = compose_config(*overrides, "method=dense")  # no calibration: rank 0 alone
        third = pipeline.run(dense, out_dir=Path(out) / f"dense{rank}")
        returned = [first, second, third]
        (Path(out) / f"returned{rank}.json").write_text(json.dumps(returned, default=str))
    finally:
        distributed.shutdown()


def test_the_pipeline_on_two_ranks_matches_one_process(tiny_model_dir, tiny_mirror, tmp_path):
    overrides = _pipeline_overrides(tiny_model_dir, tiny_mirror, tmp_path / "cache")
    _spawn(_pipeline_on_ranks, overrides, str(tmp_path))
    record = json.loads((tmp_path / "rank0" / "results.json").read_text())
    assert record["status"] == "completed"
    calibration = record["calibration"]
    assert (calibration["world_size"], calibration["backend"]) == (2, "gloo")
    assert calibration["cache_hit"] is False and calibration["tokens"] == 6 * 32
    assert not (tmp_path / "rank1").exists()  # rank 1 wrote nothing at all
    assert len(list((tmp_path / "cache" / "stats").glob("*.safetensors"))) == 1
    (first0, second0, dense0), (first1, second1, dense1) = (
        json.loads((tmp_path / f"returned{r}.json").read_text()) for r in range(2)
    )
    assert second0["started_at"] == first0["started_at"]  # the rerun was resumed ...
    assert second1 == {}  # ... and rank 1 was told so, instead of waiting for a calibration
    assert list(first1["stages"]) == ["data", "model_source", "tokenize", "load_model", "calibrate"]
    assert first1["calibration"]["world_size"] == 2
    assert dense0["status"] == "completed" and dense0["metrics"]["perplexity"]["wikitext2"]
    assert dense1 == {} and not (tmp_path / "dense1").exists()  # nothing for rank 1 to do

    from basis_sharing import pipeline

    threads = torch.get_num_threads()
    try:
        single = pipeline.run(
            compose_config(*_pipeline_overrides(tiny_model_dir, tiny_mirror, tmp_path / "c1")),
            out_dir=tmp_path / "single",
        )
    finally:
        torch.set_num_threads(threads)
    assert "world_size" not in single["calibration"]  # one process: the record as before
    ppl, ref = record["metrics"]["perplexity"]["wikitext2"], single["metrics"]["perplexity"]
    assert ppl["ppl"] == pytest.approx(ref["wikitext2"]["ppl"], rel=1e-12)
    assert record["params"] == single["params"]


# ---------------------------------------------------------------- helpers, in one process


@pytest.mark.parametrize(
    "n,batch,size", [(10, 3, 2), (10, 1, 3), (7, 2, 4), (16, 4, 4), (5, 5, 1), (64, 8, 3)]
)
def test_shards_are_contiguous_whole_batches_covering_every_sample_once(n, batch, size):
    bounds = shard_bounds(n, size, batch)
    assert len(bounds) == size and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # contiguous
    assert all(start % batch == 0 and stop > start for start, stop in bounds)  # whole batches
    batches = [-(-(stop - start) // batch) for start, stop in bounds]
    assert max(batches) - min(batches) <= 1 and sum(batches) == -(-n // batch)  # balanced
    ids = torch.arange(n * 3).reshape(n, 3)
    shards = [World(rank=r, size=size, backend="gloo").shard(ids, batch) for r in range(size)]
    assert torch.equal(torch.cat(shards), ids)  # every sample once, in order
    assert World().shard(ids, batch) is ids  # one process: the tensor itself


def test_fewer_batches_than_ranks_are_refused_with_the_fix():
    with pytest.raises(ConfigError) as err:
        shard_bounds(3, 4, 1)
    message = str(err.value)
    assert "3 calibration samples in batches of 1 make 3 batch(es), fewer than the 4" in message
    assert "calibration.n_samples >= 4" in message and "model.calib_batch_size" in message
    with pytest.raises(ConfigError, match="make 2 batch"):
        World(rank=0, size=3, backend="gloo").shard(torch.zeros(8, 2), 4)


def test_the_launch_environment_is_read_and_checked():
    assert launch_env({}) == (0, 1, 0)
    assert launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert launch_env({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2, 1)  # local rank: the rank
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 is set but RANK is not"):
        launch_env({"WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match=r"RANK=2 is outside 0 .. WORLD_SIZE-1 = 1"):
        launch_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        launch_env({"WORLD_SIZE": "two"})


def test_backends_follow_the_device_and_bad_ones_are_named():
    assert resolve_backend("auto", CPU) == "gloo"
    assert resolve_backend("auto", torch.device("cuda")) == "nccl"
    assert resolve_backend("gloo", torch.device("cuda")) == "gloo"
    with pytest.raises(ConfigError, match="distributed_backend=nccl needs a CUDA run"):
        resolve_backend("nccl", CPU)
    with pytest.raises(ConfigError, match="Valid choices: auto, gloo, nccl"):
        resolve_backend("mpi", CPU)


def test_one_process_has_no_process_group_and_identity_collectives(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world = distributed.init("cpu", "auto")
    assert world == World() and distributed.world().is_main and distributed.is_main()
    assert not torch.distributed.is_initialized()
    x = torch.ones(3)
    assert world.all_reduce_(x) is x and world.concat_rows(x) is x
    assert world.sum_ints(2, 5) == [2, 5] and world.broadcast_object("a") == "a"


class _Unreducible(ForwardStatistic):
    name = "unreducible"
    stat = "unreducible"

    def key(self, identity, calibration_hash, gram_dtype, batch_size):
        return "k"

    def encode(self, value):
        raise AssertionError

    def decode(self, tensors, fields):
        raise AssertionError

    def accumulator(self, gram_dtype):
        raise AssertionError("no pass may start for a statistic that cannot be reduced")

    def assemble(self, accumulators, batches, gram_dtype):
        raise AssertionError


def test_a_statistic_that_cannot_be_reduced_is_refused_before_any_pass():
    two = World(rank=0, size=2, backend="gloo")
    with pytest.raises(ConfigError) as err:
        collect_forward([GRAM, _Unreducible()], None, get_family("llama"), _ids(), 2, world=two)
    message = str(err.value)
    assert "statistic(s) unreducible cannot be computed data-parallel" in message
    assert "the statistics that can: fisher, gram, mlp_inputs, scale." in message
    check_data_parallel([_Unreducible()], World())  # one process: anything goes


def test_preflight_refuses_too_few_batches_for_the_launch(monkeypatch, tiny_mirror):
    from basis_sharing.preflight import validate

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    cfg = compose_config(
        "method=svd_llm",
        "calibration.n_samples=6",
        "model.calib_batch_size=2",
        "device=cpu",
        f"paths.data_dir={tiny_mirror}",
    )
    with pytest.raises(ConfigError, match="make 3 batch.*fewer than the 4 processes"):
        validate(cfg)
    monkeypatch.setenv("WORLD_SIZE", "3")
    validate(cfg)  # 3 batches for 3 ranks
