"""Window layout of Qwen2.5-VL's vision tower, computed once per batch of images.

Patches arrive from the processor grouped by merge unit (m x m patches, m = spatial merge size),
units in row-major order per image. Window attention groups units into windows of
`window_size / patch_size / m` units per side (4x4 units = 112 px for the released models);
the tower runs on the patches reordered window by window and undoes the order after the merger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisionWindows:
    unit_order: torch.Tensor
    """[U] merge-unit indices in window order."""
    unit_order_inverse: torch.Tensor
    """[U] argsort of unit_order."""
    patch_order: torch.Tensor
    """[P] patch indices in window order."""
    hw_pos_P2: torch.Tensor
    """[P, 2] (row, column) of every patch, in the processor's order."""
    cu_windows: torch.Tensor
    """[W+1] cumulative patch counts per window (in window order)."""
    cu_images: torch.Tensor
    """[N+1] cumulative patch counts per image (and temporal slice)."""


def vision_windows(grid_thw_N3: torch.Tensor, merge: int, window_size: int, patch_size: int) -> VisionWindows:
    units_per_window = window_size // merge // patch_size
    m2 = merge * merge
    unit_order, cu_win, hw, cu_img = [], [0], [], [0]
    unit_base = 0
    for t, h, w in grid_thw_N3.tolist():
        gh, gw = h // merge, w // merge
        # (row, col) per patch, merge-unit-major like the processor emits them
        rows = torch.arange(h).view(gh, merge, 1, 1).expand(gh, merge, gw, merge)
        cols = torch.arange(w).view(1, 1, gw, merge).expand(gh, merge, gw, merge)
        rc = torch.stack([rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)], dim=-1)
        hw.append(rc.repeat(t, 1))
        for ti in range(t):
            idx = torch.arange(gh * gw).view(gh, gw) + unit_base + ti * gh * gw
            for r0 in range(0, gh, units_per_window):
                for c0 in range(0, gw, units_per_window):
                    win = idx[r0:r0 + units_per_window, c0:c0 + units_per_window].reshape(-1)
                    unit_order.append(win)
                    cu_win.append(cu_win[-1] + win.numel() * m2)
            cu_img.append(cu_img[-1] + h * w)
        unit_base += t * gh * gw
    unit_order_t = torch.cat(unit_order)
    patch_order = (unit_order_t[:, None] * m2 + torch.arange(m2)[None, :]).reshape(-1)
    return VisionWindows(
        unit_order=unit_order_t,
        unit_order_inverse=torch.argsort(unit_order_t),
        patch_order=patch_order,
        hw_pos_P2=torch.cat(hw),
        cu_windows=torch.tensor(cu_win, dtype=torch.long),
        cu_images=torch.tensor(cu_img, dtype=torch.long),
    )
