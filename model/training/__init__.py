"""Training of Uni-ViGU (``univigu train``): Knowledge Recall and Capability Refinement (spec §7).

Modules, one job each: ``config`` (typed settings and their defaults), ``data`` (manifest, validation,
latent cache), ``stream`` (data order), ``objective`` (time sampling and losses), ``batch`` (one
micro-batch), ``distributed`` (torchrun + FSDP2), ``checkpoints`` (folders and resume), ``trainer``
(the loop) and ``cli``. Importing this package is torch-free.
"""
