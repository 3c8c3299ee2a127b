"""3-axis rotary position embedding shared by every Wan DiT.

The head dimension (128 in every released Wan model) is split into temporal / height / width parts
of ``d - 2*(d//3)`` / ``d//3`` / ``d//3`` channels (44/42/42), each rotated by its own frequency table
with base 10000. Channels are paired *interleaved* ((0,1), (2,3), ...) and the rotation is done in
float64, as upstream does, then cast back.

Upstream precomputes a 1024-position table, which caps a video at 1024 latent frames. The angles
here are computed for whatever positions are asked for, with the same float64 arithmetic
(``position * inv_freq``), so they equal the table entries for positions below 1024 and keep
working after them.
"""

from __future__ import annotations

import torch

ROPE_THETA = 10000.0


def axis_splits(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (t, h, w): 44/42/42 for head_dim 128."""
    return head_dim - 2 * (head_dim // 3), head_dim // 3, head_dim // 3


def inverse_frequencies(axis_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """``1 / theta^(2j/axis_dim)`` for j < axis_dim/2, float64 ``[axis_dim//2]``."""
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float64)[: axis_dim // 2] / axis_dim
    return 1.0 / (theta**exponents)


def axis_rotations(positions: torch.Tensor, axis_dim: int) -> torch.Tensor:
    """Unit complex rotations ``exp(i * p * inv_freq)``: complex128 ``[len(positions), axis_dim//2]``."""
    angles = torch.outer(positions.to(torch.float64), inverse_frequencies(axis_dim).to(positions.device))
    return torch.polar(torch.ones_like(angles), angles)


def grid_rotations(
    frame_positions: torch.Tensor, height: int, width: int, head_dim: int
) -> torch.Tensor:
    """Rotations for a token grid ordered (frame, h, w) row-major.

    Args:
        frame_positions: temporal position of each latent frame, ``[f]`` (int or float).
        height, width: token grid size (latent size / patch size).
    Returns:
        complex128 ``[f*height*width, 1, head_dim//2]`` (the 1 broadcasts over heads).
    """
    dt, dh, dw = axis_splits(head_dim)
    device = frame_positions.device
    f = frame_positions.numel()
    rt = axis_rotations(frame_positions, dt)
    rh = axis_rotations(torch.arange(height, device=device), dh)
    rw = axis_rotations(torch.arange(width, device=device), dw)
    grid = torch.cat(
        [
            rt.view(f, 1, 1, -1).expand(f, height, width, -1),
            rh.view(1, height, 1, -1).expand(f, height, width, -1),
            rw.view(1, 1, width, -1).expand(f, height, width, -1),
        ],
        dim=-1,
    )
    return grid.reshape(f * height * width, 1, -1)


def apply_rotary(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` ``[B, S, H, D]`` by ``rotations`` ``[S, 1, D/2]``.

    The product is formed in complex128 and cast back to ``x.dtype``.
    """
    pairs = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)
