"""Fetch the model files that docker/models.yaml lists into a ComfyUI models folder.

Downloads resume where they stopped, are retried with a growing pause, and are checked for
size and SHA-256 before they are moved into place (the manifest's values, else the Hub's
LFS metadata). A plain-URL download counts its bytes against the server's Content-Length
and Content-Range: a dropped connection, a server that sends less than it announced, one
that stalls (less than 1 KB/s for 60 s) or answers a Range request with another range never
puts a file under its final name; the bytes received so far are kept and the next attempt
asks for the rest (Range), checking the Content-Range it gets. A file already in place is checked once and remembered in
`<models>/.steadydancer-fetch.json`, so a restart does not hash 17 GB again. A gated or
private repository without HF_TOKEN, a file missing from a repository, a full disk: each is
one clear message, never a traceback.

usage:
  python fetch_models.py --models-dir /models --select default
  python fetch_models.py --list
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

MANIFEST = Path(__file__).with_name("models.yaml")
STATE_FILE = ".steadydancer-fetch.json"
DOWNLOADS_DIR = ".downloads"
_CHUNK = 8 * 1024 * 1024


class FetchError(Exception):
    """A model could not be fetched; the message says what to do."""


class ManifestError(FetchError):
    """models.yaml (or the selection) is wrong."""


class ChecksumError(FetchError):
    """A file's size or SHA-256 is not the expected one."""


class FatalDownloadError(FetchError):
    """Retrying cannot help (gated, not found, no space)."""


class TransferError(FetchError):
    """The transfer broke off or the server's answer does not add up; retried (resuming)."""


@dataclass(frozen=True)
class ModelEntry:
    """One file of the manifest."""

    name: str
    folder: str
    repo: str | None = None
    file: str | None = None
    pattern: str | None = None
    url: str | None = None
    revision: str = "main"
    target: str | None = None
    size: int | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None

    @property
    def source(self) -> str:
        if self.url:
            return self.url
        return f"{self.repo}/{self.file or self.pattern}@{self.revision}"


@dataclass
class Manifest:
    models: dict[str, ModelEntry]
    groups: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class RemoteFile:
    """A file resolved at its source: its path there and what the source says about it."""

    path: str
    size: int | None = None
    sha256: str | None = None


_ENTRY_KEYS = {f for f in ModelEntry.__dataclass_fields__ if f != "name"}


def _entry(name: str, raw: Any) -> ModelEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"models.{name}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise ManifestError(f"models.{name}: unknown keys {sorted(unknown)}; known: {sorted(_ENTRY_KEYS)}")
    if not raw.get("folder"):
        raise ManifestError(f"models.{name}: `folder` (the ComfyUI models subfolder) is required")
    if raw.get("url"):
        if raw.get("repo"):
            raise ManifestError(f"models.{name}: give either `url` or `repo`, not both")
    elif not raw.get("repo") or bool(raw.get("file")) == bool(raw.get("pattern")):
        raise ManifestError(f"models.{name}: needs `url`, or `repo` with exactly one of `file`/`pattern`")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ManifestError(f"models.{name}: size must be a positive number of bytes or null")
    for key in ("sha256", "sha256_prefix"):
        value = raw.get(key)
        if value is not None and (
            not isinstance(value, str) or any(c not in "0123456789abcdef" for c in value.lower())
            or (key == "sha256" and len(value) != 64)
        ):
            raise ManifestError(f"models.{name}: {key} must be hexadecimal (64 digits for sha256) or null")
    values = {k: v for k, v in raw.items() if v is not None}
    for key in ("sha256", "sha256_prefix"):
        if key in values:
            values[key] = values[key].lower()
    return ModelEntry(name=name, **values)


