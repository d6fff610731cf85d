"""What converting a pretrained language model buys, and the later paper's text protocol, on tinyshakespeare.

    python examples/lm_conversion_benefit.py --out runs/lm-conversion --protocol-table --calibrated

1. The source: `split llama-tiny-shakespeare`, train its AR reference (`train-e2e --objective ar`) for
   --pretrain-steps (its held-out CE every --pretrain-val-every steps shows where it stops improving), and
   `export --model ar` it as a Hugging Face folder, OUT/source: an ordinary pretrained causal LM.
2. For every training seed S: OUT/converted-S splits that folder (`model.checkpoint=OUT/source`, its own
   tokenizer; with --calibrated also OUT/calibrated-S, `model.calibrate_output=true`) and OUT/scratch-S splits the
   fresh recipe (a BPE trained at split: the same tokenizer, checked);
   every block of both is trained --steps steps with the held-out CE every --val-every steps, and the held-out
   CE of the split weights (step 0) is computed the same way, on the same 32 held-out rows.
3. MAUVE of both runs' blocks (the recipe's default protocol: 50 Euler steps per token), as the text table of
   docs/results/quality-llama.md. With --protocol-table, also the later paper's protocol (`--protocol few-step`: B
   steps per token,
   greedy last step; AR at top-p 0.95) for the blocks, the e2e baseline and the AR reference of the scratch
   run (the two baselines trained here at matched layer updates): MAUVE and Gen-PPL with OUT/source as the
   judge (offline there is no GPT-2 XL; the judge is the converged AR model of the same shape and data).
4. OUT/summary.json (every number) and OUT/summary.md (the tables). Every stage resumes.

CLI equivalent of one seed (S):

    dbconvert split llama-tiny-shakespeare --blocks 4 --out OUT/pretrain
    dbconvert train-e2e --run OUT/pretrain --objective ar --steps 2000 train.val_every=250
    dbconvert export OUT/source --run OUT/pretrain --model ar
    dbconvert split llama-tiny-shakespeare model.checkpoint=OUT/source train.seed=S --out OUT/converted-S
    dbconvert split llama-tiny-shakespeare train.seed=S --out OUT/scratch-S
    dbconvert train-block I --run OUT/converted-S --steps 300 train.val_every=100     # I = 0..3; and scratch-S
    dbconvert eval mauve --run OUT/converted-S --num-prompts 64 --prompt-tokens 32 --new-tokens 32 --featurizer minilm
    dbconvert train-e2e --run OUT/scratch-S && dbconvert train-e2e --run OUT/scratch-S --objective ar
    dbconvert eval mauve --run OUT/scratch-S --model e2e --protocol few-step ...
    dbconvert eval genppl --run OUT/scratch-S --model ar --protocol few-step --judge OUT/source --prompt-tokens 24 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from dbconvert.checkpoint import load_strict, load_weights
from dbconvert.config import load_recipe
from dbconvert.evaluation import evaluate_mauve, write_result
from dbconvert.evaluation.genppl import evaluate_genppl
from dbconvert.export import export_model
from dbconvert.rundir import MANIFEST, Run
from dbconvert.split import split
from dbconvert.train import heldout_batch, train_block, train_e2e

RECIPE = "llama-tiny-shakespeare"
ARMS = ("converted", "calibrated", "scratch")


def open_or_split(folder: Path, overrides: list[str]) -> Run:
    if (folder / MANIFEST).exists():
        return Run.open(folder)
    return split(load_recipe(RECIPE, overrides), out=folder, make_current=False)


def val_curve(run: Run, name: str) -> dict[int, dict[str, float]]:
    """step -> held-out metrics, from the network's metrics log."""
    out = {}
    for line in run.metrics_path(name).read_text().splitlines():
        rec = json.loads(line)
        if "val_ce" in rec:
            out[rec["step"]] = {k: v for k, v in rec.items() if k.startswith("val_")}
    return out


def step0(run: Run, index: int) -> dict[str, float]:
    """Held-out metrics of block `index`'s split weights (at step 0's output temperature), computed as training
    computes them at a val step."""
    family, recipe, info = run.family(), run.recipe, run.blocks[index]
    net = family.block_network(recipe, info.layers[1] - info.layers[0])
    load_strict(net, load_weights(run.model_dir(Run.block_name(index)) / "init.safetensors"), "split weights")
    schedule = family.training_schedule(run, Run.block_name(index), recipe)
    if schedule is not None:  # a calibrated start: the temperature of training step 0
        schedule(net, 0)
    model = family.wrap("blocks", recipe, net, run.noise()).eval()
    batch = heldout_batch(family, recipe, torch.device("cpu"), print)
    assert batch is not None
    with torch.no_grad():
        return family.heldout_metrics(
            model, batch, tuple(info.train_range), recipe, torch.Generator().manual_seed(recipe.train.seed)
        )


