#!/usr/bin/env bash
# THE prepared GPU run of issue #18 (one device-tool call; ~6-8 minutes on an H100/H200):
#   device tool run: command "bash bench/gpu_check.sh", carry ["bench/.gpu-carry"], timeout_s 600
# after `bash bench/gpu_prepare.sh` here. It installs the carried wheels into /tmp/site (no network
# there), then runs bench/gpu_check.py: the GPU-path checks (bf16 autocast, ZeRO-2, ZeRO-3, lwf + ewc
# under ZeRO-3, mid-stage resume) and bench/gpu_step.py --shape llava7b. Results: $OUT (or
# bench/results/<date>-<gpu>/): gpu_check.json, gpu_check.log, gpu_step.json.
# Extra arguments go to gpu_check.py (e.g. --only gpu_step, or --cpu-dry-run on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${MIL_GPU_SITE:-/tmp/site}   # where the carried wheels are installed
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if compgen -G "bench/.gpu-carry/whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" bench/.gpu-carry/whl/*.whl || exit 1
  export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}
  export PATH=$SITE/bin:$PATH
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
exec "$PY" bench/gpu_check.py "$@"
