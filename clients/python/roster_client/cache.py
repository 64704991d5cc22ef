"""The on-disk cache of the last snapshot of every subscribed service (`cache_dir`), in the Rust
SDK's format, so both SDKs can share one directory: one file per service, named by the 64-bit
entry hash of the service id (and "healthy-only" for a healthy-only subscription, whose snapshots
the session filters: a plain subscriber must not start from them), holding the MessagePack of
the snapshot as a push carries it. Files are replaced by writing a temporary file and renaming
it; a torn or foreign file is ignored."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgpack

from .errors import ConfigError
from .model import Snapshot, entry_hash

log = logging.getLogger("roster_client")

#: How often snapshots that changed are written (and once more when the client closes).
FLUSH_EVERY = 1.0


class Cache:
    def __init__(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the snapshot cache {directory}: {e}") from e
        self.dir = directory

    def path(self, service: str, healthy_only: bool) -> Path:
        kind = "healthy-only" if healthy_only else ""
        return self.dir / f"{entry_hash(service, kind, 0):016x}.snapshot"

    def load(self, service: str, healthy_only: bool) -> Snapshot | None:
        """The cached snapshot of `service`, if a valid one is there."""
        path = self.path(service, healthy_only)
        try:
            raw = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
            snapshot = Snapshot.from_wire(raw)
        except FileNotFoundError:
            return None
        except Exception as e:  # a torn or foreign file: start without it
            log.info("ignoring the cached snapshot %s: %s", path, e)
            return None
        return snapshot if snapshot.service == service else None

    def store(self, snapshot: Snapshot, healthy_only: bool) -> None:
        """Stores `snapshot` as the last of its service; a failure is logged, never raised."""
        path = self.path(snapshot.service, healthy_only)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_bytes(msgpack.packb(snapshot.to_wire(), use_bin_type=True))
            os.replace(tmp, path)
        except OSError as e:
            log.info("could not cache a snapshot of %s: %s", snapshot.service, e)
