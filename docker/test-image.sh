#!/usr/bin/env bash
# End-to-end test of the container on a machine without a GPU or a registry (not part of CI):
# build the image with a local base and a local ComfyUI tree, start docker-compose.yml's
# comfyui-cpu service with compose (on the host network, CPU), wait for the health check,
# run the bundled workflow on the tiny models through the RunPod worker inside the
# container, and check the video it returns.
#
# usage: docker/test-image.sh [--worktree] [--keep] [--no-build]
#   --worktree  build from the working tree (tracked + untracked, not ignored) instead of HEAD
#   --keep      leave the container running and keep the work folder
#   --no-build  reuse $IMAGE
# Environment:
#   BASE_IMAGE       base image (default local/python:3.11-slim-bookworm: Debian bookworm with
#                    python3, venv and pip, imported locally where no registry can be reached)
#   COMFYUI_DIR      ComfyUI source tree copied into the build (default /tmp/ComfyUI)
#   COMFYUI_PYTHON   Python with ComfyUI's requirements and onnx, to build the tiny models
#                    (default $COMFYUI_DIR/.venv/bin/python)
#   IMAGE            tag to build/run (default comfyui-steadydancer:test)
#   BUILD_ARGS       extra `docker build` arguments (word-split)
# Prints the image size, the build time, the time to healthy and the job time at the end.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_IMAGE=${BASE_IMAGE:-local/python:3.11-slim-bookworm}
COMFYUI_DIR=${COMFYUI_DIR:-/tmp/ComfyUI}
COMFYUI_PYTHON=${COMFYUI_PYTHON:-$COMFYUI_DIR/.venv/bin/python}
IMAGE=${IMAGE:-comfyui-steadydancer:test}
PACKAGE_DIR=/opt/ComfyUI/custom_nodes/comfyui-steadydancer

PROJECT="sdtest$$"
WORK=""
COMPOSE_FILE=""
KEEP=0

log() { printf '[test-image] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# `docker build` with BuildKit: buildx if installed, else a pre-23 client with
# DOCKER_BUILDKIT=1 (its built-in BuildKit), else nothing usable.
pick_builder() {
  if docker buildx version >/dev/null 2>&1; then
    BUILD=(docker buildx build --load)
    return
  fi
  local client major
  for client in docker /usr/bin/docker; do
    command -v "$client" >/dev/null || continue
    major=$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1) || continue
    if [[ "$major" =~ ^[0-9]+$ ]] && ((major < 23)); then
      BUILD=(env DOCKER_BUILDKIT=1 "$client" build)
      return
    fi
  done
  die "no BuildKit builder: install docker-buildx (Docker >= 23) or use a Docker 20.10-22.x client"
}

pick_compose() {
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
  else
    die "neither \`docker compose\` nor docker-compose is installed"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The build context: the repository (HEAD, or the working tree with --worktree) plus the
# local ComfyUI tree under docker/local/ComfyUI.
make_context() {
  local ctx=$1 from=$2
  mkdir -p "$ctx"
  if [[ "$from" == head ]]; then
    git -C "$REPO" archive --format=tar HEAD | tar -C "$ctx" -xf -
  else
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' file; do [[ -e "$file" ]] && printf '%s\0' "$file"; done \
      | tar --null -T - -cf -) | tar -C "$ctx" -xf -
  fi
  [[ -f "$COMFYUI_DIR/main.py" ]] || die "COMFYUI_DIR=$COMFYUI_DIR has no main.py"
  mkdir -p "$ctx/docker/local/ComfyUI"
  tar -C "$COMFYUI_DIR" --exclude=./.venv --exclude=./.git --exclude='__pycache__' \
    --exclude=./output --exclude=./input --exclude=./user --exclude=./temp \
    --exclude=./custom_nodes --exclude=./models -cf - . | tar -C "$ctx/docker/local/ComfyUI" -xf -
}

cleanup() {
  [[ -n "$WORK" ]] || return 0
  if ((KEEP)); then
    log "kept: compose project $PROJECT ($COMPOSE_FILE), work folder $WORK"
    return 0
  fi
  if [[ -f "$COMPOSE_FILE" ]]; then
    "${COMPOSE[@]}" -p "$PROJECT" -f "$COMPOSE_FILE" down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}

# The compose file's comfyui-cpu service on the host network. Compose cannot drop `ports` in
# an override (and host networking refuses published ports), so the service is taken from
# docker-compose.yml as it is, minus ports/build/profiles, with a faster health probe.
derive_compose() {
  "$COMFYUI_PYTHON" - "$REPO/docker/docker-compose.yml" "$1" <<'PY'
import sys
import yaml
with open(sys.argv[1]) as f:
    spec = yaml.safe_load(f)
service = spec["services"]["comfyui-cpu"]
for key in ("ports", "build", "profiles"):
    service.pop(key, None)
service.update(network_mode="host", restart="no")
# On the host network ComfyUI's own address is the host's: keep it on loopback.
service["environment"]["COMFYUI_LISTEN"] = "127.0.0.1"
service["healthcheck"].update(interval="2s", start_period="600s")
out = {"services": {"comfyui-cpu": service}, "volumes": spec.get("volumes", {})}
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(out, f, sort_keys=False)
PY
}

container_health() {
  docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.Status}}' "$1"
}

