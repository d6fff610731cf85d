"""Step-0 loss of each block of a converted Llama run against a fresh one, and what the output path does to it.

docs/results/quality-llama.md, "Why a converted LM block starts worse than a fresh one". Usage (runs split as that page
shows):

    python examples/lm_start_loss.py CONVERTED_RUN FRESH_RUN [OTHER_CONVERTED_RUN]

For every block: the plain cross-entropy of the block's training loss (the family's `training_loss` with the
run's weighting) of its split weights (`init.safetensors`) on 8 held-out batches of 32 rows with fixed noise
draws; also the converted block with the fresh block's final norm and head swapped in, and with its copied
final norm scaled by 0.5, 0.25, 0.1 and 0 (a softmax temperature on the head; 0 = no head).
"""

from __future__ import annotations

import json
import sys

import torch

from dbconvert.checkpoint import load_strict, load_weights
from dbconvert.rundir import Run


def block_net(run: Run, i: int):  # noqa: ANN201
    info = run.blocks[i]
    net = run.family().block_network(run.recipe, info.layers[1] - info.layers[0])
    load_strict(net, load_weights(run.model_dir(Run.block_name(i)) / "init.safetensors"), "split weights")
    return net, info


def step0_ce(run: Run, net: torch.nn.Module, info, batches: int = 8, rows: int = 32) -> float:  # noqa: ANN001
    family, recipe = run.family(), run.recipe
    denoiser = family.denoiser(recipe, net, run.noise()).eval()
    data = family.load_data(recipe, "val").tokens
    out = []
    with torch.no_grad():
        for k in range(batches):
            _, stats = family.training_loss(
                denoiser,
                [data[k * rows : (k + 1) * rows]],
                tuple(info.train_range),
                recipe,
                torch.Generator().manual_seed(k),
            )
            out.append(stats["ce"])
    return sum(out) / len(out)


def main() -> None:
    torch.set_num_threads(1)
    runs = [Run.open(a) for a in sys.argv[1:]]
    conv, fresh, others = runs[0], runs[1], runs[2:]
    for i in range(conv.num_blocks):
        cn, info = block_net(conv, i)
        fn, _ = block_net(fresh, i)
        row = {"converted": step0_ce(conv, cn, info), "fresh": step0_ce(fresh, fn, info)}
        for other in others:
            row[other.root.name] = step0_ce(other, block_net(other, i)[0], info)
        swapped, _ = block_net(conv, i)
        state, fresh_state = swapped.state_dict(), fn.state_dict()
        swapped.load_state_dict(
            {k: fresh_state[k] if k.startswith(("norm.", "lm_head")) else v for k, v in state.items()}
        )
        row["converted, fresh norm + head"] = step0_ce(conv, swapped, info)
        for a in (0.5, 0.25, 0.1, 0.0):
            scaled, _ = block_net(conv, i)
            with torch.no_grad():
                scaled.norm.weight.mul_(a)
            row[f"converted, norm x{a}"] = step0_ce(conv, scaled, info)
        print(i, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
