"""RUN/eval/*.json: one file per evaluation, and the tables that show them.

A result's file name is built from its settings (metric, model, features, split, sampler, number
of samples, seed), so rerunning the same evaluation replaces its file and a different setting
adds one. `eval compare` groups results by (metric, features): numbers from different feature
extractors are never put in one column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from dbconvert.checkpoint import write_json
from dbconvert.errors import RunError


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in ".-" else "-" for c in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:120]


def result_name(result: dict[str, Any]) -> str:
    sampler = result.get("sampler") or {}
    parts = [result["metric"], result["model"], result["features"].split(" ")[0], result.get("split") or "folder",
             f"{sampler.get('solver', '')}{sampler.get('steps') or ''}", f"g{sampler['guidance']:g}" if sampler.get("guidance") is not None else "",
             f"n{result['num_samples']}", f"seed{result['seed']}" if result.get("seed") is not None else ""]
    return _slug("-".join(p for p in parts if p))


def write_result(eval_dir: Path, result: dict[str, Any]) -> Path:
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
        if isinstance(data, dict) and {"metric", "value", "features", "model"} <= set(data):
            data["_file"] = path.name
            results.append(data)
    return results


def _sampler_text(r: dict[str, Any]) -> str:
    s = r.get("sampler") or {}
    if not s:
        return "-"
    parts = [s.get("name") or f"{s.get('solver')} {s.get('steps')} steps"]
    if s.get("guidance") not in (None, 1.0):
        parts.append(f"w={s['guidance']:g}")
    return ", ".join(parts)


def spread_text(r: dict[str, Any]) -> str:
    vals = r.get("values") or [r["value"]]
    if r["metric"] == "mauve":
        return f"{r['mean']:.4f} ± {r['std']:.4f} ({len(vals)} seeds)"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"min {r['min']:.4f}, mean {r['mean']:.4f} of [{', '.join(f'{v:.4f}' for v in vals)}]"


def result_table(r: dict[str, Any]) -> Table:
    """The table one evaluation prints."""
    title = f"{r['metric'].upper()} — {r['model']} — features: {r['features']}"
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    if r["metric"] == "fid":
        table.add_row("FID (min over repeats)" if r.get("repeats", 1) > 1 else "FID", f"{r['value']:.4f}")
        if r.get("repeats", 1) > 1:
            table.add_row("FID mean", f"{r['mean']:.4f}")
            table.add_row("FID per repeat", ", ".join(f"{v:.4f}" for v in r["values"]))
        kid = r["kid"]
        table.add_row("KID" + (" (min)" if len(kid["values"]) > 1 else ""), f"{kid['min']:.5f}")
    else:
        table.add_row("MAUVE (mean ± std)", f"{r['mean']:.4f} ± {r['std']:.4f}")
        table.add_row("per k-means seed", ", ".join(f"{v:.4f}" for v in r["values"]))
        table.add_row("prompts x samples", f"{r['num_prompts']} x {r['samples_per_prompt']}")
    table.add_row("samples", str(r["num_samples"]))
    table.add_row("reference", str(r["reference"]))
    table.add_row("sampler", _sampler_text(r))
    info = r.get("features_info") or {}
    if info.get("test_accuracy") is not None:
        table.add_row("feature net test accuracy", f"{info['test_accuracy']:.4f} ({info.get('test_images')} images)")
    table.add_row("time", f"{r['seconds']:.1f}s")
    return table


def compare_tables(results: list[dict[str, Any]]) -> list[Table]:
    """One table per (metric, features): blocks vs e2e (and folders), with their settings."""
    if not results:
        return []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["metric"], r["features"]), []).append(r)
    tables = []
    for (metric, features), rows in sorted(groups.items()):
        better = "lower" if metric == "fid" else "higher"
        table = Table(title=f"{metric.upper()} with features {features} ({better} is better)")
        cols = (["model", "FID min", "FID mean", "reps", "KID min"] if metric == "fid"
                else ["model", "MAUVE", "std", "seeds"]) + ["n", "split", "sampler", "seed"]
        for col in cols:
            table.add_column(col, justify="left" if col in ("model", "split", "sampler") else "right")
        order = {"blocks": 0, "e2e": 1}
        for r in sorted(rows, key=lambda r: (order.get(r["model"], 2), r["model"], r["num_samples"])):
            if metric == "fid":
                head = [f"{r['value']:.4f}", f"{r['mean']:.4f}", str(len(r["values"])), f"{r['kid']['min']:.5f}"]
            else:
                head = [f"{r['mean']:.4f}", f"{r['std']:.4f}", str(len(r["values"]))]
            table.add_row(r["model"], *head, str(r["num_samples"]), str(r.get("split") or "-"), _sampler_text(r),
                          str(r.get("seed") if r.get("seed") is not None else "-"))
        tables.append(table)
    return tables


def require_results(eval_dir: Path) -> list[dict[str, Any]]:
    results = collect_results(eval_dir)
    if not results:
        raise RunError(f"no evaluations in {eval_dir}; run `dbconvert eval fid` or `dbconvert eval mauve` first")
    return results
