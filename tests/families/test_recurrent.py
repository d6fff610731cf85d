"""The recurrent (Huginn) family: its checkpoint layout in and out against a reference forward written from the
formulas here, Huginn's training sampler, the denoiser's train = sample function, and the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dbconvert.checkpoint import load_weights
from dbconvert.config import load_recipe
from dbconvert.errors import CheckpointError, RecipeError
from dbconvert.families import get_family
from dbconvert.families.recurrent.model import RecurrentNet
from dbconvert.families.recurrent.objective import HuginnLM, RecurrentDenoiser, sample_recurrence, layer_evaluations
from dbconvert.noise import NoiseSettings
from dbconvert.rundir import Run
from tests.cli_helpers import assert_user_error, invoke
from tests.families.llama_tiny import write_corpus

H, HEADS, FF, V, T = 32, 4, 48, 300, 16
COUNTS = (1, 2, 1)


def tiny(corpus: Path, **extra: object) -> list[str]:
    """huginn-tiny-shakespeare shrunk to width 32, 16-token contexts, mean recurrence 4, on `corpus`."""
    base: dict[str, object] = {
        "model.hidden": H,
        "model.heads": HEADS,
        "model.intermediate": FF,
        "model.vocab_size": V,
        "model.context": T,
        "model.mean_recurrence": 4,
        "model.backprop_depth": 2,
        "data.source": str(corpus),
        "data.val_fraction": 0.1,
        "train.batch_size": 4,
        "train.steps": 4,
        "train.warmup_steps": 0,
        "train.log_every": 2,
        "train.checkpoint_every": 2,
        "train.val_every": 0,
        "sample.steps": 4,
        "train.device": "cpu",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# --- a Huginn checkpoint and Huginn's forward, written from the formulas -----------------------------------


def huginn_checkpoint(folder: Path, counts: tuple[int, int, int] = COUNTS, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny checkpoint in the key layout of Huginn's HF modeling file (rotary buffer and tied lm_head included)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=gen)  # noqa: E731
    state = {
        "transformer.wte.weight": r(V, H),
        "transformer.adapter.weight": r(H, 2 * H),
        "transformer.ln_f.weight": 1 + r(H),
        "freqs_cis": torch.zeros(T, H // HEADS // 2, 2),
    }
    for stack, n in zip(("prelude", "core_block", "coda"), counts):
        for i in range(n):
            p = f"transformer.{stack}.{i}."
            state.update(
                {
                    p + "attn.Wqkv.weight": r(3 * H, H),
                    p + "attn.qk_bias": r(2, 1, HEADS, H // HEADS),
                    p + "attn.proj.weight": r(H, H),
                    p + "mlp.fc.weight": r(2 * FF, H),
                    p + "mlp.proj.weight": r(H, FF),
                    **{p + f"norm_{k}.weight": 1 + r(H) for k in range(1, 5)},
                }
            )
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    return state


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def reference_logits(
    w: dict[str, torch.Tensor], tokens: torch.Tensor, state: torch.Tensor, r: int, theta: float = 50000.0
) -> torch.Tensor:
    """Huginn from its formulas: e = P(wte(x) sqrt(H)); s <- R(adapter([s, e])) r times; head(ln_f(C(ln_f(s))))."""
    b, t = tokens.shape
    d = H // HEADS
    freq = theta ** -(torch.arange(0, d, 2).float() / d)
    ang = torch.arange(t).float()[:, None] * freq  # (t, d/2)
    rot = torch.polar(torch.ones_like(ang), ang)

    def layer(p: str, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rms(x, w[p + "norm_1.weight"]) @ w[p + "attn.Wqkv.weight"].T).split(H, -1)
        q = q.view(b, t, HEADS, d) + w[p + "attn.qk_bias"][0]
        k = k.view(b, t, HEADS, d) + w[p + "attn.qk_bias"][1]
        q = torch.view_as_real(torch.view_as_complex(q.reshape(b, t, HEADS, d // 2, 2)) * rot[:, None]).flatten(-2)
        k = torch.view_as_real(torch.view_as_complex(k.reshape(b, t, HEADS, d // 2, 2)) * rot[:, None]).flatten(-2)
        att = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(d)
        att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        y = (att @ v.view(b, t, HEADS, d).transpose(1, 2)).transpose(1, 2).reshape(b, t, H)
        y = y @ w[p + "attn.proj.weight"].T
        x = rms(x + y, w[p + "norm_2.weight"])
        a, g = (rms(x, w[p + "norm_3.weight"]) @ w[p + "mlp.fc.weight"].T).chunk(2, -1)
        return rms(x + (F.silu(a) * g) @ w[p + "mlp.proj.weight"].T, w[p + "norm_4.weight"])

    def stack(name: str, n: int, x: torch.Tensor) -> torch.Tensor:
        for i in range(n):
            x = layer(f"transformer.{name}.{i}.", x)
        return x

    e = stack("prelude", COUNTS[0], w["transformer.wte.weight"][tokens] * math.sqrt(H))
    s = state
    for _ in range(r):
        s = stack("core_block", COUNTS[1], torch.cat([s, e], -1) @ w["transformer.adapter.weight"].T)
    h = rms(stack("coda", COUNTS[2], rms(s, w["transformer.ln_f.weight"])), w["transformer.ln_f.weight"])
    return h @ w["transformer.wte.weight"].T


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path)


def ckpt_recipe(folder: Path, corpus: Path, **extra: object):  # noqa: ANN201
    return load_recipe("huginn-tiny-shakespeare", tiny(corpus, **{"model.checkpoint": folder, **extra}))


def test_a_huginn_checkpoint_converts_to_the_same_recurrent_function(tmp_path: Path, corpus: Path) -> None:
    weights = huginn_checkpoint(tmp_path / "huginn")
    source = get_family("recurrent").source(ckpt_recipe(tmp_path / "huginn", corpus))
    lm = HuginnLM(source.network).eval()
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    state = 0.5 * torch.randn(2, 12, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for r in (1, 3, 6):
            torch.testing.assert_close(
                lm(tokens, state, (r, 0)), reference_logits(weights, tokens, state, r), atol=1e-4, rtol=1e-4
            )
        # the KV-cached decode (a cache per recurrence) is the same function, column by column
        full = lm(tokens, lm.column_state(0, 12, 2, tokens.device))
        cache, last = lm.extend(None, tokens[:, :7], 0)
        torch.testing.assert_close(last, full[:, 6], atol=1e-4, rtol=1e-4)
        for c in range(7, 12):
            cache, last = lm.extend(cache, tokens[:, c : c + 1], c)
            torch.testing.assert_close(last, full[:, c], atol=1e-4, rtol=1e-4)


def test_split_export_round_trip_keeps_huginns_layout(in_tmp: Path, corpus: Path) -> None:
    weights = huginn_checkpoint(in_tmp / "huginn")
    given = {"model.checkpoint": in_tmp / "huginn", "model.train_tokenizer": "true"}
    result = invoke("split", "huginn-tiny-shakespeare", *tiny(corpus, **given), "--out", "run")
    assert result.exit_code == 0, result.output
    assert invoke("export", "out", "--run", "run", "--model", "source").exit_code == 0
    back = load_file(str(in_tmp / "out" / "model.safetensors"))
    assert set(back) == set(weights) - {"freqs_cis"}
    for key, value in back.items():
        torch.testing.assert_close(value, weights[key])
    config = json.loads((in_tmp / "out" / "config.json").read_text())
    assert (config["n_layers_in_prelude"], config["n_layers_in_recurrent_block"], config["n_layers_in_coda"]) == COUNTS
    assert_user_error(invoke("export", "den", "--run", "run", "--model", "blocks"), "export --model source")


def test_checkpoint_errors_are_one_line(tmp_path: Path, corpus: Path) -> None:
    family = get_family("recurrent")
    state = huginn_checkpoint(tmp_path / "huginn", counts=(2, 4, 2))
    with pytest.raises(
        CheckpointError,
        match="has 2/4/2 prelude/core/coda layers, the recipe 1/2/1; set "
        "model.prelude_layers=2 model.core_layers=4 model.coda_layers=2",
    ):
        family.source(ckpt_recipe(tmp_path / "huginn", corpus))
    huginn_checkpoint(tmp_path / "huginn")
    weights = tmp_path / "huginn" / "model.safetensors"
    good = load_file(str(weights))

    def error(**changes: object) -> str:
        bad = dict(good)
        for key, value in changes.items():
            if value is None:
                bad.pop(key.replace("__", "."))
            else:
                bad[key.replace("__", ".")] = value  # type: ignore[assignment]
        save_file(bad, str(weights))
        with pytest.raises(CheckpointError) as err:
            family.source(ckpt_recipe(tmp_path / "huginn", corpus))
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "transformer.adapter.weight" in error(transformer__adapter__weight=None)
    assert "unknown key 'extra.weight'" in error(extra__weight=torch.zeros(2))
    assert "has shape (7,)" in error(transformer__ln_f__weight=torch.ones(7))
    with pytest.raises(CheckpointError, match="not found"):
        family.source(ckpt_recipe(tmp_path / "nowhere", corpus))
    del state


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.backprop_depth=33", "model.backprop_depth 33 must be in [1, model.mean_recurrence 32]"),
        ("model.backprop_depth=0", "model.backprop_depth 0 must be in [1"),
        ("model.hidden=30", "must be model.heads 4 times an even head width"),
    ],
)
def test_bad_recurrent_settings(override: str, match: str) -> None:
    with pytest.raises(RecipeError, match=re_escape(match)):
        load_recipe("huginn-tiny-shakespeare", [override])


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_a_recurrent_option_on_another_family_is_refused() -> None:
    with pytest.raises(RecipeError, match="unknown key 'model.mean_recurrence'"):
        load_recipe("llama-tiny-shakespeare", ["model.mean_recurrence=8"])


# --- Huginn's training ---------------------------------------------------------------------------------------


def test_recurrence_sampler_is_huginns_poisson_lognormal() -> None:
    gen = torch.Generator().manual_seed(0)
    draws = [sample_recurrence(32, 8, gen) for _ in range(4000)]
    r = torch.tensor([n + k for n, k in draws], dtype=torch.float64)
    assert abs(r.mean().item() - 33) < 0.6  # E[r] = E[rate] + 1 = 33
    assert all(k == min(8, n + k) and n == max(n + k - 8, 0) for n, k in draws)
    assert r.std().item() > 10  # the log-normal rate (std 0.5 in log) spreads r well beyond a Poisson's sqrt(33)
    again = torch.Generator().manual_seed(0)
    assert [sample_recurrence(32, 8, again) for _ in range(10)] == draws[:10]


def test_gradients_flow_through_the_last_k_iterations_only(tmp_path: Path, corpus: Path) -> None:
    huginn_checkpoint(tmp_path / "huginn")
    net = get_family("recurrent").source(ckpt_recipe(tmp_path / "huginn", corpus)).network
    lm = HuginnLM(net).train()
    tokens = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(1))
    s0 = torch.randn(2, 8, H, generator=torch.Generator().manual_seed(2))
    grads = []
    for no_grad, state in ((3, s0), (0, None)):
        if state is None:  # the same last 2 iterations from the state the first 3 reached, with no history
            with torch.no_grad():
                e = net.stack(net.transformer.prelude, net.embed(tokens), net.rope(torch.arange(8)[None]), None)[0]
                state = s0
                for _ in range(3):
                    state = net.stack(
                        net.transformer.core_block, net.adapt(state, e), net.rope(torch.arange(8)[None]), None
                    )[0]
        net.zero_grad()
        lm(tokens, state, (no_grad, 2)).logsumexp(-1).sum().backward()
        grads.append(net.transformer.adapter.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_compute_accounting_of_app_h() -> None:
    shape = load_recipe("huginn-lm1b").model.shape()  # type: ignore[attr-defined]
    assert layer_evaluations(shape, 1, "recurrent") == (2 + 4 * 33 + 2) + 2 * (2 + 4 * 8 + 2)
    assert layer_evaluations(shape, 1, "denoiser") == 3 * (2 + 2 * (4 + 2))


# --- the denoiser: train = sample --------------------------------------------------------------------------


def test_cached_sampling_path_is_the_training_forward(tmp_path: Path, corpus: Path) -> None:
    """Every parameter randomised (the zero modulation too): the KV-cached query (fused and unfused) computes the
    training forward's logits at every position, for left-padded rows as well."""
    recipe = load_recipe("huginn-tiny-shakespeare", tiny(corpus, **{"model.target_dim": 16}))
    net = RecurrentNet(recipe.model.shape())  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    table = F.normalize(torch.randn(V, 16, generator=gen), dim=-1)
    den = RecurrentDenoiser(net, table, NoiseSettings()).eval()
    tokens = torch.randint(0, V, (3, 10), generator=gen)
    z = torch.randn(3, 10, 16, generator=gen)
    sigma = torch.full((3, 10), 0.7)
    with torch.no_grad():
        train = den(tokens, z, sigma)
        for j in (1, 4, 9):
            cache, logits = den.query_logits(None, z[:, j], 0.7, j, clean=tokens[:, :j])
            torch.testing.assert_close(logits, train[:, j], atol=1e-4, rtol=1e-4)
            cache, _ = net.extend(None, tokens[:, :j], 0)
            torch.testing.assert_close(den.query_logits(cache, z[:, j], 0.7, j)[1], train[:, j], atol=1e-4, rtol=1e-4)
        # left padding: row 0 shortened by 2 columns of padding computes what it computes alone
        pad = torch.tensor([2, 0, 0])
        padded = tokens.clone()
        padded[0, :2] = 0
        solo = den(tokens[:1, 2:], z[:1, 2:], sigma[:1, 2:])
        _, logits = den.query_logits(None, z[:, 7], 0.7, 7, pad=pad, clean=padded[:, :7])
        torch.testing.assert_close(logits[0], solo[0, 5], atol=1e-4, rtol=1e-4)
        cache, _ = net.extend(None, padded[:, :7], 0, pad)
        unfused = den.query_logits(cache, z[:, 7], 0.7, 7, pad)[1]
        torch.testing.assert_close(unfused[0], solo[0, 5], atol=1e-4, rtol=1e-4)


