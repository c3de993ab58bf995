"""A ledger whose durable copy lives in an object store (s3://, gs://), for clusters without shared POSIX storage.

SQLite needs a POSIX filesystem, so the ledger works on a local copy and uploads the whole file (one PUT:
the object is replaced whole or not at all) after every committed change, before the call returns. A charge
that was not uploaded was never acknowledged, so the step it paid for never ran: a head restart that
reloads the object can lose no spend that was used.

One writer per ledger object: a writer claims the object by writing a sidecar `<name>.owner` holding a
random token, and checks the token before each upload. A second writer (another cluster, or a restarted
accountant) takes the claim over, and the first then fails closed on its next change instead of
overwriting newer charges. The check and the upload are two requests, so two writers racing inside
that window can still lose an update: run one accountant per ledger object (dpsynth's ledger actor is
one named actor per ledger per cluster). Object stores' conditional writes would close the window;
pyarrow does not expose them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from functools import wraps
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from .ledger import Ledger


def _split(uri: str) -> tuple[str, str]:
    """(parent directory URI with the query kept, object name)."""
    u = urlsplit(uri)
    p = PurePosixPath(u.path)
    if not p.name:
        raise ValueError(f"{uri!r}: the ledger URI must name an object, e.g. s3://bucket/dpsynth/ledger.sqlite")
    return urlunsplit(u._replace(path=str(p.parent))), p.name


def _publishes(method):
    """Run a mutating Ledger method on the local copy, then upload it before returning."""
    @wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.readonly:
            raise ValueError(f"ledger {self.uri} was opened read-only")
        with self._lock:
            result = method(self, *args, **kwargs)
            self._push()
            return result
    return wrapper


class MirroredLedger(Ledger):
    """`Ledger` semantics with the object at `uri` as the durable copy (see the module docstring)."""

    def __init__(self, uri: str, *, readonly: bool = False, timeout: float = 60.0) -> None:
        from dpsynth.storage import Storage

        parent, self.name = _split(uri)
        self.uri, self.readonly = uri, readonly
        self._store = Storage(parent)
        self._lock = threading.RLock()
        self._dir = tempfile.mkdtemp(prefix="dpsynth-ledger-")
        local = Path(self._dir) / self.name
        data = self._store.read_bytes(self.name)
        if data is None and readonly:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise FileNotFoundError(f"ledger {uri} does not exist")
        if data is not None:
            local.write_bytes(data)
        self.token = uuid.uuid4().hex
        if not readonly:
            self._store.write_text(self.name + ".owner", json.dumps(
                {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        super().__init__(local, timeout=timeout)
        if data is None:
            self._push()

    @property
    def location(self) -> str:
        return self.uri

    def _push(self) -> None:
        owner = json.loads(self._store.read_text(self.name + ".owner") or "{}")
        if owner.get("token") != self.token:
            raise RuntimeError(f"ledger {self.uri} was claimed by another accountant ({owner.get('host')}, pid "
                               f"{owner.get('pid')}); this one refuses to record anything more")
        self._store.write_bytes(self.name, self.path.read_bytes())

    set_budget = _publishes(Ledger.set_budget)
    open_run = _publishes(Ledger.open_run)
    charge = _publishes(Ledger.charge)
    certify = _publishes(Ledger.certify)
    abandon = _publishes(Ledger.abandon)
    rename_dataset = _publishes(Ledger.rename_dataset)
    extend_run = _publishes(Ledger.extend_run)

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)


def open_ledger(location: str | Path, *, readonly: bool = False) -> Ledger:
    """The ledger at a path (SQLite on local disk, NFS or a PVC) or an object-store URI."""
    from dpsynth.storage import check_uri, is_uri

    if is_uri(location):
        return MirroredLedger(check_uri(str(location)), readonly=readonly)
    path = Path(location).expanduser()
    if readonly and not path.is_file():
        raise FileNotFoundError(f"ledger {path} does not exist")
    return Ledger(path)


def ledger_exists(location: str | Path) -> bool:
    from dpsynth.storage import Storage, is_uri

    if is_uri(location):
        parent, name = _split(str(location))
        return Storage(parent).exists(name)
    return Path(location).expanduser().is_file()
