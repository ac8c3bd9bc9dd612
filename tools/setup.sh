#!/usr/bin/env bash
# Set up everything mil-plugins needs, from nothing, into ./.venv (idempotent; a second run is quick).
#
#   bash tools/setup.sh            # then: .venv/bin/mil ..., .venv/bin/python -m pytest
#
# Pins (requirements/constraints.txt holds the exact versions of the whole stack):
#   torch==2.14.1        with torchvision==0.29.1 (built for it; timm needs torchvision, and PyPI's
#                        torchvision does not import beside other torch builds: "operator
#                        torchvision::nms does not exist"). Both are on these machines' local index
#                        (/opt/pypi-more); torch 2.14.1 there is the CUDA build and pulls the nvidia-*
#                        wheels (~2.8 GB, also local). It runs on CPU as well. timm==1.0.31 builds the
#                        image / video / depth towers. For GPU nodes see README "Install on GPU machines".
#   deepspeed==0.19.8    built from source with DS_BUILD_OPS=0 (ops JIT-compile on GPU when needed),
#                        --no-build-isolation so that its build sees our torch instead of fetching one.
#   open3d-cpu==0.20.0   needs the Debian package libusb-1.0-0 to import; installed here when missing.
#   flwr==1.42.0         Flower (mil federate), with its simulation extra (Ray 2.55.1, a ~74 MB wheel);
#                        its pins set certifi, protobuf, typer, rich and packaging in the constraints.
#   llava-torch==1.2.2.post1  LLaVA's own code (the `llava` package of haotian-liu/LLaVA), for the LLaVA-fork
#                        integration and its tests; installed --no-deps: its pins (torch 2.0.1,
#                        transformers 4.36.2, timm, gradio ...) are stale and llava.model, .conversation,
#                        .mm_utils and .model.builder need nothing beyond our stack.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! ldconfig -p 2>/dev/null | grep -q "libusb-1.0.so.0"; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing libusb-1.0-0 (open3d needs it)"
    (apt-get update -qq && apt-get install -y -qq libusb-1.0-0) >/dev/null
  else
    echo "[setup] warning: libusb-1.0-0 is missing; open3d (point clouds) will not import." >&2
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
stamp=.venv/.mil-setup-stamp
want=$(cat requirements/constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi

# pip's output goes to a log that is shown only when pip fails
pip_install() {
  local log; log=$(mktemp)
  if ! $PIP install -q -c requirements/constraints.txt "$@" >"$log" 2>&1; then
    grep -v "is ignored" "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
echo "[setup] torch + torchvision"
pip_install "torch==2.14.1" "torchvision==0.29.1"
echo "[setup] mil-plugins and its dependencies"
pip_install -e ".[test,federated]"
echo "[setup] deepspeed (from source, DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 pip_install --no-build-isolation "deepspeed==0.19.8"
echo "[setup] llava-torch (LLaVA's own code, without its stale pinned dependencies)"
pip_install --no-deps "llava-torch==1.2.2.post1"
.venv/bin/python -c "import torch, torchvision, timm, transformers, peft, deepspeed, librosa, av, open3d, pycocoevalcap.cider.cider, mil_plugins, llava.model, flwr, ray" \
  || { echo "[setup] import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] done: torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
