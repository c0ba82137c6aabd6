"""The toy world: synthetic clips with known ground truth that show the whole system learns.

``world`` (scenes, rendering, prompts, captions), ``make`` (MP4s and a manifest), ``describe`` (parsing
attributes back out of text), ``detector`` (reading attributes off frames), ``vae`` (training the tiny
Wan VAE), ``recipe`` (the whole recipe) and ``evaluate`` (the JSON report).
"""
