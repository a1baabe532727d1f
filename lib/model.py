"""MobileNetV2 with a defect-classification head, and where its initial weights come from.

Head: dropout then one linear layer on the 1280 pooled features. A deeper head adds
hundreds of thousands of parameters that a few hundred SEM images per class cannot pin
down; a linear head over pooled features is also what a linear probe of pretrained
features trains, so the same model serves both recipes.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

FEATURES = 1280
DOWNLOAD_TIMEOUT_S = 30


class WeightsError(RuntimeError):
    """Requested weights cannot be loaded; the message says which and why."""


def build_model(n_classes: int, *, dropout: float = 0.2) -> nn.Module:
    """MobileNetV2 (width 1.0) with a dropout + linear head for n_classes, randomly initialised."""
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    model = mobilenet_v2(weights=None)
    model.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(FEATURES, n_classes))
    nn.init.normal_(model.classifier[1].weight, 0, 0.01)
    nn.init.zeros_(model.classifier[1].bias)
    return model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _backbone_state(state: dict) -> dict:
    """The `features.*` tensors of a MobileNetV2 state dict (or of a checkpoint holding one)."""
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("features.")}


def load_backbone(model: nn.Module, state: dict, source: str) -> None:
    """Copy pretrained backbone tensors into model; every backbone tensor must match."""
    backbone = _backbone_state(state)
    expected = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    missing = sorted(set(expected) - set(backbone))
    if missing:
        raise WeightsError(f"{source}: not a MobileNetV2 state dict ({len(missing)} backbone tensors missing, e.g. {missing[0]})")
    for k, v in expected.items():
        if backbone[k].shape != v.shape:
            raise WeightsError(f"{source}: tensor {k} has shape {tuple(backbone[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict(backbone, strict=False)


def init_weights(model: nn.Module, weights: str, *, fallback: str = "none") -> dict:
    """Load the initial backbone weights named by `weights`; return what was used.

    - "imagenet": torchvision's IMAGENET1K_V2 weights (from the torch hub cache, else
      downloaded). When they cannot be had, `fallback` decides: "none" keeps the random
      initialisation and says so; "fail" raises.
    - "none": random initialisation.
    - anything else: a path to a local state dict (e.g. torchvision's mobilenet_v2-*.pth).

    The returned dict (source, detail, sha256) belongs at the top of every training report.
    """
    if weights == "none":
        return {"source": "none", "detail": "random initialisation (no pretrained weights)", "sha256": None}
    if weights == "imagenet":
        spec = MobileNet_V2_Weights.IMAGENET1K_V2
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a firewalled network must not hang the run
        try:
            state = spec.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - offline machines fail in many ways
            reason = f"{type(e).__name__}: {e}"
            if fallback == "fail":
                raise WeightsError(f"ImageNet weights unavailable ({spec.url}): {reason}") from e
            return {"source": "none", "detail": f"ImageNet weights requested but unavailable ({reason}); "
                    f"fell back to random initialisation (weights_fallback={fallback}). To train offline from "
                    f"ImageNet weights, copy {spec.url.rsplit('/', 1)[-1]} to this machine and set weights to its path.",
                    "sha256": None}
        finally:
            socket.setdefaulttimeout(previous)
        load_backbone(model, state, "torchvision IMAGENET1K_V2")
        return {"source": "imagenet", "detail": f"torchvision MobileNet_V2_Weights.IMAGENET1K_V2 ({spec.url})", "sha256": None}
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (weights must be imagenet, none, or a path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"weights file {path} is not a readable PyTorch state dict: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    load_backbone(model, state, str(path))
    return {"source": "file", "detail": f"local state dict {path}", "sha256": _sha256(path)}


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def save_checkpoint(path: str | Path, model: nn.Module, *, classes: list[str], params: dict, **extra) -> None:
    """Write model weights, class list and parameters in one file, atomically."""
    from lib.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "classes": list(classes), "params": dict(params), **extra}, tmp)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint written by save_checkpoint; return (model in eval mode, checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (run the training stage first)")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = build_model(len(ckpt["classes"]), dropout=ckpt["params"].get("dropout", 0.0))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
