"""Where outputs and inputs live: a local path, ``file://``, ``s3://`` or ``gs://`` URI, through ``pyarrow.fs``.

Every path option of every command is a string that :func:`location` turns into a :class:`Location`: the URI as
the user wrote it (a local path made absolute), the ``pyarrow.fs`` filesystem that serves it and the path inside
that filesystem. A URI is never turned into a local ``Path`` (``s3://b/x`` would become the folder ``s3:/b/x``),
and a scheme other than these four is refused up front.

S3 credentials and endpoint come from the standard AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for S3-compatible stores, profiles and instance roles); :func:`set_s3_endpoint` (the
commands' ``--s3-endpoint``) overrides the endpoint for this process and, through the environment, for the Ray
workers it starts. Google Cloud credentials come from the standard Google environment.

Writes are atomic per backend (:meth:`Location.write_bytes`): on a local disk a temporary sibling, ``fsync`` and
``rename``; on an object store one PUT, which makes the object visible only once it is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = [
    "SCHEMES",
    "Location",
    "StorageError",
    "is_uri",
    "location",
    "require_bucket",
    "set_s3_endpoint",
]

SCHEMES = ("file", "s3", "gs", "gcs")
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(OSError):
    """A location cannot be used (unknown scheme, unreachable endpoint, missing credentials or bucket, missing
    object); the message names the URI."""


def is_uri(value: str | os.PathLike[str]) -> bool:
    """Whether ``value`` has a scheme (``s3://...``); plain local paths do not."""
    text = os.fspath(value)
    return "://" in text and not text.startswith("/")


def set_s3_endpoint(endpoint: str | None) -> None:
    """Use ``endpoint`` (``http://host:port``) for every ``s3://`` location of this process and of the Ray
    workers it starts afterwards (they inherit the environment). ``None`` keeps the AWS environment's."""
    if endpoint:
        if "://" not in endpoint:
            raise StorageError(f"--s3-endpoint {endpoint!r}: give a URL such as http://127.0.0.1:8333")
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        _filesystem.cache_clear()


def _s3_options() -> dict[str, Any]:
    """Keyword arguments for ``S3FileSystem`` from the environment (pyarrow reads keys, region and profiles itself;
    the endpoint variables are read here so that both of them and an http endpoint work)."""
    options: dict[str, Any] = {}
    endpoint = next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    elif endpoint:
        options["region"] = "us-east-1"  # S3-compatible stores ignore it; avoids a region lookup
    return options


def _make_filesystem(scheme: str) -> pafs.FileSystem:
    if scheme == "s3":
        return pafs.S3FileSystem(**_s3_options())
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem()
    return pafs.LocalFileSystem()


class _FilesystemCache:
    """One filesystem object per scheme and environment (building an S3 client costs milliseconds)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, pafs.FileSystem] = {}

    def __call__(self, scheme: str) -> pafs.FileSystem:
        env = tuple(os.environ.get(v) for v in (*_ENDPOINT_VARS, "AWS_REGION", "AWS_DEFAULT_REGION"))
        key = (scheme, env, os.getpid())
        if key not in self._cache:
            self._cache[key] = _make_filesystem(scheme)
        return self._cache[key]

    def cache_clear(self) -> None:
        self._cache.clear()


_filesystem = _FilesystemCache()


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem. ``uri`` is what users see (an absolute local path, or
    ``s3://bucket/key``); ``path`` is the filesystem's own path (``bucket/key`` on S3)."""

    uri: str
    scheme: str  # "local", "s3", "gs"
    path: str
    fs: pafs.FileSystem = field(compare=False, repr=False)

    # ------------------------------------------------------------------ naming
    def __truediv__(self, name: str) -> Location:
        return self.join(name)

    def join(self, *parts: str) -> Location:
        rel = "/".join(p.strip("/") for p in parts if p)
        if not rel:
            return self
        sep = "" if self.uri.endswith("/") else "/"
        return Location(self.uri + sep + rel, self.scheme, self.path.rstrip("/") + "/" + rel, self.fs)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> Location:
        parent_path = str(PurePosixPath(self.path).parent)
        cut = len(self.uri.rstrip("/")) - len(self.name)
        return Location(self.uri[:cut].rstrip("/") or "/", self.scheme, parent_path, self.fs)

    @property
    def is_local(self) -> bool:
        return self.scheme == "local"

    @property
    def local_path(self) -> Path:
        """The local path; only for local locations (use the methods below for anything else)."""
        if not self.is_local:
            raise StorageError(f"{self.uri}: not on a local filesystem")
        return Path(self.path)

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:  # so that local-only code (open, Path) keeps working on local locations
        return str(self.local_path)

    # ------------------------------------------------------------------ queries
    def info(self) -> pafs.FileInfo:
        return self._call("inspect", self.fs.get_file_info, self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def size(self) -> int:
        info = self.info()
        if info.type != pafs.FileType.File:
            raise StorageError(f"{self.uri}: no such file")
        return int(info.size)

    def list(self, recursive: bool = False) -> list[pafs.FileInfo]:
        """The entries under this folder (empty if it does not exist), sorted by path."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        return sorted(self._call("list", self.fs.get_file_info, selector), key=lambda i: i.path)

    def child(self, info: pafs.FileInfo) -> Location:
        """The location of an entry returned by :meth:`list`."""
        rel = info.path[len(self.path.rstrip("/")) + 1 :]
        return self.join(rel)

    # ------------------------------------------------------------------ reading
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path, compression=None) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri}: no such file") from None
        except OSError as err:
            raise _storage_error(self, "read", err) from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def open_input_file(self):
        """A seekable file (for Parquet readers)."""
        try:
            return self.fs.open_input_file(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri}: no such file") from None
        except OSError as err:
            raise _storage_error(self, "open", err) from None

    # ------------------------------------------------------------------ writing
    def mkdir(self) -> None:
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        else:
            self._call("create the folder", self.fs.create_dir, self.path, recursive=True)

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file atomically: readers see the old file or the new one, never a part."""
        if self.is_local:
            _atomic_local_write(Path(self.path), data)
            return
        try:
            with self.fs.open_output_stream(
                self.path, compression=None
            ) as f:  # one PUT: the object appears when complete
                f.write(data)
        except OSError as err:
            raise _storage_error(self, "write", err) from None

    def write_json(self, obj: Any) -> None:
        self.write_bytes((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def remove(self, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise FileNotFoundError(f"{self.uri}: no such file") from None
        except OSError as err:
            if not self.exists() and missing_ok:
                return
            raise _storage_error(self, "delete", err) from None

    def remove_tree(self) -> None:
        """Delete this folder and everything under it (nothing if it does not exist)."""
        if not self.exists():
            return
        # some object stores list a folder for a moment after it was deleted
        with contextlib.suppress(FileNotFoundError):
            self._call("delete", self.fs.delete_dir, self.path)

    # ------------------------------------------------------------------ internals
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise _storage_error(self, what, err) from None


def _storage_error(loc: Location, what: str, err: OSError) -> StorageError:
    text = str(err)
    hint = ""
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "curlCode" in text:
        endpoint = _s3_options().get("endpoint_override", "the default AWS endpoint")
        hint = f" (cannot reach {endpoint}: check --s3-endpoint / AWS_ENDPOINT_URL)"
    elif "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        hint = f" (bucket {loc.path.split('/')[0]!r} does not exist)"
    elif "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        hint = " (access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    elif "credentials" in text.lower():
        hint = " (no credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile)"
    first = text.splitlines()[0] if text else type(err).__name__
    return StorageError(f"{loc.uri}: cannot {what}{hint}: {first}")


def _atomic_local_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0666 minus the umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def location(value: str | os.PathLike[str] | Location) -> Location:
    """The location of a path option: a local path (made absolute, not resolved), ``file://``, ``s3://`` or
    ``gs://``; any other scheme is refused naming the option's value."""
    if isinstance(value, Location):
        return value
    text = os.fspath(value)
    if not text:
        raise StorageError("an empty path was given")
    if not is_uri(text):
        path = os.path.abspath(os.path.expanduser(text))
        return Location(path, "local", path, _filesystem("local"))
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(
            f"{text}: unsupported URI scheme {scheme!r} (use a local path, file://, s3:// or gs://)"
        )
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{text}: a file:// URI names a local path (file:///abs/path)")
        path = os.path.abspath(parsed.path)
        return Location(path, "local", path, _filesystem("local"))
    if not parsed.netloc:
        raise StorageError(f"{text}: no bucket in the URI ({scheme}://BUCKET/path)")
    key = parsed.path.strip("/")
    fs_path = parsed.netloc + ("/" + key if key else "")
    canonical = f"{'gs' if scheme == 'gcs' else scheme}://{fs_path}"
    return Location(canonical, "s3" if scheme == "s3" else "gs", fs_path, _filesystem(scheme))


# ------------------------------------------------------------------------------------------ local copies


def _listing(loc: Location) -> list[tuple[str, int, str]]:
    """(relative path, size, mtime) of every file under ``loc`` (or of ``loc`` itself when it is a file)."""
    info = loc.info()
    if info.type == pafs.FileType.File:
        return [("", int(info.size), str(info.mtime))]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{loc.uri}: no such file or folder")
    base = len(loc.path.rstrip("/")) + 1
    return [(i.path[base:], int(i.size), str(i.mtime)) for i in loc.list(recursive=True) if i.is_file]


def local_copy(
    value: str | os.PathLike[str] | Location, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """A local path holding the file or folder ``value``: itself when it is local, else a copy downloaded into
    ``cache_dir`` (default ``$ALM_PIPELINE_HOME/remote-cache`` or ``~/.cache/alm-pipeline/remote``) and reused
    while the remote listing (names, sizes, modification times) is unchanged. For inputs that libraries can
    only read from a local disk (Hugging Face model folders, evaluation text files)."""
    import hashlib

    loc = location(value)
    if loc.is_local:
        return loc.local_path
    listing = _listing(loc)
    root = Path(
        cache_dir
        or (
            Path(os.environ["ALM_PIPELINE_HOME"]) / "remote-cache"
            if os.environ.get("ALM_PIPELINE_HOME")
            else Path.home() / ".cache" / "alm-pipeline" / "remote"
        )
    )
    key = hashlib.sha256(loc.uri.encode()).hexdigest()[:16]
    folder = root / key
    target = folder / (loc.name or "data")
    stamp = folder / "listing.json"
    wanted = json.dumps(listing)
    if stamp.is_file() and stamp.read_text() == wanted and target.exists():
        return target
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if listing == [] or listing[0][0] != "":  # a folder
            target.mkdir()
            for rel, _size, _mtime in listing:
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(loc.join(rel).read_bytes())
        else:
            target.write_bytes(loc.read_bytes())
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    stamp.write_text(wanted)
    return target


def upload_folder(local: str | os.PathLike[str], dest: str | os.PathLike[str] | Location) -> Location:
    """Copy the local folder ``local`` to ``dest`` file by file (each an atomic write), replacing what is there;
    returns ``dest``. On a local ``dest`` this is a plain copy."""
    src = Path(local)
    loc = location(dest)
    loc.remove_tree()
    loc.mkdir()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        loc.join(path.relative_to(src).as_posix()).write_bytes(path.read_bytes())
    return loc


def require_bucket(value: str | os.PathLike[str] | Location) -> Location:
    """``value`` as a location whose storage answers: on an object store its bucket must exist (some stores,
    SeaweedFS among them, create a missing bucket on the first write, which would hide a typo). An unreachable
    endpoint or refused credentials raise :class:`StorageError` naming the URI. Cheap: one request."""
    loc = location(value)
    if not loc.is_local:
        bucket = location(f"{loc.scheme}://{loc.path.split('/', 1)[0]}")
        try:
            found = bucket.is_dir()
        except StorageError as err:
            raise StorageError(str(err).replace(bucket.uri, loc.uri, 1)) from None
        if not found:
            raise StorageError(f"{loc.uri}: bucket {bucket.uri} does not exist (create it first)")
    return loc
