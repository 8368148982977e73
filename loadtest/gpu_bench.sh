#!/usr/bin/env bash
# The GPU figures in one command: installs onnxruntime-gpu, builds the paper repository, serves it, runs the bench for each
# public model and a load test, and writes OUT/gpu_bench.json (see the GPU run in loadtest/bench.py, which does the work, its
# command line in cxrlt/cli/commands/bench.py, and loadtest/README.md).
#
#   loadtest/gpu_bench.sh [--venv DIR] [--dry-run] [--out DIR] [other options of python -m cxrlt.cli.commands.bench]
#
#   --venv DIR   run in the virtual environment DIR, created with the project's "all" extra when missing (default: the
#                active one, else the checkout's .venv). Installing onnxruntime-gpu there replaces onnxruntime: the two
#                install the same module.
#   --dry-run    (or CXRLT_GPU_DRY_RUN=1) the same steps on the CPU with the tiny profile and a few requests, installing
#                nothing: what CI runs.
# shellcheck disable=SC1091
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run="${CXRLT_GPU_DRY_RUN:-0}"
venv=""
args=()
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1; args+=("$1") ;;
        --venv) venv="${2:?--venv needs a directory}"; shift ;;
        *) args+=("$1") ;;
    esac
    shift
done

if [[ -z "$venv" && -z "${VIRTUAL_ENV:-}" && -x "$root/.venv/bin/python" ]]; then
    venv="$root/.venv"
fi
if [[ -n "$venv" ]]; then
    if [[ ! -x "$venv/bin/python" ]]; then
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -e "$root[all]"
    fi
    source "$venv/bin/activate"
fi

if [[ "$dry_run" != 1 ]]; then  # a dry run (--dry-run, passed on, or CXRLT_GPU_DRY_RUN=1) installs nothing
    if ! python -c 'import sys, onnxruntime; sys.exit("CUDAExecutionProvider" not in onnxruntime.get_available_providers())' 2>/dev/null; then
        python -m pip uninstall -y onnxruntime onnxruntime-gpu
        # the cuda and cudnn extras bring the CUDA and cuDNN libraries it was built for, as nvidia-* wheels
        python -m pip install "onnxruntime-gpu[cuda,cudnn]"
    fi
    # onnxruntime finds those wheels' libraries only on the loader's path; the server's Python stubs inherit it from here.
    nvidia_libs="$(python -c 'import glob, os, sysconfig; print(os.pathsep.join(sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "lib")))))')"
    [[ -z "$nvidia_libs" ]] || export LD_LIBRARY_PATH="${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

exec python -m cxrlt.cli.commands.bench ${args[@]+"${args[@]}"}