def test_converted_network_with_zero_modulation_runs_the_source_layers(tmp_path: Path, corpus: Path) -> None:
    """At conversion the sigma modulation is zero: a core layer on the noisy columns computes the source layer."""
    huginn_checkpoint(tmp_path / "huginn")
    net = get_family("recurrent").source(ckpt_recipe(tmp_path / "huginn", corpus)).network
    layer = net.transformer.core_block[0]
    x = torch.randn(2, 6, H)
    rope = net.rope(torch.arange(6)[None].expand(2, -1))
    cond = net.sigma_embed(torch.rand(2, 6))
    with torch.no_grad():
        torch.testing.assert_close(layer(x, rope, None, cond)[0], layer(x, rope, None)[0])


# --- the CLI, end to end ------------------------------------------------------------------------------------


def test_split_train_both_sample_both(in_tmp: Path, corpus: Path) -> None:
    result = invoke("split", "huginn-tiny-shakespeare", *tiny(corpus), "--out", "run")
    assert result.exit_code == 0, result.output
    run = Run.open("run")
    assert run.family_name == "recurrent" and run.num_layers == 4 and [b.layers for b in run.blocks] == [(0, 4)]
    assert invoke("train-block", "0", "-q").exit_code == 0
    assert invoke("train-e2e", "--objective", "recurrent", "-q").exit_code == 0
    log = [json.loads(line) for line in (in_tmp / "run" / "metrics" / "recurrent.jsonl").read_text().splitlines()]
    assert all(1 <= rec["backprop_steps"] <= 2 and rec["recurrence"] >= rec["backprop_steps"] for rec in log)
    texts = {}
    for model in ("blocks", "recurrent", "source"):
        out = invoke("sample", "--model", model, "--prompt", "ROMEO:", "--max-new-tokens", "4", "--out", model)
        assert out.exit_code == 0, out.output
        again = invoke("sample", "--model", model, "--prompt", "ROMEO:", "--max-new-tokens", "4", "--out", model + "2")
        texts[model] = (in_tmp / model / "samples.txt").read_text()
        assert texts[model] == (in_tmp / (model + "2") / "samples.txt").read_text(), again.output  # deterministic
    assert_user_error(invoke("sample", "--steps", "0"), "--steps")
    assert_user_error(invoke("train-e2e", "--objective", "ar"), "--objective must be denoiser or recurrent")
    state = load_weights(in_tmp / "run" / "recurrent" / "model.safetensors")
    assert "noisy_in.weight" in state and "transformer.core_block.0.attn.Wqkv.weight" in state


