"""Text decoding protocols: how `sample` and `eval` decode, by name (`sample.protocol` in the recipe,
`--protocol NAME` on `sample`, `eval mauve` and `eval genppl`).

- `default`: the run's `sample.steps` (50 in the shipped recipes) Euler/Heun steps per token over EDM's
  rho = 7 schedule; the token is the table row nearest to the final z; ar / source are sampled with the
  recipe's temperature and top-p (1 and 1).
- `few-step`: the later DiffusionBlocks paper's text protocol. Steps per token = B, the run's number of
  blocks (blocks and e2e alike, so B = 4 is 4 steps), placed evenly in the training noise distribution's
  CDF from sigma_max to sigma_min (the points F^-1 of evenly spaced levels, as in its vision experiment), so
  each block owns exactly one step; the last step is greedy: the token is the argmax of the owning block's
  logits at that step, not the row nearest to an Euler update. The AR baseline (ar / source) is sampled
  with top-p 0.95 (temperature 1), as the paper's. `--steps N` still overrides the step count (then N
  steps on the same CDF spacing) and `--top-p` the AR nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass

from dbconvert import noise as nz
from dbconvert.errors import DbconvertError


@dataclass(frozen=True)
class TextProtocol:
    name: str
    schedule: str
    """edm: EDM's rho schedule over sample.steps; cdf: evenly spaced in the log-normal's CDF."""
    steps_per_block: bool
    """True: steps = the run's number of blocks unless --steps is given."""
    greedy: bool
    """True: the token is the argmax of the last step's logits."""
    ar_top_p: float | None
    """The nucleus of ar / source decoding unless --top-p is given (None: the recipe's sample.top_p)."""

    def describe(self, steps: int, solver: str) -> str:
        if self.name == "default":
            return f"{solver} {steps} steps per token"
        return f"{self.name}: {solver} {steps} steps per token evenly spaced in the noise CDF, greedy final token"


PROTOCOLS: dict[str, TextProtocol] = {
    "default": TextProtocol("default", "edm", False, False, None),
    "few-step": TextProtocol("few-step", "cdf", True, True, 0.95),
}


def get_protocol(name: str | None) -> TextProtocol:
    """The protocol `name` (None: default); a one-line error naming the choices otherwise."""
    if name is None:
        return PROTOCOLS["default"]
    if name not in PROTOCOLS:
        raise DbconvertError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {name!r}")
    return PROTOCOLS[name]


def cdf_steps(num_steps: int, noise: nz.NoiseSettings) -> list[float]:
    """t_0 = sigma_max > ... > t_{N-1} = sigma_min evenly spaced in the training log-normal's CDF, then t_N = 0.

    With N = B and the equi-probability partition, step j lies in block j's owned range: one step per block.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if num_steps == 1:
        return [noise.sigma_max, 0.0]
    c_hi, c_lo = noise.cdf(noise.sigma_max), noise.cdf(noise.sigma_min)
    ts = [noise.icdf(c_hi + j / (num_steps - 1) * (c_lo - c_hi)) for j in range(num_steps)]
    ts[0], ts[-1] = noise.sigma_max, noise.sigma_min  # exact ends (the CDF round trip is not)
    return [*ts, 0.0]


def steps_of(protocol: TextProtocol, noise: nz.NoiseSettings, num_steps: int, rho: float) -> list[float]:
    return cdf_steps(num_steps, noise) if protocol.schedule == "cdf" else nz.edm_steps(num_steps, noise, rho)
