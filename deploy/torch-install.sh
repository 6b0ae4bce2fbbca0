#!/usr/bin/env bash
# Install torch 2.13.0 into a virtual environment, choosing the build on purpose.
#
#   deploy/torch-install.sh VENV_PYTHON [PIP_OPTION...]
#   deploy/torch-install.sh --dry-run VENV_PYTHON [PIP_OPTION...]   # say what it would do, change nothing
#
# A plain `pip install torch==2.13.0` on Linux takes PyPI's build, which is the CUDA build
# with several GB of NVIDIA libraries, whatever the machine has. This script decides instead:
#
#   TRIAGENODE_TORCH=auto (default)  the CUDA build when `nvidia-smi -L` lists an NVIDIA GPU,
#                                    else the CPU build;
#   TRIAGENODE_TORCH=cpu             the CPU build (torch==2.13.0+cpu, ~200 MB): a local wheel
#                                    when pip can find one (PIP_FIND_LINKS, or --find-links in
#                                    the options), else PyTorch's CPU index
#                                    (TRIAGENODE_TORCH_CPU_INDEX, default
#                                    https://download.pytorch.org/whl/cpu);
#   TRIAGENODE_TORCH=cuda            the CUDA build (torch===2.13.0): a local wheel when pip can
#                                    find one, else PyPI (or your pip's configured index);
#   TRIAGENODE_TORCH=none            install no torch: you put the build you want (ROCm,
#                                    another CUDA) into the environment first, and it is kept.
#
# TRIAGENODE_PIP_OPTIONS (e.g. "--no-index --find-links /media/wheels" offline) and the
# PIP_OPTIONs given after VENV_PYTHON are passed to pip. It prints which build it chose and why.
# A torch of the chosen build that is already installed is kept (nothing is downloaded).
set -euo pipefail

VERSION=2.13.0
CPU_INDEX="${TRIAGENODE_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

say() { printf 'torch-install: %s\n' "$*"; }
die() {
    printf 'torch-install: %s\n' "$*" >&2
    exit 2
}

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
if [[ $# -lt 1 ]]; then
    die "usage: $0 [--dry-run] VENV_PYTHON [PIP_OPTION...]"
fi
python="$1"
shift
[[ -x "$python" ]] || die "$python is not an executable Python (give the virtual environment's bin/python)"
# shellcheck disable=SC2206  # the options are words, as on pip's command line
pip_options=(${TRIAGENODE_PIP_OPTIONS:-} "$@")

mode="${TRIAGENODE_TORCH:-auto}"
case "$mode" in
    auto)
        if ! command -v nvidia-smi >/dev/null 2>&1; then
            build=cpu why="no NVIDIA GPU: nvidia-smi is not installed"
        elif gpus="$(nvidia-smi -L 2>/dev/null)" && grep -q '^GPU ' <<<"$gpus"; then
            build=cuda why="nvidia-smi -L lists $(grep -c '^GPU ' <<<"$gpus") GPU(s), the first: $(grep -m 1 '^GPU ' <<<"$gpus")"
        else
            build=cpu why="no NVIDIA GPU: nvidia-smi -L lists none"
        fi
        ;;
    cpu) build=cpu why="asked for by TRIAGENODE_TORCH=cpu" ;;
    cuda) build=cuda why="asked for by TRIAGENODE_TORCH=cuda" ;;
    none)
        say "TRIAGENODE_TORCH=none: installing no torch; the environment's own is kept"
        exit 0
        ;;
    *) die "TRIAGENODE_TORCH=$mode: expected auto, cpu, cuda or none" ;;
esac

if [[ "$build" == cpu ]]; then
    requirement="torch==$VERSION+cpu" wanted="$VERSION+cpu" label="CPU build"
else
    # === matches the version exactly: PyPI's CUDA build, never a local +cpu wheel.
    requirement="torch===$VERSION" wanted="$VERSION" label="CUDA build"
fi

installed="$("$python" -c 'import importlib.metadata as m
try:
    print(m.version("torch"))
except m.PackageNotFoundError:
    pass' 2>/dev/null || true)"
if [[ "$installed" == "$wanted" ]]; then
    say "chose the $label of torch $VERSION: $why"
    say "torch $installed is already installed; keeping it"
    exit 0
fi

# Is there a wheel pip can take without any index (find-links)? Resolving reads only metadata.
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
local_wheel=""
if "$python" -m pip install --dry-run --no-deps --ignore-installed --quiet "${pip_options[@]}" --no-index \
    --report "$report" "$requirement" >/dev/null 2>&1; then
    local_wheel="$("$python" -c 'import json, sys, urllib.parse, urllib.request
url = json.load(open(sys.argv[1]))["install"][0]["download_info"]["url"]
parts = urllib.parse.urlsplit(url)
print(urllib.request.url2pathname(parts.path) if parts.scheme == "file" else "")' "$report")"
fi

no_index=0
for option in "${pip_options[@]}"; do
    [[ "$option" == --no-index ]] && no_index=1
done

say "chose the $label of torch $VERSION: $why"
if [[ "$mode" == auto ]]; then
    say "(TRIAGENODE_TORCH=cpu or =cuda chooses the other build)"
fi
if [[ -n "$local_wheel" ]]; then
    command=("$python" -m pip install "${pip_options[@]}" "$local_wheel")
    say "installing $requirement from the local wheel $local_wheel"
elif ((no_index)); then
    die "pip runs with --no-index and finds no wheel for $requirement: put that wheel in the" \
        "--find-links folder, or choose the other build with TRIAGENODE_TORCH"
elif [[ "$build" == cpu ]]; then
    command=("$python" -m pip install "${pip_options[@]}" --index-url "$CPU_INDEX" "$requirement")
    say "installing $requirement from $CPU_INDEX"
else
    command=("$python" -m pip install "${pip_options[@]}" "$requirement")
    say "installing $requirement from pip's index (PyPI), with NVIDIA's CUDA libraries: several GB"
fi

if ((dry_run)); then
    say "would run: ${command[*]}"
    exit 0
fi
"${command[@]}"
