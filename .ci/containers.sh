#!/usr/bin/env bash
# Build the container image with podman and run it the way users do: --version, then the
# participant and group levels on a 2-subject phantom dataset with a read-only root file
# system, a tmpfs /tmp, a non-root UID and the BIDS folder mounted read-only; the output file
# list must equal .circleci/expected_outputs.txt. Each stage prints its duration.
#
# No registry can be pulled from here, so the base image is Debian 12 made with debootstrap and
# imported into podman (the Dockerfile's BASE_IMAGE argument). The image is the full one (CUDA
# PyTorch, ~7 GB); pip reads the machine's local wheel store and the proxy's CA bundle through
# build-time bind mounts, which never end up in the image. TemplateFlow's S3 bucket is out of
# reach, so this build uses the clearly marked stand-in template (TEMPLATEFLOW=stand-in), and a
# tiny random model is baked in through MODEL_URLS/MODEL_SHA256S to exercise that path.
#
# All podman state lives in one scratch folder, removed at the end (CL_CI_KEEP=1 keeps it).
# Environment: CL_CI_SCRATCH (folder), CL_CI_BASE_TAR (reuse a debootstrap tarball).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
SCRATCH=${CL_CI_SCRATCH:-$(mktemp -d /tmp/cl-containers.XXXXXX)}
mkdir -p "$SCRATCH/tmp"
export TMPDIR=$SCRATCH/tmp   # podman build's layer staging; keeps /var/tmp clean
BASE=localhost/debian:bookworm-ci
IMAGE=localhost/cl-bidsapp:ci
RUN_UID=4242:4242           # a UID that exists nowhere in the image
VERSION=$("$PY" -c "import cl_bidsapp; print(cl_bidsapp.__version__)")
T_START=$(date +%s)

stage() {  # stage NAME COMMAND...
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "::: containers: ${name}"
  "$@"
  echo "::: containers: ${name} took $(( $(date +%s) - t0 )) s"
}

PODMAN="podman --root $SCRATCH/storage --runroot $SCRATCH/run --tmpdir $SCRATCH/libpod \
--cgroup-manager cgroupfs --events-backend file --runtime runc"
pod() {
  # shellcheck disable=SC2086  # PODMAN is a word list on purpose (the tests split it too)
  $PODMAN "$@"
}

# The user's view: docker run --rm --read-only --tmpfs /tmp -u UID ... (ulimits: the runtime
# here refuses podman's defaults).
app() {
  pod run --rm --read-only --tmpfs /tmp:rw,exec -u "$RUN_UID" --network none \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$@"
}

cleanup() {
  local rc=$?
  if [ "${CL_CI_KEEP:-0}" != 1 ]; then
    pod rm -af >/dev/null 2>&1 || true
    pod rmi -af >/dev/null 2>&1 || true
    # overlay mounts left by an interrupted build would make rm fail
    grep -o "$SCRATCH/[^ ]*" /proc/mounts 2>/dev/null | sort -r | xargs -r umount -l || true
    rm -rf "$SCRATCH"
  else
    echo "kept $SCRATCH"
  fi
  exit $rc
}
trap cleanup EXIT

install_tools() {
  if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends podman debootstrap runc >/dev/null
  fi
  podman --version
}

base_image() {
  local tarball=${CL_CI_BASE_TAR:-$SCRATCH/debian-bookworm.tar}
  if [ ! -s "$tarball" ]; then
    debootstrap --variant=minbase bookworm "$SCRATCH/rootfs" http://deb.debian.org/debian \
      > "$SCRATCH/debootstrap.log" 2>&1 || { tail -20 "$SCRATCH/debootstrap.log"; return 1; }
    tar -C "$SCRATCH/rootfs" -cf "$tarball" .
    rm -rf "$SCRATCH/rootfs"
  fi
  pod import -q "$tarball" "$BASE" >/dev/null
  pod images
}

ci_model() {  # a tiny random model as a zip, baked in through a file:// URL
  mkdir -p "$SCRATCH/models"
  "$PY" - "$SCRATCH/models" <<'EOF'
import sys, zipfile
from pathlib import Path
from cl_bidsapp.models.testing import make_tiny_model
folder = Path(make_tiny_model(Path(sys.argv[1]) / "src", folds=(0,), patch=(32, 32, 32),
                              features=(4, 8, 16)))
with zipfile.ZipFile(Path(sys.argv[1]) / "tiny.zip", "w") as zf:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            zf.write(path, Path("tiny") / path.relative_to(folder))
EOF
  MODEL_SHA256=$(sha256sum "$SCRATCH/models/tiny.zip" | cut -d' ' -f1)
}

