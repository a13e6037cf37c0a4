"""CoAtNet family: paper sizes, MACs, layouts, any resolution, fused path, timm API, checkpoints, errors."""
import dataclasses

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import hybridvision
from hybridvision.models.coatnet import PRESETS, CoAtNet, CoAtNetConfig
from hybridvision.tools.profile import count_macs

PAPER_PARAMS = {
    "coatnet_0": 25e6, "coatnet_1": 42e6, "coatnet_2": 75e6, "coatnet_3": 168e6, "coatnet_4": 275e6,
    "coatnet_5": 688e6, "coatnet_6": 1.47e9, "coatnet_7": 2.44e9,
}

# a cheap CoAtNet-shaped config for the behavioural tests (all 4 stage kinds, total stride 32)
TINY = dict(depths=(1, 1, 1, 2, 1), dims=(8, 16, 16, 32, 32), head_dim=8, img_size=64, num_classes=7)


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", [
    "coatnet_0", "coatnet_1", "coatnet_2", "coatnet_3", "coatnet_4", "coatnet_5",
    pytest.param("coatnet_6", marks=pytest.mark.xfail(strict=True, reason=(
        "the published CoAtNet-6 stages (S3 = 8 MBConv @768 + 42 Transformer @1536, S4 = 2 @2048) give 1.34B, "
        "9% under the paper's 1.47B; kept as published rather than tuned to the count"))),
    "coatnet_7",
])
def test_param_counts_match_paper_on_meta(name):
    with torch.device("meta"):
        m = hybridvision.create_model(name)
    assert next(m.parameters()).is_meta
    assert abs(_n_params(m) / PAPER_PARAMS[name] - 1) < 0.05, _n_params(m)


def test_coatnet_0_real_params_and_macs():
    # torch.utils.flop_counter, with the CPU flash-SDPA formula that tools.profile registers (torch has none)
    m = hybridvision.create_model("coatnet_0").eval()
    assert abs(_n_params(m) / 25e6 - 1) < 0.05
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    macs = count_macs(m, (1, 3, 224, 224)) / 1e9
    assert abs(macs / 4.2 - 1) < 0.05, macs
    macs_dw = count_macs(hybridvision.create_model("coatnet_0", stride_mode="dw"), (1, 3, 224, 224)) / 1e9
    assert abs(macs_dw / 4.6 - 1) < 0.05, macs_dw
    # the attention matmuls are counted: the explicit q k^T and attn v of S3/S4 at 224
    heads_n2d = 5 * 12 * 196**2 * 32 + 2 * 24 * 49**2 * 32
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    assert abs(macs * 1e9 - fc.get_total_flops() / 2 - 2 * heads_n2d) < 0.01 * 2 * heads_n2d


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coatnet_1", "coatnet_2", "coatnet_3", "coatnet_4"])
def test_param_counts_real(name):
    m = hybridvision.create_model(name)
    assert abs(_n_params(m) / PAPER_PARAMS[name] - 1) < 0.05


def test_presets_follow_the_paper():
    assert PRESETS["coatnet_0"].depths == (2, 2, 3, 5, 2) and PRESETS["coatnet_0"].dims == (64, 96, 192, 384, 768)
    assert PRESETS["coatnet_0"].layout == "CCTT" and PRESETS["coatnet_0"].stride_mode == "1x1"
    assert [PRESETS[f"coatnet_{i}"].drop_path_rate for i in range(4)] == [0.2, 0.3, 0.5, 0.7]
    assert PRESETS["coatnet_5"].head_dim == 64 and PRESETS["coatnet_6"].head_dim == 128
    with torch.device("meta"):
        m6 = hybridvision.create_model("coatnet_6")
    s3 = m6.stages[2].blocks
    kinds = [type(b).__name__ for b in s3]
    assert kinds == ["MBConv"] * 8 + ["TransformerBlock"] * 42
    assert s3[0].out_chs == 768 and s3[8].in_chs == 768 and s3[8].out_chs == 1536 and s3[8].stride == 1
    assert s3[8].attn.num_heads == 1536 // 128


