"""The paper's tables as data: which runs fill each cell and which reported number it faces.

A table is rows x columns. A cell's runs are the store rows (``basis_sharing.tracking.store``)
matching the table's, the row's and the column's ``runs`` filters together; its reported number is
the one line of ``results/paper/*.csv`` matching the three ``paper`` filters. Keeping the layout
here, and the numbers in the CSV files, means a table is re-rendered from data alone and a
transcription error is fixed in one place.

Filters map a store (or paper CSV) column to the value it must have: ``None`` means "not set"
(a dense run has no target ratio), floats compare with a tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from basis_sharing.config import PAPER_ZEROSHOT_TASKS
from basis_sharing.methods import METHODS
from basis_sharing.methods.options import update_mode

RATIOS = (0.2, 0.3, 0.4, 0.5)
# Each registered method's row label, as its class declares it (e.g. svd_llm -> "SVD-LLM").
METHOD_LABELS = {name: cls.label for name, cls in METHODS.items()}
BASELINES = ("svd", "fwsvd", "asvd", "svd_llm", "basis_sharing")
PPL_DATASETS = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}
# The paper's abbreviations of its zero-shot tasks (Table 1); tests/test_config.py checks that
# its keys are config.PAPER_ZEROSHOT_TASKS.
ZEROSHOT_LABELS = {
    "openbookqa": "Openb.",
    "arc_easy": "ARC_e",
    "winogrande": "WinoG.",
    "hellaswag": "HellaS.",
    "arc_challenge": "ARC_c",
    "piqa": "PIQA",
    "mathqa": "MathQA",
}
# The tasks' columns in the paper's order (config.PAPER_ZEROSHOT_TASKS), with their labels.
ZEROSHOT_TASKS = {task: ZEROSHOT_LABELS[task] for task in PAPER_ZEROSHOT_TASKS}
PAPER_GROUP_SIZE = 2  # every released config and every Table 1-5 number uses n = 2


@dataclass(frozen=True)
class Column:
    """One column: a store metric and the reported number it is compared with."""

    label: str
    metric: str  # store column, e.g. "ppl.wikitext2", "acc.piqa", "acc.mean", "params.total"
    paper: Mapping[str, Any] = field(default_factory=dict)  # paper-CSV filter
    runs: Mapping[str, Any] = field(default_factory=dict)  # extra store filter (e.g. model)
    kind: str = "ppl"  # formatting and plotting: ppl, acc, params, seconds, ratio, speedup
    unit: str = ""  # unit of the reproduced value (and of a comparable reported one)
    scale: float = 1.0  # reproduced value = store value * scale (params.total -> millions)
    ratio: float | None = None  # the column is a compression ratio (Tables 6-8)
    panel: str | None = None  # plot panel; None: the label


@dataclass(frozen=True)
class Row:
    """One row: the runs behind it and the reported line(s) it faces (None: none reported)."""

    label: str  # the plotted series, e.g. "SVD-LLM" or "n = 2"
    runs: Mapping[str, Any]
    paper: Mapping[str, Any] | None
    ratio: float | None = None
    group: str = ""  # the leading column ("20%"); shown once per block, as in the paper


@dataclass(frozen=True)
class Ordering:
    """A per-ratio ranking note comparing this table's rows with a reported reference."""

    column: str  # column label whose values are ranked (lower is better)
    paper: Mapping[str, Any]  # reported lines ranked per ratio (method -> METHOD_LABELS)
    label: str


@dataclass(frozen=True)
class TableSpec:
    name: str  # output files: results/tables/<name>.{md,csv,tex,png}
    title: str
    runs: Mapping[str, Any]
    paper: Mapping[str, Any] | None  # None: the table has no reported counterpart
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    command: str  # how the runs are produced
    group_label: str = "Ratio"  # header of the leading column; "" drops it
    row_label: str = "Method"
    notes: tuple[str, ...] = ()
    ordering: Ordering | None = None
    # Plot perplexity relative to SVD-LLM at each ratio (one SVD-LLM row per ratio); False for a
    # table whose rows at one ratio compare different budgets (FiPS: the MLP only, or all kinds).
    relative: bool = True


