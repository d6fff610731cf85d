r"""Blocks vs the e2e baseline vs the AR reference on tinyshakespeare, at matched layer updates.

    python examples/compare_text.py --out runs/compare-text --steps 600 --seeds 0 1 \
        --weights lambda uniform network-share

For every (loss weight, training seed): split `llama-tiny-shakespeare` into B=4 blocks, train every
block `--steps` steps; for the default weight (docs/results/quality-llama.md) also train the e2e baseline (the same
denoiser, all 8 layers, full sigma range, `--steps` steps = matched layer updates) and the AR
reference (`--objective ar`, same steps). Then MAUVE (MiniLM features, offline) of each model on
the same held-out prompts, with the spread over k-means seeds, and the held-out cross-entropy per
block and sigma bucket from the last metrics line. Everything lands in OUT/summary.json and
OUT/summary.md; reruns resume (training continues, finished evaluations are read back).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dbconvert.config import load_recipe
from dbconvert.evaluation import evaluate_mauve, write_result
from dbconvert.rundir import MANIFEST, Run
from dbconvert.split import split
from dbconvert.train import train_block, train_e2e


def last_metrics(run: Run, name: str) -> dict:
    lines = run.metrics_path(name).read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def mauve(run: Run, model: str, args: argparse.Namespace) -> dict:
    path = run.root / "eval" / f"compare-mauve-{model}.json"
    if path.is_file():
        return json.loads(path.read_text())
    res = evaluate_mauve(
        run,
        model=model,
        num_prompts=args.prompts,
        samples_per_prompt=args.samples_per_prompt,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        featurizer="minilm",
        seeds=args.kmeans_seeds,
        steps=args.sample_steps,
        log=print,
    )
    write_result(run.root / "eval", res)
    path.write_text(json.dumps(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/compare-text"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--weights", nargs="+", default=["lambda", "uniform", "network-share"])
    ap.add_argument(
        "--baselines-for",
        default="lambda",
        help="loss weight whose runs also train e2e and ar ('none': blocks only, e.g. to measure a model option)",
    )
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples-per-prompt", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--kmeans-seeds", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides, key=value")
    args = ap.parse_args()

    rows = []
    for weight in args.weights:
        for seed in args.seeds:
            folder = args.out / f"{weight}-seed{seed}"
            if (folder / MANIFEST).exists():
                run = Run.open(folder)
            else:
                recipe = load_recipe(
                    "llama-tiny-shakespeare",
                    [
                        f"train.steps={args.steps}",
                        f"train.seed={seed}",
                        f"train.loss_weight={weight}",
                        "train.val_every=100",
                        *args.overrides,
                    ],
                )
                run = split(recipe, out=folder, make_current=False)
            models = ["blocks"]
            for b in run.blocks:
                train_block(run, b.index, progress=False)
            if weight == args.baselines_for:
                train_e2e(run, progress=False)
                train_e2e(run, objective="ar", progress=False)
                models += ["e2e", "ar"]
            row = {"weight": weight, "seed": seed, "run": str(run.root)}
            for b in run.blocks:
                m = last_metrics(run, Run.block_name(b.index))
                row[f"block{b.index}"] = {k: m[k] for k in m if k.startswith("val_")}
            if "e2e" in models:
                row["e2e"] = {k: v for k, v in last_metrics(run, "e2e").items() if k.startswith("val_")}
                row["ar"] = {k: v for k, v in last_metrics(run, "ar").items() if k.startswith("val_")}
            for model in models:
                res = mauve(run, model, args)
                row[f"mauve_{model}"] = {"mean": res["mean"], "std": res["std"], "values": res["values"]}
            rows.append(row)
            print(json.dumps(row))
            (args.out / "summary.json").write_text(json.dumps(rows, indent=1))

    lines = [
        "| loss weight | seed | val CE per block (0..3) | block-0 top-bucket CE | AR val CE | MAUVE blocks | MAUVE "
        "e2e | MAUVE ar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ces = " / ".join(f"{r[f'block{i}']['val_ce']:.3f}" for i in range(4))
        cell = lambda m: f"{r[m]['mean']:.3f} ± {r[m]['std']:.3f}" if m in r else "-"  # noqa: E731
        ar_ce = f"{r['ar']['val_ce']:.3f}" if "ar" in r else "-"
        lines.append(
            f"| {r['weight']} | {r['seed']} | {ces} | {r['block0']['val_ce_top']:.3f} | {ar_ce} | "
            f"{cell('mauve_blocks')} | {cell('mauve_e2e')} | {cell('mauve_ar')} |"
        )
    by_model: dict[str, list[float]] = {}
    for r in rows:
        for m in ("blocks", "e2e", "ar"):
            if f"mauve_{m}" in r and r["weight"] == args.baselines_for:
                by_model.setdefault(m, []).append(r[f"mauve_{m}"]["mean"])
    lines.append("")
    for m, vals in by_model.items():
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"- {m}: MAUVE {statistics.mean(vals):.3f} ± {spread:.3f} over training seeds {args.seeds}")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
