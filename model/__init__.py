"""Uni-ViGU: one Wan2.1-based diffusion transformer for text-to-video, captioning and joint generation.

Importing this package is cheap and torch-free; the network, samplers and pipeline live in submodules
(`model.network`, `model.samplers`, `model.pipeline`) that import torch when first used.
"""
