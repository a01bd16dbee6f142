#!/usr/bin/env bash
# Install profiles (issue 16): size and install time of the device install (`pip install edge-tl`)
# against the training install (`pip install 'edge-tl[train]'`), each in a fresh venv with a cold
# pip cache, and the aarch64 (Jetson, JetPack 6: Ubuntu 22.04, glibc 2.35, Python 3.10) resolution
# of every device requirement in setup.py.
#
# Usage: bash benchmarks/install_profiles.sh
#   PYTHON=python3.10 bash benchmarks/install_profiles.sh   # venvs from another interpreter
#   KEEP=1 ...                                              # keep the temp dir (venvs, wheels)
#
# The installs take SRC, a `git archive HEAD` copy of the repository in the temp dir, so the
# editable checkout is never touched (uncommitted edits are not measured). The machine's pip
# configuration (constraints, find-links, extra indexes) applies as it is; the script prints it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/edge-tl-install-profiles.XXXXXX")"
if [[ "${KEEP:-0}" != 1 ]]; then
    trap 'rm -rf "$WORK"' EXIT
fi
FAILURES=()

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

echo "== machine"
echo "date:       $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "cores:      $(nproc)"
echo "python:     $("$PYTHON" --version 2>&1) ($(command -v "$PYTHON"))"
echo "host pip:   $("$PYTHON" -m pip --version)"
echo "commit:     $(git -C "$REPO" rev-parse --short HEAD)"
echo "work dir:   $WORK"
echo "pip configuration in effect (pip config list):"
"$PYTHON" -m pip config list | sed 's/^/  /'
env | grep '^PIP_' | sed 's/^/  env /' || true

SRC="$WORK/src/edge-tl"
mkdir -p "$SRC"
git -C "$REPO" archive HEAD | tar -x -C "$SRC"

# Device requirements exactly as setup.py declares them (DEVICE_REQUIRES).
mapfile -t DEVICE_REQS < <("$PYTHON" - "$SRC/setup.py" <<'EOF'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEVICE_REQUIRES" for t in node.targets):
        for req in ast.literal_eval(node.value):
            print(req)
EOF
)
echo "device requirements (setup.py DEVICE_REQUIRES): ${DEVICE_REQS[*]}"