def load_manifest(path: Path = MANIFEST) -> Manifest:
    """Read and validate a manifest file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ManifestError(f"{path}: expected a `models:` mapping")
    models = {name: _entry(name, raw) for name, raw in data["models"].items()}
    groups = data.get("groups") or {}
    for group, members in groups.items():
        if group in models or group == "all":
            raise ManifestError(f"{path}: group {group!r} has the name of a model (or 'all')")
        missing = [m for m in members or [] if m not in models]
        if missing:
            raise ManifestError(f"{path}: group {group!r} names unknown models {missing}")
    return Manifest(models=models, groups={g: list(m or []) for g, m in groups.items()})


def select(manifest: Manifest, selection: str) -> list[ModelEntry]:
    """Entries for a comma-separated list of model names, group names, or `all` (in order)."""
    names: list[str] = []
    for token in (t.strip() for t in selection.split(",")):
        if not token:
            continue
        if token == "all":
            names.extend(manifest.models)
        elif token in manifest.groups:
            names.extend(manifest.groups[token])
        elif token in manifest.models:
            names.append(token)
        else:
            raise ManifestError(
                f"unknown model or group {token!r}; groups: {', '.join(sorted(manifest.groups))}, all; "
                f"models: {', '.join(manifest.models)}"
            )
    if not names:
        raise ManifestError("nothing selected: name models or groups, e.g. --select default")
    return [manifest.models[n] for n in dict.fromkeys(names)]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, size: int | None, sha256: str | None, sha256_prefix: str | None = None) -> str:
    """Check a file's size and hash; returns its SHA-256. Raises ChecksumError."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{path.name}: {actual_size} bytes, expected {size}")
    digest = sha256_of(path)
    if sha256 and digest != sha256:
        raise ChecksumError(f"{path.name}: SHA-256 {digest}, expected {sha256}")
    if sha256_prefix and not digest.startswith(sha256_prefix):
        raise ChecksumError(f"{path.name}: SHA-256 {digest} does not start with {sha256_prefix}")
    return digest


class Backend(Protocol):
    """Where files come from (Hugging Face, plain URLs, or a fake in tests)."""

    def resolve(self, entry: ModelEntry) -> RemoteFile: ...

    def download(self, entry: ModelEntry, remote: RemoteFile, dest_dir: Path, force: bool) -> Path: ...


def _hf_errors() -> dict[str, type[BaseException]]:
    from huggingface_hub import errors

    names = ("GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError",
             "EntryNotFoundError", "RemoteEntryNotFoundError", "DisabledRepoError")
    return {n: getattr(errors, n) for n in names if hasattr(errors, n)}


