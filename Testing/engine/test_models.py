"""The networks: shapes, parameter counts, and that each block does what its docstring says."""

import pytest
import torch

from mismatch.errors import UserError
from mismatch.models.networks import CARD_LAYOUT, ArchitectureConfig, UnsupportedArchitecture
from mismatch.models import (
    ConvBlock,
    DecoderBlock,
    NegativeAttentionShiftingBlock,
    PositiveAttentionShiftingBlock,
    build_model,
    count_parameters,
)

torch.manual_seed(0)


@pytest.mark.parametrize("name,decoders", [("unet", 1), ("mismatch", 2), ("mm-a", 2), ("mm-b", 2), ("mm-c", 2)])
@pytest.mark.parametrize("size", [(32, 32), (37, 50)])
def test_output_shapes_any_size(name, decoders, size):
    net = build_model(name, in_channels=3, num_classes=2, width=4)
    out = net(torch.randn(2, 3, *size))
    assert len(out) == decoders
    assert all(o.shape == (2, 1, *size) for o in out)


def test_multiclass_softmax_and_prediction_is_mean_of_decoders():
    net = build_model("mismatch", in_channels=2, num_classes=4, width=4).eval()
    x = torch.randn(1, 2, 24, 24)
    mean, per_decoder = net.predict(x)
    assert mean.shape == (1, 4, 24, 24)
    torch.testing.assert_close(mean.sum(1), torch.ones(1, 24, 24))
    torch.testing.assert_close(mean, (per_decoder[0] + per_decoder[1]) / 2)
    assert net.decoder_names == ["positive decoder", "negative decoder"]


def test_context_widens_the_input_and_is_recorded_in_the_card():
    """2.5D input: ``context`` neighbours on each side multiply the image channels the first convolution (and
    MTA's reconstruction) sees; the card records it, and a card without it (an earlier engine's) reads as 0."""
    net = build_model("mismatch", in_channels=2, width=4, context=1)
    assert net.config.input_channels == 6 and net.encoder.stem.body[0].in_channels == 6
    assert [o.shape for o in net(torch.randn(1, 6, 24, 24))] == [(1, 1, 24, 24)] * 2
    assert build_model("mta", in_channels=1, width=4, context=2).reconstruction.classifier.out_channels == 5
    card = net.config.to_dict()
    assert card["context"] == 1 and card["in_channels"] == 2
    assert ArchitectureConfig.from_dict(card) == net.config
    assert ArchitectureConfig.from_dict({k: v for k, v in card.items() if k != "context"}).context == 0
    for bad in (-1, 1.5, "one", None, True):
        with pytest.raises(UserError, match="whole number of neighbouring slices"):
            ArchitectureConfig(context=bad)


def test_parameter_counts_match_the_paper_at_width_24():
    mismatch = count_parameters(build_model("mismatch", width=24))
    unet = count_parameters(build_model("unet", width=24))
    assert abs(mismatch - 2.7e6) / 2.7e6 < 0.15, mismatch   # paper: 2.7 M
    assert abs(unet - 1.8e6) / 1.8e6 < 0.10, unet           # paper: 1.8 M
    assert mismatch > unet


def test_conv_block_downsamples_with_stride_2():
    assert ConvBlock(3, 8, stride=2)(torch.randn(1, 3, 16, 20)).shape == (1, 8, 8, 10)


def test_decoder_block_aligns_the_skip_without_cropping():
    block = DecoderBlock(c_coarse=16, c_skip=8, c_out=8)
    out = block(torch.randn(1, 16, 5, 7), torch.randn(1, 8, 10, 14))
    assert out.shape == (1, 8, 10, 14)


@pytest.mark.parametrize("cls", [PositiveAttentionShiftingBlock, NegativeAttentionShiftingBlock])
def test_shifting_block_is_main_times_mask_plus_main(cls):
    block = cls(c_coarse=16, c_skip=8, c_out=8).eval()
    coarse, skip = torch.randn(2, 16, 6, 6), torch.randn(2, 8, 12, 12)
    merged = block.merge(coarse, skip)
    main = block.main(merged)
    mask = block.attention(merged)
    assert mask.shape == main.shape
    assert float(mask.detach().min()) > 0 and float(mask.detach().max()) < 1   # a sigmoid mask, for the NASB too
    out = block(coarse, skip)
    torch.testing.assert_close(out, main * mask + main)
    # main is non-negative (ReLU), so the block only amplifies it, by a factor between 1 and 2
    assert bool((out >= main - 1e-6).all()) and bool((out <= 2 * main + 1e-6).all())


