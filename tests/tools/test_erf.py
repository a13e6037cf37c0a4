"""ERF: the RepLKNet protocol on models whose ERF is known exactly, and the area-ratio function."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from hybridvision.tools.erf import area_ratio, compute_erf, erf_area_ratios, load_images, run_erf


class ConvNet(nn.Module):
    """forward_features = ``depth`` stacked k×k convs (positive weights, positive bias: every gradient > 0)."""

    def __init__(self, k: int = 3, depth: int = 1, dilation: int = 1):
        super().__init__()
        torch.manual_seed(0)
        convs = []
        for i in range(depth):
            c = nn.Conv2d(3 if i == 0 else 4, 4, k, padding=dilation * (k // 2), dilation=dilation)
            with torch.no_grad():
                c.weight.copy_(torch.rand_like(c.weight) + 0.1)
                c.bias.fill_(1.0)
            convs.append(c)
        self.body = nn.Sequential(*convs)
        self.head = nn.Linear(4, 2)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.forward_features(x).mean((2, 3)))


@pytest.mark.parametrize("hw", [(15, 15), (16, 21)])
def test_single_3x3_conv_erf_is_exactly_a_3x3_square(hw):
    torch.manual_seed(1)
    imgs = [torch.rand(3, *hw) for _ in range(3)]
    erf = compute_erf(ConvNet(3), imgs)
    h, w = hw
    cy, cx = h // 2, w // 2
    support = erf > 0
    expected = np.zeros(hw, dtype=bool)
    expected[cy - 1 : cy + 2, cx - 1 : cx + 2] = True
    np.testing.assert_array_equal(support, expected)
    ratios = erf_area_ratios(erf)
    assert ratios["0.99"] == pytest.approx(9 / (h * w))
    assert ratios["0.2"] == pytest.approx(9 / (h * w))  # the centre pixel alone holds < 20 % of the total


def test_two_stacked_convs_grow_the_erf_to_5x5():
    erf = compute_erf(ConvNet(3, depth=2), [torch.rand(3, 17, 17)])
    assert (erf > 0).sum() == 25
    assert erf_area_ratios(erf)["0.99"] == pytest.approx(25 / 17**2)


def test_erf_is_a_mean_over_images_and_restores_train_mode():
    m = ConvNet(3).train()
    a, b = torch.rand(3, 9, 9), torch.rand(3, 9, 9)
    both = compute_erf(m, [a, b])
    assert m.training
    np.testing.assert_allclose(both, (compute_erf(m, [a]) + compute_erf(m, [b])) / 2, rtol=1e-12)
    np.testing.assert_allclose(compute_erf(m, [torch.stack([a, b])]), both, rtol=1e-12)  # batches are per-image


def test_area_ratio_on_hand_built_maps():
    m = np.zeros((10, 10))
    m[5, 5] = 1.0
    assert area_ratio(m, 0.99) == pytest.approx(1 / 100)
    u = np.ones((9, 9))  # uniform: 0.2 of 81 needs 17 px -> 5x5 square (25 px), 0.5 -> 7x7 (49 >= 40.5)
    assert area_ratio(u, 0.2) == pytest.approx(25 / 81)
    assert area_ratio(u, 0.3) == pytest.approx(25 / 81)
    assert area_ratio(u, 0.5) == pytest.approx(49 / 81)
    assert area_ratio(u, 0.99) == pytest.approx(1.0)
    ring = np.zeros((11, 11))  # half the mass in the centre, half on the 5x5 square's border
    ring[5, 5] = 4.0
    ring[3, 3] = ring[7, 7] = ring[3, 7] = ring[7, 3] = 1.0
    assert area_ratio(ring, 0.5) == pytest.approx(1 / 121)
    assert area_ratio(ring, 0.51) == pytest.approx(25 / 121)
    nonsq = np.ones((4, 10))  # clipped squares on a non-square map: r=1 -> 3x3, r=2 -> 4x5
    assert area_ratio(nonsq, 0.2) == pytest.approx(9 / 40)
    assert area_ratio(nonsq, 0.3) == pytest.approx(20 / 40)


def test_area_ratio_rejects_bad_input():
    with pytest.raises(ValueError, match="fraction"):
        area_ratio(np.ones((3, 3)), 1.5)
    with pytest.raises(ValueError, match="all zero"):
        area_ratio(np.zeros((3, 3)), 0.5)


def test_token_models_are_reshaped_to_the_patch_grid():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=(32, 48), depth=1, num_classes=3)
    erf = compute_erf(vit, [torch.randn(3, 32, 48)])
    assert erf.shape == (32, 48) and (erf > 0).any()


def test_run_erf_writes_png_and_json(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("ignored")
    assert len(load_images(folder, 16, num_images=10)) == 3
    grey = load_images(folder, (12, 20), num_images=1, mean=(0.5,), std=(0.5,), in_chans=1)
    assert grey[0].shape == (1, 12, 20) and -1 <= grey[0].min() and grey[0].max() <= 1
    res = run_erf({"a": ConvNet(3), "b": ConvNet(5)}, folder, tmp_path / "out", img_size=16, num_images=2, seed=1)
    saved = json.loads((tmp_path / "out" / "erf.json").read_text())
    assert saved == res
    assert saved["model"] == "a" and saved["num_images"] == 2
    assert set(saved["area_ratio"]) == {"0.2", "0.3", "0.5", "0.99"}
    assert saved["area_ratio"]["0.99"] == pytest.approx(9 / 256)
    assert saved["compare"]["b"]["area_ratio"]["0.99"] == pytest.approx(25 / 256)
    assert (tmp_path / "out" / "erf.png").stat().st_size > 1000


def test_bad_image_folder_messages(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_images(tmp_path / "missing", 16, num_images=1)
    with pytest.raises(ValueError, match="no images"):
        load_images(tmp_path, 16, num_images=1)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_images(tmp_path, 16, num_images=1)


def test_cli_erf(tmp_path, capsys):
    from hybridvision.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "erf"
    args = ["erf", "--model", "resnet18", "--compare", "timm:resnet10t", "--images", str(folder), "--img-size", "32",
            "--num-images", "2", "--output", str(out)]
    assert main(args) == 0
    saved = json.loads((out / "erf.json").read_text())
    assert saved["model"] == "resnet18" and saved["num_images"] == 2 and "timm:resnet10t" in saved["compare"]
    assert (out / "erf.png").exists() and "erf.json" in capsys.readouterr().out
    assert main(["erf", "--model", "resnet18", "--images", str(tmp_path / "none"), "--output", str(out)]) == 1
