"""Masked diffusion on the Llama family (model.objective=masked): conversion, loss, bound, sampler, CLI, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dbconvert.config import load_recipe
from dbconvert.families import get_family
from dbconvert.families.llama.masked import MaskedDenoiser, corrupt, mask_token_id, masked_loss, sequence_bound, unmask
from dbconvert.families.llama.model import LlamaBlockNet
from dbconvert.masking import MaskingProcess
from dbconvert.noise_process import owned_ranges, owner_of
from dbconvert.tokenizer import Tokenizer, train_chars

from tests.cli_helpers import assert_user_error, invoke
from tests.conftest import TINY_OVERRIDES
from tests.families.llama_tiny import CORPUS, write_corpus

V = 40  # vocabulary rows of the direct tests; ids >= NUM are never produced, MASK is the first free row
NUM, MASK = 30, 30


def tiny_net(layers: int = 2, seed: int = 0, vocab: int = V) -> LlamaBlockNet:
    recipe = load_recipe(
        "md4-tiny-shakespeare",
        [
            f"model.layers={layers}",
            "model.hidden=32",
            "model.heads=4",
            "model.kv_heads=2",
            "model.intermediate=48",
            f"model.vocab_size={vocab}",
        ],
    )
    torch.manual_seed(seed)
    net = LlamaBlockNet(recipe.model.shape())
    for layer in net.layers:  # a trained-looking modulation, so t matters
        torch.nn.init.normal_(layer.adaLN_modulation[-1].weight, std=0.05)
    return net.eval()


def denoiser(net: LlamaBlockNet, process: MaskingProcess | None = None) -> MaskedDenoiser:
    return MaskedDenoiser(net, process or MaskingProcess("linear", 1e-3), MASK, NUM).eval()


def masked_overrides(text: Path, **extra: object) -> list[str]:
    """md4-tiny-shakespeare shrunk to 3 layers of width 32, rows of 16 characters, on `text`."""
    base = {
        "model.layers": 3,
        "model.hidden": 32,
        "model.heads": 4,
        "model.kv_heads": 2,
        "model.intermediate": 48,
        "model.context": 16,
        "data.source": str(text),
        "data.val_fraction": 0.1,
        "train.batch_size": 4,
        "train.steps": 3,
        "train.warmup_steps": 0,
        "train.log_every": 1,
        "train.checkpoint_every": 3,
        "train.val_every": 3,
        "sample.steps": 6,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# --- the network ---------------------------------------------------------------------------


def test_converted_checkpoint_layers_compute_the_source_layers_under_full_attention(tmp_path: Path) -> None:
    from tests.families.test_llama import hf_llama

    hf = hf_llama(tmp_path / "hf", vocab=300)
    corpus = write_corpus(tmp_path)
    recipe = load_recipe(
        "md4-tiny-shakespeare", masked_overrides(corpus, **{"model.checkpoint": tmp_path / "hf", "model.layers": 4})
    )  # the checkpoint's
    family = get_family("llama")
    source = family.source(recipe)
    assert any("bidirectionally" in note for note in source.notes)  # said at split (manifest, split, info)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.9])
    full = torch.ones(2, 1, 10, 10, dtype=torch.bool)
    with torch.no_grad():
        h = hf.model.embed_tokens(ids)
        rope = hf.model.rotary_emb(h, torch.arange(10)[None].expand(2, -1))
        want = [h]
        for layer in hf.model.layers:
            want.append(layer(want[-1], attention_mask=full, position_embeddings=rope))
        causal = hf.model(ids).last_hidden_state
        for start, end in [(0, 2), (2, 4)]:
            net = family.block_network(recipe, end - start)
            net.load_state_dict(family.block_state(source, start, end))
            positions = torch.arange(10)[None].expand(2, -1)
            cond = net.sigma_embed(t)[:, None].expand(-1, 10, -1)
            out, _ = net.run_layers(want[start], positions, None, cond)  # the masked path's layer call
            torch.testing.assert_close(out, want[end], atol=1e-5, rtol=1e-5)
        whole = source.network.hidden_masked(ids, t)
    torch.testing.assert_close(whole, hf.model.norm(want[-1]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole, causal, atol=1e-3)  # the mask really changed from causal to full


def test_logits_exclude_mask_and_unused_rows_and_depend_on_t() -> None:
    model = denoiser(tiny_net())
    x = torch.randint(0, NUM, (2, 8), generator=torch.Generator().manual_seed(0))
    x[:, ::2] = MASK
    with torch.no_grad():
        a = model(x, torch.tensor([0.2, 0.2]))
        b = model(x, torch.tensor([0.9, 0.9]))
    assert a.shape == (2, 8, V) and a.dtype == torch.float32
    assert torch.isinf(a[..., NUM:]).all() and torch.isfinite(a[..., :NUM]).all()
    assert not torch.allclose(a, b)
    y = x.clone()
    y[0, -1] = 3  # bidirectional: an early position sees a later token
    with torch.no_grad():
        assert not torch.allclose(model(y, torch.tensor([0.2, 0.2]))[0, 0], a[0, 0])


# --- the loss and the bound ---------------------------------------------------------------------


def test_block_loss_is_md4_weighted_masked_cross_entropy() -> None:
    model = denoiser(tiny_net())
    tokens = torch.randint(0, NUM, (4, 12), generator=torch.Generator().manual_seed(2))
    loss, stats = masked_loss(model, tokens, (0.25, 0.25), torch.Generator().manual_seed(5))  # t = 0.25 exactly
    gen = torch.Generator().manual_seed(5)
    model.noise.draw(4, 0.25, 0.25, gen)
    u = torch.rand((4, 12), generator=gen)
    noisy, masked = corrupt(tokens, torch.full((4,), 0.25), u, model.noise, MASK)
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], MASK)) and torch.equal(
        noisy[~masked], tokens[~masked]
    )
    with torch.no_grad():
        logits = model(noisy, torch.full((4,), 0.25))
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    want = (4.0 * (ce * masked).sum(-1) / 12).mean()  # w(0.25) = 1 / 0.25 for the linear schedule
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert stats["masked_fraction"] == pytest.approx(float(masked.float().mean()))
    loss.backward()  # trains: gradients reach the t modulation
    assert model.net.layers[0].adaLN_modulation[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_blocks_pieces_add_up_to_the_e2e_bound_for_one_network(schedule: str) -> None:
    process = MaskingProcess(schedule, 0.01)
    model = denoiser(tiny_net(), process)
    tokens = torch.randint(0, NUM, (3, 10), generator=torch.Generator().manual_seed(4))
    owned = owned_ranges(process.boundaries(3, "uniform"))  # equal widths: B * K strata of the full range
    blocks, pieces = sequence_bound([model] * 3, owned, tokens, 2, torch.Generator().manual_seed(7))
    e2e, e2e_pieces = sequence_bound([model], [process.full_range()], tokens, 6, torch.Generator().manual_seed(7))
    assert len(pieces) == 4 and len(e2e_pieces) == 2
    torch.testing.assert_close(blocks, e2e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pieces[-1], e2e_pieces[-1])  # the reconstruction term, by the block owning t_min
    torch.testing.assert_close(sum(pieces[:3]), e2e_pieces[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_bound_of_a_network_that_knows_nothing_is_log_k_per_token(schedule: str) -> None:
    net = tiny_net()
    torch.nn.init.zeros_(net.lm_head.weight)  # uniform over the NUM tokens the tokenizer produces
    process = MaskingProcess(schedule, 0.01)
    model = denoiser(net, process)
    tokens = torch.randint(0, NUM, (512, 16), generator=torch.Generator().manual_seed(0))
    owned = owned_ranges(process.boundaries(2, "equiprobable"))
    bound, _ = sequence_bound([model, model], owned, tokens, 8, torch.Generator().manual_seed(1))
    # E[bound] = 16 log K exactly (w(t) (1 - alpha(t)) integrates to alpha(t_min), the reconstruction adds the
    # rest); the Monte-Carlo spread of this estimate over 8192 positions is ~1.1%
    assert float(bound.mean()) / 16 == pytest.approx(torch.log(torch.tensor(float(NUM))).item(), rel=0.05)


# --- the sampler -------------------------------------------------------------------------


def test_unmasking_is_by_the_owning_block_deterministic_and_keeps_the_prompt() -> None:
    process = MaskingProcess("linear", 1e-3)
    models = [denoiser(tiny_net(1, seed=s), process) for s in range(2)]
    owned = owned_ranges(process.boundaries(2, "equiprobable"))
    rows = [[1, 2, 3], [], [4]]
    calls = [0, 0]
    seen: list[tuple[int, int]] = []
    a = unmask(models, owned, rows, 12, 8, [10, 11, 12], torch.device("cpu"), calls, lambda d, n: seen.append((d, n)))
    assert calls == [sum(owner_of(t, owned) == b for t in process.schedule(8)[:-1]) for b in range(2)] == [4, 4]
    assert a.shape == (3, 12) and not (a == MASK).any() and (a < NUM).all()
    assert a[0, :3].tolist() == [1, 2, 3] and a[2, 0] == 4
    assert seen[-1] == (12 * 3 - 4, 12 * 3 - 4) and len(seen) == 8
    b = unmask(models, owned, rows, 12, 8, [10, 11, 12], torch.device("cpu"))
    assert torch.equal(a, b)  # same seeds, same samples
    alone = unmask(models, owned, rows[1:2], 12, 8, [11], torch.device("cpu"))
    assert torch.equal(alone[0], a[1])  # a row does not depend on its batch
    other = unmask(models, owned, rows[1:2], 12, 8, [99], torch.device("cpu"))
    assert not torch.equal(other[0], a[1])


# --- tokenizer --------------------------------------------------------------------------


def test_character_tokenizer_round_trips_and_the_mask_takes_a_free_row(tmp_path: Path) -> None:
    tok = Tokenizer(train_chars([CORPUS], tmp_path / "tok.json"))
    chars = sorted(set(CORPUS))
    assert tok.vocab_size == len(chars) + 1 and tok.eos_id == len(chars) and tok.character_level()
    ids = tok.encode("ROMEO: O Romeo!")
    assert len(ids) == len("ROMEO: O Romeo!") and tok.decode(ids) == "ROMEO: O Romeo!"
    assert mask_token_id(tok, tok.vocab_size + 1) == tok.vocab_size
    with pytest.raises(Exception, match=rf"set model.vocab_size={tok.vocab_size + 1}"):
        mask_token_id(tok, tok.vocab_size)
    with pytest.raises(Exception, match="comes from the checkpoint's config.json"):  # not the recipe's to change
        mask_token_id(tok, tok.vocab_size, "the checkpoint's config.json (hf)")


# --- end to end ---------------------------------------------------------------------------


def test_split_train_sample_and_bpc_of_blocks_and_e2e(in_tmp: Path) -> None:
    from dbconvert.families.llama.bpc import evaluate_bpc
    from dbconvert.rundir import Run

    text = write_corpus(in_tmp)
    assert invoke("split", "md4-tiny-shakespeare", *masked_overrides(text), "--out", "run").exit_code == 0
    run = Run.open(in_tmp / "run")
    assert run.parameterization["name"] == "masked" and run.noise().name == "masking"
    assert any("bidirectionally" in n for n in run.notes)
    for args in (("train-block", "0"), ("train-block", "1"), ("train-block", "2"), ("train-e2e",)):
        result = invoke(*args, "--run", "run", "-q")
        assert result.exit_code == 0, result.output
    record = json.loads((in_tmp / "run" / "metrics" / "block-00.jsonl").read_text().splitlines()[-1])
    assert {"val_ce", "val_bound", "masked_fraction"} <= set(record) and record["t_min"] >= 0.6
    for model in ("blocks", "e2e"):
        result = invoke("sample", "--run", "run", "--model", model, "--num", "2", "--max-new-tokens", "16")
        assert result.exit_code == 0, result.output
        samples = [
            json.loads(x)
            for x in (in_tmp / "run" / "samples" / f"{model}-unmask-6steps-seed0" / "samples.jsonl")
            .read_text()
            .splitlines()
        ]
        assert len(samples) == 2 and all(s["new_tokens"] <= 16 for s in samples)
        cli = invoke(
            "eval",
            "bpc",
            "--run",
            "run",
            "--model",
            model,
            "--draws",
            "1",
            "--repeats",
            "2",
            "--max-rows",
            "4",
            "--json",
            "-q",
        )
        assert cli.exit_code == 0, cli.output
        result = json.loads(cli.stdout)
        assert result == {
            **evaluate_bpc("run", model, draws=1, repeats=2, max_rows=4),
            "file": result["file"],
            "seconds": result["seconds"],
        }  # the registry's command is the library function
        assert (
            result["character_level"]
            and result["value"] == result["bpc"]
            and result["bpc"] == pytest.approx(result["nats_per_token"] / 0.6931471805599453)
        )
        assert len(result["pieces_bits_per_token"]) == (4 if model == "blocks" else 2)
        assert sum(result["pieces_bits_per_token"]) == pytest.approx(result["bits_per_token"])
        assert json.loads(Path(result["file"]).read_text())["bpc"] == result["bpc"]
    table = invoke("eval", "compare", "--run", "run").stdout
    assert "bits per character with features bits per character (lower is better)" in table
    assert_user_error(invoke("eval", "bpc", "--run", "run", "--steps", "3"), "--steps does not apply to eval bpc")
    on_train = invoke(
        "eval", "bpc", "--run", "run", "--split", "train", "--draws", "1", "--repeats", "1", "--max-rows", "2"
    )
    assert on_train.exit_code == 0 and "TRAINING rows" in on_train.stdout and "YES" in on_train.stdout
    assert "holds the rows the run trains on" in on_train.stderr
    assert_user_error(
        invoke("sample", "--run", "run", "--prompt", "ROMEO \u00fc\u20ac{x}"),
        "{ } \u00fc \u20ac); they would be dropped",
    )  # a char-level vocabulary: never dropped silently
    prompt = invoke("sample", "--run", "run", "--prompt", "ROMEO:", "--num", "1")
    assert prompt.exit_code == 0 and "ROMEO:" in prompt.stdout
    assert_user_error(invoke("sample", "--run", "run", "--solver", "heun"), "ancestral unmasking")


def test_bench_memory_and_speed_run_for_the_masked_objective(tmp_path: Path) -> None:
    text = write_corpus(tmp_path)
    speed = invoke(
        "bench",
        "speed",
        "md4-tiny-shakespeare",
        *masked_overrides(text),
        "--blocks",
        "3",
        "--batch",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--sampling-only",
        "--json",
    )
    assert speed.exit_code == 0, speed.output
    rates = json.loads(speed.stdout)
    assert rates["unit"] == "sequence" and rates["sample_steps"] == 6 and rates["block_units_per_s"] > 0
    assert rates["decoding"] is None  # whole sequences, not token by token: no AR decoding to compare with
    result = invoke(
        "bench", "memory", "md4-tiny-shakespeare", *masked_overrides(text), "--static", "--blocks", "3", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["breakdown"]) == {
        "block-0",
        "block-1",
        "block-2",
        "e2e",  # + checkpointing and the causal LM
        "block-0+ckpt",
        "e2e+ckpt",
        "ar",
        "ar+ckpt",
    }
    assert data["e2e_static_bytes"] == data["breakdown"]["e2e"]["total_bytes"] and 1.5 < data["ratio"] < 3


# --- bad input ----------------------------------------------------------------------------


@pytest.fixture
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    write_corpus(folder)
    tok = Tokenizer(train_chars([CORPUS], folder / "chars.json"))
    (folder / "size").write_text(str(tok.vocab_size))
    return folder


@pytest.mark.parametrize(
    ("recipe", "extra", "match"),
    [
        ("dit-tiny-digits", [*TINY_OVERRIDES, "model.objective=masked"], "unknown key 'model.objective'"),
        ("dit-tiny-digits", [*TINY_OVERRIDES, "noise.process=masking"], "does not apply to the dit family"),
        ("md4-tiny-shakespeare", ["noise.process=edm"], "model.objective=masked needs noise.process=masking"),
        ("llama-tiny-shakespeare", ["noise.process=masking"], "set model.objective=masked"),
        ("md4-tiny-shakespeare", ["noise.schedule=quadratic"], "noise.schedule"),
        ("md4-tiny-shakespeare", ["noise.t_min=1.5"], "noise.t_min"),
        ("md4-tiny-shakespeare", ["noise.t_min=-0.2"], "noise.t_min"),
        ("md4-tiny-shakespeare", ["TOKENIZER"], "[MASK]"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    in_tmp: Path, inputs: Path, recipe: str, extra: list[str], match: str
) -> None:
    text = inputs / "corpus.txt"
    if extra == ["TOKENIZER"]:  # a tokenizer using every row of model.vocab_size: no free id for [MASK]
        extra = [
            f"model.tokenizer={inputs / 'chars.json'}",
            "model.tokenizer_type=bpe",
            f"model.vocab_size={(inputs / 'size').read_text()}",
        ]
    base = masked_overrides(text) if recipe != "dit-tiny-digits" else []
    assert_user_error(invoke("split", recipe, *base, *extra), match)
    assert not any(in_tmp.iterdir())


def test_md4_text8_is_the_papers_setting_and_names_what_to_place_where_offline(in_tmp: Path) -> None:
    r = load_recipe("md4-text8")
    assert (r.model.layers, r.model.hidden, r.model.heads, r.blocks.num, r.noise.gamma, r.model.context) == (
        12,
        768,
        12,
        3,
        0.05,
        256,
    )
    assert (r.train.lr, r.train.weight_decay, r.train.warmup_steps, r.train.batch_size, r.noise.schedule) == (
        3e-4,
        0.03,
        2000,
        256,
        "linear",
    )
    assert (r.model.objective, r.model.tokenizer_type, r.noise.process) == ("masked", "char", "masking")
    small = ["model.layers=3", "model.hidden=32", "model.heads=4", "model.kv_heads=2", "model.intermediate=48"]
    result = invoke("split", "md4-text8", *small, "--out", "run")  # the tests run with HF_DATASETS_OFFLINE=1
    assert_user_error(result, "afmck/text8")
    assert "~/.cache/huggingface/datasets" in result.stderr and not any(in_tmp.iterdir())