def heldout_rows(run: Run) -> torch.Tensor:
    batch = heldout_batch(run.family(), run.recipe, torch.device("cpu"), print)
    assert batch is not None
    return batch[0]


def scored(run: Run, metric: str, model: str, protocol: str, args: argparse.Namespace) -> dict[str, Any]:
    """One evaluation, written into the run and read back on a rerun."""
    path = run.root / "eval" / f"lmconv-{metric}-{model}-{protocol}.json"
    if path.is_file():
        return json.loads(path.read_text())
    common = dict(
        model=model,
        num_prompts=args.prompts,
        samples_per_prompt=args.samples_per_prompt,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        protocol=protocol,
        log=print,
    )
    if metric == "mauve":
        steps = args.sample_steps if protocol == "default" and model != "ar" else None
        res = evaluate_mauve(run, featurizer="minilm", seeds=args.kmeans_seeds, steps=steps, **common)
    else:  # the judge (the source, context 64) must read prompt + continuation in its own tokens, BOS included
        common["prompt_tokens"] = args.judge_prompt_tokens
        res = evaluate_genppl(run, judge=str(args.out / "source"), **common)
    write_result(run.root / "eval", res)
    kept = {"mean": res["mean"], "std": res["std"], "values": res["values"]}
    path.write_text(json.dumps(kept))
    return kept


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/lm-conversion"))
    ap.add_argument(
        "--pretrain-steps",
        type=int,
        default=2000,
        help="AR pretraining steps; 2000 is where its held-out CE stopped falling (docs/results/quality-llama.md)",
    )
    ap.add_argument("--pretrain-val-every", type=int, default=250)
    ap.add_argument("--steps", type=int, default=300, help="training steps of every block (and of e2e and ar)")
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument(
        "--calibrated", action="store_true", help="also the converted blocks with model.calibrate_output=true"
    )
    ap.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=None,
        help="the run kinds to train (default: converted and scratch, with --calibrated also calibrated)",
    )
    ap.add_argument(
        "--rank-arms",
        type=int,
        nargs="*",
        default=[],
        metavar="R",
        help="also calibrated runs with low-rank sigma modulation, model.adaln_rank=R (folders calibrated-rR-S)",
    )
    ap.add_argument(
        "--protocol-table", action="store_true", help="also e2e and ar of the scratch runs, few-step protocol"
    )
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples-per-prompt", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--judge-prompt-tokens",
        type=int,
        default=24,
        help="Gen-PPL's prompt length: 24 + 32 new tokens leave the 64-token judge room for re-tokenised text",
    )
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--kmeans-seeds", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides for every run, key=value")
    args = ap.parse_args()
    if args.arms is None:
        args.arms = ["converted", *(["calibrated"] if args.calibrated else []), "scratch"]
    if args.protocol_table and "scratch" not in args.arms:
        ap.error("--protocol-table trains e2e and ar in the scratch runs: keep scratch in --arms")
    args.out.mkdir(parents=True, exist_ok=True)

    pre = open_or_split(
        args.out / "pretrain",
        [
            f"train.val_every={args.pretrain_val_every}",
            f"train.checkpoint_every={args.pretrain_val_every}",
            *args.overrides,
        ],
    )
    train_e2e(pre, objective="ar", steps=args.pretrain_steps, progress=False)
    source = args.out / "source"
    if not (source / "config.json").is_file():
        export_model(pre, source, model="ar")
    summary: dict[str, Any] = {
        "pretrain": {"steps": args.pretrain_steps, "val_ce": {s: m["val_ce"] for s, m in val_curve(pre, "ar").items()}},
        "seeds": {},
    }

    train = [f"train.steps={args.steps}", f"train.val_every={args.val_every}", f"train.checkpoint_every={args.steps}"]
    for seed in args.seeds:
        converted = [f"model.checkpoint={source}", f"train.seed={seed}", *train, *args.overrides]
        arms = {
            "converted": ["model.calibrate_output=false", *converted],
            # the copied final norm scaled where the copied head starts worse than none
            "calibrated": ["model.calibrate_output=true", *converted],
            "scratch": [f"train.seed={seed}", *train, *args.overrides],
        }
        arms = {kind: arms[kind] for kind in ARMS if kind in args.arms}
        for rank in sorted(args.rank_arms, reverse=True):
            arms[f"calibrated-r{rank}"] = ["model.calibrate_output=true", f"model.adaln_rank={rank}", *converted]
        runs = {kind: open_or_split(args.out / f"{kind}-{seed}", overrides) for kind, overrides in arms.items()}
        first = heldout_rows(next(iter(runs.values())))
        if any(not torch.equal(heldout_rows(r), first) for r in runs.values()):
            raise SystemExit("the runs do not all hold out the same token rows (their tokenizers differ)")
        row: dict[str, Any] = {}
        for kind, run in runs.items():
            for b in run.blocks:
                train_block(run, b.index, progress=False)
            row[kind] = {
                "blocks": [
                    {
                        "step0": step0(run, b.index),
                        **{str(k): v for k, v in val_curve(run, Run.block_name(b.index)).items()},
                    }
                    for b in run.blocks
                ],
                "mauve_blocks": scored(run, "mauve", "blocks", "default", args),
            }
        if args.protocol_table:
            run = runs["scratch"]
            train_e2e(run, progress=False)
            train_e2e(run, objective="ar", progress=False)
            row["scratch"]["ar_val_ce"] = val_curve(run, "ar")[args.steps]["val_ce"]
            for kind, r in runs.items():
                for model in ("blocks", "e2e", "ar") if kind == "scratch" else ("blocks",):
                    for metric in ("mauve", "genppl"):
                        row[kind][f"{metric}_{model}_few-step"] = scored(r, metric, model, "few-step", args)
        summary["seeds"][str(seed)] = row
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(tables(summary, args))
    print(tables(summary, args))


