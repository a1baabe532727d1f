"""Cross-validation: folds keep duplicate groups whole, originals are the scored images, configs are checked."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings, strategies as st
from PIL import Image

from conftest import sem_like
from lib import cv, params


@settings(max_examples=40, deadline=None)
@given(n_groups=st.integers(10, 60), k=st.integers(2, 5), seed=st.integers(0, 1000), data=st.data())
def test_no_group_crosses_folds_and_every_item_is_tested_once(n_groups, k, seed, data):
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=n_groups, max_size=n_groups))
    groups = np.repeat(np.arange(n_groups), sizes)
    group_label = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n_groups, max_size=n_groups)))
    labels = group_label[groups]
    assume(np.bincount(labels).max() >= k)  # stratification needs one class as large as the fold count
    splits = cv.folds(labels, groups, k, seed)
    assert len(splits) == k
    tested = np.concatenate([te for _, te in splits])
    assert sorted(tested.tolist()) == list(range(len(groups)))
    for tr, te in splits:
        assert not set(groups[tr]) & set(groups[te])
        assert len(np.intersect1d(tr, te)) == 0


def test_too_few_groups_for_the_folds_is_an_error():
    with pytest.raises(ValueError, match="at least 5 duplicate groups"):
        cv.folds([0, 1, 0], [0, 1, 2], 5, 0)
    with pytest.raises(ValueError, match="a class with at least 5 images"):
        cv.folds([0, 0, 0, 0, 1, 1, 1, 1, 2, 2], list(range(10)), 5, 0)


def test_augmented_copies_join_their_original_which_is_the_scored_image(tmp_path):
    rows = []
    for cls, k in (("bridge", 0), ("vias", 1)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            img = Image.fromarray(sem_like(100 * k + i, 96))
            img.save(tmp_path / cls / f"{cls}_{i}.png")
            rows.append((tmp_path / cls / f"{cls}_{i}.png", cls))
            for a in (1, 2):  # offline augmentation: noisy, resized copies named _augN
                arr = np.asarray(img.resize((120, 120)), np.float32) + np.random.default_rng(a).normal(0, 3, (120, 120))
                p = tmp_path / cls / f"{cls}_{i}_aug{a}.png"
                Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p)
                rows.append((p, cls))
    df = pd.DataFrame({"path": [str(p) for p, _ in rows], "class": [c for _, c in rows]})
    out = cv.audit_groups(df, 6, 6, workers=1)
    assert out["group"].nunique() == 6
    reps = out[out["representative"]]
    assert len(reps) == 6 and not reps["path"].map(lambda p: "_aug" in p.rsplit("/", 1)[1]).any()
    assert (out.groupby("group")["class"].nunique() == 1).all()


def test_config_lines_are_checked_against_the_schema():
    base = params.read_file(params.BASE)
    c = cv.parse_config("arch:efficientnet_lite0 recipe:probe epochs:3 weights:/tmp/x.pth", base)
    assert c.P["arch"] == "efficientnet_lite0" and c.P["epochs"] == 3 and c.P["weights"] == "/tmp/x.pth"
    assert c.P["lr"] == base["lr"]
    with pytest.raises(params.ParamError, match="'recipe'"):
        cv.parse_config("recipe:magic", base)
    with pytest.raises(params.ParamError, match="unknown parameter 'epoch'"):
        cv.parse_config("epoch:3", base)
    with pytest.raises(params.ParamError, match=r"parameter 'distill' \(in cv config 'distill:2'\) must be at least 0 and at most 1, got 2"):
        cv.parse_config("distill:2", base)
    with pytest.raises(params.ParamError, match="not key:value"):
        cv.parse_config("arch", base)


def _result(name, recalls, k):
    folds = pd.DataFrame({"fold": np.arange(1, len(recalls) + 1), "repeat": np.arange(len(recalls)) // k + 1,
                          "macro recall": recalls, "accuracy": recalls, "miss rate": 0.0, "seconds": 1.0})
    return cv.ConfigResult(config=name, weights="imagenet", recipe="probe", folds=folds,
                           per_class=pd.DataFrame(), confusion=np.zeros((2, 2), np.int64), shifts=pd.DataFrame())


def test_paired_comparison_is_the_corrected_resampled_t_test():
    from scipy import stats

    ref = _result("ref", [0.80, 0.70, 0.90, 0.85, 0.75], 5)
    same = _result("same", [0.80, 0.70, 0.90, 0.85, 0.75], 5)
    better = _result("better", [0.84, 0.71, 0.93, 0.90, 0.76], 5)
    table = cv.paired([ref, same, better], k=5).set_index("config")
    assert list(table.index) == ["same", "better"]
    assert table.loc["same", "difference (points)"] == 0 and table.loc["same", "p"] == 1.0
    d = np.array([4, 1, 3, 5, 1], float)
    se = d.std(ddof=1) * np.sqrt(1 / 5 + 1 / 4)  # the naive paired test would use sqrt(1/5)
    row = table.loc["better"]
    assert row["difference (points)"] == pytest.approx(2.8)
    assert row["high"] - row["difference (points)"] == pytest.approx(stats.t.ppf(0.975, 4) * se)
    assert row["p"] == pytest.approx(2 * stats.t.sf(2.8 / se, 4))
    assert (row["folds better"], row["folds worse"]) == (5, 0)
    naive = stats.ttest_rel(better.folds["macro recall"], ref.folds["macro recall"]).pvalue
    assert row["p"] > naive  # wider than the plain paired t-test: folds share training data
    assert cv.paired_text(row).startswith("+2.8 [")


def test_repeated_folds_use_one_seed_per_repeat_and_keep_groups_whole():
    groups = np.repeat(np.arange(40), 2)
    y = np.repeat(np.arange(40) % 4, 2)
    df = pd.DataFrame({"group": groups})
    splits, fold_of = cv.repeated_folds(df, y, 4, 7, repeats=3)
    assert len(splits) == 12 and list(fold_of.columns) == ["fold r1", "fold r2", "fold r3"]
    for r in range(3):
        tested = np.sort(np.concatenate([te for _, te in splits[4 * r: 4 * r + 4]]))
        assert tested.tolist() == list(range(80))
        assert (df.assign(f=fold_of.iloc[:, r]).groupby("group")["f"].nunique() == 1).all()
    assert not (fold_of["fold r1"] == fold_of["fold r2"]).all()  # another seed, another assignment
    one, fold_one = cv.repeated_folds(df, y, 4, 7)
    assert list(fold_one.columns) == ["fold"] and (fold_one["fold"] == fold_of["fold r1"]).all()
    with pytest.raises(ValueError, match="cv_repeats"):
        cv.repeated_folds(df, y, 4, 7, repeats=0)


def test_fold_scatter_keeps_long_configuration_lines_readable():
    """Own-data configuration lines run to 200 characters: the figure wraps them instead of
    squeezing the plot away (matplotlib warns when tight_layout cannot fit the labels)."""
    import warnings
    from types import SimpleNamespace

    import matplotlib
    matplotlib.use("Agg")
    from lib import plots

    line = ("arch:efficientnet_lite1 weights:imagenet recipe:partial image_size:240 freeze_blocks:16 cache_views:4 "
            "epochs:30 label_smoothing:0.1 aug_shot:30 aug_flip:false aug_rot90:false ema_decay:0.995")
    results = [SimpleNamespace(config=f"{line} seed:{i}", folds=pd.DataFrame({"macro recall": [0.8, 0.85, 0.9]}))
               for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.fold_scatter(results)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == 6 and all(max(len(part) for part in t.split("\n")) <= 56 for t in labels)
    assert labels[0].replace("\n", " ") == f"{line} seed:0"


def test_short_names_say_what_each_configuration_changes_from_the_reference():
    base = params.read_file(params.BASE) | {"cache_views": 8, "aug_shot": 0.0}
    ref = "arch:efficientnet_lite0 recipe:partial epochs:30 aug_shot:30 aug_flip:false"
    configs = cv.parse_configs([ref, f"{ref} epochs:60", "recipe:partial epochs:30 aug_flip:false",
                                f"{ref} ema_decay:0.995 cache_views:4", ref, ref], base)
    names = cv.short_names(configs)
    # a key the reference sets and another line leaves out shows the base value; keys in schema order
    assert names == ["reference", "epochs:60", "aug_shot:0.0", "cache_views:4 ema_decay:0.995",
                     "the reference again", "the reference again (#6)"]


def test_adding_a_configuration_keeps_the_cached_keys_of_those_already_run():
    base = params.read_file(params.BASE)
    splits = cv.folds(np.repeat(np.arange(4), 6), np.arange(24), 3, 0)
    ref, other = "recipe:probe epochs:3", "recipe:probe epochs:3 probe_c:0.05"
    alone = cv.parse_configs([ref], {**base, "cv_configs": [ref]})
    both = cv.parse_configs([ref, other], {**base, "cv_configs": [ref, other]})
    key = cv.result_key(alone[0], "data", splits, ["blur"])
    assert cv.result_key(both[0], "data", splits, ["blur"]) == key
    assert cv.result_key(both[1], "data", splits, ["blur"]) != key  # what does change the result still counts
    assert cv.result_key(alone[0], "other data", splits, ["blur"]) != key
    assert cv.result_key(alone[0], "data", cv.folds(np.repeat(np.arange(4), 6), np.arange(24), 3, 1), ["blur"]) != key
    assert cv.result_key(cv.parse_config(ref, {**base, "seed": 1}), "data", splits, ["blur"]) != key


def test_dihedral_views_are_the_eight_symmetries_of_the_square_the_first_four_keeping_orientation():
    a = np.arange(2 * 1 * 5 * 5, dtype=float).reshape(2, 1, 5, 5)
    views = [cv.dihedral(a, i) for i in range(8)]
    group = [np.rot90(b, q, axes=(2, 3)) for b in (a, a[..., ::-1]) for q in range(4)]
    as_bytes = lambda xs: sorted(x.tobytes() for x in xs)  # noqa: E731
    assert as_bytes(views) == as_bytes(group) and len(set(as_bytes(views))) == 8
    keep = [a, a[..., ::-1], a[..., ::-1, :], np.rot90(a, 2, axes=(2, 3))]  # mirror images and the half turn
    assert as_bytes(views[:4]) == as_bytes(keep)
    assert cv.dihedral(np.zeros((1, 1, 3, 7)), 3).shape == (1, 1, 3, 7)
    with pytest.raises(ValueError, match="8"):
        cv.dihedral(a, 8)


def test_view_averaging_averages_the_softmax_of_each_view():
    from lib.calibration import probabilities

    x = np.random.default_rng(0).random((3, 1, 4, 4))
    corner = lambda v: np.stack([v[:, 0, 0, 0], v[:, 0, -1, -1]], 1) * 5  # noqa: E731  (not symmetric)
    total = lambda v: np.stack([v.sum((1, 2, 3)), -v.sum((1, 2, 3))], 1)  # noqa: E731  (symmetric)
    assert np.allclose(cv.view_averaged(total, x, {"all": 8})["all"], probabilities(total(x)))
    expected = np.mean([probabilities(corner(cv.dihedral(x, i))) for i in range(4)], axis=0)
    averaged = cv.view_averaged(corner, x, {"flips": 4, "all": 8})
    assert np.allclose(averaged["flips"], expected)
    assert not np.allclose(averaged["flips"], probabilities(corner(x)))
    # view 0 given: not scored again, and the same averages
    assert np.allclose(cv.view_averaged(corner, x, {"flips": 4}, first=probabilities(corner(x)))["flips"], expected)
    assert np.allclose(averaged["all"], np.mean([probabilities(corner(cv.dihedral(x, i))) for i in range(8)], axis=0))


def test_view_averaged_scores_are_compared_with_the_single_view_on_the_same_folds():
    r = _result("cfg", [0.80, 0.70, 0.90, 0.85, 0.75], 5)
    r.folds["macro recall (flips)"] = [0.84, 0.71, 0.93, 0.90, 0.76]
    r.folds["miss rate (flips)"] = [0.0, 0.1, 0.0, 0.0, 0.0]
    table = cv.averaged_table([r, _result("old", [0.8] * 5, 5)], k=5)
    assert len(table) == 1  # the result scored before view averaging has no row
    row = table.iloc[0]
    assert (row["views"], row["worst fold, averaged"]) == ("flips", 0.71)
    assert row["averaged"] == pytest.approx(0.828) and row["miss rate, averaged"] == pytest.approx(0.02)
    assert row["averaged − single, points [95%], p"].startswith("+2.8 [") and row["folds better / worse"] == "5 / 0"
    # per class, from the out-of-fold predictions: fold-wise recall, then the mean over folds
    r.oof = pd.DataFrame({"fold": [1, 1, 1, 2, 2], "true": [0, 0, 1, 0, 1], "pred": [0, 1, 1, 0, 0],
                          "pred (flips)": [0, 0, 1, 1, 1]})
    per_class = cv.averaged_per_class(r, ["a", "b"])
    assert list(per_class.index) == ["single view", "flips"] and list(per_class.columns) == ["a", "b"]
    assert per_class.loc["single view"].tolist() == [0.75, 0.5] and per_class.loc["flips"].tolist() == [0.5, 1.0]


def test_configurations_averaged_score_the_mean_probabilities_on_the_reference_folds():
    classes = ["clean", "open"]
    true = np.array([0, 1, 1, 0, 1, 1])

    def member(name, p_open, recalls):
        r = _result(name, recalls, 3)
        r.oof = pd.DataFrame({"fold": [1, 1, 2, 2, 3, 3], "index": [0, 1, 2, 3, 4, 5], "true": true,
                              "clean": 1 - np.asarray(p_open), "open": p_open}).sample(frac=1, random_state=0)
        return r

    # each alone misses one open image (called clean); they miss different ones, sure of the other
    ref = member("ref", [0.1, 0.4, 0.9, 0.1, 0.9, 0.9], [0.5, 1.0, 1.0])  # fold 1: its open image missed
    other = member("other", [0.1, 0.9, 0.9, 0.1, 0.4, 0.9], [1.0, 1.0, 0.5])  # fold 3: one of two open missed
    third = member("third", [0.0] * 6, [0.5] * 3)
    table = cv.probability_averages([ref, other, third], classes, k=3).set_index("averaged")
    assert list(table.index) == ["ref + other", "ref + third", "ref + other + third"]
    both = table.loc["ref + other"]
    assert both["per fold"] == "1.000, 1.000, 1.000" and both["miss rate"] == 0.0  # (0.4 + 0.9) / 2 > 0.5
    assert both["vs reference, points [95%], p"].startswith("+16.7 [") and both["folds better / worse"] == "1 / 0"
    # (0.9 + 0) / 2 < 0.5: every open image called clean; fold 3 holds only open images
    assert table.loc["ref + third", "per fold"] == "0.500, 0.500, 0.000" and table.loc["ref + third", "miss rate"] == 1.0
    assert table.loc["ref + third", "folds better / worse"] == "0 / 2"  # level on fold 1, where ref missed too
    # only results scored on the same images take part; one result alone has nothing to average
    elsewhere = member("elsewhere", [0.9] * 6, [1.0] * 3)
    elsewhere.oof["index"] += 100
    assert cv.probability_averages([ref, elsewhere], classes, k=3).empty
    assert cv.probability_averages([ref, _result("old", [0.8] * 3, 3)], classes, k=3).empty


def test_a_distill_configuration_cross_fits_its_teachers_on_each_fold_s_own_groups(monkeypatch):
    from lib import recipes

    cfg = cv.parse_config("arch:efficientnet_lite0 weights:imagenet recipe:partial image_size:32 freeze_blocks:14 "
                          "cache_views:1 epochs:1 batch_size:8 distill:0.5", params.read_file(params.BASE))
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    gray = rng.random((len(y), 1, 32, 32), dtype=np.float32)
    groups = np.arange(len(y)) // 2  # pairs of copies
    splits = cv.folds(y, groups, 2, 0)
    seen = []

    def fake(P, gray_, y_, n, *, groups=None, **kw):  # the teachers, replaced: what they are given is the point
        seen.append(groups.copy())
        return np.eye(n, dtype=np.float32)[y_], "teachers were here"

    monkeypatch.setattr(recipes, "distill_targets", fake)
    r = cv.run_config(cfg, gray, y, splits, np.ones(len(y), bool), ["a", "b", "c"], device="cpu", groups=groups,
                      log=lambda *a: None)
    assert [g.tolist() for g in seen] == [groups[tr].tolist() for tr, _ in splits]
    assert "teachers were here" in r.notes and len(r.folds) == 2
