"""The dbconvert pipeline from Python: split a tiny DiT into 2 blocks, train each, sample.

Run from anywhere (writes into ./example-run):

    python examples/python_api.py --steps 200

Every CLI command is a thin wrapper over one of these functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dbconvert.config import load_recipe
from dbconvert.families import get_family
from dbconvert.sampling import SampleRequest
from dbconvert.split import split
from dbconvert.train import train_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per block")
    parser.add_argument("--out", type=Path, default=Path("example-run"))
    args = parser.parse_args()

    recipe = load_recipe("dit-tiny-digits", [f"train.steps={args.steps}", "blocks.num=2", "train.warmup_steps=10"])
    run = split(recipe, out=args.out, force=True)
    print(json.dumps([b.to_dict() for b in run.blocks], indent=1))
    for block in run.blocks:
        result = train_block(run, block.index, progress=False)
        print(f"block {block.index}: {result.step} steps, last loss {result.last_loss:.4f}")
    samples = get_family(run.family_name).generate(run, SampleRequest(steps=20, num=16))
    print(f"samples: {samples.files[0]} (each block ran {samples.calls} times)")


if __name__ == "__main__":
    main()