def _without_normalisation(module):
    """Instance normalisation mixes the whole image into every pixel; take it out (and the ReLUs, which
    can switch a random small network's centre off) to see the convolutions' own receptive field."""
    for name, child in module.named_children():
        if isinstance(child, (torch.nn.GroupNorm, torch.nn.ReLU)):
            setattr(module, name, torch.nn.Identity())
        else:
            _without_normalisation(child)
    return module


def _mask_receptive_radius(block, size=41):
    """How far (in pixels) an input change can reach the centre of the attention mask."""
    block = _without_normalisation(block)
    merged = torch.zeros(1, block.c_in, size, size, requires_grad=True)
    with torch.no_grad():
        merged.add_(torch.randn_like(merged))
    mask = block.attention(merged)
    mask[0, :, size // 2, size // 2].sum().backward()
    reach = merged.grad.abs().sum((0, 1)) > 0
    rows = reach.any(1).nonzero()
    return int(rows.max() - size // 2)


def test_pasb_side_branch_sees_far_and_nasb_side_branch_stays_local():
    """The dilating block's atrous side branch (dilation 5, two layers) reaches 10 pixels; the eroding
    block's side branch (two plain 3x3 convolutions with skips) reaches 2."""
    pasb = PositiveAttentionShiftingBlock(c_coarse=8, c_skip=4, c_out=4).eval()
    nasb = NegativeAttentionShiftingBlock(c_coarse=8, c_skip=4, c_out=4).eval()
    assert _mask_receptive_radius(pasb) == 10
    assert _mask_receptive_radius(nasb) == 2


def test_pasb_side_branches_are_factorised_and_paper_only():
    for side in ("factorised", "paper"):
        block = PositiveAttentionShiftingBlock(16, 8, 16, side=side)
        assert block(torch.randn(1, 16, 4, 4), torch.randn(1, 8, 8, 8)).shape == (1, 16, 8, 8)
    with pytest.raises(ValueError, match="factorised"):
        PositiveAttentionShiftingBlock(16, 8, 16, side="compact")


def test_factorised_pasb_side_is_one_atrous_convolution_of_low_rank():
    """The default side branch's first layer (1x1 projection, then atrous 3x3) is exactly one atrous 3x3
    convolution from the merged input, whose weight is the product of the two."""
    block = PositiveAttentionShiftingBlock(16, 8, 16, side="factorised", side_ratio=0.5).eval()
    project, atrous = block.side[0]
    weight = torch.einsum("orhw,ri->oihw", atrous.weight, project.weight[:, :, 0, 0])
    merged = torch.randn(2, block.c_in, 20, 20)
    direct = torch.nn.functional.conv2d(merged, weight, atrous.bias, padding=5, dilation=5)
    torch.testing.assert_close(block.side[0](merged), direct, rtol=1e-4, atol=1e-5)
    assert _mask_receptive_radius(block) == 10
    assert ArchitectureConfig().pasb_side == "factorised"


def test_cards_record_the_one_layout_and_other_layouts_are_refused_clearly():
    card = build_model("mismatch", width=8).config.to_dict()
    assert {k: card[k] for k in CARD_LAYOUT} == CARD_LAYOUT   # every card says what it was built with
    assert ArchitectureConfig.from_dict(card) == ArchitectureConfig(width=8)
    assert ArchitectureConfig.from_dict({**card, "side_ratio": [0.25, 0.25, 0.125], "min_side_width": 8.0}) \
        == ArchitectureConfig(width=8)
    assert build_model("mismatch", width=8).encoder.bottleneck.body[0].out_channels == 80   # 1.25 x 8 w
    # the first engine's cards: another side ratio, no bottleneck_ratio or min_side_width recorded
    early = {"name": "mismatch", "in_channels": 1, "num_classes": 2, "width": 8, "pasb_side": "paper",
             "side_ratio": [1.0, 0.25, 0.125], "dilation": 5}
    with pytest.raises(UnsupportedArchitecture, match="side_ratio is .*train the model again"):
        ArchitectureConfig.from_dict(early)
    with pytest.raises(UnsupportedArchitecture, match="does not record bottleneck_ratio"):
        ArchitectureConfig.from_dict({**early, "side_ratio": [0.25, 0.25, 0.125]})
    with pytest.raises(UnsupportedArchitecture, match="dilation is 3"):
        ArchitectureConfig.from_dict({**card, "dilation": 3})
    with pytest.raises(UnsupportedArchitecture, match="'compact' is not one this engine builds"):
        ArchitectureConfig.from_dict({**card, "pasb_side": "compact"})
    # a network without a PASB does not use the side branch's setting
    assert ArchitectureConfig.from_dict({**card, "name": "unet", "pasb_side": "compact"}).name == "unet"


@pytest.mark.parametrize("c_in,c_out", [(8, 8), (8, 5)])
def test_residual_conv_is_one_convolution_with_the_skip_in_its_centre_tap(c_in, c_out):
    from mismatch.models.blocks import _ResidualConv

    torch.manual_seed(0)
    block = _ResidualConv(c_in, c_out).eval()
    x = torch.randn(2, c_in, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.reference_forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,side", [(NegativeAttentionShiftingBlock, None), (PositiveAttentionShiftingBlock, "paper"),
                                      (PositiveAttentionShiftingBlock, "factorised")])
@pytest.mark.parametrize("train", [False, True])
def test_fast_forward_equals_the_plain_reference_forward(cls, side, train):
    """The fused fast path (the NASB's single pass; the in-place sigmoid and addcmul of every shifting block)
    gives the numbers of the plain forward that reads like the paper's figure, and the same gradients."""
    torch.manual_seed(0)
    kwargs = {"side": side} if side else {}
    block = cls(c_coarse=16, c_skip=8, c_out=8, side_ratio=1.0, **kwargs).train(train)
    coarse, skip = torch.randn(2, 16, 6, 7), torch.randn(2, 8, 12, 14)
    fast = block(coarse, skip)
    fast_grads = torch.autograd.grad(fast.square().sum(), list(block.parameters()))
    plain = block.reference_forward(coarse, skip)
    plain_grads = torch.autograd.grad(plain.square().sum(), list(block.parameters()))
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    scale = max(float(g.abs().max()) for g in plain_grads)   # a bias before a normalisation has ~0 gradient
    for f, p in zip(fast_grads, plain_grads):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("shape", [(3, 5, 17, 23), (2, 16, 32, 32), (1, 1, 8, 8), (2, 4, 1, 1)])
def test_instance_norm_gradient_in_channels_last_equals_torchs_group_norm(shape):
    """Training on the CPU in channels-last takes the block's own backward; it must give torch's
    ``GroupNorm`` gradients (input, weight, bias) to float rounding, and the same output."""
    from mismatch.models.blocks import InstanceNorm

    c = shape[1]
    ours, ref = InstanceNorm(c), torch.nn.GroupNorm(c, c)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())   # the same keys: saved models load either way
    x = (3 * torch.randn(shape) + 1).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    grads = []
    for module in (ours, ref):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(dy)
        grads.append((y.detach(), xi.grad, module.weight.grad, module.bias.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert grads[0][1].is_contiguous(memory_format=torch.channels_last)


def test_instance_norm_takes_its_own_backward_only_where_it_is_faster():
    """The own backward is for channels-last float32 CPU training; inference and other layouts run torch's."""
    from mismatch.models import blocks

    calls = []
    real = blocks._ChannelsLastInstanceNorm.apply
    blocks._ChannelsLastInstanceNorm.apply = lambda *a: calls.append(1) or real(*a)
    try:
        norm = blocks.norm(4)
        x = torch.randn(2, 4, 6, 6)
        norm(x.contiguous(memory_format=torch.channels_last))
        assert len(calls) == 1
        norm(x)                                          # plain layout
        with torch.no_grad():
            norm(x.contiguous(memory_format=torch.channels_last))   # inference
        norm.double()(x.double().contiguous(memory_format=torch.channels_last))   # other precision
        assert len(calls) == 1
    finally:
        blocks._ChannelsLastInstanceNorm.apply = real
    net = build_model("mismatch", width=4)
    assert all(isinstance(m, blocks.InstanceNorm) for m in net.modules() if isinstance(m, torch.nn.GroupNorm))


def test_mismatch_training_gradients_in_channels_last_equal_the_plain_layouts():
    """A whole MisMatch network: the loss's gradients in channels-last (the CPU training path, with the
    normalisation's own backward) equal those of the same network in the plain layout (torch's backward)."""
    torch.manual_seed(3)
    net = build_model("mismatch", width=4)
    x = torch.randn(2, 1, 40, 40)
    grads = []
    for fmt in (torch.channels_last, torch.contiguous_format):
        net.zero_grad()
        net.to(memory_format=fmt)
        out = net(x.contiguous(memory_format=fmt))
        sum((o.sigmoid() * torch.linspace(-1, 1, 40)).sum() for o in out).backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-3, atol=1e-4, msg=k)
