#!/usr/bin/env bash
# Run HERE (a CPU machine with the project's .venv and PyPI), before a GPU session: puts into
# bench/.gpu-carry/ (git-ignored; name it in the device tool's `carry`) what a bare GPU image lacks:
#   data/  the tiny benchmark the checks train on (generated here: the generator needs PyAV,
#          soundfile and open3d, which the GPU image does not carry)
#   whl/   this project as a wheel (its entry points register the built-in plugins), DeepSpeed
#          (pure Python, DS_BUILD_OPS=0) and the DeepSpeed dependencies the GPU image lacks,
#          as cp312 manylinux wheels, versions from requirements/constraints.txt
#
#   bash bench/gpu_prepare.sh            # then, with the device tool: bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
CARRY=bench/.gpu-carry
mkdir -p "$CARRY/whl"
if [ ! -f "$CARRY/data/benchmark.json" ]; then
  echo "[gpu_prepare] tiny benchmark -> $CARRY/data"
  PYTHONPATH=$PWD "$PY" -c "from mil_plugins.benchmark import make_benchmark; make_benchmark('$CARRY/data', size='tiny', seed=0)"
fi
pin() { grep -i "^$1==" requirements/constraints.txt | head -1; }
echo "[gpu_prepare] wheels -> $CARRY/whl"
rm -f "$CARRY"/whl/*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY/whl" .
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY/whl" "$(pin deepspeed)"
for name in hjson pydantic pydantic_core annotated-types typing-inspection; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/whl" "$(pin "$name")"
done
ls -la "$CARRY/whl"
du -sh "$CARRY"
