"""The container's entry point (docker/entrypoint.sh) and device check (docker/gpu_check.py).

The shell functions are sourced into bash and called one by one; `main` is run end to end
with a stand-in ComfyUI (a main.py that records its command line) and, for the RunPod mode,
a stand-in worker, so the process supervision is exercised for real.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "docker" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gc = _gpu_check()


def bash(script: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `script` in bash after sourcing the entry point (main does not run when sourced)."""
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHON": sys.executable}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", "-c", f'source "{ENTRYPOINT}"\n{script}'],
        capture_output=True, text=True, env=full_env, timeout=timeout, check=False,
    )


# --- models folder --------------------------------------------------------------------------

def test_models_dir_comes_from_MODELS_DIR_first(tmp_path):
    (tmp_path / "vol").mkdir()
    result = bash("resolve_models_dir", {"MODELS_DIR": "/data/models/", "STEADYDANCER_VOLUMES": str(tmp_path / "vol")})
    assert result.stdout.strip() == "/data/models"


def test_models_dir_prefers_a_volume_comfyui_tree_then_its_models_folder(tmp_path):
    runpod, workspace = tmp_path / "runpod-volume", tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "ComfyUI" / "models").mkdir(parents=True)
    volumes = f"{runpod} {workspace}"
    assert bash("resolve_models_dir", {"STEADYDANCER_VOLUMES": volumes}).stdout.strip() == f"{workspace}/ComfyUI/models"
    runpod.mkdir()  # the serverless volume wins when both exist
    assert bash("resolve_models_dir", {"STEADYDANCER_VOLUMES": volumes}).stdout.strip() == f"{runpod}/models"


def test_models_dir_falls_back_to_comfyuis_own(tmp_path):
    result = bash("resolve_models_dir", {"STEADYDANCER_VOLUMES": str(tmp_path / "none"), "COMFYUI_DIR": "/opt/ComfyUI"})
    assert result.stdout.strip() == "/opt/ComfyUI/models"


def test_extra_model_paths_yaml_points_every_folder_at_the_volume(tmp_path):
    models = tmp_path / "my models: 'v1' #2"  # spaces, colon, quotes and hash survive
    out = tmp_path / "cfg" / "extra.yaml"
    result = bash(f'write_extra_model_paths "{models}" "{out}"')
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(out.read_text())
    section = config["steadydancer_volume"]
    assert section["base_path"] == str(models)
    assert section["is_default"] is True
    assert section["diffusion_models"].split() == ["diffusion_models", "unet"]
    assert section["text_encoders"].split() == ["text_encoders", "clip"]
    for key in ("clip_vision", "vae", "loras", "dwpose", "checkpoints"):
        assert section[key].split() == [key]


def test_model_folders_are_created_and_a_read_only_volume_is_tolerated(tmp_path):
    models = tmp_path / "models"
    assert bash(f'create_model_folders "{models}"').returncode == 0
    assert {"diffusion_models", "unet", "text_encoders", "vae", "dwpose"} <= {p.name for p in models.iterdir()}
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        result = bash(f'create_model_folders "{read_only}"')
        if os.geteuid() != 0:  # root writes anyway
            assert result.returncode == 0
            assert "not writable: using it read-only" in result.stderr
    finally:
        read_only.chmod(0o755)


# --- mode and command line ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("arg", "env", "mode"),
    [("auto", {}, "comfyui"), ("auto", {"RUNPOD_ENDPOINT_ID": "ep1"}, "runpod"), ("runpod", {}, "runpod"),
     ("fetch", {"RUNPOD_ENDPOINT_ID": "ep1"}, "fetch"), ("bash", {}, "bash")],
)
def test_mode(arg, env, mode):
    assert bash(f"resolve_mode {arg}", env).stdout.strip() == mode


