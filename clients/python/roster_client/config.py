"""The client configuration: the same `client.toml` the Rust SDK and the `roster` commands read
(docs/PROTOCOL.md §8). Relative paths are relative to the file's directory."""

from __future__ import annotations

import os
import re
import secrets
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_PATH = Path(".roster/client.toml")
TOKEN = re.compile(r"rst_[0-9a-f]{16}_[0-9a-f]{64}")


@dataclass
class ClientConfig:
    """How a client reaches the registry. See docs/PROTOCOL.md §8 for every key."""

    sessions: list[str]
    ca: Path
    server_name: str | None = None
    token: str | None = None
    client_name: str = ""
    client_id: str | None = None
    client_secret_file: Path | None = None
    connect_timeout_ms: int = 5000
    request_timeout_ms: int = 10000
    keep_alive_ms: int = 500
    dead_after_ms: int = 1500
    idle_timeout_ms: int = 4000
    max_frame: int = 1 << 20
    refuse_empty: bool = True
    cache_dir: Path | None = None
    reconnect_min_ms: int = 50
    reconnect_max_ms: int = 2000
    max_in_flight: int = 32
    _extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @staticmethod
    def load(path: str | os.PathLike[str]) -> ClientConfig:
        """Reads a TOML config file; unknown keys are refused, as the Rust SDK does."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from e
        known = {f.name for f in fields(ClientConfig) if not f.name.startswith("_")}
        token_file = raw.pop("token-file", None) or raw.pop("token_file", None)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
        if "sessions" not in raw or "ca" not in raw:
            raise ConfigError(f"{path}: `sessions` and `ca` are required")
        base = path.parent

        def rel(value: Any) -> Path:
            p = Path(str(value))
            return p if p.is_absolute() else base / p

        for key in ("ca", "client_secret_file", "cache_dir"):
            if raw.get(key) is not None:
                raw[key] = rel(raw[key])
        if token_file is not None:
            if raw.get("token") is not None:
                raise ConfigError(f"{path}: give token or token-file, not both")
            try:
                raw["token"] = rel(token_file).read_text().strip()
            except OSError as e:
                raise ConfigError(f"cannot read the token file {token_file}: {e}") from e
        config = ClientConfig(**raw)
        config.validate()
        return config

    def validate(self) -> None:
        """Refuses what the Rust SDK refuses: no session, a session address that is not
        HOST:PORT, `max_in_flight` outside 1–1024, a keep-alive not below the idle timeout, a
        token not shaped `rst_<16 hex>_<64 hex>`."""
        if not self.sessions:
            raise ConfigError("the client config names no session server")
        for addr in self.sessions:
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"session address {addr!r} is not HOST:PORT")
        if not 1 <= self.max_in_flight <= 1024:
            raise ConfigError(f"max_in_flight is {self.max_in_flight}; it must be 1 to 1024")
        if self.keep_alive_ms >= self.idle_timeout_ms:
            raise ConfigError(
                f"keep_alive_ms ({self.keep_alive_ms}) must be below idle_timeout_ms "
                f"({self.idle_timeout_ms})"
            )
        if self.token is not None and not TOKEN.fullmatch(self.token.strip()):
            raise ConfigError(
                "the client's token is malformed: a token is rst_<16 hex digits>_<64 hex "
                "digits> (made by `roster acl token create`)"
            )

    def client_secret(self) -> bytes:
        """The secret this client presents in Hello: from `client_secret_file` (created with a
        random one if missing), else a new random one."""
        if self.client_secret_file is None:
            return secrets.token_hex(16).encode()
        path = self.client_secret_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(16) + "\n")
        secret = path.read_text().strip().encode()
        if not 16 <= len(secret) <= 64:
            raise ConfigError(f"{path}: a client secret is 16 to 64 bytes")
        return secret
