"""Grad-CAM: automatic target layers, output shape and range, tokens reshaped to 2D, the PNG overlay."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hybridvision.tools.cam import find_target_layer, grad_cam, run_cam


def _model(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **kw)


@pytest.mark.parametrize(
    "name, kw, layer, hw",
    [
        ("resnet18", {}, "layer4", (64, 48)),
        ("convnext_atto", {}, "stages.3", (65, 65)),
        ("vit_tiny_patch16_224", {"img_size": (32, 48), "depth": 2}, "blocks.1.norm1", (32, 48)),
        ("vit_tiny_patch16_224", {"img_size": (48, 32), "depth": 2, "global_pool": "avg"}, "blocks.1", (48, 32)),
    ],
)
def test_cam_shape_range_and_auto_layer(name, kw, layer, hw):
    m = _model(name, **kw).train()
    assert find_target_layer(m)[0] == layer
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    cams, classes, used = grad_cam(m, x)
    assert used == layer
    assert cams.shape == (2, *hw) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1 and cams.max() > 0.5
    assert classes.shape == (2,)
    assert m.training  # mode restored


def test_target_class_and_explicit_layer():
    m = _model("resnet18")
    x = torch.randn(1, 3, 40, 40)
    cams, classes, used = grad_cam(m, x, target_layer="layer3", target_class=4)
    assert used == "layer3" and classes.tolist() == [4] and cams.shape == (1, 40, 40)
    with pytest.raises(ValueError, match="not a module"):
        grad_cam(m, x, target_layer="layer9")
    with pytest.raises(ValueError, match="5 classes"):
        grad_cam(m, x, target_class=7)


def test_cam_follows_the_object():
    """A model that responds to a bright patch: the CAM peaks on the patch."""
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("features", torch.nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", torch.nn.Flatten())
    net.add_module("fc", torch.nn.Linear(4, 2))
    with torch.no_grad():
        net.features.weight.fill_(0.1)
        net.features.bias.zero_()
        net.fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]))
    x = torch.zeros(1, 3, 32, 32)
    x[..., 20:28, 4:12] = 1.0
    cams, classes, used = grad_cam(net, x, target_class=0)
    assert used == "features"
    cy, cx = np.unravel_index(cams[0].argmax(), cams[0].shape)
    assert 19 <= cy <= 28 and 3 <= cx <= 12


def test_run_cam_writes_overlay(tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(img)
    res = run_cam(_model("resnet18"), img, tmp_path / "out" / "cam.png", img_size=(48, 64))
    out = Image.open(res["output"])
    assert out.size == (64, 48) and out.mode == "RGB"
    assert res["target_layer"] == "layer4" and 0 <= res["class"] < 5
    with pytest.raises(ValueError, match="cannot read"):
        run_cam(_model("resnet18"), tmp_path / "missing.png", tmp_path / "o.png")


def test_cli_cam(tmp_path, capsys):
    from hybridvision.cli import main

    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "cam.png"
    assert main(["cam", "--model", "resnet18", "--image", str(img), "--img-size", "48", "--output", str(out)]) == 0
    assert Image.open(out).size == (48, 48) and "layer4" in capsys.readouterr().out
    assert main(["cam", "--model", "resnet18", "--image", str(img), "--target-layer", "nope", "--output", str(out)]) == 1
    assert "not a module" in capsys.readouterr().err
