"""The paper's tables next to ours: table specifications (YAML), cell aggregation, Markdown and LaTeX.

A table specification lists the paper's cells (row, column, value) and, where this repository has
an experiment for a cell, a selector naming the records that fill it: experiment, data variant and
configuration overrides (exact match, so runs on other data or other settings never mix in). A cell
may instead average other selections seed by seed (`ours: {mean_of: [selector, ...]}`, e.g. PACS's
Avg over the four held-out domains). Every cell is rendered, with a dash where nothing has been run.
Output is a pure function of the specs and the records: no clock, no machine state.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opl.errors import OPLError
from opl.results.records import PROTOCOL_NAMES, PROTOCOLS, select_runs
from opl.results.stats import TOO_FEW_RUNS, Interval, Summary, mean_minus_constant, summarize, welch_difference

DASH = "—"
SPEC_KEYS = {"title", "source", "metric", "units", "decimals", "protocols", "paper_protocol", "status", "notes",
             "cells", "comparisons"}
CELL_KEYS = {"row", "column", "paper", "paper_pm", "metric", "pm_metric", "decimals", "ours"}
SELECTOR_KEYS = {"experiment", "data_variant", "overrides"}
MEAN_OF_KEYS = {"mean_of"}
COMPARISON_KEYS = {"label", "column", "treatment", "baseline"}


class SpecError(OPLError):
    """A malformed table specification."""


@dataclass(frozen=True)
class Selector:
    experiment: str
    data_variant: str
    overrides: dict = field(default_factory=dict)

    def matches(self, record: dict) -> bool:
        return (record["experiment"] == self.experiment and record["data_variant"] == self.data_variant
                and record["overrides"] == self.overrides)

    def select(self, records: list[dict], where: str) -> list[dict]:
        """The runs this selector names (`select_runs`: one per seed, one dataset)."""
        return select_runs([r for r in records if self.matches(r)], where)


@dataclass(frozen=True)
class MeanOf:
    """A cell whose value per seed is the mean of several selections' values for that seed."""

    parts: tuple[Selector, ...]

    @property
    def data_variant(self) -> str:
        return "mean of " + "; ".join(part.data_variant for part in self.parts)


@dataclass(frozen=True)
class Cell:
    row: str
    column: str
    metric: str
    paper: float | None
    paper_pm: float | None
    ours: "Selector | MeanOf | None"
    decimals: int | None = None  # overrides the table's, e.g. 3 for cosines in a table of percentages
    # A per-run uncertainty shown beside ours, like the paper's ± (e.g. "5w1s_ci95", the 95 % interval
    # over episodes of each run's few-shot accuracy; its mean over the cell's runs is shown).
    pm_metric: str | None = None
    # paper and paper_pm as the paper prints them ("71.4", "0.8"): never padded to the table's decimals.
    paper_text: str | None = None
    paper_pm_text: str | None = None


@dataclass(frozen=True)
class Comparison:
    label: str
    column: str
    treatment: str
    baseline: str


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    source: str
    metric: str
    units: str
    decimals: int
    protocols: tuple[str, ...]
    paper_protocol: str | None
    status: str | None
    notes: str | None
    cells: tuple[Cell, ...]
    comparisons: tuple[Comparison, ...]

    def cell(self, row: str, column: str) -> Cell:
        for cell in self.cells:
            if (cell.row, cell.column) == (row, column):
                return cell
        raise SpecError(f"table {self.name}: no cell ({row!r}, {column!r})")


# ---------------------------------------------------------------------------------------- loading
def _require(mapping, key, where, kind=None):
    if key not in mapping:
        raise SpecError(f"{where}: missing {key!r}")
    value = mapping[key]
    if kind is not None and not isinstance(value, kind):
        raise SpecError(f"{where}: {key!r} must be {kind.__name__ if isinstance(kind, type) else kind}, got {value!r}")
    return value


def _unknown(mapping, allowed, where):
    extra = sorted(set(mapping) - allowed)
    if extra:
        raise SpecError(f"{where}: unknown keys {extra}; allowed: {sorted(allowed)}")


def _number_or_none(value, key, where):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise SpecError(f"{where}: {key!r} must be a number or null, got {value!r}")
    return None if value is None else float(value)


