#!/usr/bin/env bash
# The embedded demo from nothing: a fresh virtualenv, the install, the synthetic data, a short REPA
# training run (CPU or GPU), samples from its checkpoint, and the report.
# Extra arguments go to train.py (e.g. `bash scripts/demo.sh --max-train-steps 200`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e .
"$VENV/bin/python" -m fastrepa.data.synthetic --out runs/demo-data --num-images 2000
rm -rf runs/demo  # a fresh run: train.py would otherwise resume from the last demo's checkpoints
"$VENV/bin/python" train.py --preset demo "$@"
ckpt=$(ls runs/demo/checkpoints/*.pt | sort | tail -n 1)
"$VENV/bin/python" generate.py --ckpt "$ckpt" --sample-dir runs/demo/fid-samples --num-fid-samples 100 \
    --per-proc-batch-size 50 --mode sde --num-steps 50 --cfg-scale 1.8 --guidance-high 0.7 --no-png --overwrite
echo
cat runs/demo/report.md
echo "sample grid: $(ls runs/demo/samples/*.png | sort | tail -n 1)"
