"""RUN/eval/*.json: one file per evaluation, and the tables that show them.

A result's file name is built from its settings: the readable ones (metric, model, features, split,
sampler, weights, number of samples, seed) and a digest of all of them (`result_settings`: those every
metric records plus the metric's own `settings_keys`, e.g. Monte-Carlo draws, the judge's path, prompt
lengths), so rerunning the same evaluation replaces its file and any different setting adds one. `eval
compare` groups results by (metric, features): numbers from different feature extractors are never put in one
column.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from dbconvert.errors import RunError
from dbconvert.evaluation.metric import metric_names, metric_of


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in ".-+" else "-" for c in text)  # + kept: g1e+30 is not g1e-30
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:120]


SETTINGS_KEYS = ("metric", "model", "features", "split", "sampler", "num_samples", "seed", "weights", "reference")
"""Result keys every metric's settings include (`Metric.settings_keys` adds the metric's own)."""


def result_settings(result: dict[str, Any]) -> dict[str, Any]:
    """What decides a result (not what it measured): two results with equal settings are the same evaluation."""
    keys = (*SETTINGS_KEYS, *metric_of(result).settings_keys)
    settings = {k: result[k] for k in keys if k in result}
    source = result.get("source") or {}
    if source.get("kind") == "folder":  # a scored sample folder is a setting; the run's own path is not
        settings["source"] = source.get("path")
    return settings


def result_name(result: dict[str, Any]) -> str:
    sampler = result.get("sampler") or {}
    weights = sampler.get("weights") or result.get("weights")
    parts = [
        result["metric"],
        result["model"],
        str(result.get("features", "-")).split(" ")[0],
        result.get("split") or "folder",
        f"{sampler.get('solver', '')}{sampler.get('steps') or ''}",
        str(sampler.get("protocol")) if sampler.get("protocol") not in (None, "default") else "",
        f"g{sampler['guidance']:g}" if sampler.get("guidance") is not None else "",
        f"{weights}-weights" if weights not in (None, "ema") else "",
        f"n{result['num_samples']}",
        f"seed{result['seed']}" if result.get("seed") is not None else "",
    ]
    digest = hashlib.sha256(json.dumps(result_settings(result), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{_slug('-'.join(p for p in parts if p))[:111]}-{digest}"


def write_result(eval_dir: Path, result: dict[str, Any]) -> Path:
    from dbconvert.checkpoint import write_json  # torch: not on the CLI's help path

    path = Path(eval_dir) / f"{result_name(result)}.json"
    write_json(path, result)
    return path


def collect_results(eval_dir: Path) -> list[dict[str, Any]]:
    """Every RUN/eval/*.json, each with its file name under `_file`; unreadable files are skipped."""
    results = []
    for path in sorted(Path(eval_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and {"metric", "value", "model"} <= set(data):
            data.setdefault("features", "-")
            data["_file"] = path.name
            results.append(data)
    return results


def _sampler_text(r: dict[str, Any]) -> str:
    s = r.get("sampler") or {}
    if not s:
        return "-"
    named = " ".join(p for p in (s.get("solver"), f"{s['steps']} steps" if s.get("steps") else None) if p)
    parts = [s.get("name") or named or "one forward"]  # a classifier: no solver, no steps
    if s.get("guidance") not in (None, 1.0):
        parts.append(f"w={s['guidance']:g}")
    return ", ".join(parts)


def result_table(r: dict[str, Any]) -> Table:
    """The table one evaluation prints: the metric's own rows, then where the numbers come from."""
    metric = metric_of(r)
    table = Table(title=f"{metric.title} — {r['model']} — features: {r['features']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for row in metric.detail_rows(r):
        table.add_row(*row)
    kind, path = source_of(r)
    table.add_row("source", ("sample folder" if kind == "folder" else "run") + (f" {path}" if path else ""))
    table.add_row("samples", str(r["num_samples"]))
    table.add_row("reference", str(r.get("reference", "-")))
    for row in metric.extra_rows(r):
        table.add_row(*row)
    table.add_row("sampler", _sampler_text(r))
    info = r.get("features_info") or {}
    if info.get("val_accuracy") is not None:
        table.add_row(
            "feature net held-out accuracy",
            f"{info['val_accuracy']:.4f} ({info.get('val_images')} train-split "
            f"images it was not trained on; trained on {info.get('train_images')}, {info.get('epochs')} epochs)",
        )
    if info.get("test_accuracy") is not None:
        table.add_row("feature net test accuracy", f"{info['test_accuracy']:.4f} ({info.get('test_images')} images)")
    table.add_row("time", f"{r['seconds']:.1f}s")
    return table


def source_of(r: dict[str, Any]) -> tuple[str, str | None]:
    """(kind, path) of what was scored: `run` (a model of the run at path) or `folder` (a sample folder at path)."""
    source = r.get("source") or {}
    if source.get("kind") in ("run", "folder"):
        return source["kind"], source.get("path")
    return ("folder" if str(r["model"]).startswith("folder:") else "run"), None  # results older than `source`


def reference_text(r: dict[str, Any]) -> str:
    """The reference in a compare row: split (or folder) and size, and a warning when it overlaps training."""
    size = r.get("reference_size")
    text = (r.get("split") or "folder") + (f" {size}" if size else "")
    return text + " OVERLAPS TRAINING" if r.get("reference_overlaps_training") else text


def compare_tables(results: list[dict[str, Any]], run_root: Path | None = None) -> list[RenderableType]:
    """One table per (metric, features), in the metric's own columns: blocks vs e2e (and sample folders), each row
    labelled with its source.

    A row's source is `this run` (a model of `run_root`), `run [k]` (a result of another run folder) or
    `folder [k]` (a sample folder scored by `eval fid --samples`); the paths follow the table as numbered
    notes, whole, so a narrow terminal never cuts them. `xR` after a mean: over R repeats (FID) or k-means
    seeds (MAUVE).
    """
    if not results:
        return []
    here = Path(run_root).resolve() if run_root is not None else None
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["metric"], r["features"]), []).append(r)
    out: list[RenderableType] = []
    for (name, features), rows in sorted(groups.items()):
        metric = metric_of(rows[0])
        columns = metric.compare_columns()
        ref_header, ref_cell = metric.reference_column()
        table = Table(
            title=f"{metric.title} with features {features} ({metric.better_text()})",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        cols = ["model", "source", *(header for header, _ in columns), "n", ref_header, "sampler, seed"]
        wrapping = (ref_header, "sampler, seed")
        for col in cols:  # only the settings wrap on a narrow terminal: numbers and labels stay whole
            table.add_column(
                col, justify="left" if col in (*wrapping, "model", "source") else "right", no_wrap=col not in wrapping
            )
        notes: list[str] = []

        def where(r: dict[str, Any]) -> tuple[int, str, str]:
            """(section, model label, source label) of one result."""
            kind, path = source_of(r)
            if kind == "folder":
                if path is None:
                    return 2, "-", f"folder {str(r['model']).removeprefix('folder:')}"
                notes.append(path)
                return 2, "-", f"folder [{len(notes)}]"
            if here is not None and path is not None and Path(path) != here:
                notes.append(path)
                return 1, str(r["model"]), f"run [{len(notes)}]"
            return 0, str(r["model"]), "this run"

        order = {"blocks": 0, "e2e": 1}
        labelled = [(where(r), r) for r in rows]
        labelled.sort(
            key=lambda item: (item[0][0], order.get(item[1]["model"], 2), str(item[1]["model"]), item[1]["num_samples"])
        )
        section = None
        for (kind, model, source), r in labelled:
            if section is not None and kind != section:
                table.add_section()
            section = kind
            seed = f", seed {r['seed']}" if r.get("seed") is not None else ""
            table.add_row(
                model,
                source,
                *(cell(r) for _, cell in columns),
                str(r["num_samples"]),
                ref_cell(r),
                _sampler_text(r) + seed,
            )
        lines = [f"[{i}] {path}" for i, path in enumerate(notes, 1)]
        counts = sorted({int(r["num_samples"]) for r in rows})
        if metric.depends_on_count and len(counts) > 1:
            lines.append(
                f"note: these rows were scored at different sample counts (n = {', '.join(map(str, counts))}) "
                f"and {metric.title} moves with n: compare rows of equal n"
            )
        footnotes = Text("\n".join(lines), no_wrap=True, overflow="ignore")
        out.append(Group(table, footnotes) if lines else table)
    return out


def require_results(eval_dir: Path) -> list[dict[str, Any]]:
    results = collect_results(eval_dir)
    if not results:
        raise RunError(
            f"no evaluations in {eval_dir}; run `dbconvert eval METRIC` first (metrics: {', '.join(metric_names())})"
        )
    return results
