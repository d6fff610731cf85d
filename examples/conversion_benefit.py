"""What converting a pretrained model buys, measured on digits: blocks cut from a pretrained source vs from scratch.

    python examples/conversion_benefit.py --out runs/conversion-benefit     # about 8 CPU minutes

1. Pretrain a source: `split` the recipe (a fresh network), `train-e2e --steps N` (the e2e baseline, the same EDM
   denoiser over all layers), `export --model e2e` to a .safetensors file (it records `edm`).
2. `split` that file into B blocks (`model.checkpoint=...`: the converted run), and the fresh recipe into B blocks
   (the scratch run; the same init seed as the pretraining run, so the only difference is the pretraining).
3. For every K of --finetune, train every block of both runs to K steps (resuming from the previous K) and compute
   the FID of --num samples per sampling seed with the built-in digit features (`eval fid --features builtin`).
   K = 0 samples the blocks as split (`dbconvert sample` refuses untrained blocks, so this script draws them itself,
   with the same sampler, and scores the folder with `eval fid --samples`).
4. Write OUT/conversion-benefit.md (the table), .json (every number) and .png (FID vs K).

The CLI equivalent of steps 1-3 (per K and per block):

    dbconvert split dit-tiny-digits --blocks 4 --out OUT/pretrain
    dbconvert train-e2e --run OUT/pretrain --steps 600
    dbconvert export OUT/source.safetensors --run OUT/pretrain --model e2e
    dbconvert split dit-tiny-digits model.checkpoint=OUT/source.safetensors --blocks 4 --out OUT/converted
    dbconvert split dit-tiny-digits --blocks 4 --out OUT/scratch
    dbconvert train-block I --run OUT/converted --steps K          # and --run OUT/scratch; I = 0..3
    dbconvert eval fid --run OUT/converted --features builtin --num 500 --seed S     # S = 0, 1; and OUT/scratch
    dbconvert eval fid --run OUT/converted --model source --features builtin --num 500 --seed S
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dbconvert import noise as nz
from dbconvert.checkpoint import load_strict, load_weights
from dbconvert.config import load_recipe
from dbconvert.evaluation.fid import evaluate_fid
from dbconvert.export import export_model
from dbconvert.families.dit.generate import write_images
from dbconvert.rundir import Run
from dbconvert.sampling import edm_sample, guided
from dbconvert.split import split
from dbconvert.train import train_block, train_e2e


def sample_as_split(run: Run, num: int, seed: int, out: Path) -> Path:
    """`dbconvert sample --model blocks` for blocks that were never trained: the split weights, the same sampler."""
    family, cfg = run.family(), run.recipe.sample
    models = []
    for name, depth in run.model_targets("blocks"):
        net = family.block_network(run.recipe, depth)
        load_strict(net, load_weights(run.model_dir(name) / "model.safetensors"), name)
        models.append(family.wrap("blocks", run.recipe, net, run.noise()).eval())
    classes = int(run.recipe.model.num_classes)  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    ts = nz.edm_steps(cfg.steps, run.noise(), cfg.rho)
    z = (ts[0] * torch.randn((num, *family.sample_shape(run.recipe)), generator=gen, dtype=torch.float64)).float()
    y = torch.arange(num) % max(classes, 1)
    with torch.no_grad():
        x = edm_sample(
            lambda i, z, s: guided(models[i], z, s, y, cfg.guidance, classes), run.owned_ranges(), ts, z, cfg.solver
        ).clamp(-1, 1)
    write_images(out, x, y)
    return out


def fid(run: Run, model: str, num: int, seed: int, untrained: bool = False) -> float:
    if untrained:
        folder = sample_as_split(run, num, seed, run.root / "eval" / "samples" / f"as-split-seed{seed}-n{num}")
        return float(evaluate_fid(run, samples=folder, features="builtin")["value"])
    return float(evaluate_fid(run, model=model, num=num, seed=seed, features="builtin")["value"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/conversion-benefit"))
    parser.add_argument("--recipe", default="dit-tiny-digits")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--pretrain", type=int, default=600, help="e2e steps of the source")
    parser.add_argument("--finetune", default="0,100,300", help="steps per block at which FID is measured")
    parser.add_argument("--num", type=int, default=500, help="samples per FID")
    parser.add_argument("--seeds", default="0,1", help="sampling seeds (FID is averaged over them)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key.sub=value")
    args = parser.parse_args()
    ks = [int(k) for k in args.finetune.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out: Path = args.out
    start = time.process_time()
    recipe = lambda *extra: load_recipe(args.recipe, [*args.overrides, f"blocks.num={args.blocks}", *extra])  # noqa: E731

    pre_run = (
        Run.open(out / "pretrain")
        if (out / "pretrain" / "manifest.yaml").exists()
        else split(recipe(), out=out / "pretrain", make_current=False)
    )
    train_e2e(pre_run, steps=args.pretrain, progress=False)
    source_file = out / "source.safetensors"
    export_model(pre_run, source_file, model="e2e", force=True)
    runs = {}
    for label, extra in (("converted", [f"model.checkpoint={source_file}"]), ("scratch", [])):
        path = out / label
        runs[label] = (
            Run.open(path) if (path / "manifest.yaml").exists() else split(recipe(*extra), out=path, make_current=False)
        )
    assert runs["converted"].parameterization["name"] == "edm"

    results: dict = {"source": [fid(runs["converted"], "source", args.num, s) for s in seeds], "blocks": {}}
    print(f"pretrained source ({args.pretrain} e2e steps), unsplit: FID {np.mean(results['source']):.2f}", flush=True)
    for k in ks:
        for label, run in runs.items():
            if k > 0:
                for b in range(run.num_blocks):
                    train_block(run, b, steps=k, progress=False)
            values = [fid(run, "blocks", args.num, s, untrained=k == 0) for s in seeds]
            results["blocks"].setdefault(label, {})[k] = values
            print(f"{label}, {k} steps per block: FID {np.mean(values):.2f} {values}", flush=True)
    results["settings"] = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "blocks": args.blocks,
        "pretrain_steps": args.pretrain,
        "finetune_steps": ks,
        "num": args.num,
        "seeds": seeds,
        "features": "builtin",
        "cpu_seconds": round(time.process_time() - start, 1),
    }
    (out / "conversion-benefit.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "conversion-benefit.md").write_text(markdown(results))
    plot(results, out / "conversion-benefit.png")
    print(markdown(results))


def markdown(results: dict) -> str:
    s = results["settings"]
    seeds = ", ".join(str(x) for x in s["seeds"])
    lines = ["| steps per block | from the pretrained source | from scratch | ahead |", "|---:|---:|---:|---|"]
    for k in s["finetune_steps"]:
        conv, scratch = (results["blocks"][label][k] for label in ("converted", "scratch"))
        a, b = float(np.mean(conv)), float(np.mean(scratch))
        fmt = lambda v: f"{np.mean(v):.2f} ({' / '.join(f'{x:.2f}' for x in v)})"  # noqa: E731
        lines.append(
            f"| {k} | {fmt(conv)} | {fmt(scratch)} | {'pretrained' if a < b else 'scratch'} by {abs(a - b):.2f} |"
        )
    lines.append(
        f"\nPretrained source ({s['pretrain_steps']} e2e steps), unsplit: FID "
        f"{np.mean(results['source']):.2f} ({' / '.join(f'{x:.2f}' for x in results['source'])}). "
        f"FID on {s['num']} samples, built-in digit features, mean (per seed) over sampling seeds {seeds}; "
        f"{s['cpu_seconds']} CPU seconds in all.\n"
    )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from dbconvert.plots import new_figure, save_figure

    s = results["settings"]
    fig = new_figure(5.0, 3.2)
    ax = fig.add_subplot()
    for label, name in (("converted", "blocks from the pretrained source"), ("scratch", "blocks from scratch")):
        ks = s["finetune_steps"]
        ax.plot(ks, [np.mean(results["blocks"][label][k]) for k in ks], marker="o", label=name)
    ax.axhline(
        np.mean(results["source"]),
        color="grey",
        linestyle="--",
        label=f"pretrained source, unsplit ({s['pretrain_steps']} e2e steps)",
    )
    ax.set_xlabel("fine-tuning steps per block")
    ax.set_ylabel(f"FID (built-in features, {s['num']} samples)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
