"""parcify: timm resnet50 / mobilenetv2_100 / convnext_tiny / efficientnet_b0 / a torchvision ResNet / a ViT.
Untouched weights stay bit-equal, outputs have the right shape at other and non-square sizes, the auto recipe picks
the paper's blocks, no_weight_decay gains the PEs, clear errors when there is nothing to replace."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from hybridvision.blocks.parc import ParCPair, ParCTokenMixer
from hybridvision.models.convert import ParCReplacement, parcify


def _clone_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_untouched_equal(before: dict, model: nn.Module, replaced: list[ParCReplacement]) -> int:
    after = model.state_dict()
    gone = tuple(r.name + "." for r in replaced)
    kept = [k for k in before if not k.startswith(gone)]
    assert kept
    for k in kept:
        assert torch.equal(after[k], before[k]), k
    return len(kept)


CONVNETS = {
    # name: (expected "auto" replacements, kind)
    "resnet50": (["layer3.3.conv2", "layer3.4.conv2", "layer3.5.conv2", "layer4.2.conv2"], "dense"),
    "mobilenetv2_100": (["blocks.4.0.conv_dw", "blocks.4.1.conv_dw", "blocks.4.2.conv_dw", "blocks.6.0.conv_dw"], "depthwise"),
    "convnext_tiny": (
        ["stages.2.blocks.6.conv_dw", "stages.2.blocks.7.conv_dw", "stages.2.blocks.8.conv_dw", "stages.3.blocks.2.conv_dw"],
        "depthwise",
    ),
    "efficientnet_b0": (["blocks.4.0.conv_dw", "blocks.4.1.conv_dw", "blocks.4.2.conv_dw", "blocks.6.0.conv_dw"], "depthwise"),
}


@pytest.mark.parametrize("name", list(CONVNETS))
def test_parcify_timm_convnets(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    before = _clone_state(model)
    out, replaced = parcify(model, report=True)
    assert out is model and model.parc_replacements == replaced
    names, kind = CONVNETS[name]
    assert [r.name for r in replaced] == names
    assert all(kind in r.old and r.new == "ParCPair" for r in replaced)
    assert [r.base_size for r in replaced] == [(14, 14)] * 3 + [(7, 7)]
    for r in replaced:
        assert isinstance(model.get_submodule(r.name), ParCPair)
    _assert_untouched_equal(before, model, replaced)
    pe = {f"{r.name}.parc_{d}.pe" for r in replaced for d in "hw"}
    assert pe <= model.no_weight_decay()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 96)).shape == (2, 1000)


def test_parcify_all_and_patterns_on_convnext():
    model = timm.create_model("convnext_atto")  # depths 2,2,6,2
    _, rep = parcify(model, where="all", report=True)
    assert len(rep) == 12 and rep[0].base_size == (56, 56)
    model = timm.create_model("convnext_atto")
    _, rep = parcify(model, where=["stages.3.*", "stages.1.blocks.0"], img_size=(160, 192), report=True)
    assert [r.name for r in rep] == ["stages.1.blocks.0.conv_dw", "stages.3.blocks.0.conv_dw", "stages.3.blocks.1.conv_dw"]
    assert [r.base_size for r in rep] == [(20, 24), (5, 6), (5, 6)]


def test_parcify_torchvision_resnet_needs_img_size():
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    before = _clone_state(model)
    with pytest.raises(ValueError, match="pass img_size="):
        parcify(model)
    _, rep = parcify(model, img_size=128, report=True)
    # BasicBlock: the last three 3x3s at stride 16 (two blocks), the last one at stride 32
    assert [r.name for r in rep] == ["layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2", "layer4.1.conv2"]
    assert [r.base_size for r in rep] == [(8, 8)] * 3 + [(4, 4)]
    _assert_untouched_equal(before, model, rep)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 64)).shape == (1, 1000)


@pytest.fixture()
def vit():
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True).eval()


def test_parcify_vit_is_a_pure_convnet(vit):
    before = _clone_state(vit)
    _, rep = parcify(vit, report=True)
    assert [r.name for r in rep] == [f"blocks.{i}.attn" for i in range(12)]
    assert all(r.old == "Attention" and r.base_size == (4, 4) for r in rep)
    assert vit.cls_token is None and vit.num_prefix_tokens == 0 and vit.global_pool == "avg"
    assert not any(isinstance(m, timm.layers.Attention) for m in vit.modules())
    assert not any("qkv" in k for k in vit.state_dict())
    after = vit.state_dict()
    assert torch.equal(after["pos_embed"], before["pos_embed"][:, 1:])
    kept = [k for k in before if k in after and k != "pos_embed"]
    assert any(".attn.proj." in k for k in kept) and any(".mlp.fc1." in k for k in kept)
    for k in kept:
        assert torch.equal(after[k], before[k]), k
    assert {"pos_embed", "blocks.0.attn.mixer.parc_1h.pe"} <= vit.no_weight_decay()
    with torch.no_grad():
        assert vit(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
        assert vit(torch.randn(1, 3, 48, 96)).shape == (1, 1000)  # non-square: 3x6 grid
    assert {m.grid for m in vit.modules() if isinstance(m, ParCTokenMixer)} == {(3, 6)}


def test_parcify_vit_output_is_a_function_of_all_tokens(vit):
    parcify(vit, where=["blocks.0"])
    assert isinstance(vit.blocks[0].attn, ParCTokenMixer) and not isinstance(vit.blocks[1].attn, ParCTokenMixer)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    feats = vit.forward_features(x)  # (1, 16, 192): no class token left
    assert feats.shape == (1, 16, 192)
    vit.train()
    loss = vit(torch.randn(2, 3, 64, 64)).logsumexp(-1).mean()
    loss.backward()
    assert vit.blocks[0].attn.mixer.parc_1h.weight.grad.abs().sum() > 0


def test_nothing_to_replace_is_a_clear_error():
    pointwise = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="nothing to replace.*stride"):
        parcify(pointwise, img_size=32)
    with pytest.raises(ValueError, match="nothing to replace"):
        parcify(nn.Sequential(nn.Flatten(), nn.Linear(4, 4)), img_size=2)
    valid_conv = nn.Sequential(nn.Conv2d(4, 4, 3))  # no padding: the size changes
    with pytest.raises(ValueError, match="padding changes the size"):
        parcify(valid_conv, img_size=16)


def test_where_errors():
    model = timm.create_model("mobilenetv2_050")
    with pytest.raises(ValueError, match=r"'layer9\.\*' matches no replaceable convolution"):
        parcify(model, where="layer9.*")
    with pytest.raises(ValueError, match="where must be"):
        parcify(model, where=[3])
    with pytest.raises(ValueError, match="img_size must be"):
        parcify(model, img_size=(0, 4))


def test_converted_vit_copies_follow_their_own_grid(vit):
    import copy

    parcify(vit)
    twin = copy.deepcopy(vit)  # e.g. timm's ModelEmaV3
    with torch.no_grad():
        twin(torch.randn(1, 3, 48, 96))
    assert {m.grid for m in twin.modules() if isinstance(m, ParCTokenMixer)} == {(3, 6)}
    assert {m.grid for m in vit.modules() if isinstance(m, ParCTokenMixer)} == {(4, 4)}
