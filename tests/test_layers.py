"""The fast forms of the backbones' layers and of g(s, c) equal their textbook forms, in values
and in every gradient: TorchRec's cross network, projected-key target attention, and the
decoder block run on a one-query batch through SDPA."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec.modules.crossnet import LowRankMixtureCrossNet

from genctr_rec.models.decoder import GenerativeDecoder
from genctr_rec.models.layers import CrossNet, TargetAttention


def _grads(module: nn.Module, inputs: list[torch.Tensor], out: torch.Tensor) -> list:
    """Gradients of a random projection of ``out`` w.r.t. the inputs and every parameter; a
    parameter the output does not reach gets None (DDP without a static graph refuses it)."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    wrt = inputs + list(module.parameters())
    return list(torch.autograd.grad((out * weight).sum(), wrt, allow_unused=True))


def _assert_same(module: nn.Module, inputs: list[torch.Tensor], fast, reference) -> None:
    got, expected = fast(), reference()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g_got, g_expected in zip(
        _grads(module, inputs, got), _grads(module, inputs, expected), strict=True
    ):
        assert (g_got is None) == (g_expected is None)  # the same parameters reached
        if g_got is not None:
            torch.testing.assert_close(g_got, g_expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("experts", [1, 3])
def test_cross_net_equals_torchrec_low_rank_mixture_cross_net(experts: int) -> None:
    torch.manual_seed(0)
    net = CrossNet(in_features=40, num_layers=3, num_experts=experts, low_rank=8)
    for bias in net.bias:  # TorchRec starts them at zero: make them count
        nn.init.normal_(bias)
    x = torch.randn(33, 40, requires_grad=True)
    _assert_same(net, [x], lambda: net(x), lambda: LowRankMixtureCrossNet.forward(net, x))
    # TorchRec's module loads into ours as it is: same parameter names and shapes
    theirs = LowRankMixtureCrossNet(40, 3, experts, 8)
    net.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_target_attention_equals_the_projected_form_with_empty_and_short_rows() -> None:
    torch.manual_seed(0)
    attention = TargetAttention(16)
    target = torch.randn(6, 16, requires_grad=True)
    history = torch.randn(6, 9, 16, requires_grad=True)
    lengths = torch.tensor([9, 0, 3, 1, 9, 5])
    _assert_same(
        attention,
        [target, history],
        lambda: attention(target, history, lengths),
        lambda: attention.forward_projected(target, history, lengths),
    )
    assert torch.equal(attention(target, history, lengths)[1], torch.zeros(16))


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("conditional", [True, False])
def test_one_query_decoder_equals_the_sdpa_block(heads: int, layers: int, conditional: bool):
    """g(s, c) through the projection-free one-query attention equals the decoder run on a
    one-query batch through SDPA, for every parameter's gradient too."""
    torch.manual_seed(0)
    decoder = GenerativeDecoder(16, 12, layers, heads, conditional=conditional)
    history = torch.randn(5, 11, 16, requires_grad=True)
    targets = torch.randn(5, 16, requires_grad=True)
    lengths = torch.tensor([11, 0, 4, 1, 7])

    def reference() -> torch.Tensor:
        decoder.kernel = "sdpa"
        try:
            return decoder.forward_target_summed(history, lengths, targets)
        finally:
            decoder.kernel = "projection_free"

    _assert_same(
        decoder,
        [history, targets],
        lambda: decoder.forward_target_summed(history, lengths, targets),
        reference,
    )


def test_the_reference_kernel_is_a_flag() -> None:
    """``--decoder-kernel sdpa`` reaches the decoder the run builds (the reference path, chosen
    without patching a class), and an unknown kernel is refused."""
    from genctr_rec.cli import _run_config, build_parser
    from genctr_rec.factory import decoder_for

    argv = ["finetune", "--data", "d", "--out", "o", "--decoder-kernel", "sdpa"]
    cfg = _run_config(build_parser().parse_args(argv), "finetune")
    assert cfg.model.decoder_kernel == "sdpa"
    assert decoder_for(cfg).kernel == "sdpa"
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv[:-1] + ["flash"])
