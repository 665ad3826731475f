"""The container's model fetcher (docker/fetch_models.py) and its manifest (docker/models.yaml).

Downloads go through a fake backend (or a local HTTP server for the URL backend): what is
tested is the fetcher's own logic, resuming, checking, retrying and its messages.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from docker_modules import load_docker_module

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


fm = load_docker_module("fetch_models")

GOOD = b"steadydancer weights " * 1000
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


class FakeBackend:
    """Serves `files` {path: bytes}; `failures` transient errors happen first; counts calls."""

    def __init__(self, files: dict[str, bytes], *, failures: int = 0, sha256: str | None = None,
                 size: int | None = None, corrupt_first: bool = False) -> None:
        self.files, self.failures = files, failures
        self.sha256, self.size, self.corrupt_first = sha256, size, corrupt_first
        self.resolves = self.downloads = 0
        self.forced: list[bool] = []

    def resolve(self, entry):
        self.resolves += 1
        path = entry.file or fm.match_pattern(entry, self.files)
        return fm.RemoteFile(path=path, size=self.size, sha256=self.sha256)

    def download(self, entry, remote, dest_dir, force):
        self.downloads += 1
        self.forced.append(force)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection reset by peer")
        dest = Path(dest_dir) / remote.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = self.files[remote.path]
        if self.corrupt_first:
            self.corrupt_first = False
            data = b"x" * len(data)
        dest.write_bytes(data)
        return dest


def entry(**kw):
    values = {"name": "dit", "folder": "diffusion_models", "repo": "org/repo", "file": "sub/dit.gguf"}
    values.update(kw)
    return fm.ModelEntry(**values)


def fetcher(tmp_path, backend, **kw):
    messages: list[str] = []
    f = fm.Fetcher(tmp_path, hub=backend, url=backend, retries=kw.pop("retries", 3), backoff=1.0,
                   log=messages.append, sleep=kw.pop("sleep", lambda s: None), **kw)
    return f, messages


# --- manifest -----------------------------------------------------------------------------

def test_shipped_manifest_is_valid_and_its_groups_resolve():
    manifest = fm.load_manifest(DOCKER / "models.yaml")
    default = fm.select(manifest, "default")
    folders = {e.folder for e in default}
    assert {"diffusion_models", "text_encoders", "clip_vision", "vae", "dwpose"} <= folders
    assert len(fm.select(manifest, "all")) == len(manifest.models)
    for e in manifest.models.values():
        assert e.size is None or e.size > 0
        assert e.sha256 is None or len(e.sha256) == 64


def test_manifest_folders_are_ones_the_entrypoint_registers():
    manifest = fm.load_manifest(DOCKER / "models.yaml")
    text = (DOCKER / "entrypoint.sh").read_text()
    registered = set()
    in_block = False
    for line in text.splitlines():
        if line.startswith("MODEL_FOLDERS=("):
            in_block = True
            continue
        if in_block:
            if line.startswith(")"):
                break
            registered |= {item.strip('"').split(":")[1] for item in line.split()}
    assert {e.folder for e in manifest.models.values()} <= registered


def test_default_models_are_the_files_the_bundled_workflow_loads():
    """`STEADYDANCER_FETCH=default` must provide what workflows/api/steadydancer_api.json asks for."""
    manifest = fm.load_manifest(DOCKER / "models.yaml")
    provided = {Path(e.target or e.file or "").name for e in fm.select(manifest, "default")}
    workflow = json.loads((REPO / "workflows" / "api" / "steadydancer_api.json").read_text())
    wanted = {
        node["inputs"][key]
        for node in workflow.values()
        for key in ("clip_name", "vae_name")
        if isinstance(node["inputs"].get(key), str)
    }
    assert wanted <= provided, f"missing from the default group: {sorted(wanted - provided)}"


def test_default_diffusion_model_is_the_one_the_bundled_workflow_loads():
    manifest = fm.load_manifest(DOCKER / "models.yaml")
    provided = {Path(e.target or e.file or "").name for e in fm.select(manifest, "default")}
    workflow = json.loads((REPO / "workflows" / "api" / "steadydancer_api.json").read_text())
    names = {n["inputs"]["model_name"] for n in workflow.values() if n["class_type"] == "SteadyDancerModelLoader"}
    assert names <= provided


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: []", "expected a `models:` mapping"),
        ("models: {a: {repo: x/y, file: f}}", "`folder`"),
        ("models: {a: {folder: vae, repo: x/y}}", "exactly one of `file`/`pattern`"),
        ("models: {a: {folder: vae, repo: x/y, file: f, pattern: '*'}}", "exactly one of"),
        ("models: {a: {folder: vae, url: 'https://x/f', repo: x/y}}", "either `url` or `repo`"),
        ("models: {a: {folder: vae, repo: x/y, file: f, size: -3}}", "size must be"),
        ("models: {a: {folder: vae, repo: x/y, file: f, sha256: abc}}", "64 digits"),
        ("models: {a: {folder: vae, repo: x/y, file: f, colour: red}}", "unknown keys"),
        ("models: {a: {folder: vae, repo: x/y, file: f}}\ngroups: {g: [b]}", "unknown models ['b']"),
        ("models: {a: {folder: vae, repo: x/y, file: f}}\ngroups: {a: [a]}", "has the name of a model"),
        ("models: {a: [", "not valid YAML"),
    ],
)
def test_bad_manifests_are_named(tmp_path, text, message):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(fm.ManifestError) as info:
        fm.load_manifest(path)
    assert message in str(info.value)


def test_selection_by_group_name_and_all_keeps_order_without_duplicates(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({
        "groups": {"g": ["b", "a"]},
        "models": {n: {"folder": "vae", "repo": "x/y", "file": n} for n in ("a", "b", "c")},
    }))
    manifest = fm.load_manifest(path)
    assert [e.name for e in fm.select(manifest, "g, c, a")] == ["b", "a", "c"]
    assert [e.name for e in fm.select(manifest, "all")] == ["a", "b", "c"]
    with pytest.raises(fm.ManifestError, match=r"unknown model or group 'd'.*groups: g"):
        fm.select(manifest, "d")
    with pytest.raises(fm.ManifestError, match="nothing selected"):
        fm.select(manifest, " , ")


# --- fetching -----------------------------------------------------------------------------

def test_fetch_downloads_verifies_and_places_the_file(tmp_path):
    backend = FakeBackend({"sub/dit.gguf": GOOD}, sha256=GOOD_SHA, size=len(GOOD))
    f, _ = fetcher(tmp_path, backend)
    path = f.fetch(entry())
    assert path == tmp_path / "diffusion_models" / "dit.gguf"
    assert path.read_bytes() == GOOD
    assert not (tmp_path / fm.DOWNLOADS_DIR / "dit").exists()  # staging removed
    state = json.loads((tmp_path / fm.STATE_FILE).read_text())
    assert state["diffusion_models/dit.gguf"]["sha256"] == GOOD_SHA


def test_a_verified_file_is_not_downloaded_or_hashed_again(tmp_path, monkeypatch):
    backend = FakeBackend({"sub/dit.gguf": GOOD}, sha256=GOOD_SHA)
    f, messages = fetcher(tmp_path, backend)
    f.fetch(entry(sha256=GOOD_SHA))
    monkeypatch.setattr(fm, "sha256_of", lambda p: pytest.fail("hashed again"))
    f.fetch(entry(sha256=GOOD_SHA))
    assert backend.downloads == 1
    assert backend.resolves == 1  # no network at all the second time
    assert "already verified" in messages[-1]


def test_a_file_changed_on_disk_is_checked_again(tmp_path):
    backend = FakeBackend({"sub/dit.gguf": GOOD}, sha256=GOOD_SHA)
    f, messages = fetcher(tmp_path, backend)
    path = f.fetch(entry())
    path.write_bytes(b"truncated")
    f.fetch(entry())
    assert path.read_bytes() == GOOD
    assert backend.downloads == 2
    assert any("not the expected one" in m for m in messages)


def test_a_file_put_in_place_by_hand_is_accepted_when_it_checks_out(tmp_path):
    target = tmp_path / "diffusion_models" / "dit.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(GOOD)
    backend = FakeBackend({"sub/dit.gguf": GOOD}, sha256=GOOD_SHA, size=len(GOOD))
    f, _ = fetcher(tmp_path, backend)
    f.fetch(entry())
    assert backend.downloads == 0


def test_transient_errors_are_retried_with_growing_pauses(tmp_path):
    pauses: list[float] = []
    backend = FakeBackend({"sub/dit.gguf": GOOD}, failures=2, sha256=GOOD_SHA)
    f, _ = fetcher(tmp_path, backend, sleep=pauses.append)
    f.fetch(entry())
    assert pauses == [1.0, 2.0]
    assert backend.downloads == 3


def test_giving_up_names_the_model_and_the_last_error(tmp_path):
    backend = FakeBackend({"sub/dit.gguf": GOOD}, failures=10)
    f, _ = fetcher(tmp_path, backend, retries=2)
    with pytest.raises(fm.FetchError, match=r"dit: giving up after 3 attempts: connection reset"):
        f.fetch(entry())


def test_a_corrupt_download_is_fetched_again_from_scratch(tmp_path):
    backend = FakeBackend({"sub/dit.gguf": GOOD}, sha256=GOOD_SHA, corrupt_first=True)
    f, _ = fetcher(tmp_path, backend)
    assert f.fetch(entry()).read_bytes() == GOOD
    assert backend.forced == [False, True]  # the retry does not resume the bad partial file


def test_size_mismatch_fails_and_leaves_nothing_in_place(tmp_path):
    backend = FakeBackend({"sub/dit.gguf": GOOD})
    f, _ = fetcher(tmp_path, backend, retries=1)
    with pytest.raises(fm.FetchError, match=r"bytes, expected 5"):
        f.fetch(entry(size=5))
    assert not (tmp_path / "diffusion_models" / "dit.gguf").exists()


def test_manifest_and_hub_disagreeing_is_fatal_without_retries(tmp_path):
    backend = FakeBackend({"sub/dit.gguf": GOOD}, sha256="0" * 64)
    f, _ = fetcher(tmp_path, backend)
    with pytest.raises(fm.FatalDownloadError, match=r"changed upstream; update models\.yaml"):
        f.fetch(entry(sha256=GOOD_SHA))
    assert backend.downloads == 0


def test_not_enough_space_is_said_before_downloading(tmp_path, monkeypatch):
    backend = FakeBackend({"sub/dit.gguf": GOOD}, size=20 * 10**9)
    monkeypatch.setattr(fm.shutil, "disk_usage", lambda p: type("U", (), {"free": 10**9})())
    f, _ = fetcher(tmp_path, backend)
    with pytest.raises(fm.FatalDownloadError, match=r"needs 20.0 GB, only 1.0 GB free"):
        f.fetch(entry())


def test_openmmlab_hash_prefix_is_checked(tmp_path):
    backend = FakeBackend({"sub/dit.gguf": GOOD})
    f, _ = fetcher(tmp_path, backend, retries=0)
    with pytest.raises(fm.FetchError, match="does not start with deadbeef"):
        f.fetch(entry(sha256_prefix="deadbeef"))
    assert f.fetch(entry(sha256_prefix=GOOD_SHA[:8])).read_bytes() == GOOD


def test_patterns_must_match_exactly_one_file(tmp_path):
    files = {"a-Q4_K_M.gguf": GOOD, "a-Q8_0.gguf": GOOD, "b-Q8_0.gguf": GOOD}
    f, _ = fetcher(tmp_path, FakeBackend(files))
    assert f.fetch(entry(file=None, pattern="*-Q4_K_M*.gguf")).name == "a-Q4_K_M.gguf"
    with pytest.raises(fm.FatalDownloadError, match=r"matched a-Q8_0\.gguf, b-Q8_0\.gguf"):
        f.fetch(entry(file=None, pattern="*Q8_0*"))
    with pytest.raises(fm.FatalDownloadError, match="matched none"):
        f.fetch(entry(file=None, pattern="*Q2_K*"))


def test_one_failure_does_not_stop_the_others(tmp_path):
    backend = FakeBackend({"sub/dit.gguf": GOOD, "vae.st": b"vae"})
    f, _ = fetcher(tmp_path, backend, retries=0)
    failures = fm.fetch_all(f, [entry(size=1), entry(name="vae", folder="vae", file="vae.st")])
    assert [e.name for e, _ in failures] == ["dit"]
    assert (tmp_path / "vae" / "vae.st").read_bytes() == b"vae"


# --- Hugging Face errors ------------------------------------------------------------------

def _hub_error(name: str):
    errors = pytest.importorskip("huggingface_hub.errors")
    import httpx2 as httpx  # what huggingface_hub 2.x builds its errors from
    response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/x"))
    return getattr(errors, name)("401 Client Error", response=response)


@pytest.fixture
def hub_backend():
    pytest.importorskip("huggingface_hub")
    pytest.importorskip("httpx2")
    return fm.HubBackend


def test_gated_repo_without_token_says_how_to_get_access(hub_backend):
    message = str(hub_backend(None)._translate(_hub_error("GatedRepoError"), entry(repo="org/gated")))
    assert "org/gated is gated" in message
    assert "https://huggingface.co/org/gated" in message
    assert "HF_TOKEN" in message


def test_gated_repo_with_a_token_without_access_says_so(hub_backend):
    message = str(hub_backend("hf_x")._translate(_hub_error("GatedRepoError"), entry(repo="org/gated")))
    assert "HF_TOKEN has no access" in message


def test_missing_repo_and_missing_file_are_fatal(hub_backend):
    backend = hub_backend(None)
    missing = backend._translate(_hub_error("RepositoryNotFoundError"), entry())
    assert isinstance(missing, fm.FatalDownloadError) and "set HF_TOKEN" in str(missing)
    gone = backend._translate(_hub_error("RemoteEntryNotFoundError"), entry())
    assert isinstance(gone, fm.FatalDownloadError) and "models.yaml is out of date" in str(gone)
    other = ConnectionError("reset")
    assert backend._translate(other, entry()) is other  # transient: retried by the caller


# --- plain URLs, resumed with Range -------------------------------------------------------

class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = GOOD
    requests: ClassVar[list[str | None]] = []

    def do_GET(self):
        header = self.headers.get("Range")
        type(self).requests.append(header)
        start = int(header.split("=")[1].rstrip("-")) if header else 0
        body = self.payload[start:]
        self.send_response(206 if header else 200)
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def range_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    _RangeHandler.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_downloads_resume_a_partial_file(tmp_path, range_server):
    e = fm.ModelEntry(name="det", folder="dwpose", url=f"{range_server}/det-d3bd2b23.pth",
                      sha256_prefix=GOOD_SHA[:8])
    staging = tmp_path / fm.DOWNLOADS_DIR / "det"
    staging.mkdir(parents=True)
    (staging / "det-d3bd2b23.pth.part").write_bytes(GOOD[:1000])
    f = fm.Fetcher(tmp_path, url=fm.UrlBackend(), log=lambda m: None)
    path = f.fetch(e)
    assert path == tmp_path / "dwpose" / "det-d3bd2b23.pth"
    assert path.read_bytes() == GOOD
    assert _RangeHandler.requests == ["bytes=1000-"]


def test_cli_lists_and_rejects_unknown_selections(tmp_path, capsys):
    assert fm.main(["--list", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "group default:" in out and "steadydancer-q6_k" in out
    assert fm.main(["--select", "nope", "--models-dir", str(tmp_path)]) == 2
    assert "unknown model or group 'nope'" in capsys.readouterr().err


def test_hub_metadata_gives_the_size_and_hash_to_check(hub_backend):
    from huggingface_hub.hf_api import RepoFile

    class Api:
        def list_repo_files(self, repo, revision):
            return ["README.md", "x-Q4_K_M.gguf", "x-Q8_0.gguf"]

        def get_paths_info(self, repo, paths, expand, revision):
            assert expand and revision == "main"
            return [RepoFile(path=paths[0], size=123, oid="git-oid",
                             lfs={"size": 123, "oid": GOOD_SHA, "pointerSize": 130})]

    backend = hub_backend(None)
    backend.api = Api()
    remote = backend.resolve(entry(file=None, pattern="*-Q4_K_M*.gguf"))
    assert remote == fm.RemoteFile(path="x-Q4_K_M.gguf", size=123, sha256=GOOD_SHA)
