"""Run storage: a local path (local disk, NFS, a Kubernetes PVC) or an object-store URI (s3://, gs://).

Object stores go through pyarrow filesystems (`pyarrow.fs.FileSystem.from_uri`), the same layer Ray
Train and Tune use for their own storage, so credentials and endpoints are configured the usual way:
the cloud's environment / instance role, or URI query options such as
`s3://bucket/runs?endpoint_override=minio:9000&scheme=http`.

Atomicity: a local file is written to a temporary sibling and renamed; an object-store object is one
PUT (an object becomes visible whole or not at all). Directories are never atomic on an object store, so
callers publish a directory by writing a small pointer file last (see dpsynth.train.worker).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from dpsynth.io import atomic_write_bytes

SCHEMES = ("s3", "gs", "gcs")


def is_uri(location: str | Path | None) -> bool:
    return isinstance(location, str) and "://" in location


def check_uri(uri: str) -> str:
    """Return `uri` if pyarrow supports its scheme; ValueError (one line) otherwise."""
    scheme = urlsplit(uri).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"{uri!r}: unsupported scheme {scheme!r}; use a path or one of " +
                         ", ".join(f"{s}://" for s in SCHEMES))
    if not urlsplit(uri).netloc:
        raise ValueError(f"{uri!r}: no bucket")
    return uri


class Storage:
    """A directory on the run storage. Picklable (holds only its location): ships to Ray workers."""

    def __init__(self, root: str | Path | Storage) -> None:
        root = root.root if isinstance(root, Storage) else root
        self.root = check_uri(root) if is_uri(root) else str(Path(root).expanduser().resolve())
        self._fs = None

    def __getstate__(self) -> dict:
        return {"root": self.root, "_fs": None}

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def __str__(self) -> str:
        return self.root

    @property
    def is_local(self) -> bool:
        return not is_uri(self.root)

    def child(self, *parts: str) -> Storage:
        """A subdirectory; a URI keeps its query options (endpoint, scheme, ...)."""
        rel = str(PurePosixPath(*parts))
        if self.is_local:
            return Storage(Path(self.root) / rel)
        u = urlsplit(self.root)
        return Storage(urlunsplit(u._replace(path=str(PurePosixPath(u.path or "/") / rel))))

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.root} is not a local path")
        return Path(self.root)

    def filesystem(self):
        """(pyarrow filesystem, path inside it) for this directory; what Ray's RunConfig takes."""
        import pyarrow.fs as pafs

        if self._fs is None:
            if self.is_local:
                self._fs = (pafs.LocalFileSystem(), self.root)
            else:
                self._fs = pafs.FileSystem.from_uri(self.root)
        return self._fs

    def _path(self, name: str) -> str:
        fs, base = self.filesystem()
        return str(PurePosixPath(base) / name) if name else base

    # --- files ---------------------------------------------------------------------------------

    def read_bytes(self, name: str) -> bytes | None:
        """The file's content, or None if it does not exist."""
        if self.is_local:
            p = Path(self.root) / name
            return p.read_bytes() if p.is_file() else None
        import pyarrow.fs as pafs

        fs, _ = self.filesystem()
        path = self._path(name)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read()

    def exists(self, name: str) -> bool:
        if self.is_local:
            return (Path(self.root) / name).exists()
        import pyarrow.fs as pafs

        fs, _ = self.filesystem()
        return fs.get_file_info(self._path(name)).type != pafs.FileType.NotFound

    def read_text(self, name: str) -> str | None:
        data = self.read_bytes(name)
        return None if data is None else data.decode()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic: readers see the old content or the new, never a part."""
        if self.is_local:
            atomic_write_bytes(Path(self.root) / name, data)
            return
        fs, _ = self.filesystem()
        with fs.open_output_stream(self._path(name)) as f:  # one PUT / multipart upload, visible on close
            f.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    # --- directories ---------------------------------------------------------------------------

    def upload(self, local_dir: Path, name: str) -> None:
        """Copy a local directory's files to `name/` (overwriting files of the same name)."""
        if self.is_local:
            shutil.copytree(local_dir, Path(self.root) / name, dirs_exist_ok=True)
            return
        import pyarrow.fs as pafs

        fs, _ = self.filesystem()
        pafs.copy_files(str(local_dir), self._path(name), destination_filesystem=fs)

    def download(self, name: str, local_dir: Path) -> Path:
        """Copy `name/` into a local directory (created); return it."""
        local_dir = Path(local_dir)
        if self.is_local:
            shutil.copytree(Path(self.root) / name, local_dir, dirs_exist_ok=True)
            return local_dir
        import pyarrow.fs as pafs

        fs, _ = self.filesystem()
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self._path(name), str(local_dir), source_filesystem=fs)
        return local_dir

    def listdir(self, name: str = "") -> list[str]:
        """Names directly under `name/` (empty if it does not exist)."""
        if self.is_local:
            p = Path(self.root) / name
            return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
        import pyarrow.fs as pafs

        fs, _ = self.filesystem()
        infos = fs.get_file_info(pafs.FileSelector(self._path(name), allow_not_found=True))
        return sorted(PurePosixPath(i.path).name for i in infos)

    def delete(self, name: str = "") -> None:
        """Remove the file or directory `name` (or this whole directory) if it exists."""
        if self.is_local:
            path = Path(self.root) / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return
        import pyarrow.fs as pafs

        fs, _ = self.filesystem()
        info = fs.get_file_info(self._path(name))
        if info.type == pafs.FileType.File:
            fs.delete_file(self._path(name))
        elif info.type == pafs.FileType.Directory:
            fs.delete_dir(self._path(name))

    @contextmanager
    def writing_dir(self, name: str) -> Iterator[Path]:
        """A local directory whose files end up in `name/`: the destination itself on a path (no copy), else a
        temporary directory uploaded when the block succeeds."""
        if self.is_local:
            dest = Path(self.root) / name
            dest.mkdir(parents=True, exist_ok=True)
            yield dest
            return
        with tempfile.TemporaryDirectory(prefix="dpsynth-upload-") as tmp:
            yield Path(tmp)
            self.upload(Path(tmp), name)

    def fetch(self, name: str) -> tuple[Path, bool]:
        """A local directory holding `name/`: the directory itself when local (no copy), else a fresh
        temporary download. Returns (path, is_temporary); the caller removes a temporary one."""
        if self.is_local:
            return Path(self.root) / name, False
        return self.download(name, Path(tempfile.mkdtemp(prefix="dpsynth-fetch-"))), True