class HubBackend:
    """Files from the Hugging Face Hub (huggingface_hub: resumable downloads into a folder)."""

    def __init__(self, token: str | None) -> None:
        from huggingface_hub import HfApi

        self.token = token or None
        self.api = HfApi(token=self.token)
        self.errors = _hf_errors()

    def _translate(self, exc: BaseException, entry: ModelEntry) -> BaseException:
        """Hub errors that retrying cannot fix, as one message saying what to do."""
        kind = type(exc)
        e = self.errors
        url = f"https://huggingface.co/{entry.repo}"
        if "GatedRepoError" in e and issubclass(kind, e["GatedRepoError"]):
            if self.token:
                return FatalDownloadError(
                    f"{entry.repo} is gated and HF_TOKEN has no access to it: accept its terms at {url} "
                    "with the account the token belongs to"
                )
            return FatalDownloadError(
                f"{entry.repo} is gated: accept its terms at {url}, then pass a token as HF_TOKEN "
                "(a read token from https://huggingface.co/settings/tokens)"
            )
        if "RepositoryNotFoundError" in e and issubclass(kind, e["RepositoryNotFoundError"]):
            hint = "check the repo id in models.yaml" if self.token else "if it is private, set HF_TOKEN"
            return FatalDownloadError(f"repository {entry.repo} not found or not accessible: {hint}")
        if "RevisionNotFoundError" in e and issubclass(kind, e["RevisionNotFoundError"]):
            return FatalDownloadError(f"{entry.repo} has no revision {entry.revision!r}")
        if any(n in e and issubclass(kind, e[n]) for n in ("EntryNotFoundError", "RemoteEntryNotFoundError")):
            return FatalDownloadError(
                f"{entry.repo} has no file {entry.file or entry.pattern!r} at {entry.revision}: "
                "models.yaml is out of date"
            )
        if "DisabledRepoError" in e and issubclass(kind, e["DisabledRepoError"]):
            return FatalDownloadError(f"{entry.repo} has been disabled on the Hub")
        return exc

    def resolve(self, entry: ModelEntry) -> RemoteFile:
        try:
            path = entry.file or self._match(entry)
            infos = self.api.get_paths_info(entry.repo, [path], expand=True, revision=entry.revision)
        except Exception as exc:
            raise self._translate(exc, entry) from None
        if not infos:
            raise FatalDownloadError(f"{entry.repo} has no file {path!r}: models.yaml is out of date")
        info = infos[0]
        lfs = getattr(info, "lfs", None)
        size = getattr(lfs, "size", None) or getattr(info, "size", None)
        sha256 = getattr(lfs, "sha256", None)
        return RemoteFile(path=path, size=size, sha256=sha256)

    def _match(self, entry: ModelEntry) -> str:
        files = self.api.list_repo_files(entry.repo, revision=entry.revision)
        return match_pattern(entry, files)

    def download(self, entry: ModelEntry, remote: RemoteFile, dest_dir: Path, force: bool) -> Path:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(
                entry.repo, remote.path, revision=entry.revision, local_dir=dest_dir,
                token=self.token, force_download=force,
            ))
        except Exception as exc:
            raise self._translate(exc, entry) from None


def match_pattern(entry: ModelEntry, files: Iterable[str]) -> str:
    """The one file of a repository that matches the entry's glob pattern."""
    matches = sorted(f for f in files if fnmatch.fnmatchcase(f, entry.pattern or ""))
    if len(matches) != 1:
        found = ", ".join(matches) if matches else "none"
        raise FatalDownloadError(
            f"{entry.name}: pattern {entry.pattern!r} must match exactly one file of {entry.repo}, "
            f"matched {found}: update models.yaml"
        )
    return matches[0]


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


def parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) of a Content-Range header; None where it says `*`. Raises
    TransferError for a missing or malformed header."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        raise TransferError(f"the server answered a Range request with Content-Range {value!r}")
    first, last, total = match.groups()
    return (None if first is None else int(first), None if last is None else int(last),
            None if total in (None, "*") else int(total))