@pytest.mark.parametrize("layout", ["CCCC", "CCCT", "CCTT", "CTTT", "VIT_REL"])
def test_layouts(layout):
    torch.manual_seed(0)
    m = CoAtNet(CoAtNetConfig(**TINY, layout=layout)).eval()
    kinds = "".join("C" if type(b).__name__ == "MBConv" else "T" for s in m.stages for b in s.blocks)
    if layout == "VIT_REL":
        assert kinds == "T" * 5 and m.stem.convs[0].kernel_size == (16, 16)
        assert [f["reduction"] for f in m.feature_info] == [16, 16, 32]
    else:
        assert kinds == "".join(k * d for k, d in zip(layout, TINY["depths"][1:]))
        assert [f["reduction"] for f in m.feature_info] == [2, 4, 8, 16, 32]
    with torch.no_grad():
        assert m(torch.randn(2, 3, 64, 96)).shape == (2, 7)


@pytest.mark.parametrize("hw", [(64, 64), (96, 64), (32, 160), (128, 96)])
def test_any_resolution_divisible_by_stride(hw):
    torch.manual_seed(0)
    m = CoAtNet(CoAtNetConfig(**TINY)).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        assert m(x).shape == (2, 7)
        assert m.forward_features(x).shape == (2, 32, hw[0] // 32, hw[1] // 32)


def test_bad_inputs_raise_clear_errors():
    m = CoAtNet(CoAtNetConfig(**TINY)).eval()
    with pytest.raises(ValueError, match=r"70x64 .*total stride 32"):
        m(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match=r"in_chans=1"):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="layout"):
        CoAtNetConfig(layout="CCXT")
    with pytest.raises(ValueError, match="head_dim"):
        CoAtNetConfig(dims=(64, 96, 192, 380, 768))
    with pytest.raises(ValueError, match="stride_mode"):
        CoAtNetConfig(stride_mode="pool")
    with pytest.raises(TypeError, match="unknown option"):
        CoAtNet(CoAtNetConfig(**TINY), depth=3)
    with pytest.raises(RuntimeError, match="pretrained"):
        timm.create_model("coatnet_0", pretrained=True)


def test_fuse_equals_unfused():
    torch.manual_seed(0)
    m = CoAtNet(CoAtNetConfig(**TINY, stride_mode="dw")).double()
    m.train()
    with torch.no_grad():  # populate BN statistics with something non-trivial
        for _ in range(3):
            m(torch.randn(4, 3, 64, 64, dtype=torch.float64) * 2 + 0.5)
    m.eval()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        m.fuse()
        assert not any(isinstance(b, torch.nn.BatchNorm2d) for b in m.modules())
        torch.testing.assert_close(m(x), ref, rtol=1e-9, atol=1e-9)
    with pytest.raises(RuntimeError, match="eval"):
        CoAtNet(CoAtNetConfig(**TINY)).fuse()


def test_fused_fast_path_float32_equals_unfused():
    """The documented inference path (eval + fuse() + inference_mode, oneDNN fused kernels on CPU)."""
    from hybridvision.ops.fused import fast_path_enabled

    torch.manual_seed(0)
    m = CoAtNet(CoAtNetConfig(**TINY, stride_mode="dw", pool="avg"))
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(4, 3, 64, 64))
    m.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        fast_path_enabled(False)
        try:
            ref = m(x)
        finally:
            fast_path_enabled(True)
        m.fuse()
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    m = CoAtNet(CoAtNetConfig(**TINY, drop_path_rate=0.1)).train()
    m(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_relative_bias_resized_for_other_resolutions():
    torch.manual_seed(0)
    m = CoAtNet(CoAtNetConfig(**TINY)).eval()
    attn = m.stages[2].blocks[0].attn
    assert attn.rel_pos.size == (4, 4) and attn.rel_pos.table.shape[-2:] == (7, 7)
    with torch.no_grad():
        m(torch.randn(1, 3, 96, 64))
        assert attn.rel_pos.table_for((4, 4)) is attn.rel_pos.table  # same size: identity
        assert set(k[0] for k in attn.rel_pos._cache) == {(6, 4)}  # eval cache keyed by grid


def test_timm_create_model_features_only_and_kwargs():
    f = timm.create_model("coatnet_0", num_classes=10, features_only=True, drop_path_rate=0.1)
    assert f.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert f.feature_info.channels() == [64, 96, 192, 384, 768]
    f = timm.create_model("coatnet_nano", features_only=True, in_chans=1, out_indices=(1, 3))
    f.eval()
    with torch.no_grad():
        outs = f(torch.randn(2, 1, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 8, 8), (2, 96, 4, 4)]
    tiny = timm.create_model("coatnet_0", features_only=True, depths=(1, 1, 1, 1, 1), dims=(8, 16, 32, 32, 64),
                             head_dim=8, img_size=64)
    with torch.no_grad():
        outs = tiny.eval()(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[-3:]) for o in outs] == [(8, 32, 48), (16, 16, 24), (32, 8, 12), (32, 4, 6), (64, 2, 3)]