# The generation size the graph asks for: SteadyDancerImageToVideo's width/height, followed
# through links to the node that sets them (e.g. a size node); "0 0" when it is decided at run
# time (a size node in auto mode).
expected_size() {
  "$COMFYUI_PYTHON" - "$1" <<'PY'
import json
import sys
graph = json.load(open(sys.argv[1]))
node = next(v for v in graph.values() if v["class_type"] == "SteadyDancerImageToVideo")
size = []
for name in ("width", "height"):
    value = node["inputs"][name]
    while isinstance(value, list) and len(value) == 2 and value[0] in graph:
        value = graph[value[0]]["inputs"].get(name)
    size.append(value if isinstance(value, int) and value > 0 else 0)
print(*size)
PY
}

# Check a video file: decodable, with frames of the expected size, any size for 0 0 (run
# with COMFYUI_PYTHON).
check_video() {
  "$COMFYUI_PYTHON" - "$1" "$2" "$3" <<'PY'
import sys
import av
path, width, height = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with av.open(path) as container:
    frames = [f for f in container.decode(video=0)]
if not frames:
    sys.exit(f"{path}: no video frames")
w, h = frames[0].width, frames[0].height
if (width, height) != (0, 0) and (w, h) != (width, height):
    sys.exit(f"{path}: frames are {w}x{h}, expected {width}x{height}")
print(f"{path}: {len(frames)} frames of {w}x{h}")
PY
}

