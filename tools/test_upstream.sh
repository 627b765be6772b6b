#!/usr/bin/env bash
# Run dw-d2's test suite against the Detectron2 of a source tree (for example a clone of
# upstream's main branch) instead of the Detectron2 installed in .venv:
#
#   tools/test_upstream.sh DETECTRON2_SOURCE_DIR [--compiled] [PYTEST_ARGS...]
#
# The tree is copied to .cache/ (Python only, with dw-d2's detectron2._C stand-in; or, with
# --compiled, with its own operators built in place, which needs a C++ compiler), and the copy
# goes ahead of .venv's Detectron2 on PYTHONPATH for pytest and every process it starts. The
# source tree itself is not modified. Exit status: pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: $0 DETECTRON2_SOURCE_DIR [--compiled] [PYTEST_ARGS...]"
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    echo "$usage" >&2
    exit 2
fi
source_dir=$1
shift
compiled=()
if [[ ${1:-} == --compiled ]]; then
    compiled=(--compiled)
    shift
    if ! command -v "${CXX:-c++}" >/dev/null; then
        echo "$0: --compiled needs a C++ compiler (${CXX:-c++} not found)" >&2
        exit 2
    fi
fi
if [[ ! -f $source_dir/detectron2/__init__.py ]]; then
    echo "$0: $source_dir is not a Detectron2 source tree (no detectron2/__init__.py)" >&2
    exit 2
fi

bash tools/setup_env.sh  # .venv: torch, pytest, dw_d2 (and the snapshot, which the copy shadows)
python=${DW_D2_VENV:-.venv}/bin/python
copy=.cache/detectron2-tree${compiled:+-compiled}
"$python" tools/install_detectron2.py --copy-tree "$source_dir" --into "$copy" \
    ${compiled[@]+"${compiled[@]}"}
copy=$(cd "$copy" && pwd)
export PYTHONPATH="$copy${PYTHONPATH:+:$PYTHONPATH}"

# The tests must import the copy, not .venv's Detectron2.
"$python" -c "
import sys, detectron2
if not detectron2.__file__.startswith('$copy/'):
    sys.exit(f'detectron2 imports from {detectron2.__file__}, not from the copy in $copy')
"
"$python" -m dw_d2.env --short
start=$(date +%s)
status=0
"$python" -m pytest -q "$@" || status=$?
echo "[test_upstream] pytest exit status $status in $(( $(date +%s) - start )) s," \
     "Detectron2 from $(cat "$copy/detectron2/_dw_d2_source.txt")"
exit $status
