#!/usr/bin/env bash
# Container entry point: find the models volume, point ComfyUI at it, optionally fetch the
# models the manifest lists, pick GPU/low-VRAM/CPU flags, then start ComfyUI (and the RunPod
# worker when asked).
#
# usage: entrypoint.sh [auto|comfyui|runpod|fetch|COMMAND...]
#   auto     runpod when RUNPOD_ENDPOINT_ID is set (RunPod serverless), else comfyui
#   comfyui  ComfyUI in the foreground
#   runpod   ComfyUI in the background + the RunPod serverless worker (docker/runpod_handler.py)
#   fetch    fetch the models named by STEADYDANCER_FETCH (default: "default") and exit
#   other    run that command (e.g. `bash`)
#
# Environment (all optional):
#   MODELS_DIR              models folder; default: the first of /runpod-volume, /workspace that
#                           exists (its ComfyUI/models if present, else its models/), else
#                           ComfyUI's own models/ folder
#   STEADYDANCER_FETCH      manifest entries or groups to fetch at start, comma-separated
#                           ("default", "small", "all", "steadydancer-q8_0,umt5-xxl-fp16", ...); empty: none
#   HF_TOKEN                Hugging Face token, for gated or private repositories
#   COMFYUI_PORT (8188), COMFYUI_LISTEN (0.0.0.0 inside the container, where compose publishes
#                           the port on the host's loopback only; in runpod mode always 127.0.0.1)
#   COMFYUI_ARGS            extra ComfyUI arguments (e.g. "--lowvram --preview-method auto")
#   STEADYDANCER_DEVICE     auto (default), cpu, lowvram, normal: see docker/gpu_check.py
#   STEADYDANCER_LOWVRAM_BELOW_GB  VRAM below which --lowvram is added (default 20)
#
# The functions below are sourced by the tests (tests/test_docker_entrypoint.py); main only
# runs when this file is executed.
set -euo pipefail

