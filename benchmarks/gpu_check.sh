#!/usr/bin/env bash
# The GPU check (issue 23): devices, the precision `auto` picks, NCCL all-reduce bus bandwidth, GAN and segmenter
# steps/s on 1 and all GPUs, torch.compile on/off, data_wait with png and raw shards, peak GPU memory; about
# 5 minutes. Without a GPU: one line, exit 0. What it measures and how: benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [--out benchmarks/gpu_check.md] [--params params.yaml] [--cpu-smoke]
#
# It installs nothing: PY names the Python to use (default .venv/bin/python when it exists, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
# This checkout's pipeline package, whatever an installed copy says (stage scripts run as files, not modules).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