def _printed(value) -> str | None:
    """A number as the specification writes it: its YAML text ("0.80", "71.4"), else its shortest text."""
    if value is None:
        return None
    return getattr(value, "text", None) or repr(value)


def _decimals_of(text: str) -> int:
    mantissa = text.lower().split("e")[0]
    return len(mantissa.split(".")[1]) if "." in mantissa else 0


def _decimals_or_none(value, where):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 6):
        raise SpecError(f"{where}: 'decimals' must be an integer from 0 to 6, got {value!r}")
    return value


def _parse_selector(raw, where: str) -> Selector:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a selector must be a mapping, got {raw!r}")
    _unknown(raw, SELECTOR_KEYS, where)
    return Selector(_require(raw, "experiment", where, str), _require(raw, "data_variant", where, str),
                    dict(raw.get("overrides") or {}))


def _parse_ours(raw, where: str) -> "Selector | MeanOf | None":
    """`ours`: null, a selector, or `{mean_of: [selector, selector, ...]}`."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: 'ours' must be a mapping or null")
    if "mean_of" not in raw:
        return _parse_selector(raw, where)
    _unknown(raw, MEAN_OF_KEYS, where)
    parts = raw["mean_of"]
    if not isinstance(parts, list) or len(parts) < 2:
        raise SpecError(f"{where}: 'mean_of' must list at least two selectors, got {parts!r}")
    parts = tuple(_parse_selector(part, f"{where}, mean_of {i + 1}") for i, part in enumerate(parts))
    if any(part in parts[:i] for i, part in enumerate(parts)):
        raise SpecError(f"{where}: 'mean_of' lists the same selector twice")
    return MeanOf(parts)


def parse_spec(name: str, data) -> TableSpec:
    where = f"table {name}"
    if not isinstance(data, dict):
        raise SpecError(f"{where}: the file must hold a mapping")
    _unknown(data, SPEC_KEYS, where)
    metric = _require(data, "metric", where, str)
    for key in ("status", "notes", "units", "paper_protocol"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise SpecError(f"{where}: {key!r} must be text, got {data[key]!r}")
    protocols = data.get("protocols", ["final_epoch_test"])
    if not isinstance(protocols, list) or not protocols:
        raise SpecError(f"{where}: 'protocols' must be a non-empty list, got {protocols!r}")
    protocols = tuple(protocols)
    for protocol in protocols + ((data["paper_protocol"],) if data.get("paper_protocol") else ()):
        if protocol not in PROTOCOLS:
            raise SpecError(f"{where}: unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}")
    cells = []
    for i, raw in enumerate(_require(data, "cells", where, list)):
        cw = f"{where}, cell {i + 1}"
        if not isinstance(raw, dict):
            raise SpecError(f"{cw}: must be a mapping")
        _unknown(raw, CELL_KEYS, cw)
        ours = _parse_ours(raw.get("ours"), cw)
        pm_metric = raw.get("pm_metric")
        if pm_metric is not None and not isinstance(pm_metric, str):
            raise SpecError(f"{cw}: 'pm_metric' must be a metric name, got {pm_metric!r}")
        cells.append(Cell(str(_require(raw, "row", cw)), str(_require(raw, "column", cw)), raw.get("metric", metric),
                          _number_or_none(raw.get("paper"), "paper", cw),
                          _number_or_none(raw.get("paper_pm"), "paper_pm", cw), ours,
                          _decimals_or_none(raw.get("decimals"), cw), pm_metric,
                          _printed(raw.get("paper")), _printed(raw.get("paper_pm"))))
    seen = set()
    for cell in cells:
        if (cell.row, cell.column) in seen:
            raise SpecError(f"{where}: cell ({cell.row!r}, {cell.column!r}) appears twice")
        seen.add((cell.row, cell.column))
    comparisons = []
    for i, raw in enumerate(data.get("comparisons") or []):
        cw = f"{where}, comparison {i + 1}"
        if not isinstance(raw, dict):
            raise SpecError(f"{cw}: must be a mapping")
        _unknown(raw, COMPARISON_KEYS, cw)
        comparison = Comparison(str(_require(raw, "label", cw)), str(_require(raw, "column", cw)),
                                str(_require(raw, "treatment", cw)), str(_require(raw, "baseline", cw)))
        for row in (comparison.treatment, comparison.baseline):
            if (row, comparison.column) not in seen:
                raise SpecError(f"{cw}: no cell ({row!r}, {comparison.column!r})")
        comparisons.append(comparison)
    return TableSpec(name=name, title=_require(data, "title", where, str), source=_require(data, "source", where, str),
                     metric=metric, units=str(data.get("units", "")), decimals=_decimals_or_none(data.get("decimals", 2), where),
                     protocols=protocols, paper_protocol=data.get("paper_protocol"), status=data.get("status"),
                     notes=data.get("notes"), cells=tuple(cells), comparisons=tuple(comparisons))


class PrintedFloat(float):
    """A float read from a specification file that keeps the text it was written as."""

    text: str


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader whose floats keep their text: the paper's "0.8" stays "0.8", its "72.40" stays "72.40"."""


