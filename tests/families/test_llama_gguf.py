"""GGUF checkpoints in (`model.checkpoint=model.gguf`) and a converted checkpoint's context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dbconvert.config import load_recipe
from dbconvert.errors import DbconvertError
from tests.cli_helpers import assert_user_error, invoke
from tests.families.llama_tiny import CORPUS, tiny_overrides

LLAMA_CPP_NAMES = {  # Hugging Face layer key -> llama.cpp tensor name below blk.{i}.
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py), which transformers undoes when it reads a GGUF."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_tiny_gguf(folder: Path, layers: int = 4, max_pos: int = 256, tokenizer: bool = True):
    """A tiny Llama written as llama.cpp writes one (F32 tensors, byte-level BPE tokenizer in the metadata, unless
    not `tokenizer`).

    Returns (gguf path, the transformers model it holds, the tokenizer it holds (or the file's own tokenizer would
    have held) as a tokenizers.Tokenizer, saved as folder/bpe.json)."""
    gguf = pytest.importorskip(
        "gguf", reason="the optional extra gguf (pip install 'dbconvert[gguf]') is not installed"
    )
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from dbconvert.tokenizer import train_bpe

    folder.mkdir(parents=True, exist_ok=True)
    tok_file = train_bpe([CORPUS], 300, folder / "bpe.json")
    spec = json.loads(Path(tok_file).read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    path = folder / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(max_pos)
    w.add_embedding_length(32)
    w.add_block_count(layers)
    w.add_feed_forward_length(48)
    w.add_rope_dimension_count(8)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500.0)
    w.add_vocab_size(len(tokens))
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
        w.add_eos_token_id(vocab["<|endoftext|>"])
        w.add_add_bos_token(False)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in LLAMA_CPP_NAMES.items()})
    state = model.state_dict()
    for key, name in names.items():
        t = state[key].detach()
        if ".attn_q." in name:
            t = llama_cpp_permute(t, 4)
        if ".attn_k." in name:
            t = llama_cpp_permute(t, 2)
        w.add_tensor(name, t.numpy().astype("float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model, Tokenizer.from_file(str(tok_file))


def test_a_gguf_file_converts_like_a_hugging_face_folder_with_its_tokenizer(in_tmp: Path) -> None:
    from dbconvert.checkpoint import file_sha256
    from dbconvert.split import split
    from dbconvert.tokenizer import run_tokenizer

    path, hf, ref_tok = write_tiny_gguf(in_tmp / "gg")
    corpus = in_tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    recipe = load_recipe("llama-tiny-shakespeare", tiny_overrides(corpus, **{"model.checkpoint": str(path)}))
    run = split(recipe, out=in_tmp / "run")
    record = run.manifest["source"]
    assert (record["checkpoint"], record["sha256"], record["by_reference"]) == (str(path), file_sha256(path), True)
    assert [f["path"] for f in record["files"]] == [str(path.resolve())]  # the GGUF file, not the temporary folder
    assert run.recipe.model.layers == 4 and run.recipe.model.max_positions == 256
    source = run.family().block_network(run.recipe, 4)
    from dbconvert.source_ref import source_state

    source.load_state_dict(dict(source_state(run)))  # read again from the GGUF file
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the dequantised (here: F32, so exact) network is the converted source
        torch.testing.assert_close(source.forward_causal(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    tok = run_tokenizer(run.shared_dir)
    assert tok.encode(text) == ref_tok.encode(text).ids  # the file's own tokenizer, no BOS as the file says
    assert tok.eos_id == ref_tok.token_to_id("<|endoftext|>")
    assert any(
        n.startswith(
            "context: training and sampling use model.context = 16 tokens (the recipe's), not the checkpoint's 256"
        )
        for n in run.notes
    )


def test_a_gguf_file_without_a_tokenizer_takes_the_one_named(in_tmp: Path) -> None:
    """Issue 34: model.tokenizer=PATH is what the refusal asks for, so once it is set the split goes through."""
    from dbconvert.tokenizer import run_tokenizer

    path, _, ref_tok = write_tiny_gguf(in_tmp / "gg", tokenizer=False)
    corpus = in_tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    args = ("split", "llama-tiny-shakespeare", *tiny_overrides(corpus, **{"model.checkpoint": str(path)}))
    assert_user_error(invoke(*args, "--out", "run"), "its tokenizer could not be rebuilt")
    assert not (in_tmp / "run").exists()
    result = invoke(*args, f"model.tokenizer={in_tmp / 'gg' / 'bpe.json'}", "--out", "run")
    assert result.exit_code == 0, result.output
    text = "ROMEO:\nBut soft, what light"
    assert run_tokenizer(in_tmp / "run" / "shared").encode(text) == ref_tok.encode(text).ids


def test_sizes_given_that_a_gguf_file_contradicts_are_one_line(in_tmp: Path) -> None:
    path, _, _ = write_tiny_gguf(in_tmp / "gg")
    corpus = in_tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    result = invoke(
        "split",
        "llama-tiny-shakespeare",
        *tiny_overrides(corpus, **{"model.checkpoint": str(path), "model.layers": 2}),
        "--out",
        "run",
    )
    assert_user_error(result, "model.layers=2 (the checkpoint has 4)")
    assert not (in_tmp / "run").exists()


def test_a_gguf_file_without_the_extra_is_one_line_naming_it(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dbconvert.families.llama import gguf as gguf_in

    (in_tmp / "model.gguf").write_bytes(b"GGUF")
    corpus = in_tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    monkeypatch.setattr(gguf_in, "extra_installed", lambda: False)
    result = invoke(
        "split",
        "llama-tiny-shakespeare",
        *tiny_overrides(corpus, **{"model.checkpoint": "model.gguf"}),
        "--out",
        in_tmp / "run",
    )
    assert_user_error(result, "needs the optional extra gguf: pip install 'dbconvert[gguf]'")
    assert not (in_tmp / "run").exists()


def test_a_damaged_gguf_file_is_one_line(in_tmp: Path) -> None:
    pytest.importorskip("gguf", reason="the optional extra gguf (pip install 'dbconvert[gguf]') is not installed")
    (in_tmp / "model.gguf").write_bytes(b"GGUF not really")
    corpus = in_tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    result = invoke(
        "split",
        "llama-tiny-shakespeare",
        *tiny_overrides(corpus, **{"model.checkpoint": "model.gguf"}),
        "--out",
        in_tmp / "run",
    )
    assert_user_error(result, "could not be read as a GGUF Llama")
    assert not (in_tmp / "run").exists()


# --- a converted checkpoint's context ------------------------------------------------------


def test_split_notes_the_context_and_sample_source_can_use_the_checkpoints(in_tmp: Path) -> None:
    from tests.families.test_llama import hf_llama
    from dbconvert.tokenizer import train_bpe

    hf_llama(in_tmp / "hf", max_pos=64)
    train_bpe([CORPUS], 300, in_tmp / "hf" / "tokenizer.json")
    corpus = in_tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    result = invoke(
        "split",
        "llama-tiny-shakespeare",
        *tiny_overrides(corpus, **{"model.checkpoint": in_tmp / "hf"}),
        "--out",
        in_tmp / "run",
    )
    assert result.exit_code == 0, result.output
    assert "model.context = 16 tokens (the recipe's), not the checkpoint's 64" in " ".join(result.output.split())

    def sample(*args: object):
        return invoke(
            "sample", "--run", in_tmp / "run", "--model", "source", "--max-new-tokens", 200, "--temperature", 0, *args
        )

    short, long = sample("--out", in_tmp / "s16"), sample("--context", "checkpoint", "--out", in_tmp / "s64")
    assert short.exit_code == 0 and long.exit_code == 0, short.output + long.output
    rows = [json.loads((in_tmp / d / "samples.jsonl").read_text().splitlines()[0]) for d in ("s16", "s64")]
    assert rows[0]["stopped_by"] != "max_new_tokens" and rows[1]["stopped_by"] != "max_new_tokens"
    assert rows[0]["new_tokens"] < rows[1]["new_tokens"]  # greedy: the longer text continues the shorter one
    assert rows[1]["new_tokens"] + 1 <= 64 and (rows[0]["new_tokens"] + 1 <= 16)
    assert_user_error(sample("--context", "65"), "longer than the checkpoint's 64 positions")
    assert_user_error(sample("--context", "many"), "--context must be recipe, checkpoint or a number")
    assert_user_error(
        invoke("sample", "--run", in_tmp / "run", "--model", "blocks", "--context", "checkpoint"),
        "the blocks model was trained at model.context = 16",
    )


def test_context_checkpoint_needs_a_checkpoint_and_applies_to_text_only(in_tmp: Path, tiny_run) -> None:
    from dbconvert.families.llama.context import sample_context

    recipe = load_recipe("llama-tiny-shakespeare", ["model.context=16"])
    with pytest.raises(DbconvertError, match="has no model.checkpoint"):
        sample_context(recipe, None, "source", "checkpoint")
    assert sample_context(recipe, None, "source", "8") == 8
    assert_user_error(
        invoke("sample", "--run", tiny_run.root, "--context", "checkpoint"), "--context does not apply to a dit run"
    )


# --- a converted block's output temperature ------------------------------------------------


def test_converted_blocks_start_with_a_calibrated_output_temperature(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from dbconvert.families.llama.calibrate import GRID, TEMPERATURE_FILE, read_block_temperature, step0_loss
    from dbconvert.families.llama.family import LlamaFamily
    from dbconvert.source_ref import source_state
    from dbconvert.split import split
    from dbconvert.tokenizer import train_bpe
    from dbconvert.train import train_block
    from tests.families.test_llama import hf_llama

    hf = hf_llama(in_tmp / "hf")
    with torch.no_grad():  # a confidently wrong head, as a pretrained head reading a mid-network state is
        hf.lm_head.weight.mul_(40.0)
    hf.save_pretrained(in_tmp / "hf")
    train_bpe([CORPUS], 300, in_tmp / "hf" / "tokenizer.json")
    corpus = in_tmp / "corpus.txt"
    corpus.write_text(CORPUS)

    def run_of(name: str, calibrate: bool):
        return split(
            load_recipe(
                "llama-tiny-shakespeare",
                tiny_overrides(
                    corpus,
                    **{
                        "model.checkpoint": str(in_tmp / "hf"),
                        "model.calibrate_output": str(calibrate).lower(),
                        "train.warmup_steps": 2,
                    },
                ),
            ),
            out=in_tmp / name,
        )

    plain, calibrated = run_of("plain", False), run_of("calibrated", True)
    source = source_state(calibrated)
    assert all(torch.equal(t, source_state(plain)[k]) for k, t in source.items())
    assert any(n.startswith("output calibration") for n in calibrated.notes)
    assert not any(n.startswith("output calibration") for n in plain.notes)
    assert not (calibrated.shared_dir / TEMPERATURE_FILE).exists()  # split runs nothing of the network
    family = calibrated.family()
    assert family.training_schedule(plain, "block-00", plain.recipe) is None
    assert family.training_schedule(calibrated, "e2e", calibrated.recipe) is None  # blocks only
    rows = family.calibration_rows(calibrated.recipe)
    said: list[str] = []
    for i, info in enumerate(calibrated.blocks):
        name = calibrated.block_name(i)
        state = load_file(str(calibrated.model_dir(name) / "model.safetensors"))
        plain_state = load_file(str(plain.model_dir(name) / "model.safetensors"))
        assert state.keys() == plain_state.keys() and all(torch.equal(state[k], t) for k, t in plain_state.items())

        def make(scaled: dict, depth: int = info.layers[1] - info.layers[0]):  # the split-time calibration's way
            net = family.block_network(calibrated.recipe, depth)
            net.load_state_dict(scaled)
            return family.denoiser(calibrated.recipe, net, calibrated.noise()).eval()

        old = {
            a: step0_loss(
                make({**state, "norm.weight": state["norm.weight"] * a}), rows, tuple(info.train_range), "uniform", 0
            )
            for a in (0.0, *GRID)
        }
        expected = min(GRID, key=lambda a: (old[a], -a)) if old[1.0] > old[0.0] else 1.0
        net = family.block_network(calibrated.recipe, info.layers[1] - info.layers[0])
        net.load_state_dict(state)
        den = family.denoiser(calibrated.recipe, net, calibrated.noise())
        plain_loss = step0_loss(den, rows, tuple(info.train_range), "uniform", 0)
        schedule = family.training_schedule(calibrated, name, calibrated.recipe, said.append)
        schedule(net, 0)  # step 0 of the block's training: measured on the network, then applied
        scale = read_block_temperature(calibrated.model_dir(name))
        assert scale == expected  # the same choice the split-time calibration made
        assert all(torch.equal(t, state[k]) for k, t in net.state_dict().items())  # the weights put back exactly
        cal_loss = step0_loss(den, rows, tuple(info.train_range), "uniform", 0)
        assert float(net.head_gain) == scale < 1 and cal_loss < plain_loss  # the wrong head is cooled
        if i == 0:  # at the top noise the head is all the block has: the loss the wrong head cost is gone
            assert cal_loss < plain_loss - 3.0
        schedule(net, 1)
        assert float(net.head_gain) == pytest.approx((1 + scale) / 2)  # linear over the 2 warm-up steps
        schedule(net, 2)
        assert float(net.head_gain) == 1.0
        assert f"x{scale:g}" in said[-1] and said[-1].startswith(name)
        again = family.training_schedule(calibrated, name, calibrated.recipe)  # a resume reads it, measures nothing
        again(net, 1)
        assert float(net.head_gain) == pytest.approx((1 + scale) / 2)

    seen: list[tuple[int, float]] = []  # the trainer sets the temperature before every step
    real = LlamaFamily.training_schedule
    start = read_block_temperature(calibrated.model_dir("block-00"))
    (calibrated.model_dir("block-00") / TEMPERATURE_FILE).unlink()  # the first training measures it again

    def spy(self, run, target, recipe, note=None):  # noqa: ANN001, ANN202
        fn = real(self, run, target, recipe, note)
        return lambda net, step: (fn(net, step), seen.append((step, float(net.head_gain))))

    monkeypatch.setattr(LlamaFamily, "training_schedule", spy)
    train_block(calibrated, 0, progress=False, overrides=["train.warmup_steps=4"])  # the training's own recipe
    assert read_block_temperature(calibrated.model_dir("block-00")) == start
    assert seen == [(k, pytest.approx(start + (1 - start) * k / 4)) for k in range(4)]


def test_runs_calibrated_at_split_keep_their_scales(in_tmp: Path) -> None:
    """A run split by a version that calibrated at split (RUN/shared/output_temperature.json) trains with them."""
    from dbconvert.families.llama.calibrate import TEMPERATURE_FILE
    from dbconvert.split import split
    from dbconvert.tokenizer import train_bpe
    from tests.families.test_llama import hf_llama

    hf_llama(in_tmp / "hf")
    train_bpe([CORPUS], 300, in_tmp / "hf" / "tokenizer.json")
    corpus = in_tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    run = split(
        load_recipe(
            "llama-tiny-shakespeare",
            tiny_overrides(corpus, **{"model.checkpoint": str(in_tmp / "hf"), "train.warmup_steps": 2}),
        ),
        out=in_tmp / "r",
    )
    (run.shared_dir / TEMPERATURE_FILE).write_text('{"block-01": 0.25}')
    family = run.family()
    assert family.training_schedule(run, "block-00", run.recipe) is None  # not listed: it started unscaled
    net = family.block_network(run.recipe, 1)
    family.training_schedule(run, "block-01", run.recipe)(net, 0)
    assert float(net.head_gain) == 0.25


def test_a_damaged_temperature_file_is_one_line(tmp_path: Path) -> None:
    from dbconvert.errors import RunError
    from dbconvert.families.llama.calibrate import TEMPERATURE_FILE, read_temperatures

    (tmp_path / TEMPERATURE_FILE).write_text('{"block-00": 0.3')  # cut short
    with pytest.raises(RunError, match="not a JSON object of block names and numbers"):
        read_temperatures(tmp_path)
    (tmp_path / TEMPERATURE_FILE).write_text('["block-00"]')
    with pytest.raises(RunError, match="delete the file"):
        read_temperatures(tmp_path)


def test_head_gain_rises_linearly_to_one_over_the_warm_up() -> None:
    from dbconvert.families.llama.calibrate import head_gain_at

    assert [head_gain_at(0.25, k, 3) for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [head_gain_at(0.25, k, 0) for k in range(3)] == [0.25, 1.0, 1.0]  # no warm-up: step 0 only


@pytest.mark.parametrize(
    "loss_of,expected",
    [
        (lambda a: (a - 0.4) ** 2 + 1.0, 0.375),  # the head hurts (worse than none at all): the best grid scale
        (lambda a: (a - 0.4) ** 2 + (a - 0.05) * 0.3, 1.0 / 4),
        (lambda a: (a - 0.6) ** 2, 1.0),  # the head already helps at step 0 (better than none): kept as it is
        (lambda a: 5.0 - a, 1.0),
    ],
)
def test_calibration_scales_only_a_head_that_starts_worse_than_none(loss_of, expected: float) -> None:
    from dbconvert.families.llama import calibrate as cal

    best, losses = cal.calibrate(loss_of)
    assert best == pytest.approx(expected) and set(losses) == {0.0, *cal.GRID}