def test_bench_memory_of_the_baseline_grows_with_k_and_the_denoisers_does_not(corpus: Path) -> None:
    from dbconvert.bench import bench_memory

    peaks = {}
    for k in (1, 4):
        recipe = load_recipe(
            "huginn-tiny-shakespeare", tiny(corpus, **{"model.mean_recurrence": 8, "model.backprop_depth": k})
        )
        r = bench_memory(recipe, 1, batch=4, device="cpu")
        peaks[k] = {name: row["saved_activations"] for name, row in r["breakdown"].items()}
    assert peaks[4]["recurrent"] > 2 * peaks[1]["recurrent"]
    assert peaks[4]["block-0"] == peaks[1]["block-0"]
    assert peaks[4]["recurrent+ckpt"] < peaks[4]["recurrent"]


def test_huginn_lm1b_is_the_papers_setting_and_hub_data_offline_is_one_line(in_tmp: Path) -> None:
    r = load_recipe("huginn-lm1b")
    m = r.model
    assert (m.prelude_layers, m.core_layers, m.coda_layers, m.hidden, m.heads) == (2, 4, 2, 512, 8)  # type: ignore
    assert (m.mean_recurrence, m.backprop_depth, r.blocks.num, r.data.source) == (32, 8, 1, "lm1b")  # type: ignore
    small = ["model.hidden=32", "model.heads=4", "model.intermediate=48", "model.tokenizer=null", "model.target_dim=8"]
    result = invoke("split", "huginn-lm1b", *small, "--out", "run")  # the tests run with HF_DATASETS_OFFLINE=1
    assert_user_error(result, "'lm1b' could not be loaded")
    assert "~/.cache/huggingface/datasets" in result.stderr and not any(in_tmp.iterdir())
