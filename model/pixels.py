"""Between uint8 video frames and the VAE's pixel tensors, whose values lie in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch


def frames_to_pixels(clips: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``clips (B, T, H, W, 3)`` -> float32 ``(B, 3, T, H, W)`` in [-1, 1] on ``device``."""
    return torch.from_numpy(clips).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def pixels_to_frames(pixels: torch.Tensor) -> np.ndarray:
    """``pixels (3, T, H, W)``, clamped to [-1, 1] -> uint8 frames ``(T, H, W, 3)`` on the CPU."""
    return ((pixels.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
