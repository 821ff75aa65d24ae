"""Augmentation on the device, batched: a random rotation and shift per training image.

One affine grid for the whole [K * B] batch, no per-sample Python and no PIL. The angle and
shift of member k's row r at step t come from hash(seed, t, r) (randomness.uniform), so a member
sees the same augmented images alone or in any population.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .randomness import uniform

_ROTATE, _SHIFT_X, _SHIFT_Y = range(3)  # the three streams of a member's augmentation


def augment(x: torch.Tensor, image_shape: tuple[int, int], background: float, group) -> torch.Tensor:
    """x: [K, B, H*W] normalized images -> the same, rotated and shifted per member and row.

    `group` supplies per-member [K, 1, 1] `rotate` (max degrees), `shift` (max pixels),
    `augments` (bool), `augment_seed32` and `step_count`. Pixels that come in from outside the
    image are the background (a raw 0, normalized), as torchvision's fill=0 gives.
    """
    K, B, _ = x.shape
    H, W = image_shape

    def signed(stream: int) -> torch.Tensor:  # [K, B] uniform in [-1, 1)
        u = uniform(group.augment_seed32, group.step_count, stream, B, 1, dtype=x.dtype)
        return u.view(K, B) * 2 - 1

    angle = signed(_ROTATE) * group.rotate.view(K, 1) * (math.pi / 180)
    # affine_grid's coordinates run from -1 to 1 across the image: one pixel is 2 / size
    tx = signed(_SHIFT_X) * group.shift.view(K, 1) * (2.0 / W)
    ty = signed(_SHIFT_Y) * group.shift.view(K, 1) * (2.0 / H)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], -2)  # [K, B, 2, 3]
    grid = F.affine_grid(theta.view(K * B, 2, 3), [K * B, 1, H, W], align_corners=False)
    images = (x - background).view(K * B, 1, H, W)
    moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved = moved.view(K, B, H * W) + background
    return torch.where(group.augments.view(K, 1, 1), moved, x)  # members without augmentation: untouched