def pct(ratio: float) -> str:
    return f"{round(ratio * 100)}%"


def ppl_column(dataset: str, **kw: Any) -> Column:
    return Column(
        PPL_DATASETS[dataset],
        f"ppl.{dataset}",
        {"dataset_or_task": dataset, "metric": "ppl"},
        **kw,
    )


def accuracy_columns() -> tuple[Column, ...]:
    tasks = tuple(
        Column(label, f"acc.{task}", {"dataset_or_task": task, "metric": "acc"}, kind="acc")
        for task, label in ZEROSHOT_TASKS.items()
    )
    mean = Column(
        "Avg",
        "acc.mean",
        {"dataset_or_task": "average", "metric": "acc"},
        kind="acc",
        panel="Average of the 7 zero-shot tasks",
    )
    return (*tasks, mean)


def method_row(method: str, ratio: float | None, *, label: str | None = None, **runs: Any) -> Row:
    """A method at a ratio (``ratio=None``: the dense Original row)."""
    filters: dict[str, Any] = {"method": method, "target_ratio": ratio}
    if method in ("svd_llm", "basis_sharing"):
        filters["update"] = "none"
    if method == "basis_sharing":
        filters["group_size"] = PAPER_GROUP_SIZE
    filters.update(runs)
    paper = {"method": method} if ratio is None else {"method": method, "ratio": ratio}
    return Row(
        label or METHOD_LABELS[method],
        filters,
        paper,
        ratio=ratio,
        group="0%" if ratio is None else pct(ratio),
    )


def ratio_method_rows(methods: tuple[str, ...] = BASELINES) -> tuple[Row, ...]:
    rows = [method_row("dense", None)]
    for ratio in RATIOS:
        rows += [method_row(m, ratio) for m in methods]
    # The paper prints the ratio once per block.
    return tuple(
        r if i == 0 or r.group != rows[i - 1].group else Row(r.label, r.runs, r.paper, r.ratio)
        for i, r in enumerate(rows)
    )


PAPER_RUNS = {"finetune": "none", "calibration": "wikitext2"}
FULL_COLUMNS = (*(ppl_column(d) for d in PPL_DATASETS), *accuracy_columns())

TABLE1 = TableSpec(
    name="table1",
    title="Table 1: LLaMA-7B, S from WikiText-2 (perplexity and zero-shot accuracy)",
    runs={"model": "llama7b", **PAPER_RUNS},
    paper={"table": "1", "model": "llama7b"},
    rows=ratio_method_rows(),
    columns=FULL_COLUMNS,
    command="python run.py experiment=table1 -m",
    notes=(
        "The paper's SVD, FWSVD, ASVD and SVD-LLM rows are SVD-LLM's published numbers.",
        "Basis Sharing: group size 2, no update step (the released code never runs it).",
    ),
)


def table2_rows() -> tuple[Row, ...]:
    rows = [method_row("dense", None)]
    for ratio in RATIOS:
        for i, (calibration, name) in enumerate(
            (("wikitext2", "WikiText-2"), ("alpaca", "Alpaca"))
        ):
            row = method_row("basis_sharing", ratio, label=f"Basis Sharing (S: {name})")
            runs = {**row.runs, "calibration": calibration}
            paper = {**row.paper, "calibration": calibration}
            rows.append(Row(row.label, runs, paper, ratio, pct(ratio) if i == 0 else ""))
    return tuple(rows)


TABLE2 = TableSpec(
    name="table2",
    title="Table 2: LLaMA-2-7B, Basis Sharing with S from WikiText-2 or Alpaca",
    runs={"model": "llama2_7b", "finetune": "none"},
    paper={"table": "2", "model": "llama2_7b"},
    rows=table2_rows(),
    columns=FULL_COLUMNS,
    command="python run.py experiment=table2 -m",
    notes=(
        "The paper's Table 2 survives only in part: the Original row and the WikiText-2 "
        "perplexities; its other numbers are listed below without a row.",
    ),
)