def _printed_float(loader, node) -> PrintedFloat:
    value = PrintedFloat(loader.construct_yaml_float(node))
    value.text = node.value
    return value


_SpecLoader.add_constructor("tag:yaml.org,2002:float", _printed_float)


def load_specs(folder: str | Path) -> list[TableSpec]:
    folder = Path(folder)
    paths = sorted(folder.glob("*.yaml"))
    if not paths:
        raise SpecError(f"no table specifications (*.yaml) in {folder}")
    specs = []
    for path in paths:
        try:
            data = yaml.load(path.read_text(), Loader=_SpecLoader)
        except yaml.YAMLError as exc:
            raise SpecError(f"{path}: not valid YAML ({exc})") from exc
        specs.append(parse_spec(path.stem, data))
    return specs


# ---------------------------------------------------------------------------------------- numbers
def metric_value(record: dict, protocol: str, metric: str) -> float | None:
    metrics = record["metrics"].get(protocol)
    return None if metrics is None else metrics.get(metric)


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    protocol: str
    records: tuple[dict, ...]  # the records that produced a value under this protocol
    summary: Summary | None
    vs_paper: Interval | None
    values: tuple[float, ...] = ()  # one per seed, in seed order: what summary and comparisons use


def cell_result(cell: Cell, protocol: str, records: list[dict]) -> CellResult:
    if isinstance(cell.ours, MeanOf):
        return mean_of_result(cell, protocol, records)
    chosen = cell.ours.select(records, f"cell ({cell.row!r}, {cell.column!r})") if cell.ours is not None else []
    chosen = [r for r in chosen if metric_value(r, protocol, cell.metric) is not None]
    if not chosen:
        return CellResult(cell, protocol, (), None, None)
    values = [metric_value(r, protocol, cell.metric) for r in chosen]
    vs_paper = mean_minus_constant(values, cell.paper) if cell.paper is not None else None
    return CellResult(cell, protocol, tuple(chosen), summarize(values), vs_paper, tuple(values))


def mean_of_result(cell: Cell, protocol: str, records: list[dict]) -> CellResult:
    """A `mean_of` cell: for each seed, the mean of the parts' values for that seed (e.g. PACS's Avg
    = the mean over the four held-out domains of one seed); then mean and std over those seeds. A
    seed that some parts have and others lack is an error: its mean would be over fewer parts."""
    parts = [cell_result(Cell(cell.row, cell.column, cell.metric, None, None, part), protocol, records)
             for part in cell.ours.parts]
    by_part = [{r["seed"]: metric_value(r, protocol, cell.metric) for r in part.records} for part in parts]
    seeds = sorted(set().union(*by_part))
    for seed in seeds:
        lacking = [part for part, values in zip(cell.ours.parts, by_part) if seed not in values]
        if lacking:
            raise SpecError(f"cell ({cell.row!r}, {cell.column!r}) averages {len(parts)} selections, but seed {seed} "
                            f"has no {protocol} record for "
                            + "; ".join(f"{p.experiment} on {p.data_variant} with {p.overrides}" for p in lacking)
                            + ": run it, or leave this seed's other runs out of the records")
    if not seeds:
        return CellResult(cell, protocol, (), None, None)
    values = [math.fsum(values[seed] for values in by_part) / len(by_part) for seed in seeds]
    chosen = sorted((r for part in parts for r in part.records), key=lambda r: (r["seed"], r["run_key"]))
    vs_paper = mean_minus_constant(values, cell.paper) if cell.paper is not None else None
    return CellResult(cell, protocol, tuple(chosen), summarize(values), vs_paper, tuple(values))


