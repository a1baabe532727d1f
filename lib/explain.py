"""Why the network said what it said: class-activation maps, nearest training images, label issues.

- Grad-CAM (captum's `LayerGradCam`) on the last feature map before pooling, for the predicted
  class, upsampled to the input and scaled to 0-1 per image.
- Nearest training images in the network's pooled feature space (cosine, scikit-learn): a fast way
  to see label noise, near-duplicates and true ambiguity behind a mistake.
- Label issues (cleanlab's `find_label_issues`) from out-of-fold predicted probabilities: the
  images most likely to carry a wrong label, ranked.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.preprocess import normalize


def cam_layer(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose output (False) or input (True) is the last feature map before pooling."""
    if model.arch == "mobilenet_v2":
        return model.features[-1], False
    return model.features._avg_pooling, True  # EfficientNet-Lite: the activated head convolution feeds the pooling


@contextmanager
def _quiet_tqdm_auto():
    """captum and cleanlab import tqdm.auto, which warns (into the rendered report) when imported in a
    Jupyter kernel without ipywidgets; that warning, and only it, is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        yield


def gradcam(model: nn.Module, gray: np.ndarray, targets: np.ndarray, *, device="cpu", batch_size: int = 16) -> np.ndarray:
    """Grad-CAM maps [N, H, W] on 0-1 of cached grayscale images [N, 1, H, W] for the given classes."""
    with _quiet_tqdm_auto():
        from captum.attr import LayerAttribution, LayerGradCam

    model = model.eval().to(device)
    layer, on_input = cam_layer(model)
    cam = LayerGradCam(model, layer)
    out = []
    for i in range(0, len(gray), batch_size):
        x = torch.from_numpy(normalize(gray[i : i + batch_size])).to(device).requires_grad_(True)
        t = torch.as_tensor(np.asarray(targets[i : i + batch_size]), dtype=torch.long, device=device)
        a = cam.attribute(x, target=t, relu_attributions=True, attribute_to_layer_input=on_input)
        a = LayerAttribution.interpolate(a.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
        peak = a.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
        out.append((a / peak).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *gray.shape[-2:]), np.float32)


def nearest(train_features: np.ndarray, query_features: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Indices [Q, k] of the k nearest training images by cosine distance, and the distances."""
    from sklearn.neighbors import NearestNeighbors

    nn_ = NearestNeighbors(n_neighbors=min(k, len(train_features)), metric="cosine").fit(train_features)
    dist, idx = nn_.kneighbors(query_features)
    return idx, dist


def out_of_fold_probe(features: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int = 5, seed: int = 0,
                      groups: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold class probabilities [N, C] of the training stage's linear probe
    (`lib.recipes.linear_probe`) on fixed features (stratified, group-aware when groups are given):
    each image scored by a model that never saw its label."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    from lib.recipes import linear_probe

    y = np.asarray(y)
    k = int(max(2, min(folds, np.bincount(y)[np.bincount(y) > 0].min())))
    splitter = (StratifiedGroupKFold(k, shuffle=True, random_state=seed) if groups is not None
                else StratifiedKFold(k, shuffle=True, random_state=seed))
    prob = np.zeros((len(y), n_classes))
    for tr, te in splitter.split(features, y, groups):
        _, _, clf = linear_probe(features[tr], y[tr], n_classes, c=0.5, seed=seed)
        prob[np.ix_(te, clf.classes_)] = clf.predict_proba(features[te])
    return prob


def label_issues(y: np.ndarray, prob: np.ndarray, classes: list[str], limit: int | None = None) -> pd.DataFrame:
    """The images cleanlab flags as probably mislabelled, most likely first: position, given label,
    the label the model suggests, and the self-confidence (out-of-fold probability of the given label)."""
    with _quiet_tqdm_auto():
        from cleanlab.filter import find_label_issues

    y = np.asarray(y)
    present = np.bincount(y, minlength=len(classes)) > 0
    if present.sum() < 2:
        return pd.DataFrame(columns=["position", "given", "suggested", "self-confidence"])
    # cleanlab needs every column to be a class present in the labels: drop absent ones and renormalise
    keep = np.flatnonzero(present)
    p = prob[:, keep] + 1e-12
    p = p / p.sum(1, keepdims=True)
    y_kept = np.searchsorted(keep, y)
    ranked = find_label_issues(y_kept, p, return_indices_ranked_by="self_confidence")
    ranked = ranked[:limit] if limit is not None else ranked
    return pd.DataFrame({"position": ranked, "given": [classes[y[i]] for i in ranked],
                         "suggested": [classes[keep[p[i].argmax()]] for i in ranked],
                         "self-confidence": p[ranked, y_kept[ranked]]})
