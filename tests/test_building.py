"""Networks built with parameters on the meta device and filled by assignment (no second copy, no random init)."""

from __future__ import annotations

import pytest
import torch

from dbconvert.building import build_empty, load_network, meta_specs
from dbconvert.errors import CheckpointError
from dbconvert.families.llama.model import LlamaBlockNet, LlamaShape

SHAPE = LlamaShape(100, 32, 64, 2, 4, 2, 8, 64)


def test_an_empty_network_has_meta_parameters_real_buffers_and_draws_no_random_numbers() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    net = build_empty(lambda: LlamaBlockNet(SHAPE))
    assert torch.equal(torch.rand(3), expected)  # the global generator was not advanced
    assert all(p.is_meta for p in net.parameters())
    assert all(not b.is_meta for b in net.buffers())  # rotary tables and the head gain are computed, not loaded
    assert meta_specs(lambda: LlamaBlockNet(SHAPE))["embed_tokens.weight"].shape == (100, 32)


def test_loading_assigns_the_tensors_themselves_and_keeps_requires_grad() -> None:
    torch.manual_seed(1)
    state = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in LlamaBlockNet(SHAPE).state_dict().items()
    }

    def frozen() -> LlamaBlockNet:
        net = LlamaBlockNet(SHAPE)
        net.embed_tokens.weight.requires_grad_(False)
        return net

    net = load_network(frozen, state, "test")
    assert net.norm.weight.data_ptr() == state["norm.weight"].data_ptr()  # no copy
    assert net.norm.weight.dtype == torch.bfloat16 and not net.embed_tokens.weight.requires_grad
    assert net.layers[0].self_attn.q_proj.weight.requires_grad
    wide = load_network(lambda: LlamaBlockNet(SHAPE), state, "test", torch.float32)
    assert wide.norm.weight.dtype == torch.float32 and torch.equal(wide.norm.weight, state["norm.weight"].float())
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        wide.forward_causal(ids)  # every tensor real: it runs


def test_a_missing_key_is_one_line_before_anything_is_assigned() -> None:
    state = dict(LlamaBlockNet(SHAPE).state_dict())
    state.pop("norm.weight")
    with pytest.raises(CheckpointError, match="missing key 'norm.weight'"):
        load_network(lambda: LlamaBlockNet(SHAPE), state, "test")
