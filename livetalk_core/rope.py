"""3-axis rotary position embedding shared by every Wan DiT.

The head dimension (128 in every released Wan model) is split into temporal / height / width parts
of ``d - 2*(d//3)`` / ``d//3`` / ``d//3`` channels (44/42/42), each rotated by its own frequency table
with base 10000. Channels are paired *interleaved* ((0,1), (2,3), ...) and the rotation is done in
float64, as upstream does, then cast back. Rotations are kept as real (cos, sin) pairs rather than
complex numbers: the same float64 values and products, in a form ``torch.compile`` can fuse.

Upstream precomputes a 1024-position table, which caps a video at 1024 latent frames. The angles
here are computed for whatever positions are asked for, with the same float64 arithmetic
(``position * inv_freq``), so they equal the table entries for positions below 1024 and keep
working after them.
"""

from __future__ import annotations

import functools

import torch

ROPE_THETA = 10000.0


def axis_splits(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (t, h, w): 44/42/42 for head_dim 128."""
    return head_dim - 2 * (head_dim // 3), head_dim // 3, head_dim // 3


def inverse_frequencies(axis_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """``1 / theta^(2j/axis_dim)`` for j < axis_dim/2, float64 ``[axis_dim//2]``."""
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float64)[: axis_dim // 2] / axis_dim
    return 1.0 / (theta**exponents)


@functools.lru_cache(maxsize=16)
def _inverse_frequencies_on(axis_dim: int, device: torch.device) -> torch.Tensor:
    # Computed on the CPU (bit-for-bit upstream's table) and copied once per device: a copy in every
    # forward would make the CPU wait for the GPU's queue.
    return inverse_frequencies(axis_dim).to(device)


def axis_rotations(positions: torch.Tensor, axis_dim: int) -> torch.Tensor:
    """``(cos, sin)`` of ``p * inv_freq``: float64 ``[len(positions), axis_dim//2, 2]``."""
    angles = torch.outer(positions.to(torch.float64), _inverse_frequencies_on(axis_dim, positions.device))
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def grid_rotations(
    frame_positions: torch.Tensor, height: int, width: int, head_dim: int
) -> torch.Tensor:
    """Rotations for a token grid ordered (frame, h, w) row-major.

    Args:
        frame_positions: temporal position of each latent frame, ``[f]`` (int or float).
        height, width: token grid size (latent size / patch size).
    Returns:
        float64 ``[f*height*width, 1, head_dim//2, 2]`` (cos, sin); the 1 broadcasts over heads.
    """
    dt, dh, dw = axis_splits(head_dim)
    device = frame_positions.device
    f = frame_positions.numel()
    rt = axis_rotations(frame_positions, dt)
    rh = axis_rotations(torch.arange(height, device=device), dh)
    rw = axis_rotations(torch.arange(width, device=device), dw)
    grid = torch.cat(
        [
            rt.view(f, 1, 1, -1, 2).expand(f, height, width, -1, 2),
            rh.view(1, height, 1, -1, 2).expand(f, height, width, -1, 2),
            rw.view(1, 1, width, -1, 2).expand(f, height, width, -1, 2),
        ],
        dim=-2,
    )
    return grid.reshape(f * height * width, 1, -1, 2)


def apply_rotary(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` ``[B, S, H, D]`` by ``rotations`` ``[S, 1, D/2, 2]``.

    ``(re + i im)(cos + i sin)`` is formed in float64 and cast back to ``x.dtype``.
    """
    pairs = x.to(torch.float64).unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = rotations[..., 0], rotations[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(x.dtype)