def models_table(
    name: str, title: str, table: str, models: dict[str, str], notes: tuple[str, ...] = ()
) -> TableSpec:
    """Methods at 20 % (rows) x models (columns), WikiText-2 perplexity (Tables 3 and 4)."""
    columns = tuple(
        Column(
            label,
            "ppl.wikitext2",
            {"model": model, "dataset_or_task": "wikitext2", "metric": "ppl"},
            runs={"model": model},
        )
        for model, label in models.items()
    )
    return TableSpec(
        name=name,
        title=title,
        runs={"target_ratio": 0.2, **PAPER_RUNS},
        paper={"table": table, "ratio": 0.2},
        rows=tuple(method_row(m, 0.2) for m in BASELINES),
        columns=columns,
        command=f"python run.py experiment={name} -m",
        group_label="",
        notes=notes,
    )


TABLE3 = models_table(
    "table3",
    "Table 3: other model families at 20 %, WikiText-2 perplexity",
    "3",
    {"opt6.7b": "OPT-6.7B", "llama2_7b": "LLaMA-2-7B", "mistral7b": "Mistral-7B"},
)
TABLE4 = models_table(
    "table4",
    "Table 4: model scale at 20 %, WikiText-2 perplexity",
    "4",
    {"llama7b": "LLaMA-7B", "llama13b": "LLaMA-13B", "llama30b": "LLaMA-30B"},
    notes=("OOM: the paper's FWSVD ran out of memory during compression.",),
)

TABLE5 = TableSpec(
    name="table5",
    title="Table 5: GPT-2 at 20 % against Dynamic Tying (GPT2-XL), WikiText-2",
    runs={"target_ratio": 0.2, **PAPER_RUNS},
    paper={"table": "5", "ratio": 0.2},
    rows=(
        Row("Dynamic Tying (GPT2-XL)", {"method": "dynamic_tying"}, {"method": "dynamic_tying"}),
        Row(
            "Basis Sharing (GPT-2)",
            {"model": "gpt2", "method": "basis_sharing", "group_size": PAPER_GROUP_SIZE},
            {"model": "gpt2", "method": "basis_sharing"},
        ),
    ),
    columns=(
        Column(
            "#Params (M)",
            "params.total",
            {"metric": "params"},
            kind="params",
            unit="M",
            scale=1e-6,
        ),
        Column(
            "Compression time (s)",
            "time.compress_s",
            {"metric": "compression_time"},
            kind="seconds",
            unit="s",
        ),
        ppl_column("wikitext2"),
    ),
    command="python run.py experiment=table5 -m",
    group_label="",
    notes=(
        "Dynamic Tying is not implemented here; its row is the paper's only.",
        "Compression time here: wall time of the calibrate and compress stages.",
        "#Params here: every parameter of the compressed model (params.total).",
    ),
)


def group_size_table(
    name: str,
    title: str,
    table: str,
    finetune: str,
    sizes: tuple[int, ...],
    notes: tuple[str, ...] = (),
):
    """Group size n (rows) x ratio (columns), WikiText-2 perplexity (Tables 6-8)."""
    rows = tuple(
        Row(
            f"n = {n}",
            {"method": "basis_sharing", "group_size": n, "update": "none"},
            {"group_size": n},
        )
        for n in sizes
    )
    columns = tuple(
        Column(
            pct(r),
            "ppl.wikitext2",
            {"ratio": r, "dataset_or_task": "wikitext2", "metric": "ppl"},
            runs={"target_ratio": r},
            ratio=r,
            panel="WikiText-2",
        )
        for r in RATIOS
    )
    return TableSpec(
        name=name,
        title=title,
        runs={"model": "llama7b", "finetune": finetune, "calibration": "wikitext2"},
        paper={"table": table, "model": "llama7b", "method": "basis_sharing"},
        rows=rows,
        columns=columns,
        command=f"python run.py experiment={name} -m",
        group_label="",
        row_label="Group size",
        notes=(("n = 1 shares nothing: it is SVD-LLM.",) if 1 in sizes else ()) + notes,
    )