def tables(summary: dict[str, Any], args: argparse.Namespace) -> str:
    """The tables of docs/results/quality-llama.md: held-out CE per block over training (one cell per run kind, the
    seeds side by side),
    MAUVE of the blocks per run kind, and the few-step protocol's MAUVE and Gen-PPL."""
    seeds = list(summary["seeds"])
    first = summary["seeds"][seeds[0]]
    kinds = list(first)  # as trained: converted, calibrated, scratch, then the rank arms (highest first)
    gap = "converted" in kinds and "scratch" in kinds
    steps = ["step0", *(str(s) for s in range(args.val_every, args.steps + 1, args.val_every))]
    curve = summary["pretrain"]["val_ce"]
    lines = [
        f"AR source: held-out CE {curve[max(curve, key=int)]:.3f} after {summary['pretrain']['steps']} steps",
        "",
        f"held-out CE (nats) per block, training seeds {' / '.join(seeds)}:",
        "",
        "| block | step | " + " | ".join(kinds) + (" | scratch - converted (mean ± std over seeds) |" if gap else " |"),
        "|---|---:|" + "---|" * len(kinds) + ("---:|" if gap else ""),
    ]
    for b in range(len(first[kinds[0]]["blocks"])):
        for st in steps:
            ce = {k: [summary["seeds"][s][k]["blocks"][b][st]["val_ce"] for s in seeds] for k in kinds}
            cells = [" / ".join(f"{v:.3f}" for v in ce[k]) for k in kinds]
            if gap:
                cells.append(mean_std([f - c for f, c in zip(ce["scratch"], ce["converted"])]))
            lines.append(f"| {b} | {st.replace('step0', '0')} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| training seed | " + " | ".join(f"MAUVE {k} blocks" for k in kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]
    for s in seeds:
        row = summary["seeds"][s]
        lines.append(
            f"| {s} | "
            + " | ".join(f"{row[k]['mauve_blocks']['mean']:.3f} ± {row[k]['mauve_blocks']['std']:.3f}" for k in kinds)
            + " |"
        )
    if args.protocol_table:
        lines += [
            "",
            "few-step protocol (B steps per token, greedy last step; ar at top-p 0.95):",
            "",
            "| model | " + " | ".join(f"MAUVE S{s} | Gen-PPL S{s}" for s in seeds) + " |",
            "|---|" + "---:|" * (2 * len(seeds)),
        ]
        for kind, model in (
            ("converted", "blocks"),
            ("calibrated", "blocks"),
            ("scratch", "blocks"),
            ("scratch", "e2e"),
            ("scratch", "ar"),
        ):
            if kind not in kinds:
                continue
            cells = []
            for s in seeds:
                row = summary["seeds"][s][kind]
                for metric in ("mauve", "genppl"):
                    r = row[f"{metric}_{model}_few-step"]
                    cells.append(
                        f"{r['mean']:.3f} ± {r['std']:.3f}"
                        if metric == "mauve"
                        else f"{r['mean']:.2f} ± {r['std']:.2f}"
                    )
            lines.append(f"| {model} ({kind}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