def test_command_line_has_the_device_flags_and_the_users_arguments(tmp_path):
    env = {"STEADYDANCER_DEVICE": "cpu", "COMFYUI_PORT": "9001", "COMFYUI_DIR": "/opt/ComfyUI",
           "COMFYUI_ARGS": "--preview-method auto"}
    result = bash('comfyui_command 0.0.0.0 /tmp/x.yaml', env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[1:-1] == [
        "/opt/ComfyUI/main.py", "--listen", "0.0.0.0", "--port", "9001", "--disable-auto-launch",
        "--extra-model-paths-config", "/tmp/x.yaml", "--cpu", "--preview-method", "auto",
    ]
    assert "STEADYDANCER_DEVICE=cpu" in result.stderr  # the reason is logged


def test_users_device_choice_wins_over_the_check():
    result = bash("comfyui_command 0.0.0.0 /tmp/x.yaml", {"STEADYDANCER_DEVICE": "cpu", "COMFYUI_ARGS": "--lowvram"})
    args = result.stdout.split()
    assert "--lowvram" in args and "--cpu" not in args


def test_a_bad_device_setting_stops_the_start():
    result = bash("comfyui_command 0.0.0.0 /tmp/x.yaml", {"STEADYDANCER_DEVICE": "gpu"})
    assert result.returncode != 0
    assert "use one of auto, cpu, lowvram, normal" in result.stderr


# --- main, end to end with a stand-in ComfyUI --------------------------------------------

def _fake_tree(tmp_path: Path, worker: str) -> tuple[Path, Path]:
    """A ComfyUI whose main.py records its argv, and a package dir with a stand-in worker."""
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text(textwrap.dedent(f"""
        import json, os, sys, time
        open({str(tmp_path / 'argv.json')!r}, "w").write(json.dumps(sys.argv[1:]))
        if os.environ.get("FAKE_COMFY_SLEEP"):
            time.sleep(float(os.environ["FAKE_COMFY_SLEEP"]))
    """))
    package = tmp_path / "pkg"
    (package / "docker").mkdir(parents=True)
    for name in ("entrypoint.sh", "gpu_check.py", "fetch_models.py", "models.yaml"):
        shutil.copy(REPO / "docker" / name, package / "docker" / name)
    (package / "docker" / "runpod_handler.py").write_text(worker)
    return comfy, package


def run_main(tmp_path, comfy, package, *args, env=None, timeout=60):
    full_env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
        "COMFYUI_DIR": str(comfy), "STEADYDANCER_DIR": str(package), "MODELS_DIR": str(tmp_path / "models"),
        "STEADYDANCER_DEVICE": "cpu",
    }
    full_env.update(env or {})
    return subprocess.run(["bash", str(package / "docker" / "entrypoint.sh"), *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, check=False)


def test_main_starts_comfyui_with_the_volume_config(tmp_path):
    comfy, package = _fake_tree(tmp_path, "")
    result = run_main(tmp_path, comfy, package)
    assert result.returncode == 0, result.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    config = Path(argv[argv.index("--extra-model-paths-config") + 1])
    assert yaml.safe_load(config.read_text())["steadydancer_volume"]["base_path"] == str(tmp_path / "models")
    assert argv[argv.index("--listen") + 1] == "0.0.0.0"
    assert "--cpu" in argv
    assert (tmp_path / "models" / "diffusion_models").is_dir()
    assert "models folder: " in result.stderr


def test_main_runs_another_command_as_is(tmp_path):
    comfy, package = _fake_tree(tmp_path, "")
    result = run_main(tmp_path, comfy, package, "echo", "hello")
    assert result.stdout == "hello\n"


def test_main_fails_clearly_when_the_fetch_fails(tmp_path):
    comfy, package = _fake_tree(tmp_path, "")
    result = run_main(tmp_path, comfy, package, env={"STEADYDANCER_FETCH": "no-such-model"})
    assert result.returncode != 0
    assert "unknown model or group 'no-such-model'" in result.stderr
    assert "unset STEADYDANCER_FETCH" in result.stderr
    assert not (tmp_path / "argv.json").exists()  # ComfyUI was not started


def test_runpod_mode_stops_comfyui_when_the_worker_exits(tmp_path):
    # The stand-in worker waits until ComfyUI has started, then fails.
    worker = textwrap.dedent(f"""
        import os, pathlib, sys, time
        for _ in range(200):
            if pathlib.Path({str(tmp_path / 'argv.json')!r}).exists():
                break
            time.sleep(0.1)
        print('worker', os.environ['COMFYUI_URL'])
        sys.exit(3)
    """)
    comfy, package = _fake_tree(tmp_path, worker)
    result = run_main(tmp_path, comfy, package, "runpod", env={"FAKE_COMFY_SLEEP": "120", "COMFYUI_PORT": "8199"},
                      timeout=60)
    assert result.returncode == 3
    assert "worker http://127.0.0.1:8199" in result.stdout
    assert "RunPod worker exited (status 3): stopping ComfyUI" in result.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[argv.index("--listen") + 1] == "127.0.0.1"  # the worker's ComfyUI stays private


def test_runpod_mode_keeps_comfyui_on_loopback_whatever_comfyui_listen_says(tmp_path):
    worker = "import time; time.sleep(120)\n"
    comfy, package = _fake_tree(tmp_path, worker)
    (comfy / "main.py").write_text(
        f"import json, sys; open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:])); sys.exit(4)\n"
    )
    result = run_main(tmp_path, comfy, package, "runpod", env={"COMFYUI_LISTEN": "0.0.0.0"}, timeout=60)
    assert result.returncode == 4
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[argv.index("--listen") + 1] == "127.0.0.1"
    assert "COMFYUI_LISTEN=0.0.0.0 ignored" in result.stderr


def test_runpod_mode_stops_the_worker_when_comfyui_exits(tmp_path):
    worker = "import time; time.sleep(120)\n"
    comfy, package = _fake_tree(tmp_path, worker)
    (comfy / "main.py").write_text("import sys; sys.exit(5)\n")
    result = run_main(tmp_path, comfy, package, "runpod", timeout=60)
    assert result.returncode == 5
    assert "ComfyUI exited (status 5): stopping the RunPod worker" in result.stderr


# --- device choice (gpu_check.choose_flags) ---------------------------------------------------

GIB = 1024**3


@pytest.mark.parametrize(
    ("user", "mode", "gpus", "flags", "reason"),
    [
        ([], "auto", [], ["--cpu"], "running on the CPU (very slow): no usable CUDA GPU"),
        ([], "auto", [gc.GPU("NVIDIA H100", 80 * GIB)], [], "GPU NVIDIA H100 with 80.0 GiB"),
        ([], "auto", [gc.GPU("RTX 4060 Ti", 16 * GIB)], ["--lowvram"], "16.0 GiB, below"),
        ([], "normal", [gc.GPU("RTX 4060 Ti", 16 * GIB)], [], "RTX 4060 Ti"),
        ([], "lowvram", [gc.GPU("H100", 80 * GIB)], ["--lowvram"], "STEADYDANCER_DEVICE=lowvram"),
        ([], "cpu", [gc.GPU("H100", 80 * GIB)], ["--cpu"], "STEADYDANCER_DEVICE=cpu"),
        (["--highvram"], "auto", [], [], "COMFYUI_ARGS already choose"),
    ],
)
def test_choose_flags(user, mode, gpus, flags, reason):
    why = None if gpus else "no usable CUDA GPU (Found no NVIDIA driver on your system)"
    got, message = gc.choose_flags(user, mode, gpus, why, 20.0)
    assert got == flags
    assert reason in message


def test_choose_flags_rejects_unknown_modes():
    with pytest.raises(ValueError, match="use one of auto, cpu, lowvram, normal"):
        gc.choose_flags([], "fast", [], None, 20.0)


def test_an_unusable_cuda_is_explained_in_torchs_words():
    class Cuda:
        @staticmethod
        def is_available():
            return False

        @staticmethod
        def init():
            raise RuntimeError("The NVIDIA driver on your system is too old (found version 12040).\nPlease update")

    class Torch:
        __version__ = "2.13.0"
        version = type("V", (), {"cuda": "13.0"})
        cuda = Cuda

    assert gc._cuda_init_error(Torch) == "The NVIDIA driver on your system is too old (found version 12040)."


def test_probe_on_this_machine_gives_a_reason_when_there_is_no_gpu():
    gpus, why = gc.probe_gpus()
    if not gpus:
        assert why  # e.g. "torch 2.13.0+cpu is a CPU build"


def test_fetch_mode_downloads_the_manifests_files_into_the_volume(tmp_path):
    """`entrypoint.sh fetch` end to end: manifest -> fetcher -> file in its ComfyUI folder."""
    import http.server
    import threading

    payload = b"tiny detector weights"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    manifest = tmp_path / "models.yaml"
    manifest.write_text(yaml.safe_dump({"models": {"det": {
        "url": f"http://127.0.0.1:{server.server_address[1]}/yolox.onnx", "folder": "dwpose",
        "size": len(payload)}}}))
    comfy, package = _fake_tree(tmp_path, "")
    try:
        result = run_main(tmp_path, comfy, package, "fetch",
                          env={"STEADYDANCER_FETCH": "det", "STEADYDANCER_MANIFEST": str(manifest)})
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "models" / "dwpose" / "yolox.onnx").read_bytes() == payload
    assert "1 models ready" in result.stderr
    assert not (tmp_path / "argv.json").exists()  # fetch mode does not start ComfyUI
