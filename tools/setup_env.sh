#!/usr/bin/env bash
# Create (or update) the project-local virtual environment: pinned torch/torchvision,
# Detectron2 (upstream git when reachable, else the verified PyPI snapshot), and dw_d2 itself.
# Safe to run repeatedly: each step is a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${DW_D2_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${DW_D2_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
STAMP="$VENV/.dw_d2_setup"
# Anything that changes what must be installed invalidates the stamp.
FINGERPRINT="$(cat tools/setup_env.sh tools/install_detectron2.py setup.cfg pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC ${DW_D2_DETECTRON2:-auto}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$FINGERPRINT" && -x "$VENV/bin/python" ]]; then
    exit 0
fi

start=$(date +%s)
echo "[setup] creating/updating $VENV"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# shellcheck disable=SC2086
"${PIP[@]}" install -q $TORCH_SPEC
"$VENV/bin/python" tools/install_detectron2.py
"${PIP[@]}" install -q --no-build-isolation -e ".[test]"
"$VENV/bin/python" -m dw_d2.env --short
echo "$FINGERPRINT" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s"