def test_timm_model_api():
    torch.manual_seed(0)
    m = timm.create_model("coatnet_0", depths=(1, 1, 1, 1, 1), dims=(8, 16, 32, 32, 64), head_dim=8,
                          img_size=64, num_classes=5)
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["first_conv"] == "stem.convs.0"
    assert cfg["classifier"] == "head.fc" and m.default_cfg == cfg
    assert dict(m.named_modules())["stem.convs.0"] is m.stem.convs[0]
    assert m.get_classifier() is m.head.fc and m.get_classifier().out_features == 5
    nwd = m.no_weight_decay()
    assert nwd and all(n.endswith("rel_pos.table") for n in nwd)
    assert len(nwd) == sum(1 for n, _ in m.named_parameters() if "rel_pos" in n)
    gm = m.group_matcher()
    assert set(gm) == {"stem", "blocks"}
    m.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, 64, 2, 2)
        assert m.forward_head(feats, pre_logits=True).shape == (2, 64)
        torch.testing.assert_close(m.forward_head(feats), m(x))
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert [t.shape[1] for t in inter] == [8, 16, 32, 32, 64]
        only = m.forward_intermediates(x, indices=[1, 2], intermediates_only=True, stop_early=True)
        assert [t.shape[1] for t in only] == [16, 32]
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    m.reset_classifier(0)
    assert m(x).shape == (2, 64)
    # grad checkpointing: same numbers, gradients flow
    m2 = timm.create_model("coatnet_0", depths=(1, 1, 1, 1, 1), dims=(8, 16, 32, 32, 64), head_dim=8,
                           img_size=64, num_classes=5).eval()
    y_ref = m2(x)
    m2.set_grad_checkpointing(True)
    y = m2(x)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    assert m2.stem.convs[0].weight.grad is not None
    # timm's optimizer factory honours no_weight_decay
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(m2, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(id(p) in no_decay for n, p in m2.named_parameters() if n.endswith("rel_pos.table"))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_checkpoint_path_loading(tmp_path, fmt):
    kw = dict(depths=(1, 1, 1, 1, 1), dims=(8, 16, 32, 32, 64), head_dim=8, img_size=64, num_classes=4)
    torch.manual_seed(0)
    src = timm.create_model("coatnet_0", **kw).eval()
    path = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    dst = timm.create_model("coatnet_0", checkpoint_path=str(path), **kw).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_small_image_presets_on_fashion_mnist_shapes():
    # nano: the demo model, Fashion-MNIST resized to 32 px, total stride 8 (micro and mini: same geometry, the long
    # recipe's); pico: native 28 px, total stride 4
    for name, side, stride in (
        ("coatnet_nano", 32, 8), ("coatnet_micro", 32, 8), ("coatnet_mini", 32, 8), ("coatnet_pico", 28, 4)
    ):
        torch.manual_seed(0)
        m = hybridvision.create_model(name, in_chans=1, num_classes=10).eval()
        assert 1e5 < _n_params(m) < 3e6
        assert m.cfg.layout == "CCTT" and m.cfg.img_size == side
        assert m.pretrained_cfg["input_size"][-2:] == (side, side)
        assert m.feature_info[-1]["reduction"] == stride
        with torch.no_grad():
            assert m(torch.randn(3, 1, side, side)).shape == (3, 10)
            assert m(torch.randn(3, 1, 32, 48)).shape == (3, 10)
        with pytest.raises(ValueError, match=f"total stride {stride}"):
            m(torch.randn(1, 1, side + 2, side))


def test_config_is_frozen_and_overrides_apply():
    cfg = PRESETS["coatnet_0"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layout = "CCCC"  # type: ignore[misc]
    with torch.device("meta"):
        m = hybridvision.create_model("coatnet_0", layout="CTTT", img_size=(256, 192), in_chans=1)
    assert m.cfg.layout == "CTTT" and m.cfg.img_size == (256, 192) and m.stem.convs[0].in_channels == 1
    assert m.stages[1].blocks[0].attn.rel_pos.size == (32, 24)
