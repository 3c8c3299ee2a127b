"""3-axis rotary position embedding shared by every Wan DiT.

The head dimension (128 in every released Wan model) is split into temporal / height / width parts
of ``d - 2*(d//3)`` / ``d//3`` / ``d//3`` channels (44/42/42), each rotated by its own frequency table
with base 10000. Channels are paired *interleaved* ((0,1), (2,3), ...) and the rotation is done in
float64, as upstream does, then cast back.

Rotations are kept per channel rather than as complex numbers: ``[..., 2, D]`` float64, row 0 the
pair's cosine on both of its channels, row 1 its sine signed for the channel (``-sin`` on the
first, ``+sin`` on the second). A rotation is then ``x * cos + swap(x) * signed_sin`` with
``swap`` exchanging the two channels of each pair: bit for bit the float64 products and sums of
the pairwise form of upstream's complex multiplication, ``(re*cos - im*sin, re*sin + im*cos)``
(``tests/test_core.py``), in a form that ``torch.compile`` turns into one pass at memory speed
(the pairwise form, with a stack of its two halves, compiled to a slower kernel: docs/performance.md).

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
    """Rotations by ``p * inv_freq``: float64 ``[len(positions), 2, axis_dim]`` (cos, signed sin per channel)."""
    angles = torch.outer(positions.to(torch.float64), _inverse_frequencies_on(axis_dim, positions.device))
    cos, sin = torch.cos(angles), torch.sin(angles)
    per_channel = (torch.stack([cos, cos], dim=-1), torch.stack([-sin, sin], dim=-1))
    return torch.stack([part.flatten(-2) for part in per_channel], dim=-2)


def grid_rotations(
    frame_positions: torch.Tensor, height: int, width: int, head_dim: int
) -> torch.Tensor:
    """Rotations for a token grid ordered (frame, h, w) row-major.

    Args:
        frame_positions: temporal position of each latent frame, ``[f]`` (int or float).
        height, width: token grid size (latent size / patch size).
    Returns:
        float64 ``[f*height*width, 1, 2, head_dim]`` (cos, signed sin per channel); the 1
        broadcasts over heads.
    """
    dt, dh, dw = axis_splits(head_dim)
    device = frame_positions.device
    f = frame_positions.numel()
    rt = axis_rotations(frame_positions, dt)
    rh = axis_rotations(torch.arange(height, device=device), dh)
    rw = axis_rotations(torch.arange(width, device=device), dw)
    grid = torch.cat(
        [
            rt.view(f, 1, 1, 2, -1).expand(f, height, width, 2, -1),
            rh.view(1, height, 1, 2, -1).expand(f, height, width, 2, -1),
            rw.view(1, 1, width, 2, -1).expand(f, height, width, 2, -1),
        ],
        dim=-1,
    )
    return grid.reshape(f * height * width, 1, 2, head_dim)


def apply_rotary(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` ``[B, S, H, D]`` by ``rotations`` ``[S, 1, 2, D]``
    (or anything that broadcasts to it), in float64, cast back to ``x.dtype``."""
    x64 = x.to(torch.float64)
    swapped = x64.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x64 * rotations[..., 0, :] + swapped * rotations[..., 1, :]).to(x.dtype)


def compose_rotations(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The rotation ``then`` after ``first`` (angles added), both ``[..., 2, D]``; float64 in, float64 out."""
    c1, s1, c2, s2 = first[..., 0, :], first[..., 1, :], then[..., 0, :], then[..., 1, :]
    # On a pair's first channel both sines carry a minus sign: the product is the same, the sum flips.
    return torch.stack([c1 * c2 - s1 * s2, s1 * c2 + c1 * s2], dim=-2)
