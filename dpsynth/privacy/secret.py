"""The data owner's secret: a random key kept beside the privacy ledger and never released.

It keys every hash dpsynth takes of private data: the dataset fingerprint the ledger holds budgets under (an
HMAC, so a released fingerprint is no membership oracle to someone who knows every record but one), the privacy
unit of a record without a unit column, and the split a unit falls in. Because the key stays with the owner, nobody
else can recompute which split any unit went to, or test a guessed dataset against a released fingerprint; because
it stays beside the ledger, the same data hashes the same way in every run against that ledger.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32
SUFFIX = ".key"


def _key_location(ledger: str | Path) -> tuple[object, str]:
    """(a Storage holding the key, the key's name in it): `<ledger>.key` beside the ledger file or object."""
    from dpsynth.storage import Storage, is_uri

    location = str(ledger)
    if is_uri(location):
        from .mirror import _split

        parent, name = _split(location)  # the query (endpoint, scheme) stays on the parent URI
        return Storage(parent), name + SUFFIX
    path = Path(location).expanduser()
    return Storage(path.parent), path.name + SUFFIX


def ledger_secret(ledger: str | Path, *, create: bool = True) -> bytes:
    """The owner's key for the ledger at `ledger` (a path or an object-store URI), made on first use.

    A local key is created with O_EXCL and mode 0600, so two first runs racing agree on one key.
    """
    from dpsynth.errors import UserError

    store, name = _key_location(ledger)
    if store.is_local:
        path = store.local_path / name
        if not path.exists():
            if not create:
                raise UserError(f"privacy.ledger: no owner key {path} beside the ledger")
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another first run made it
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(KEY_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
        key = path.read_bytes()
    else:
        key = store.read_bytes(name)
        if key is None:
            if not create:
                raise UserError(f"privacy.ledger: no owner key {name} beside the ledger {ledger}")
            store.write_bytes(name, secrets.token_bytes(KEY_BYTES))
            key = store.read_bytes(name)
    if key is None or len(key) != KEY_BYTES:
        raise UserError(f"privacy.ledger: the owner key beside {ledger} is damaged ({0 if key is None else len(key)} "
                        f"bytes, expected {KEY_BYTES}); restore it from a backup (a new key would re-key every dataset)")
    return key


def keyed_hash(secret: bytes, purpose: str, value: str) -> bytes:
    """HMAC-SHA256 of `value` under `secret`, separated by `purpose` so one hash never stands in for another."""
    return hmac.new(secret, purpose.encode() + b"\x00" + value.encode(), hashlib.sha256).digest()


def keyed_unit_interval(secret: bytes, purpose: str, value: str) -> float:
    """A uniform number in [0, 1) that only the key holder can compute: for splits and subsets."""
    return int.from_bytes(keyed_hash(secret, purpose, value)[:8], "big") / 2.0**64