ALL_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
TABLE6 = group_size_table(
    "table6", "Table 6: group size, LLaMA-7B, WikiText-2 perplexity", "6", "none", ALL_SIZES
)
TABLE7 = group_size_table(
    "table7",
    "Table 7: group size after LoRA, LLaMA-7B, WikiText-2 perplexity",
    "7",
    "lora",
    ALL_SIZES,
    notes=(
        "Runs with finetune=lora: PEFT LoRA r = 8, alpha = 32 on the q and v coefficients "
        "(finetune.targets=paper), 2 epochs on WikiText-2 train, merged back "
        "(docs/methods.md §6).",
    ),
)
TABLE8 = group_size_table(
    "table8",
    "Table 8: group size after full fine-tuning, LLaMA-7B, WikiText-2 perplexity",
    "8",
    "full",
    (2, 4, 8, 16, 32),
    notes=(
        "Runs with finetune=full: every parameter trained, lr 2e-6, gradient accumulation 8, "
        "3 epochs on WikiText-2 train (docs/methods.md §6).",
    ),
)


def smollm_rows() -> tuple[Row, ...]:
    """Table 1's layout without reported numbers, plus the two methods with their update step."""
    rows = [Row("Original", method_row("dense", None).runs, None, None, "0%")]
    for ratio in RATIOS:
        block = []
        for method in BASELINES:
            block.append(method_row(method, ratio))
            if method in ("svd_llm", "basis_sharing"):
                label = f"{METHOD_LABELS[method]} + update"
                own = update_mode(method, True)
                block.append(method_row(method, ratio, label=label, update=own))
        rows += [
            Row(r.label, r.runs, None, r.ratio, r.group if i == 0 else "")
            for i, r in enumerate(block)
        ]
    return tuple(rows)


TABLE_SMOLLM = TableSpec(
    name="table-smollm",
    title="SmolLM2-135M (embedded model): every method x 20-50 %, WikiText-2 perplexity",
    runs={"model": "smollm2_135m", "collection": "wikitext2_16w", "finetune": "none"},
    paper=None,
    rows=smollm_rows(),
    columns=(
        ppl_column("wikitext2"),
        Column("Achieved ratio", "achieved_ratio", kind="ratio"),
    ),
    command=(
        "python run.py experiment=table_smollm method=dense,svd,fwsvd,svd_llm,basis_sharing -m`, "
        "`python run.py experiment=table_smollm method=asvd method.sensitivity_samples=1 -m` (one "
        "calibration block per ASVD sensitivity measurement, to fit the CPU budget) and "
        "`python run.py experiment=table_smollm method=svd_llm,basis_sharing method.update=true -m"
    ),
    notes=(
        "Perplexity on the first 16 WikiText-2 test windows of 2048 tokens (32,768 tokens); "
        "calibration on 64 x 512 tokens of the WikiText-2 validation split (seed 2023); "
        "the paper has no SmolLM2 numbers, so there is no reported column.",
        "Basis Sharing: group size 2. + update: the deviated-input refit (SVD-LLM: sequential, "
        "Basis Sharing: single pass).",
    ),
    ordering=Ordering(
        column="WikiText-2",
        paper={"table": "1", "model": "llama7b", "dataset_or_task": "wikitext2", "metric": "ppl"},
        label="paper, LLaMA-7B, Table 1",
    ),
)

MLP = "up/gate/down"