def comparison_interval(spec: TableSpec, comparison: Comparison, protocol: str, records: list[dict]):
    treatment = cell_result(spec.cell(comparison.treatment, comparison.column), protocol, records)
    baseline = cell_result(spec.cell(comparison.baseline, comparison.column), protocol, records)
    ours = None
    if treatment.summary and baseline.summary:
        ours = welch_difference(treatment.values, baseline.values)
    paper = None
    if treatment.cell.paper is not None and baseline.cell.paper is not None:
        paper = treatment.cell.paper - baseline.cell.paper
    return paper, ours, treatment, baseline


# ---------------------------------------------------------------------------------------- formatting
def _fmt(value: float | None, decimals: int, signed: bool = False) -> str:
    if value is None:
        return DASH
    text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    if float(text) == 0.0:  # no "-0.00" for a value that rounds to zero
        text = text.replace("-", "+" if signed else "")
    return text


def format_paper(cell: Cell) -> str:
    """The paper's number and its ± as the paper prints them (not padded to the table's decimals)."""
    if cell.paper is None:
        return DASH
    text = cell.paper_text or _printed(cell.paper)
    return text + (f" ± {cell.paper_pm_text or _printed(cell.paper_pm)}" if cell.paper_pm is not None else "")


def paper_difference_decimals(treatment: Cell, baseline: Cell) -> int:
    """The paper's difference of two cells to the digits the paper prints for them."""
    return max(_decimals_of(cell.paper_text or _printed(cell.paper)) for cell in (treatment, baseline))


def format_summary(summary: Summary | None, decimals: int) -> str:
    if summary is None:
        return DASH
    spread = _fmt(summary.std, decimals) if summary.std is not None else DASH
    return f"{_fmt(summary.mean, decimals)} ± {spread} (n={summary.n})"


def format_ours(result: CellResult, decimals: int) -> str:
    """Mean ± std over runs (n); with a pm_metric, also the mean of the runs' own ± (e.g. over episodes)."""
    text = format_summary(result.summary, decimals)
    pm = [metric_value(r, result.protocol, result.cell.pm_metric) for r in result.records] if result.cell.pm_metric else []
    pm = [v for v in pm if v is not None]
    return text + (f"; within-run ± {_fmt(sum(pm) / len(pm), decimals)}" if pm else "")


def format_interval(interval: Interval | None, decimals: int) -> str:
    if interval is None:
        return DASH
    if interval.low is None:
        return f"{_fmt(interval.estimate, decimals, True)} (no CI: {interval.undetermined})"
    return (f"{_fmt(interval.estimate, decimals, True)} "
            f"[{_fmt(interval.low, decimals, True)}, {_fmt(interval.high, decimals, True)}]")


def format_verdict(interval: Interval | None) -> str:
    if interval is None:
        return DASH
    verdict = interval.excludes_zero
    if verdict is None:
        return "n/a (needs ≥ 2 seeds)" if interval.undetermined == TOO_FEW_RUNS else "undetermined (identical runs)"
    return "yes" if verdict else "no"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def _run_keys(records) -> str:
    return ", ".join(r["run_key"][:8] for r in records) or DASH


def _title(spec: TableSpec) -> str:
    if any(cell.metric != spec.metric for cell in spec.cells):  # mixed metrics: each column says its own
        return spec.title
    return f"{spec.title} ({spec.metric}{', ' + spec.units if spec.units else ''})"


def _decimals(spec: TableSpec, cell: Cell) -> int:
    return spec.decimals if cell.decimals is None else cell.decimals


def cell_rows(spec: TableSpec, records: list[dict]) -> list[list[str]]:
    rows = []
    for cell in spec.cells:
        decimals = _decimals(spec, cell)
        for protocol in spec.protocols:
            result = cell_result(cell, protocol, records)
            variant = cell.ours.data_variant if cell.ours else DASH
            rows.append([cell.row, cell.column, PROTOCOL_NAMES[protocol], format_paper(cell),
                         format_ours(result, decimals),
                         format_interval(result.vs_paper, decimals), format_verdict(result.vs_paper),
                         variant, _run_keys(result.records)])
    return rows


