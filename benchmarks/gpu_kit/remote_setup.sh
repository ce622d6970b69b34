#!/usr/bin/env bash
# The GPU machine's side of the GPU kit (benchmarks/gpu_kit/README.md gives the device-tool calls).
#
#   bash benchmarks/gpu_kit/remote_setup.sh stash NN      # each transfer: move gpu-kit/NN's piece to $KIT
#   bash benchmarks/gpu_kit/remote_setup.sh run [ARGS]    # last call: join, check, install, bench_gpu.py ARGS
#   bash benchmarks/gpu_kit/remote_setup.sh unpack        # join, check, install only (also for tests on CPU)
#
# Run from the checkout's root.  KIT (default /tmp/nsfw-kit) keeps the pieces between calls: the
# machine keeps /tmp while it is held, the checkout may be laid anew on every call.  SITE (default
# /tmp/site) receives the wheels (pip install --no-index --no-deps --target); the image's torch,
# CuPy, pyarrow and numba stay as they are.  OUT (the device tool's result folder) receives
# bench_gpu.json, the executed notebook and setup.log.
set -euo pipefail

KIT="${KIT:-/tmp/nsfw-kit}"
SITE="${SITE:-/tmp/site}"
OUT="${OUT:-$PWD/results}"
PY="${PYTHON:-python3}"
cmd="${1:-}"
shift || true

log() { echo "[remote_setup $(date +%H:%M:%S)] $*" >&2; }

check_piece() {  # check_piece FILE: its sha256 against SHA256SUMS beside it in $KIT
  local name
  name="$(basename "$1")"
  (cd "$KIT" && grep -E "  ${name}\$" SHA256SUMS | sha256sum --check --status) || {
    log "sha256 mismatch or unknown piece: $name"
    return 1
  }
}

stash() {
  local nn="$1"
  local src="gpu-kit/$nn"
  [ -d "$src" ] || { log "no $src in this checkout: carry it (carry: [\"gpu-kit/$nn\"])"; exit 2; }
  mkdir -p "$KIT"
  mv -f "$src"/kit.tar.* "$KIT"/
  cp -f "$src/SHA256SUMS" "$src/kit.json" "$KIT"/
  if ! check_piece "$KIT/kit.tar.$nn"; then
    rm -f "$KIT/kit.tar.$nn"  # never keep a bad piece: carry it again
    exit 1
  fi
  log "piece $nn stashed in $KIT: $(ls "$KIT" | grep -c '^kit.tar\.') of $(grep -c 'kit.tar\.' "$KIT/SHA256SUMS") pieces there"
}

unpack() {
  [ -f "$KIT/SHA256SUMS" ] || { log "no pieces in $KIT: run 'stash NN' for every transfer first"; exit 2; }
  local want have
  want="$(grep -c 'kit.tar\.' "$KIT/SHA256SUMS")"
  have="$(ls "$KIT" | grep -c '^kit.tar\.' || true)"
  if [ "$have" != "$want" ]; then
    log "only $have of $want pieces in $KIT; missing: $(cd "$KIT" && grep -o 'kit.tar\.[0-9]*' SHA256SUMS | while read -r p; do [ -f "$p" ] || printf '%s ' "$p"; done)"
    exit 2
  fi
  if [ ! -f "$KIT/unpacked/.done" ]; then
    (cd "$KIT" && grep 'kit.tar\.' SHA256SUMS | sha256sum --check --quiet)
    rm -rf "$KIT/unpacked" && mkdir -p "$KIT/unpacked"
    local sum
    sum="$(cat "$KIT"/kit.tar.[0-9]* | sha256sum | cut -d' ' -f1)"
    grep -qE "^${sum}  kit.tar\$" "$KIT/SHA256SUMS" || { log "the joined tar's sha256 $sum is not the kit's"; exit 1; }
    cat "$KIT"/kit.tar.[0-9]* | tar -x -C "$KIT/unpacked"
    touch "$KIT/unpacked/.done"
    log "kit joined and checked ($(du -sh "$KIT/unpacked" | cut -f1))"
  fi
  if [ ! -f "$SITE/.done" ]; then
    rm -rf "$SITE"
    # SITE_PIP_ARGS: e.g. "--python-version 3.12 --only-binary=:all: --platform ..." to lay out a
    # Python 3.12 site from another Python (the kit's CPU test does)
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile ${SITE_PIP_ARGS:-} --target "$SITE" \
      "$KIT"/unpacked/wheels/*.whl
    touch "$SITE/.done"
    log "$(ls "$KIT"/unpacked/wheels/*.whl | wc -l) wheels installed into $SITE"
  fi
}

environment() {
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export NSFW_DASK_MODEL_DIR="$KIT/unpacked/data/weights"
  export NSFW_DASK_REFERENCE_DIR="$KIT/unpacked/data/reference"
  export NSFW_DASK_OFFLINE=1
  export PATH="$SITE/bin:$PATH"
}

case "$cmd" in
  stash)
    [ $# -ge 1 ] || { log "usage: stash NN"; exit 2; }
    for nn in "$@"; do stash "$nn"; done
    ;;
  unpack)
    unpack
    ;;
  run)
    mkdir -p "$OUT"
    {
      unpack
      environment
      log "python: $("$PY" -c 'import sys; print(sys.version.split()[0])'), PYTHONPATH=$PYTHONPATH"
      "$PY" - <<'EOF'
import importlib
for name in ("torch", "cupy", "pyarrow", "numba", "numpy", "pandas", "dask", "distributed", "cudf", "dask_cudf", "dask_cuda", "rmm", "nsfw_dask"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:12s} {getattr(mod, '__version__', '?'):14s} {getattr(mod, '__file__', '')}")
    except Exception as e:  # noqa: BLE001 - a report, not a check
        print(f"  {name:12s} FAILED: {type(e).__name__}: {e}")
EOF
    } 2>&1 | tee "$OUT/setup.log"
    environment
    # --state: the sections of earlier calls (kept in $KIT while the machine is held) are merged,
    # so the last call's bench_gpu.json holds every section run so far
    exec "$PY" benchmarks/bench_gpu.py --out "$OUT" --state "$KIT/bench_gpu.json" "$@"
    ;;
  *)
    sed -n 2,13p "$0"
    exit 2
    ;;
esac