build_image() {
  ci_model
  local binds=()
  for path in /opt/wheels /opt/pypi /opt/pypi-more /etc/xdg/pip; do
    [ -e "$path" ] && binds+=(-v "$path:$path:ro")
  done
  local cert=/etc/ssl/certs/ca-certificates.crt
  # --format docker: OCI images drop SHELL (pipefail); --layers=false: one commit of the
  # ~7 GB tree at the end instead of one scan of it per instruction
  pod build --isolation chroot --network host --format docker --layers=false --force-rm \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
    "${binds[@]}" -v "$cert:/run/ci/ca.crt:ro" -v "$SCRATCH/models:/run/ci/models:ro" \
    --build-arg BASE_IMAGE="$BASE" --build-arg VERSION="$VERSION" \
    --build-arg VCS_REF="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --build-arg PIP_CERT=/run/ci/ca.crt --build-arg TEMPLATEFLOW=stand-in \
    --build-arg MODEL_URLS=file:///run/ci/models/tiny.zip \
    --build-arg MODEL_SHA256S="$MODEL_SHA256" \
    -t "$IMAGE" -f Dockerfile . 2>&1 | grep -v -E '^(Copying blob|Copying config|Writing manifest)'
  pod images "$IMAGE"
}

check_image() {
  local out; out=$(app "$IMAGE" --version)
  echo "$out"
  [ "$out" = "cl-bidsapp v$VERSION" ] || { echo "unexpected --version: $out" >&2; return 1; }
  CL_BIDSAPP_TEST_IMAGE=$IMAGE CL_BIDSAPP_TEST_PODMAN=$PODMAN \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_container_image.py
}

phantoms() {
  mkdir -p "$SCRATCH/data" "$SCRATCH/out" "$SCRATCH/work"
  chown -R "$RUN_UID" "$SCRATCH/data" "$SCRATCH/out" "$SCRATCH/work"
  app --entrypoint cl-bidsapp-simulate -v "$SCRATCH/data:/data" "$IMAGE" \
    /data/bids --n-subjects 2 --voxel-size 2 --seed 1
}

participant() {
  app -v "$SCRATCH/data/bids:/data:ro" -v "$SCRATCH/out:/out" -v "$SCRATCH/work:/work" \
    "$IMAGE" /data /out participant -w /work --nprocs 2 --omp-nthreads 1 --no-tta \
    --model tiny-test
}

GROUP_RAN=0
group() {
  local rc=0
  app -v "$SCRATCH/data/bids:/data:ro" -v "$SCRATCH/out:/out" -v "$SCRATCH/work:/work" \
    "$IMAGE" /data /out group -w /work --nprocs 2 --model tiny-test 2> "$SCRATCH/group.err" \
    || rc=$?
  cat "$SCRATCH/group.err" >&2
  if [ "$rc" = 64 ] && grep -q "not available yet" "$SCRATCH/group.err"; then
    echo "NOTE: this version has no group level yet; its outputs are not compared"
    return 0
  fi
  [ "$rc" = 0 ] || { echo "group level failed (exit $rc)" >&2; return "$rc"; }
  GROUP_RAN=1
}

compare_outputs() {
  local expected=.circleci/expected_outputs.txt
  # logs, reports and figures vary with the run; the derivatives' names must not
  (cd "$SCRATCH/out" && find . -type f ! -path './*/log/*' ! -path '*/figures/*' \
    ! -name '*.html' | LC_ALL=C sort) > "$SCRATCH/outputs.txt"
  if [ "$GROUP_RAN" = 0 ]; then
    grep -v '^\./group/' "$expected" > "$SCRATCH/expected.txt"
    expected=$SCRATCH/expected.txt
  fi
  diff -u "$expected" "$SCRATCH/outputs.txt"
  echo "$(wc -l < "$SCRATCH/outputs.txt") output files as expected"
  # the container's provenance must reach the derivatives
  grep -q '"Type": "docker"' "$SCRATCH/out/dataset_description.json"
}

# Arguments name stages to run alone (for development, with CL_CI_KEEP=1 and CL_CI_SCRATCH);
# none runs them all.
want() { [ -z "$SELECTED" ] || [[ " $SELECTED " == *" $1 "* ]]; }
SELECTED="$*"
want install_tools && stage "install podman and debootstrap" install_tools
want base_image && stage "Debian base image (debootstrap + import)" base_image
want build_image && stage "build the image" build_image
want check_image && stage "image checks (--version, read-only, any UID, labels)" check_image
want phantoms && stage "phantom dataset (2 subjects, in the image)" phantoms
want participant && stage "participant level (read-only root, UID $RUN_UID)" participant
want group && stage "group level" group
want compare_outputs && stage "compare the output file list" compare_outputs
echo "::: containers: total $(( $(date +%s) - T_START )) s"