def comparison_rows(spec: TableSpec, records: list[dict]) -> list[list[str]]:
    rows = []
    for comparison in spec.comparisons:
        for protocol in spec.protocols:
            paper, ours, treatment, baseline = comparison_interval(spec, comparison, protocol, records)
            n = f"{treatment.summary.n} vs {baseline.summary.n}" if ours else DASH
            decimals = _decimals(spec, treatment.cell)
            paper_decimals = paper_difference_decimals(treatment.cell, baseline.cell) if paper is not None else 0
            rows.append([comparison.label, comparison.column, PROTOCOL_NAMES[protocol], _fmt(paper, paper_decimals, True),
                         format_interval(ours, decimals), n, format_verdict(ours)])
    return rows


CELL_HEADER = ["row", "column", "protocol (ours)", "paper", "ours: mean ± std (n)", "ours − paper [95% CI]",
               "differs from paper?", "data variant", "runs"]
COMPARISON_HEADER = ["comparison", "column", "protocol (ours)", "paper Δ", "ours Δ [95% Welch CI]", "seeds",
                     "distinguishable from seed noise?"]


def summary_markdown(spec: TableSpec, records: list[dict], heading: str = "##") -> list[str]:
    """The cells and the OPL-vs-baseline comparisons: what the README shows."""
    lines = [f"{heading} {_title(spec)}", ""]
    lines.append(f"Source: {spec.source}." + (f" Paper's protocol: {PROTOCOL_NAMES[spec.paper_protocol]}."
                                              if spec.paper_protocol else ""))
    if spec.status:
        lines += ["", f"Status: {spec.status.strip()}"]
    if spec.notes:
        lines += ["", f"Notes: {spec.notes.strip()}"]
    lines += [""] + _md_table(CELL_HEADER, cell_rows(spec, records))
    if spec.comparisons:
        lines += [""] + _md_table(COMPARISON_HEADER, comparison_rows(spec, records))
    return lines


def table_markdown(spec: TableSpec, records: list[dict]) -> str:
    lines = ["<!-- generated by scripts/make_tables.py from results/records.jsonl; do not edit -->", ""]
    lines += summary_markdown(spec, records, heading="#")
    used = {}
    for cell in spec.cells:
        for protocol in spec.protocols:
            for record in cell_result(cell, protocol, records).records:
                used[record["run_key"]] = record
    lines += ["", "## Runs behind the cells", ""]
    if used:
        rows = []
        for key in sorted(used, key=lambda k: (used[k]["experiment"], used[k]["seed"], k)):
            r = used[key]
            overrides = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(none)"
            commit = (r["code"].get("commit") or "unknown")[:10] + (" (dirty)" if r["code"].get("dirty") else "")
            rows.append([key, r["experiment"], str(r["seed"]), overrides, r["data_variant"], str(r["epochs"]),
                         r["device"], commit, r["finished_at"]])
        lines += _md_table(["run key", "experiment", "seed", "overrides", "data variant", "epochs", "device", "commit",
                            "finished"], rows)
    else:
        lines.append("None yet.")
    return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
    replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "±": r"$\pm$", "—": "--",
                    "−": "$-$", "Δ": r"$\Delta$", "≥": r"$\geq$", "<": "$<$", ">": "$>$",
                    "'": "'"}
    return "".join(replacements.get(ch, ch) for ch in str(text))


def table_latex(spec: TableSpec, records: list[dict]) -> str:
    header = ["row", "column", "protocol", "paper", "ours: mean $\\pm$ std (n)", "ours $-$ paper [95\\% CI]"]
    lines = ["% generated by scripts/make_tables.py from results/records.jsonl; do not edit",
             "\\begin{table}[t]", "\\centering", f"\\caption{{{_tex_escape(_title(spec))}}}",
             "\\begin{tabular}{llllll}", "\\hline", " & ".join(header) + " \\\\", "\\hline"]
    for row in cell_rows(spec, records):
        lines.append(" & ".join(_tex_escape(c) for c in row[:6]) + " \\\\")
    lines += ["\\hline", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"
