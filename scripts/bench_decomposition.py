"""Decomposition paths: the thin SVD of S W_G against the eigendecomposition of its smaller Gram.

``method.decomposition=svd|gram_eigh|auto`` (docs/methods.md §5.1). For every group of a shape,
in one process, each path decomposes S W_G in float64 and truncates at the group's Basis Sharing
rank for ``--ratio``; the report gives the summed wall time per path, the speed-up of
``gram_eigh`` (and of ``auto``, which picks per group by shape) over ``svd``, and the agreement:
the largest relative difference of the kept singular values and of the compressed weights B C_j.

Shapes:

* ``embedded``: the embedded SmolLM2-135M's real weights (the package's GGUF, converted once into
  the configured cache), grouped as ``method=basis_sharing`` groups them (group_size 2, the
  paper's shared kinds).
* ``group4096``: one LLaMA-7B up/gate pair, S W_G of 4096 x 22016 (random weights).
* ``llama7b``: all 144 groups of a LLaMA-7B-shaped model (hidden 4096, MLP 11008, 32 layers,
  group_size 2: 80 shared q/k/v/up/gate pairs, 64 private o/down layers), random weights; for a GPU.

S is the Cholesky factor of a synthetic Gram per input width (Gaussian activations over 2 d_in
tokens with column scales from 1 down to 1e-2, condition number about 1e4): the paths' speed
depends on the shapes only, and a realistic spread of singular values exercises the accuracy.

Reproduce (CPU; the numbers in the README)::

    python scripts/bench_decomposition.py --threads 2 \\
        --json results/benchmarks/bench_decomposition_cpu.json
    python scripts/bench_decomposition.py --shape llama7b --device cuda \\
        --json results/benchmarks/bench_decomposition_llama7b_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from basis_sharing.linalg.factorization import (  # noqa: E402
    decompose_shared,
    decomposition_path,
    shared_rank,
)
from basis_sharing.linalg.whitening import whitening_factor  # noqa: E402

F64 = torch.float64
PATHS = ("svd", "gram_eigh")
SHAPES = ("embedded", "group4096", "llama7b")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", choices=SHAPES, default=["embedded", "group4096"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ratio", type=float, default=0.2, help="the truncation rank's ratio")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    return parser.parse_args(argv)


def synthetic_factor(d_in: int, device: torch.device, seed: int) -> torch.Tensor:
    """S (upper triangular) of the Gram of Gaussian activations with decaying column scales."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d_in, dtype=F64)
    x = torch.randn(2 * d_in, d_in, generator=g, dtype=F64) * scales
    return whitening_factor((x.T @ x).to(device)).S


def embedded_groups() -> list[tuple[str, list[torch.Tensor]]]:
    """(name, member weights (d_in, d_out)) of every Basis Sharing group of the embedded model."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    import basis_sharing.config  # noqa: F401  (the config schemas)
    from basis_sharing.methods.basis_sharing import BasisSharing, BasisSharingMethodConfig
    from basis_sharing.methods.registry import CompressionContext
    from basis_sharing.models.families import family_for_model_type
    from basis_sharing.models.loading import resolve_source

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "conf")):
        cfg = compose("config", overrides=["model=smollm2_135m"])
    source = resolve_source(cfg.model, Path(cfg.paths.cache_dir).expanduser(), cfg.offline)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    family = family_for_model_type(model.config.model_type)
    method_cfg = OmegaConf.merge(
        OmegaConf.structured(BasisSharingMethodConfig), {"name": BasisSharing.name}
    )
    plans = BasisSharing(method_cfg).plan(
        model, family, CompressionContext(ratio=0.2, device=torch.device("cpu"))
    )
    layers = family.layers(model)
    return [
        (
            f"{plan.kind}{list(plan.layers)}",
            [family.weight(layers[i], plan.kind).detach().to(F64) for i in plan.layers],
        )
        for plan in plans
    ]


def random_group(d_in: int, d_out: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d_in, d_out, generator=g, dtype=F64) / d_in**0.5 for _ in range(n)]


def llama7b_groups(seed: int) -> list[tuple[str, Any]]:
    """The 144 groups' shapes; weights are built lazily (one group in memory at a time)."""
    hidden, mlp, layers = 4096, 11008, 32
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden)}
    shapes |= {"o": (hidden, hidden), "up": (hidden, mlp), "gate": (hidden, mlp)}
    shapes["down"] = (mlp, hidden)
    groups: list[tuple[str, Any]] = []
    for kind, (d_in, d_out) in shapes.items():
        shared = kind not in ("o", "down")
        for first in range(0, layers, 2 if shared else 1):
            n = 2 if shared else 1
            groups.append((f"{kind}[{first}:{first + n}]", (d_in, d_out, n, seed + len(groups))))
    return groups


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(weights, S, path: str, k: int, device: torch.device):
    sync(device)
    start = time.perf_counter()
    dec = decompose_shared(weights, S, path=path)
    basis, coefficients = dec.truncate(k)
    sync(device)
    return time.perf_counter() - start, dec.sigma[:k], basis, coefficients


