"""Presets: the training augmentation for grayscale SEM images, as keyword-only callables.

Images are decoded once (`lib.data.cache_gray`) and kept as grayscale [1, H, W] tensors on
0-1; the train preset augments them before `lib.preprocess.normalize` turns them into network
input. Evaluation uses no preset: its preprocessing is `lib.preprocess` alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.transforms import v2


class _RandomStep(nn.Module):
    """One random augmentation with one strength, `amount`, applied with probability `p`."""

    def __init__(self, amount, p: float = 1.0):
        super().__init__()
        self.amount, self.p = amount, p

    def extra_repr(self) -> str:
        return f"amount={self.amount}, p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p < 1 and torch.rand(()) < 1 - self.p:
            return x
        return self.step(x)


class _AddNoise(_RandomStep):
    """Gaussian noise with a random std in [0, amount] per image (detector noise varies by tool)."""

    def step(self, x: torch.Tensor) -> torch.Tensor:
        std = torch.rand(()) * self.amount
        return (x + torch.randn_like(x) * std).clamp(0, 1)


class _Resolution(_RandomStep):
    """Down-sample to a random fraction in [amount, 1] of the side, then back up: a coarser pixel
    size or an image that was stored small and enlarged."""

    def step(self, x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1]
        f = self.amount + (1 - self.amount) * float(torch.rand(()))
        small = nn.functional.interpolate(x[None], size=max(8, round(side * f)), mode="bilinear", antialias=True)
        return nn.functional.interpolate(small, size=x.shape[-2:], mode="bilinear")[0].clamp(0, 1)


class _Gamma(_RandomStep):
    """Gamma in [exp(-amount), exp(amount)]: detector response and brightness curves differ by tool."""

    def step(self, x: torch.Tensor) -> torch.Tensor:
        gamma = math.exp((2 * float(torch.rand(())) - 1) * self.amount)
        return x.clamp(1e-6, 1) ** gamma


class _ShotNoise(_RandomStep):
    """Poisson (shot) noise at a random peak count in [amount, 10 * amount] electrons per pixel, drawn
    log-uniformly: a faster scan or a lower beam current (`lib.shifts` scores peak 30)."""

    def step(self, x: torch.Tensor) -> torch.Tensor:
        peak = self.amount * 10 ** float(torch.rand(()))
        return (torch.poisson(x.clamp(0, 1) * peak) / peak).clamp(0, 1)


class _Rot90(nn.Module):
    """A rotation by a random multiple of 90 degrees (square images: the side stays)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, int(torch.randint(4, ())), dims=(-2, -1))


class _Jpeg(_RandomStep):
    """JPEG re-compression at a random quality in [amount, 95]."""

    def step(self, x: torch.Tensor) -> torch.Tensor:
        from lib.shifts import jpeg

        quality = int(torch.randint(self.amount, 96, ()))
        return torch.from_numpy(jpeg(x[0].numpy(), quality))[None]


def train_transform(*, size: int, shift: float = 0.0, scale: float = 0.0, brightness: float = 0.0,
                    contrast: float = 0.0, noise: float = 0.0, blur: float = 0.0, flip: bool = False,
                    rot90: bool = False, resolution: float = 0.0, gamma: float = 0.0, jpeg: int = 0,
                    shot: float = 0.0) -> v2.Compose:
    """Augmentation for grayscale [1, H, W] tensors on 0-1 that keeps SEM semantics.

    No rotations or flips unless asked: scan direction and shading are not symmetric.
    Each argument at 0 (or False) switches its step off. `resolution`, `gamma`, `jpeg` and
    `shot` cover the shifts of `lib.shifts` (down-up sampling, gamma, JPEG, shot noise); noise,
    contrast and blur cover the rest.
    """
    steps: list[nn.Module] = []
    if flip:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if rot90:
        steps.append(_Rot90())
    if scale > 0:
        # zoom in by up to `scale` of the side: SEM tools and recipes differ in pixel size
        area = (1 - scale) ** 2
        steps.append(v2.RandomResizedCrop(size, scale=(area, 1.0), ratio=(0.9, 1.1), antialias=True))
    if shift > 0:
        # shift by cropping a reflect-padded image: no black borders for the model to learn
        steps.append(v2.RandomCrop(size, padding=max(1, round(shift * size)), padding_mode="reflect"))
    if resolution > 0:
        steps.append(_Resolution(resolution, p=0.5))
    if brightness > 0 or contrast > 0:
        steps.append(v2.ColorJitter(brightness=brightness or None, contrast=contrast or None))
    if gamma > 0:
        steps.append(_Gamma(gamma))
    if blur > 0:
        k = 2 * math.ceil(3 * blur) + 1
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=k, sigma=(0.1, blur))], p=0.5))
    if shot > 0:
        steps.append(_ShotNoise(shot, p=0.5))
    if noise > 0:
        steps.append(_AddNoise(noise))
    if jpeg > 0:
        steps.append(_Jpeg(jpeg, p=0.5))
    steps.append(v2.Resize((size, size), antialias=True))  # no-op at the cached size
    return v2.Compose(steps)


def augmentation(P: dict) -> v2.Compose:
    """The training augmentation the parameters ask for (aug_* keys)."""
    return train_transform(size=P["image_size"], shift=P["aug_shift"], scale=P["aug_scale"],
                           brightness=P["aug_brightness"], contrast=P["aug_contrast"], noise=P["aug_noise"],
                           blur=P["aug_blur"], flip=P["aug_flip"], rot90=P["aug_rot90"],
                           resolution=P["aug_resolution"], gamma=P["aug_gamma"], jpeg=P["aug_jpeg"],
                           shot=P["aug_shot"])