declare -A SECONDS_OF MB_OF DISTS_OF
install_profile() {
    local profile="$1" target="$2"
    local venv="$WORK/venv-$profile"
    echo
    echo "== profile $profile: pip install '$target' (fresh venv, cold cache PIP_CACHE_DIR=$WORK/cache-$profile)"
    "$PYTHON" -m venv "$venv"
    echo "venv pip: $("$venv/bin/python" -m pip --version)"
    local t0 t1
    t0="$(now)"
    PIP_CACHE_DIR="$WORK/cache-$profile" "$venv/bin/python" -m pip install "$target" \
        > "$WORK/pip-$profile.log" 2>&1 || { tail -n 30 "$WORK/pip-$profile.log"; return 1; }
    t1="$(now)"
    tail -n 1 "$WORK/pip-$profile.log"
    # Where the large wheels came from (local find-links / file:// index or the network).
    grep -E '^(  )?(Downloading|Processing|Obtaining) ' "$WORK/pip-$profile.log" \
        | grep -iE 'torch|nvidia|triton|nni|onnxruntime|numpy' | sed 's/^ */  /' || true
    SECONDS_OF[$profile]="$(elapsed "$t0" "$t1")"
    MB_OF[$profile]="$(du -sm "$venv" | cut -f1)"
    DISTS_OF[$profile]="$("$venv/bin/python" -m pip list --format=freeze | wc -l)"
    echo "install seconds: ${SECONDS_OF[$profile]}"
    echo "venv MB (du -sm): ${MB_OF[$profile]}"
    echo "distributions (pip list --format=freeze | wc -l, pip, setuptools and edge-tl included): ${DISTS_OF[$profile]}"
    echo "largest site-packages entries:"
    du -sm "$venv"/lib/python*/site-packages/* 2>/dev/null | sort -rn | awk "NR <= 6" | sed 's/^/  /'
}

install_profile device "$SRC"
install_profile train "$SRC[train]"

echo
echo "== checks"
cd "$WORK"  # outside the checkout: nothing from the repository on sys.path
if "$WORK/venv-device/bin/python" -c "import torch" > "$WORK/torch-device.log" 2>&1; then
    echo "FAIL: import torch succeeds in the device venv"
    FAILURES+=("import torch succeeds in the device venv")
else
    echo "ok: import torch fails in the device venv: $(tail -n 1 "$WORK/torch-device.log")"
fi
if "$WORK/venv-device/bin/edge-tl" --help > "$WORK/help-device.log" 2>&1; then
    echo "ok: edge-tl --help runs in the device venv"
    sed 's/^/  /' "$WORK/help-device.log"
else
    echo "FAIL: edge-tl --help in the device venv:"
    tail -n 15 "$WORK/help-device.log" | sed 's/^/  /'
    FAILURES+=("edge-tl --help fails in the device venv")
fi
echo "training venv: $("$WORK/venv-train/bin/python" -c 'import torch, torchvision, timm; print("torch", torch.__version__, "cuda", torch.version.cuda, "| torchvision", torchvision.__version__, "| timm", timm.__version__)' 2>&1 | tail -n 1)"
"$WORK/venv-train/bin/python" -m pip list --format=freeze | grep -iE '^(nni|nvidia-|triton)' | sed 's/^/  /' || true
cd "$REPO"

echo
echo "== table"
echo "| profile | install seconds | venv MB | distributions |"
echo "| --- | --- | --- | --- |"
for p in device train; do
    echo "| $p | ${SECONDS_OF[$p]} | ${MB_OF[$p]} | ${DISTS_OF[$p]} |"
done

# ---------------------------------------------------------------------------------------------
# aarch64 resolution of the device requirements, all together (one consistent set), binary only.
AARCH_PIP="$WORK/venv-device/bin/python"
aarch64_download() {
    local name="$1"; shift
    local dest="$WORK/aarch64-$name"
    local platforms=()
    for tag in "$@"; do platforms+=(--platform "$tag"); done
    echo
    echo "== aarch64 download ($name): platforms $*"
    local rc=0
    PIP_CACHE_DIR="$WORK/cache-aarch64" "$AARCH_PIP" -m pip download --only-binary=:all: \
        "${platforms[@]}" --python-version 3.10 --implementation cp --abi cp310 \
        -d "$dest" "${DEVICE_REQS[@]}" > "$WORK/aarch64-$name.log" 2>&1 || rc=$?
    echo "pip download exit status: $rc"
    if [[ $rc -ne 0 ]]; then
        grep -E '^ERROR' "$WORK/aarch64-$name.log" | sed 's/^/  /' || tail -n 5 "$WORK/aarch64-$name.log"
    fi
    echo "wheels:"
    ls "$dest" 2>/dev/null | sort | sed 's/^/  /' || true
    echo "platform tags of the binary wheels (the newest manylinux_2_N among them is the glibc the set needs):"
    ls "$dest" 2>/dev/null | grep -v -- '-none-any\.whl$' \
        | sed -E 's/^([^-]+)-([^-]+)-.*-([^-]+)\.whl$/  \1 \2: \3/' || true
    return 0
}
aarch64_download manylinux2014 manylinux2014_aarch64
aarch64_download three-tags manylinux_2_28_aarch64 manylinux2014_aarch64 manylinux_2_17_aarch64
# What pip on JetPack 6 (glibc 2.35) accepts: manylinux_2_35 down to manylinux_2_17 (= 2014).
JETPACK6_TAGS=()
for minor in $(seq 35 -1 17); do JETPACK6_TAGS+=("manylinux_2_${minor}_aarch64"); done
JETPACK6_TAGS+=(manylinux2014_aarch64)
aarch64_download jetpack6 "${JETPACK6_TAGS[@]}"

echo
echo "== nni==3.0 for aarch64 (expected to find nothing)"
rc=0
PIP_CACHE_DIR="$WORK/cache-aarch64" "$AARCH_PIP" -m pip download nni==3.0 --only-binary=:all: \
    --platform manylinux2014_aarch64 --python-version 3.10 -d "$WORK/aarch64-nni" \
    > "$WORK/aarch64-nni.log" 2>&1 || rc=$?
echo "pip download exit status: $rc"
grep -E '^ERROR' "$WORK/aarch64-nni.log" | sed 's/^/  /' || tail -n 5 "$WORK/aarch64-nni.log"
if [[ $rc -eq 0 ]]; then
    echo "UNEXPECTED: nni==3.0 resolved for aarch64: $(ls "$WORK/aarch64-nni")"
    FAILURES+=("nni==3.0 resolved for aarch64 (setup.py's marker assumes it does not)")
fi

echo
if [[ ${#FAILURES[@]} -gt 0 ]]; then
    printf 'FAILED: %s\n' "${FAILURES[@]}"
    exit 1
fi
echo "all checks passed"
