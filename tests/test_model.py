"""Model construction, weight sources, checkpoints."""

import pytest
import torch

from lib import model as net


@pytest.mark.parametrize("n_classes", [2, 5, 8, 12])
def test_output_shape_for_every_class_count(n_classes):
    m = net.build_model(n_classes).eval()
    with torch.inference_mode():
        assert m(torch.zeros(3, 3, 64, 64)).shape == (3, n_classes)


def test_one_class_is_refused():
    with pytest.raises(ValueError):
        net.build_model(1)


def test_local_state_dict_loads_the_backbone(tmp_path):
    donor = net.build_model(1000)
    torch.save(donor.state_dict(), tmp_path / "mobilenet_v2.pth")
    m = net.build_model(8)
    info = net.init_weights(m, str(tmp_path / "mobilenet_v2.pth"))
    assert info["source"] == "file" and len(info["sha256"]) == 64
    for k, v in donor.state_dict().items():
        if k.startswith("features."):
            assert torch.equal(m.state_dict()[k], v), k
    assert m.classifier[1].out_features == 8


def test_bad_weight_files_are_named(tmp_path):
    with pytest.raises(net.WeightsError, match="not found"):
        net.init_weights(net.build_model(3), str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(net.WeightsError, match="junk.pth"):
        net.init_weights(net.build_model(3), str(tmp_path / "junk.pth"))
    torch.save({"features.0.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(net.WeightsError, match="wrong.pth"):
        net.init_weights(net.build_model(3), str(tmp_path / "wrong.pth"))


def test_unavailable_imagenet_weights_fall_back_and_say_so(monkeypatch):
    from torchvision.models import MobileNet_V2_Weights

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(type(MobileNet_V2_Weights.IMAGENET1K_V2), "get_state_dict", offline, raising=False)
    info = net.init_weights(net.build_model(3), "imagenet", fallback="none")
    assert info["source"] == "none" and "unavailable" in info["detail"] and "no network" in info["detail"]
    with pytest.raises(net.WeightsError, match="ImageNet weights unavailable"):
        net.init_weights(net.build_model(3), "imagenet", fallback="fail")


def test_checkpoint_round_trip(tmp_path):
    m = net.build_model(4, dropout=0.3).eval()
    net.save_checkpoint(tmp_path / "m.pt", m, classes=list("abcd"), params={"dropout": 0.3, "image_size": 64},
                        epoch=2, weights={"source": "none"})
    back, ckpt = net.load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(m(x), back(x))
    assert ckpt["classes"] == list("abcd") and ckpt["epoch"] == 2


@pytest.mark.parametrize("arch, k", [("efficientnet_lite0", 12), ("efficientnet_lite1", 16), ("efficientnet_lite2", 16),
                                     ("mobilenet_v2", 14)])
def test_trunk_then_top_is_the_whole_network_and_checkpoints_keep_the_arch(arch, k, tmp_path):
    torch.manual_seed(0)
    m = net.build_model(3, arch=arch, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(net.Top(m, k)(net.trunk(m, x, k)), m(x), atol=1e-5)
    with pytest.raises(ValueError, match=f"between 1 and {net.units(m) - 1} for {arch}"):
        net.Top(m, net.units(m))
    net.save_checkpoint(tmp_path / "m.pt", m, classes=list("abc"), params={"dropout": 0.2, "image_size": 64})
    back, ckpt = net.load_checkpoint(tmp_path / "m.pt")
    assert ckpt["arch"] == arch
    with torch.inference_mode():
        assert torch.equal(back(x), m(x))


@pytest.mark.parametrize("views", [4, 8])
def test_view_average_is_the_mean_softmax_over_the_squares_symmetries_and_carries_the_temperature(views):
    import numpy as np

    from lib import cv
    from lib.calibration import probabilities

    torch.manual_seed(0)
    m = net.build_model(3, image_size=32).eval()
    x = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)

    def logits_of(v):
        with torch.inference_mode():
            return m(torch.from_numpy(v)).numpy()

    expected = cv.view_averaged(logits_of, x, {"n": views})["n"]  # the views make cv scores
    wrapped = net.with_views(m, views)
    with torch.inference_mode():
        got = wrapped(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(probabilities(got), expected, atol=1e-5)
    np.testing.assert_allclose(np.exp(got), expected, atol=1e-5)  # log-probabilities: softmax changes nothing
    net.fold_temperature(wrapped, 2.0)
    with torch.inference_mode():
        np.testing.assert_allclose(wrapped(torch.from_numpy(x)).numpy(), got / 2.0, rtol=1e-5)
    assert m.classifier[-1].weight.abs().sum() > 0 and net.with_views(m, 1) is m


def test_view_counts_other_than_1_4_8_are_refused():
    with pytest.raises(ValueError, match="1, 4 or 8"):
        net.with_views(net.build_model(3), 2)
