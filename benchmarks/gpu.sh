#!/usr/bin/env bash
# The one-GPU checks of BENCHMARKS.md as one script, for a machine with a CUDA GPU and the project's
# virtualenv (CUDA torch). Random weights at the real size need no files; with WAN (a Wan2.1-T2V-1.3B
# Diffusers folder) and CHECKPOINT (the Uni-ViGU .pth) set, the real-model checks run too.
#   bash benchmarks/gpu.sh                 # JSON results in ${OUT:-gpu-results}/
# Multi-GPU commands (torchrun) are in BENCHMARKS.md, "Several GPUs per job".
set -euo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
run() { echo "+ $*" >&2; python -m "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

run benchmarks.transformer_step --device cuda --size real --dtype bfloat16 --repeats 5 --json "$out/step_real.json"
run benchmarks.transformer_step --device cuda --size real --dtype bfloat16 --repeats 5 --text-tokens 20,256 --masked-prompt 20 --json "$out/step_real_t2v.json"
run benchmarks.caption_sampler --device cuda --size real --repeats 5 --json "$out/caption_real.json"
run benchmarks.caption_reuse --device cuda --size real --intervals 1,10,50 --repeats 2 --json "$out/reuse_real.json"
run benchmarks.fast_path --device cuda --size real --variants eager,auto --repeats 5 --json "$out/fast_real.json"
run benchmarks.end_to_end --device cuda --preset tiny --repeats 3 --json "$out/e2e_tiny_cuda.json"
run benchmarks.multi_gpu measure --device cuda --size real --json "$out/multi_gpu_1.json"

if [[ -n "${WAN:-}" && -n "${CHECKPOINT:-}" ]]; then
    weights=(--wan "$WAN" --checkpoint "$CHECKPOINT")
    run benchmarks.end_to_end --device cuda "${weights[@]}" --repeats 2 --json "$out/e2e_real.json"
    run benchmarks.caption_batching --device cuda "${weights[@]}" --jobs 16 --batch-sizes 1,4,8 --repeats 2 --json "$out/batching_real.json"
    run benchmarks.vae_tiling --device cuda --wan "$WAN" --height 480 --width 832 --frames 81 --repeats 2 --json "$out/vae_480.json"
fi
