"""The registered ParC models: parameter counts against the paper table, forward at default / larger / non-square
sizes, features_only strides, timm API (forward_features / head, reset_classifier, no_weight_decay), kernel sizes,
all circular_conv methods agree, clear errors."""
from __future__ import annotations

import pytest
import timm
import timm.optim
import torch

import hybridvision.models.parc_convnets  # noqa: F401  (registers)
import hybridvision.models.parc_net  # noqa: F401
from hybridvision.blocks.parc import ParCPair
from hybridvision.ops.parc import ParC2d

# name: (paper params, default input size, feature reductions)
TABLE = {
    "parc_net_s": (5.0e6, 256, [2, 4, 8, 16, 32]),
    "parc_resnet50": (24.0e6, 224, [2, 4, 8, 16, 32]),
    "parc_mobilenetv2": (3.5e6, 224, [2, 4, 8, 16, 32]),
    "convnext_xt": (7.44e6, 224, [4, 8, 16, 32]),
    "parc_convnext_xt": (7.41e6, 224, [4, 8, 16, 32]),
}
NAMES = list(TABLE) + ["fast_parc_convnext_xt"]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {n: timm.create_model(n).eval() for n in NAMES}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list(TABLE))
def test_param_counts_match_the_table(models, name):
    target = TABLE[name][0]
    assert abs(n_params(models[name]) - target) / target <= 0.03, n_params(models[name])


def test_parc_convnext_counts_exactly(models):
    # 3 blocks at 14 px / 192 ch and 1 at 7 px / 384 ch: 7x7 dw (49 C) -> ParC weights + PE (2 K C); biases equal
    saved = 3 * (49 - 2 * 14) * 192 + (49 - 2 * 7) * 384
    assert n_params(models["convnext_xt"]) - n_params(models["parc_convnext_xt"]) == saved
    assert n_params(models["convnext_xt"]) == n_params(timm.create_model("convnext_atto", depths=(3, 3, 9, 3), dims=(48, 96, 192, 384)))


def test_parc_mobilenetv2_is_timm_mobilenetv2_plus_parc(models):
    base = timm.create_model("mobilenetv2_100")
    parc = models["parc_mobilenetv2"]
    keep = {k: v.shape for k, v in base.state_dict().items() if ".conv_dw." not in k}
    assert {k: v.shape for k, v in parc.state_dict().items() if k in keep} == keep
    assert [r.name for r in parc.parc_replacements] == [
        "blocks.4.0.conv_dw", "blocks.4.1.conv_dw", "blocks.4.2.conv_dw", "blocks.6.0.conv_dw"
    ]


@pytest.mark.parametrize("name", NAMES)
def test_forward_default_and_non_square(models, name):
    m = models[name]
    size = TABLE.get(name, (0, 224))[1]
    with torch.no_grad():
        assert m(torch.randn(1, 3, size, size)).shape == (1, 1000)
        assert m(torch.randn(2, 3, 96, 160)).shape == (2, 1000)


@pytest.mark.parametrize("name", ["parc_net_s", "parc_convnext_xt"])
def test_forward_larger(models, name):
    with torch.no_grad():
        assert models[name](torch.randn(1, 3, 320, 288)).shape == (1, 1000)


