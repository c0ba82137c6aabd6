import numpy as np
import pytest
import torch

from model.pixels import frames_to_pixels, pixels_to_frames


def test_frames_to_pixels_maps_the_uint8_range_onto_minus_one_to_one_channels_first():
    clips = np.zeros((2, 3, 4, 5, 3), dtype=np.uint8)
    clips[1, 2, 3, 4] = (255, 0, 128)
    pixels = frames_to_pixels(clips)
    assert pixels.shape == (2, 3, 3, 4, 5) and pixels.dtype == torch.float32
    assert pixels[0].eq(-1.0).all()
    assert pixels[1, :, 2, 3, 4].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1.0], abs=1e-6)


def test_pixels_to_frames_inverts_frames_to_pixels_and_clamps_overshoot():
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(pixels_to_frames(frames_to_pixels(frames[None])[0]), frames)
    overshoot = torch.tensor([-3.0, 3.0]).view(1, 1, 1, 2).expand(3, 1, 1, 2)  # (3, T, H, W)
    assert pixels_to_frames(overshoot)[0, 0].tolist() == [[0, 0, 0], [255, 255, 255]]