def _content_length(headers: Any) -> int | None:
    value = headers.get("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None


class UrlBackend:
    """Files from a plain HTTP(S) URL, resumed with a Range request.

    Nothing reaches the returned path unless the bytes received add up to what the server
    announced (Content-Length, or Content-Range's range and total when resuming): a short
    transfer raises TransferError and keeps the partial file for the next attempt.
    """

    def __init__(self, timeout: float = 60.0, stall_seconds: float = 60.0, min_rate: float = 1024.0,
                 log: Callable[[str], None] | None = None) -> None:
        self.timeout = timeout  # per socket operation (connect, each read)
        self.stall_seconds, self.min_rate = stall_seconds, min_rate  # slower than this for that long: stalled
        self.log = log or (lambda message: None)

    def resolve(self, entry: ModelEntry) -> RemoteFile:
        return RemoteFile(path=entry.url or "")

    def download(self, entry: ModelEntry, remote: RemoteFile, dest_dir: Path, force: bool) -> Path:
        dest_dir.mkdir(parents=True, exist_ok=True)
        name = entry.url.rsplit("/", 1)[-1] if entry.url else entry.name
        final, part = dest_dir / name, dest_dir / (name + ".part")
        if force:
            part.unlink(missing_ok=True)
        start = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(entry.url or "", headers={"Range": f"bytes={start}-"} if start else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                offset, expected_body, total = self._plan(response, start, part, entry)
                with open(part, "ab" if offset else "wb") as out:
                    received = self._copy(response, out, entry)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and start:
                return self._range_not_satisfiable(exc, start, part, final, entry)
            if exc.code in (401, 403, 404, 410):
                raise FatalDownloadError(f"{entry.url}: HTTP {exc.code} {exc.reason}") from None
            raise TransferError(f"{entry.url}: HTTP {exc.code} {exc.reason}") from None
        if expected_body is not None and received != expected_body:
            raise TransferError(
                f"{entry.name}: the connection ended after {offset + received} of "
                f"{total if total is not None else offset + expected_body} bytes (kept for resuming)"
            )
        size = part.stat().st_size
        if total is not None and size != total:
            part.unlink(missing_ok=True)  # the pieces do not make the file: start again
            raise TransferError(f"{entry.name}: {size} bytes on disk, the server says {total}: starting again")
        if total is None and entry.size is None and entry.sha256 is None:
            self.log(f"{entry.name}: the server gave no length and models.yaml no size or hash: "
                     "the file cannot be checked")
        part.replace(final)
        return final

    def _plan(self, response: Any, start: int, part: Path, entry: ModelEntry) -> tuple[int, int | None, int | None]:
        """(offset the body starts at, bytes the body should have, size of the whole file)."""
        status = getattr(response, "status", 200)
        if start and status == 206:
            try:
                first, last, total = parse_content_range(response.headers.get("Content-Range"))
            except TransferError:
                part.unlink(missing_ok=True)  # the answer cannot be placed: start again
                raise
            if first != start or last is None:
                part.unlink(missing_ok=True)
                raise TransferError(f"{entry.name}: asked for bytes {start}- and got "
                                    f"{response.headers.get('Content-Range')!r}: starting again")
            body = last - first + 1
            length = _content_length(response.headers)
            if length is not None and length != body:
                raise TransferError(f"{entry.name}: Content-Length {length} does not match Content-Range")
            self._check_total(entry, total)
            return start, body, total
        if status == 206:
            raise TransferError(f"{entry.name}: HTTP 206 to a request without Range")
        if status != 200:
            raise TransferError(f"{entry.url}: HTTP {status}")
        if start:
            self.log(f"{entry.name}: the server ignored the Range request: downloading from the start")
        length = _content_length(response.headers)
        self._check_total(entry, length)
        return 0, length, length

    @staticmethod
    def _check_total(entry: ModelEntry, total: int | None) -> None:
        if total is not None and entry.size is not None and total != entry.size:
            raise FatalDownloadError(
                f"{entry.name}: {entry.url} is {total} bytes, models.yaml says {entry.size}: "
                "the file changed upstream; update models.yaml"
            )

    def _copy(self, response: Any, out: Any, entry: ModelEntry) -> int:
        """Copy the body; raises TransferError when it is slower than min_rate for stall_seconds."""
        received = 0
        window_start, window_bytes = time.monotonic(), 0
        read = getattr(response, "read1", None) or response.read
        while True:
            chunk = read(_CHUNK)
            if not chunk:
                return received
            out.write(chunk)
            received += len(chunk)
            window_bytes += len(chunk)
            now = time.monotonic()
            if now - window_start >= self.stall_seconds:
                if window_bytes < self.min_rate * self.stall_seconds:
                    out.flush()
                    raise TransferError(f"{entry.name}: stalled ({window_bytes} bytes in "
                                        f"{now - window_start:.0f} s; kept for resuming)")
                window_start, window_bytes = now, 0

    def _range_not_satisfiable(self, exc: urllib.error.HTTPError, start: int, part: Path, final: Path,
                               entry: ModelEntry) -> Path:
        """416 to `Range: bytes=<start>-`: complete only if the server's total is exactly `start`."""
        try:
            _, _, total = parse_content_range(exc.headers.get("Content-Range"))
        except TransferError:
            total = None
        if total == start and (entry.size is None or entry.size == total):
            part.replace(final)
            return final
        part.unlink(missing_ok=True)
        raise TransferError(f"{entry.name}: the server refused bytes {start}- (its size: "
                            f"{total if total is not None else 'not given'}): starting again") from None


class State:
    """Files already verified: relative path -> size, mtime and SHA-256 when checked."""

    def __init__(self, models_dir: Path) -> None:
        self.path = models_dir / STATE_FILE
        try:
            self.data: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def known_good(self, rel: str, path: Path, sha256: str | None) -> bool:
        record = self.data.get(rel)
        if not record or not path.exists():
            return False
        stat = path.stat()
        same_file = record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns
        return same_file and (sha256 is None or record.get("sha256") == sha256)

    def remember(self, rel: str, path: Path, sha256: str) -> None:
        stat = path.stat()
        self.data[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


@dataclass
class Fetcher:
    """Fetches manifest entries into `models_dir/<folder>/<file name>`."""

    models_dir: Path
    hub: Backend | None = None
    url: Backend | None = None
    retries: int = 4
    backoff: float = 5.0
    log: Callable[[str], None] = lambda message: print(f"[fetch] {message}", file=sys.stderr, flush=True)
    sleep: Callable[[float], None] = time.sleep

    def backend(self, entry: ModelEntry) -> Backend:
        if entry.url:
            self.url = self.url or UrlBackend(log=self.log)
            return self.url
        if self.hub is None:
            self.hub = HubBackend(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
        return self.hub

    def target(self, entry: ModelEntry, remote: RemoteFile | None = None) -> Path:
        name = entry.target or Path(entry.file or (remote.path if remote else "") or entry.url or "").name
        return self.models_dir / entry.folder / name

    def fetch(self, entry: ModelEntry) -> Path:
        """Make sure the entry's file is in place and verified; returns its path."""
        state = State(self.models_dir)
        # A file whose name and hash the manifest fixes needs no network when already there.
        if not entry.pattern:
            target = self.target(entry)
            rel = str(target.relative_to(self.models_dir))
            if target.exists() and state.known_good(rel, target, entry.sha256):
                self.log(f"{entry.name}: {rel} already verified")
                return target
        remote = self._with_retries(entry, lambda: self.backend(entry).resolve(entry))
        size, sha256 = self._expected(entry, remote)
        target = self.target(entry, remote)
        rel = str(target.relative_to(self.models_dir))
        if target.exists():
            if state.known_good(rel, target, sha256):
                self.log(f"{entry.name}: {rel} already verified")
                return target
            try:
                digest = verify(target, size, sha256, entry.sha256_prefix)
            except ChecksumError as exc:
                self.log(f"{entry.name}: the file in place is not the expected one ({exc}): fetching it again")
            else:
                state.remember(rel, target, digest)
                self.log(f"{entry.name}: {rel} present and verified")
                return target
        self._check_space(entry, target, size)
        staging = self.models_dir / DOWNLOADS_DIR / entry.name
        self.log(f"{entry.name}: downloading {entry.source} -> {rel}")

        def attempt(force: bool) -> Path:
            path = self.backend(entry).download(entry, remote, staging, force)
            try:
                digest = verify(path, size, sha256, entry.sha256_prefix)
            except ChecksumError:
                path.unlink(missing_ok=True)
                raise
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            state.remember(rel, target, digest)
            return target

        result = self._with_retries(entry, attempt, pass_force=True)
        shutil.rmtree(staging, ignore_errors=True)
        if sha256 is None and entry.sha256_prefix is None:
            self.log(f"{entry.name}: no published SHA-256: only the size could be checked")
        self.log(f"{entry.name}: {rel} ready")
        return result

    def _expected(self, entry: ModelEntry, remote: RemoteFile) -> tuple[int | None, str | None]:
        """Size and hash to check: the manifest's, which must agree with the source's."""
        for what, ours, theirs in (("size", entry.size, remote.size), ("SHA-256", entry.sha256, remote.sha256)):
            if ours is not None and theirs is not None and ours != theirs:
                raise FatalDownloadError(
                    f"{entry.name}: models.yaml says {what} {ours}, {entry.source} says {theirs}: "
                    "the file changed upstream; update models.yaml"
                )
        return entry.size or remote.size, entry.sha256 or remote.sha256

    def _check_space(self, entry: ModelEntry, target: Path, size: int | None) -> None:
        if size is None:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
        if free < size:
            raise FatalDownloadError(
                f"{entry.name}: needs {size / 1e9:.1f} GB, only {free / 1e9:.1f} GB free in {target.parent}"
            )

    def _with_retries(self, entry: ModelEntry, action: Callable[..., Any], pass_force: bool = False) -> Any:
        force = False
        for attempt in range(self.retries + 1):
            try:
                return action(force) if pass_force else action()
            except (FatalDownloadError, ManifestError):
                raise
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                # A corrupt file must not be resumed: the next attempt starts from zero. A broken
                # transfer (TransferError, a reset, a timeout) resumes from what arrived.
                force = isinstance(exc, ChecksumError)
                if attempt == self.retries:
                    raise FetchError(
                        f"{entry.name}: giving up after {self.retries + 1} attempts: {exc}"
                    ) from None
                pause = self.backoff * 2**attempt
                self.log(f"{entry.name}: attempt {attempt + 1} failed ({exc}); retrying in {pause:.0f} s")
                self.sleep(pause)
        raise AssertionError("unreachable")


def fetch_all(fetcher: Fetcher, entries: list[ModelEntry]) -> list[tuple[ModelEntry, str]]:
    """Fetch every entry; returns the failures (entry, message). One failure does not stop the rest."""
    failures = []
    for entry in entries:
        try:
            fetcher.fetch(entry)
        except FetchError as exc:
            failures.append((entry, str(exc)))
            fetcher.log(f"error: {exc}")
        except OSError as exc:
            failures.append((entry, f"{entry.name}: {exc}"))
            fetcher.log(f"error: {entry.name}: {exc}")
    return failures


def describe(manifest: Manifest, models_dir: Path | None) -> str:
    lines = []
    for name, members in manifest.groups.items():
        lines.append(f"group {name}: {', '.join(members)}")
    for entry in manifest.models.values():
        size = f"{entry.size / 1e9:.1f} GB" if entry.size else "size ?"
        where = f"{entry.folder}/"
        present = ""
        if models_dir is not None and entry.file:
            present = " [present]" if (models_dir / entry.folder / Path(entry.file).name).exists() else ""
        lines.append(f"{entry.name:22} {size:>9}  {where:18} {entry.source}{present}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("MODELS_DIR", "models")))
    parser.add_argument("--select", default="default", help="model or group names, comma-separated, or all")
    parser.add_argument("--retries", type=int, default=4)
    parser.add_argument("--list", action="store_true", help="list the manifest and exit")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
        if args.list:
            print(describe(manifest, args.models_dir))
            return 0
        entries = select(manifest, args.select)
    except ManifestError as exc:
        print(f"[fetch] error: {exc}", file=sys.stderr)
        return 2
    try:
        args.models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"[fetch] error: cannot create {args.models_dir}: {exc}", file=sys.stderr)
        return 1
    if not os.access(args.models_dir, os.W_OK):
        print(f"[fetch] error: {args.models_dir} is not writable by uid {os.getuid()}", file=sys.stderr)
        return 1
    fetcher = Fetcher(args.models_dir, retries=args.retries)
    failures = fetch_all(fetcher, entries)
    if failures:
        print(f"[fetch] {len(failures)} of {len(entries)} models failed:", file=sys.stderr)
        for _, message in failures:
            print(f"[fetch]   {message}", file=sys.stderr)
        return 1
    print(f"[fetch] {len(entries)} models ready in {args.models_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