def fips_rows() -> tuple[Row, ...]:
    """FiPS against Basis Sharing and SVD-LLM on the MLP only, then at one total budget."""

    def fips(ratio: float, sparsity: float, u_update: str, ratio_of: str, label: str) -> Row:
        runs = {"method": "fips", "target_ratio": ratio, "sparsity": sparsity}
        return Row(label, {**runs, "u_update": u_update, "ratio_of": ratio_of}, None, ratio)

    rows: list[Row] = []
    for ratio in (0.2, 0.4):
        block = [
            fips(ratio, 0.0, "sequential", "kinds", "FiPS, s = 0"),
            fips(ratio, 0.5, "sequential", "kinds", "FiPS, s = 0.5"),
            fips(ratio, 0.5, "joint", "kinds", "FiPS, s = 0.5, joint U"),
            method_row("basis_sharing", ratio, label="Basis Sharing (MLP)", kinds=MLP),
            method_row("svd_llm", ratio, label="SVD-LLM (MLP)", kinds=MLP),
        ]
        rows += [
            Row(r.label, r.runs, None, r.ratio, f"MLP {pct(ratio)}" if i == 0 else "")
            for i, r in enumerate(block)
        ]
    block = [
        fips(0.2, 0.5, "sequential", "decoder", "FiPS, s = 0.5"),
        method_row("basis_sharing", 0.2, kinds="all"),
        method_row("svd_llm", 0.2, kinds="all"),
    ]
    rows += [
        Row(r.label, r.runs, None, r.ratio, "all 20%" if i == 0 else "")
        for i, r in enumerate(block)
    ]
    return tuple(rows)


TABLE_FIPS_SMOLLM = TableSpec(
    name="table-fips-smollm",
    title="SmolLM2-135M (embedded model): FiPS, Basis Sharing and SVD-LLM on the MLP and overall",
    runs={"model": "smollm2_135m", "collection": "fips_smollm", "finetune": "none"},
    paper=None,
    rows=fips_rows(),
    columns=(
        ppl_column("wikitext2"),
        Column("Avg acc", "acc.mean", kind="acc"),
        Column("MLP ratio", "budget_ratio", kind="ratio"),
        Column("Decoder ratio", "achieved_ratio", kind="ratio"),
        Column("Compression (s)", "time.compress_s", kind="seconds"),
    ),
    command=(
        "python run.py experiment=fips_smollm method.sparsity=0,0.5 -m` and the other sweeps "
        "listed in conf/experiment/fips_smollm.yaml, then `make collect "
        "RUNS=outputs/experiments/fips_smollm NAME=fips_smollm"
    ),
    group_label="Removed",
    relative=False,
    notes=(
        "MLP x %: x of the MLP weights removed (attention dense); all 20%: 20 % of every decoder "
        "projection (FiPS with method.ratio_of=decoder).",
        "Perplexity on the first 16 WikiText-2 test windows; zero-shot acc on the first 100 "
        "documents of each of the seven tasks; calibration on 64 x 512 WikiText-2 validation "
        "tokens for every method. Compression: the calibrate and compress stages' wall time.",
    ),
)

# The options of conf/method/basis_sharing_plus.yaml as the results store reads them
# (tests/test_experiments.py keeps the two equal): the combination measured best on the embedded
# model (README "Beyond the paper").
PLUS_OPTIONS: dict[str, Any] = {
    "update": "layerwise",
    "whitening": "cholesky",
    "allocation": "uniform",
    "sharing": "auto/rule",
    "refit_basis": True,
    "refit_samples": None,
    "decomposition": "auto",
}
PLAIN = {"whitening": "cholesky", "allocation": "uniform", "refit_basis": False}