def measure(
    groups: list[tuple[str, Any]], ratio: float, device: torch.device, seed: int, label: str
):
    factors: dict[int, torch.Tensor] = {}
    rows = []
    for name, spec in tqdm(groups, desc=f"decompose {label}", unit="group"):
        weights = random_group(*spec) if isinstance(spec, tuple) else spec
        weights = [w.to(device) for w in weights]
        d_in, d_out, n = weights[0].shape[0], weights[0].shape[1], len(weights)
        if d_in not in factors:
            factors[d_in] = synthetic_factor(d_in, device, seed)
        k = shared_rank(d_in, d_out, n, ratio)
        results = {path: timed(weights, factors[d_in], path, k, device) for path in PATHS}
        (_, ref_sigma, ref_basis, ref_c), (_, sigma, basis, c) = (
            results["svd"],
            results["gram_eigh"],
        )
        weight_diff = max(
            float(torch.linalg.matrix_norm(basis @ cj - ref_basis @ rj))
            / float(torch.linalg.matrix_norm(ref_basis @ rj))
            for cj, rj in zip(c, ref_c, strict=True)
        )
        rows.append(
            {
                "group": name,
                "shape": [d_in, n * d_out],
                "rank": k,
                "auto_path": decomposition_path(d_in, n * d_out, "auto"),
                **{f"{path}_s": results[path][0] for path in PATHS},
                "sigma_max_rel_diff": float(((sigma - ref_sigma).abs() / ref_sigma).max()),
                "weights_max_rel_diff": weight_diff,
            }
        )
        del weights, results
    total = {path: sum(r[f"{path}_s"] for r in rows) for path in PATHS}
    auto = sum(r[f"{r['auto_path']}_s"] for r in rows)
    return {
        "groups": len(rows),
        "svd_s": total["svd"],
        "gram_eigh_s": total["gram_eigh"],
        "auto_s": auto,
        "speedup_gram_eigh": total["svd"] / total["gram_eigh"],
        "speedup_auto": total["svd"] / auto,
        "sigma_max_rel_diff": max(r["sigma_max_rel_diff"] for r in rows),
        "weights_max_rel_diff": max(r["weights_max_rel_diff"] for r in rows),
        "per_group": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report: dict[str, Any] = {
        "benchmark": "decomposition paths (svd vs gram_eigh vs auto)",
        "command": "python scripts/bench_decomposition.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "ratio": args.ratio,
        "load_average_at_start": list(os.getloadavg()),  # other jobs on the machine
        "shapes": {},
    }
    for shape in args.shape:
        if shape == "embedded":
            groups = embedded_groups()
        elif shape == "group4096":
            groups = [("up/gate pair 4096 x 22016", (4096, 11008, 2, args.seed))]
        else:
            groups = llama7b_groups(args.seed)
        result = measure(groups, args.ratio, device, args.seed, shape)
        report["shapes"][shape] = result
        print(
            f"{shape}: {result['groups']} groups, svd {result['svd_s']:.2f} s, gram_eigh "
            f"{result['gram_eigh_s']:.2f} s ({result['speedup_gram_eigh']:.2f}x), auto "
            f"{result['auto_s']:.2f} s ({result['speedup_auto']:.2f}x); max rel diff sigma_k "
            f"{result['sigma_max_rel_diff']:.1e}, B C {result['weights_max_rel_diff']:.1e}"
        )
    report["load_average_at_end"] = list(os.getloadavg())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