@pytest.mark.parametrize("name", list(TABLE))
def test_features_only_strides(name):
    f = timm.create_model(name, features_only=True).eval()
    red = TABLE[name][2]
    assert f.feature_info.reduction() == red
    with torch.no_grad():
        outs = f(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[-2:]) for o in outs] == [(64 // r, 96 // r) for r in red]
    assert [o.shape[1] for o in outs] == f.feature_info.channels()


def test_kernel_sizes_follow_the_default_input_size(models):
    m = models["parc_convnext_xt"]
    assert (m.stages[2].blocks[6].conv_dw.parc_h.base_size, m.stages[3].blocks[2].conv_dw.parc_w.base_size) == (14, 7)
    fast = models["fast_parc_convnext_xt"]
    assert [fast.stages[i].blocks[0].conv_dw.parc_h.base_size for i in range(4)] == [56, 28, 14, 7]
    assert sum(isinstance(mod, ParCPair) for mod in fast.modules()) == 18
    rect = timm.create_model("parc_convnext_xt", img_size=(192, 256))
    pair = rect.stages[2].blocks[8].conv_dw
    assert (pair.parc_h.base_size, pair.parc_w.base_size) == (12, 16)
    net = models["parc_net_s"]
    ks = [mod.base_size for mod in net.modules() if isinstance(mod, ParC2d) and mod.direction == "H"]
    assert sorted(set(ks)) == [8, 16, 32]
    rn = models["parc_resnet50"]
    assert rn.layer3[5].conv2.parc_h.groups == 1 and rn.layer4[2].conv2.parc_h.weight.shape == (256, 256, 7)


@pytest.mark.parametrize("name", ["parc_convnext_xt", "parc_net_s"])
def test_timm_api(models, name):
    m = models[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape[-2:] == (2, 2)
        torch.testing.assert_close(m.forward_head(feats), m(x))
        assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
    m2 = timm.create_model(name, num_classes=7)
    m2.reset_classifier(3)
    assert m2.eval()(x).shape == (2, 3)
    assert m.pretrained_cfg["input_size"][1] == TABLE[name][1]


@pytest.mark.parametrize("name", ["parc_net_s", "parc_resnet50", "parc_mobilenetv2", "parc_convnext_xt"])
def test_no_weight_decay_holds_exactly_the_position_embeddings(models, name):
    m = models[name]
    params = dict(m.named_parameters())
    pe = {n for n, mod in m.named_modules() if isinstance(mod, ParC2d) and mod.pe is not None}
    assert m.no_weight_decay() == {f"{n}.pe" for n in pe} and pe
    assert all(params[n].dim() == 2 for n in m.no_weight_decay())
    opt = timm.optim.create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = next(g for g in opt.param_groups if g["weight_decay"] == 0.0)
    assert {id(params[n]) for n in m.no_weight_decay()} <= {id(p) for p in no_decay["params"]}


def test_all_methods_agree_on_a_model():
    torch.manual_seed(1)
    ref = timm.create_model("parc_convnext_xt", parc_method="direct").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        y = ref(x)
        for method in ("gemm", "fft"):
            other = timm.create_model("parc_convnext_xt", parc_method=method).eval()
            other.load_state_dict(ref.state_dict())
            torch.testing.assert_close(other(x), y, rtol=1e-4, atol=1e-4)


def test_training_step_reaches_parc_weights():
    torch.manual_seed(2)
    m = timm.create_model("parc_net_s", num_classes=4)
    loss = torch.nn.functional.cross_entropy(m(torch.randn(2, 3, 64, 64)), torch.tensor([0, 3]))
    loss.backward()
    grads = [mod.weight.grad for mod in m.modules() if isinstance(mod, ParC2d)]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_errors():
    with pytest.raises(RuntimeError, match="ships no pretrained weights"):
        timm.create_model("parc_resnet50", pretrained=True)
    with pytest.raises(ValueError, match="img_size must be"):
        timm.create_model("parc_net_s", img_size=16)
    with pytest.raises(ValueError, match="matches no replaceable convolution"):
        timm.create_model("parc_convnext_xt", parc_where=["stages.9.*"])
    assert set(NAMES) <= set(timm.list_models("*parc*") + timm.list_models("convnext_xt"))


def test_small_grayscale_images():
    # Fashion-MNIST-sized input, one channel, 10 classes: the kernels are the measured feature sizes at 28 px
    # (timm's 'same' padding rounds up: 28 -> 14 -> 7 -> 4 -> 2 -> 1)
    m = timm.create_model("parc_mobilenetv2", in_chans=1, num_classes=10, img_size=28).eval()
    assert [r.base_size for r in m.parc_replacements] == [(2, 2)] * 3 + [(1, 1)]
    net = timm.create_model("parc_net_s", in_chans=1, num_classes=10, img_size=32).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)