def plus_rows() -> tuple[Row, ...]:
    """Every SVD-LLM variant, Basis Sharing with each option alone, and basis_sharing_plus."""
    bs = {**PLAIN, "sharing": "default"}
    rows: list[Row] = []
    for ratio in RATIOS:
        block = [
            method_row("svd_llm", ratio, **PLAIN),
            method_row(
                "svd_llm", ratio, label="SVD-LLM + update", **{**PLAIN, "update": "layerwise"}
            ),
            method_row(
                "svd_llm",
                ratio,
                label="SVD-LLM V2 recipe (global + eigh)",
                **{**PLAIN, "whitening": "eigh", "allocation": "global/kind"},
            ),
            method_row(
                "svd_llm",
                ratio,
                label="SVD-LLM + layerwise update + basis re-derivation",
                **{**PLAIN, "update": "layerwise", "refit_basis": True, "refit_samples": None},
            ),
            method_row("basis_sharing", ratio, **bs),
            method_row(
                "basis_sharing", ratio, label="+ one_pass update", **{**bs, "update": "one_pass"}
            ),
            method_row(
                "basis_sharing", ratio, label="+ sequential refit", **{**bs, "update": "sequential"}
            ),
            method_row(
                "basis_sharing",
                ratio,
                label="+ global allocation",
                **{**bs, "allocation": "global/kind"},
            ),
            method_row(
                "basis_sharing",
                ratio,
                label="+ global allocation, normalised",
                **{**bs, "allocation": "global/kind/normalized"},
            ),
            method_row("basis_sharing", ratio, label="+ auto sharing", **{**bs, "sharing": "auto"}),
            method_row(
                "basis_sharing", ratio, label="+ eigh whitening", **{**bs, "whitening": "eigh"}
            ),
            method_row(
                "basis_sharing",
                ratio,
                label="+ auto sharing + layerwise update",
                **{**PLAIN, "sharing": "auto", "update": "layerwise", "refit_samples": None},
            ),
            method_row(
                "basis_sharing",
                ratio,
                label="+ layerwise update",
                **{**bs, "update": "layerwise", "refit_samples": None, "decomposition": "svd"},
            ),
            method_row(
                "basis_sharing",
                ratio,
                label="+ layerwise update + basis re-derivation",
                **{**bs, "update": "layerwise", "refit_basis": True, "refit_samples": None},
            ),
            method_row(
                "basis_sharing",
                ratio,
                label="+ auto sharing + layerwise + re-derivation",
                **{**PLUS_OPTIONS, "sharing": "auto", "decomposition": "svd"},
            ),
            method_row(
                "basis_sharing",
                ratio,
                label="+ auto (rule kinds) + layerwise + re-derivation, SVD",
                **{**PLUS_OPTIONS, "decomposition": "svd"},
            ),
            method_row(
                "basis_sharing",
                ratio,
                label="+ auto (rule kinds) + layerwise + re-derivation = basis_sharing_plus",
                **PLUS_OPTIONS,
            ),
        ]
        rows += [
            Row(r.label, r.runs, None, r.ratio, r.group if i == 0 else "")
            for i, r in enumerate(block)
        ]
    return tuple(rows)


TABLE_PLUS_SMOLLM = TableSpec(
    name="table-plus-smollm",
    title="SmolLM2-135M (embedded model): every SVD-LLM variant and each Basis Sharing option",
    runs={"model": "smollm2_135m", "collection": "plus_smollm", "finetune": "none"},
    paper=None,
    rows=plus_rows(),
    columns=(
        ppl_column("wikitext2"),
        ppl_column("ptb"),
        ppl_column("c4"),
        Column("Achieved ratio", "achieved_ratio", kind="ratio"),
        Column("Compression (s)", "time.compress_s", kind="seconds"),
    ),
    command=(
        "python run.py experiment=plus_smollm method=svd_llm -m` and the other sweeps listed in "
        "conf/experiment/plus_smollm.yaml, then `make collect "
        "RUNS=outputs/experiments/plus_smollm NAME=plus_smollm"
    ),
    relative=False,
    notes=(
        "Perplexity on the first 16 WikiText-2 test windows and the first 4 of PTB and C4 (2048 "
        "tokens each); calibration on 64 x 512 WikiText-2 validation tokens (seed 2023).",
        "Each + row is Basis Sharing (group size 2) with that one option (docs/methods.md §10); "
        "basis_sharing_plus is conf/method/basis_sharing_plus.yaml. Compression: the calibrate "
        "and compress stages' wall time (the Grams came from the disk cache; a sweep's later "
        "ratios reuse its decompositions).",
    ),
)

SPECS: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TABLE1,
        TABLE2,
        TABLE3,
        TABLE4,
        TABLE5,
        TABLE6,
        TABLE7,
        TABLE8,
        TABLE_SMOLLM,
        TABLE_FIPS_SMOLLM,
        TABLE_PLUS_SMOLLM,
    )
}


def get_spec(name: str) -> TableSpec:
    """A table by name; ``table_smollm`` (the experiment's spelling) is accepted too."""
    key = name.replace("_", "-") if name.replace("_", "-") in SPECS else name
    if key not in SPECS:
        raise KeyError(f"Unknown table {name!r}. Valid: {', '.join(SPECS)}.")
    return SPECS[key]