STEADYDANCER_DIR=${STEADYDANCER_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
COMFYUI_DIR=${COMFYUI_DIR:-/opt/ComfyUI}
PYTHON=${PYTHON:-python}

# Folders ComfyUI looks models up in, as "comfyui_key:subfolder" (several subfolders per key
# are allowed). dwpose is registered by this package.
MODEL_FOLDERS=(
  "checkpoints:checkpoints"
  "diffusion_models:diffusion_models" "diffusion_models:unet"
  "text_encoders:text_encoders" "text_encoders:clip"
  "clip_vision:clip_vision"
  "vae:vae"
  "loras:loras"
  "dwpose:dwpose"
  "upscale_models:upscale_models"
  "embeddings:embeddings"
)

log() {
  printf '[entrypoint] %s\n' "$*" >&2
}

die() {
  log "error: $*"
  exit 1
}

# The models folder to use: MODELS_DIR, else the first volume that exists, else ComfyUI's.
# Volumes are looked for in STEADYDANCER_VOLUMES (default "/runpod-volume /workspace").
resolve_models_dir() {
  if [[ -n "${MODELS_DIR:-}" ]]; then
    printf '%s\n' "${MODELS_DIR%/}"
    return
  fi
  local volume
  for volume in ${STEADYDANCER_VOLUMES:-/runpod-volume /workspace}; do
    if [[ -d "$volume/ComfyUI/models" ]]; then
      printf '%s\n' "$volume/ComfyUI/models"
      return
    fi
    if [[ -d "$volume" ]]; then
      printf '%s\n' "$volume/models"
      return
    fi
  done
  printf '%s\n' "$COMFYUI_DIR/models"
}

# YAML single-quoted scalar (a path may hold ':' or '#').
yaml_quote() {
  local value=${1//\'/\'\'}
  printf "'%s'" "$value"
}

# Write ComfyUI's extra_model_paths.yaml for MODELS_DIR ($1) to the file $2. The section is
# the default one, so files ComfyUI itself saves (and our fetcher) land on the volume.
write_extra_model_paths() {
  local models_dir=$1 out=$2 entry key folder previous=""
  mkdir -p "$(dirname "$out")"
  {
    printf '# written by docker/entrypoint.sh at container start\n'
    printf 'steadydancer_volume:\n'
    printf '  base_path: %s\n' "$(yaml_quote "$models_dir")"
    printf '  is_default: true\n'
    for entry in "${MODEL_FOLDERS[@]}"; do
      key=${entry%%:*}
      folder=${entry#*:}
      if [[ "$key" != "$previous" ]]; then
        printf '  %s: |\n' "$key"
        previous=$key
      fi
      printf '    %s\n' "$folder"
    done
  } >"$out"
}

# Create the model subfolders (so ComfyUI lists them and the fetcher can write). A read-only
# volume is fine: the files are only read then.
create_model_folders() {
  local models_dir=$1 entry
  if ! mkdir -p "$models_dir" 2>/dev/null || [[ ! -w "$models_dir" ]]; then
    log "models folder $models_dir is not writable: using it read-only"
    return 0
  fi
  for entry in "${MODEL_FOLDERS[@]}"; do
    mkdir -p "$models_dir/${entry#*:}"
  done
}

# The mode to run: the first argument, with "auto" resolved from the environment.
resolve_mode() {
  local mode=${1:-auto}
  if [[ "$mode" == auto ]]; then
    if [[ -n "${RUNPOD_ENDPOINT_ID:-}" ]]; then mode=runpod; else mode=comfyui; fi
  fi
  printf '%s\n' "$mode"
}

# Fetch the manifest entries named in STEADYDANCER_FETCH ($2 overrides) into $1.
fetch_models() {
  local models_dir=$1 selection=${2:-${STEADYDANCER_FETCH:-}}
  [[ -n "$selection" ]] || return 0
  log "fetching models ($selection) into $models_dir"
  "$PYTHON" "$STEADYDANCER_DIR/docker/fetch_models.py" \
    --manifest "${STEADYDANCER_MANIFEST:-$STEADYDANCER_DIR/docker/models.yaml}" \
    --models-dir "$models_dir" --select "$selection"
}

# ComfyUI's device flags (--cpu / --lowvram / nothing), decided by docker/gpu_check.py, which
# logs its reason. Extra arguments are the user's ComfyUI arguments: they take precedence.
device_flags() {
  "$PYTHON" "$STEADYDANCER_DIR/docker/gpu_check.py" -- "$@"
}

# The ComfyUI command line, one argument per line (listen address $1, config file $2).
comfyui_command() {
  local listen=$1 config=$2
  local -a user_args=() flags=()
  if [[ -n "${COMFYUI_ARGS:-}" ]]; then
    read -r -a user_args <<<"$COMFYUI_ARGS"
  fi
  local flags_text
  flags_text=$(device_flags "${user_args[@]}") || die "the device check failed (see above)"
  if [[ -n "$flags_text" ]]; then
    mapfile -t flags <<<"$flags_text"
  fi
  printf '%s\n' "$PYTHON" "$COMFYUI_DIR/main.py" --listen "$listen" \
    --port "${COMFYUI_PORT:-8188}" --disable-auto-launch \
    --extra-model-paths-config "$config" "${flags[@]}" "${user_args[@]}"
}

# ComfyUI in the background and the RunPod worker in the foreground; when either ends, the
# other is stopped and the container exits with the first one's status.
run_worker() {
  local -a cmd=("$@")
  "${cmd[@]}" &
  local comfy_pid=$!
  COMFYUI_URL="http://127.0.0.1:${COMFYUI_PORT:-8188}" \
    "$PYTHON" "$STEADYDANCER_DIR/docker/runpod_handler.py" &
  local worker_pid=$!
  trap 'kill -TERM "$comfy_pid" "$worker_pid" 2>/dev/null' TERM INT
  local status=0
  wait -n "$comfy_pid" "$worker_pid" || status=$?
  if kill -0 "$comfy_pid" 2>/dev/null; then
    log "RunPod worker exited (status $status): stopping ComfyUI"
  else
    log "ComfyUI exited (status $status): stopping the RunPod worker"
  fi
  kill -TERM "$comfy_pid" "$worker_pid" 2>/dev/null || true
  wait || true
  return "$status"
}

main() {
  local mode
  mode=$(resolve_mode "${1:-auto}")
  [[ $# -gt 0 ]] && shift
  case "$mode" in
    comfyui | runpod | fetch) ;;
    *) exec "$mode" "$@" ;;
  esac

  local models_dir config
  models_dir=$(resolve_models_dir)
  log "models folder: $models_dir"
  create_model_folders "$models_dir"
  if [[ "$mode" == fetch ]]; then
    fetch_models "$models_dir" "${STEADYDANCER_FETCH:-default}"
    return
  fi
  fetch_models "$models_dir" || die "model fetch failed (see above); unset STEADYDANCER_FETCH to start without it"

  config=${STEADYDANCER_EXTRA_PATHS:-${TMPDIR:-/tmp}/steadydancer/extra_model_paths.yaml}
  write_extra_model_paths "$models_dir" "$config"

  # The worker talks to ComfyUI over loopback; nothing else may reach it on RunPod (ComfyUI
  # has no login: anyone reaching it could queue work, upload files and read the outputs).
  local listen=${COMFYUI_LISTEN:-0.0.0.0}
  if [[ "$mode" == runpod ]]; then
    if [[ -n "${COMFYUI_LISTEN:-}" && "$COMFYUI_LISTEN" != 127.0.0.1 ]]; then
      log "COMFYUI_LISTEN=$COMFYUI_LISTEN ignored: in runpod mode ComfyUI listens on 127.0.0.1 only"
    fi
    listen=127.0.0.1
  fi
  local cmd_text
  local -a cmd=()
  cmd_text=$(comfyui_command "$listen" "$config") || exit 1
  mapfile -t cmd <<<"$cmd_text"
  log "starting: ${cmd[*]}"
  cd "$COMFYUI_DIR"
  if [[ "$mode" == runpod ]]; then
    run_worker "${cmd[@]}"
  else
    exec "${cmd[@]}"
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