main() {
  local from=head build=1 arg
  for arg in "$@"; do
    case "$arg" in
      --worktree) from=worktree ;;
      --keep) KEEP=1 ;;
      --no-build) build=0 ;;
      *) die "unknown argument $arg (see the header of $0)" ;;
    esac
  done
  command -v docker >/dev/null || die "no docker command"
  docker info >/dev/null 2>&1 || die "no Docker engine: start dockerd (docker info must work)"
  pick_compose

  WORK=$(mktemp -d /tmp/steadydancer-image-test.XXXX)
  COMPOSE_FILE="$WORK/docker-compose.test.yml"
  trap cleanup EXIT

  local build_seconds="(not built)"
  if ((build)); then
    pick_builder
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || die "no base image $BASE_IMAGE"
    make_context "$WORK/context" "$from"
    log "building $IMAGE from $from with ${BUILD[*]}"
    local -a extra=()
    [[ -z "${BUILD_ARGS:-}" ]] || read -r -a extra <<<"$BUILD_ARGS"
    local start=$SECONDS
    # onnxruntime instead of onnxruntime-gpu; PyPI's torch (the GPU image's) runs with --cpu.
    "${BUILD[@]}" --network host -f "$WORK/context/docker/Dockerfile" \
      --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg COMFYUI_SRC=ComfyUI \
      --build-arg ONNXRUNTIME=onnxruntime "${extra[@]}" -t "$IMAGE" "$WORK/context" \
      || die "docker build failed"
    build_seconds=$((SECONDS - start))
    rm -rf "$WORK/context"
  fi
  local size
  size=$(docker image inspect --format '{{.Size}}' "$IMAGE") || die "no image $IMAGE"

  log "building the tiny models with $COMFYUI_PYTHON"
  mkdir -p "$WORK/models" "$WORK/input" "$WORK/output" "$WORK/inputs"
  (cd "$REPO" && "$COMFYUI_PYTHON" scripts/make_tiny_models.py --comfyui "$COMFYUI_DIR" \
    --out "$WORK/models" --input "$WORK/inputs" --graph "$WORK/graph.json") >&2 \
    || die "scripts/make_tiny_models.py failed"
  # The container runs as uid 1000: it must be able to write the output folder.
  chmod -R a+rwX "$WORK/models" "$WORK/input" "$WORK/output"

  local port
  port=$(free_port)
  derive_compose "$COMPOSE_FILE"
  export STEADYDANCER_IMAGE=$IMAGE MODELS_PATH=$WORK/models INPUT_PATH=$WORK/input \
    OUTPUT_PATH=$WORK/output COMFYUI_PORT=$port COMFYUI_HOST_PORT=$port
  local -a compose=("${COMPOSE[@]}" -p "$PROJECT" -f "$COMPOSE_FILE")
  log "starting the container (port $port, host network)"
  local start=$SECONDS
  "${compose[@]}" up -d --no-build comfyui-cpu >&2 || die "compose up failed"
  local cid status
  cid=$("${compose[@]}" ps -q comfyui-cpu)
  [[ -n "$cid" ]] || die "no container"
  while :; do
    status=$(container_health "$cid")
    case "$status" in
      healthy*) break ;;
      unhealthy* | *exited | *dead)
        docker logs --tail 80 "$cid" >&2 || true
        die "container is $status" ;;
    esac
    ((SECONDS - start < 900)) || { docker logs --tail 80 "$cid" >&2; die "not healthy after 900 s"; }
    sleep 1
  done
  local healthy_seconds=$((SECONDS - start))
  log "healthy after ${healthy_seconds} s"
  docker logs "$cid" 2>&1 | grep -E '^\[(entrypoint|gpu_check)\]' >&2 || true

  # The constraints file must stop any later install from replacing torch.
  local pip_out
  if pip_out=$(docker exec "$cid" pip install --dry-run torch==2.12.0 2>&1); then
    die "pip would replace torch inside the image: the constraints file does not hold it"
  fi
  grep -qiE "conflict|ResolutionImpossible" <<<"$pip_out" || die "unexpected pip failure: $pip_out"
  log "torch is held by the constraints file (pip refuses torch==2.12.0)"

  log "running the bundled workflow (tiny models) through the RunPod worker in the container"
  "$COMFYUI_PYTHON" - "$WORK/graph.json" "$WORK/inputs" >"$WORK/job.json" <<'PY'
import base64, json, sys
from pathlib import Path
graph = json.loads(Path(sys.argv[1]).read_text())
inputs = Path(sys.argv[2])
images = [{"name": p.name, "image": base64.b64encode(p.read_bytes()).decode()}
          for p in sorted(inputs.iterdir()) if p.is_file()]
print(json.dumps({"id": "test-image", "input": {"workflow": graph, "images": images}}))
PY
  start=$SECONDS
  docker exec -i -e COMFYUI_URL="http://127.0.0.1:$port" "$cid" \
    python "$PACKAGE_DIR/docker/runpod_handler.py" --job - --save /opt/ComfyUI/output/worker-result \
    <"$WORK/job.json" >"$WORK/result.json" || { cat "$WORK/result.json" >&2; die "the job failed"; }
  local job_seconds=$((SECONDS - start))
  local video
  video=$(find "$WORK/output/worker-result" -type f \( -name '*.mp4' -o -name '*.webm' \) | head -n 1)
  [[ -n "$video" ]] || { cat "$WORK/result.json" >&2; die "the worker returned no video"; }
  local width height
  read -r width height < <(expected_size "$WORK/graph.json")
  check_video "$video" "$width" "$height" >&2 || die "bad video"

  log "PASSED"
  printf 'image %s: %s bytes (%s GB)\nbuild: %s s\ntime to healthy: %s s\njob (tiny models, CPU): %s s\n' \
    "$IMAGE" "$size" "$(python3 -c "print(round($size / 1e9, 2))")" "$build_seconds" \
    "$healthy_seconds" "$job_seconds"
}

main "$@"
