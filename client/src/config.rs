//! Client configuration: where the session servers are and how to trust them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use roster_common::acl::Secret;
use roster_common::quic::TransportSettings;
use roster_common::{Error, Result};
use serde::{Deserialize, Serialize};

/// How a client reaches the registry. Loaded from `client.toml` or built in code.
///
/// ```toml
/// sessions = ["127.0.0.1:7300"]   # session servers; a DNS name counts with each of its addresses
/// ca = "ca.pem"                   # the cluster CA, relative to this file
/// # server_name = "localhost"     # name checked in the server certificate (default: the host)
/// # token = "rst_..."             # for clusters that check tokens (or token-file = "...")
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Session server addresses, `host:port`; a DNS name stands for every address it resolves to.
    /// At least one.
    pub sessions: Vec<String>,
    /// The cluster CA certificate (PEM) the session's certificate must chain to.
    pub ca: PathBuf,
    /// The name the server certificate must be valid for. Default: the host part of the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The token presented in `Hello`, for clusters that check tokens (those created without
    /// `--insecure-no-auth`); what it allows decides what this client may publish and subscribe
    /// to. `roster dev` writes one here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// A file holding the token instead (`token-file` in TOML; relative to the config file): for
    /// tokens mounted as secrets. Read by [`ClientConfig::load`] into `token`; give one or the
    /// other.
    #[serde(
        default,
        rename = "token-file",
        alias = "token_file",
        skip_serializing_if = "Option::is_none"
    )]
    pub token_file: Option<PathBuf>,
    /// A name for this client in server logs. Default empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_name: String,
    /// The client id; default a random one per `Client`. Subscribers see it in every snapshot, so
    /// it is a name, not a credential: the client also presents a secret on every connection
    /// (see `client_secret_file`), and only a connection with that secret can replace or remove
    /// the client's publishers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// A file holding this client's secret (16 to 64 bytes of text), created with a random one
    /// (readable by its owner only) if it does not exist. Default none: each `Client` draws a
    /// random secret, kept across its reconnects. Set it together with a fixed `client_id` so
    /// a restarted process is still the same client: it takes its previous incarnation's
    /// publishers over within the session's client grace. Without it, a restarted process with
    /// the same id is another client, refused with `PermissionDenied` until the old one is
    /// declared dead (the session's idle timeout plus its client grace, about 4 s). A relative
    /// path is taken relative to the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// Deadline for the QUIC handshake. Default 5000 ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Deadline for one request. Default 10000 ms.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Keep-alive interval. Default 500 ms.
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
    /// A session server that sends nothing for this long is taken for dead and left for another
    /// one (its keep-alive answers normally arrive every `keep_alive_ms`). Default 1500 ms.
    #[serde(default = "default_dead_after_ms")]
    pub dead_after_ms: u64,
    /// Silence after which the connection is declared dead. Default 4000 ms.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Largest frame sent or accepted. Default 1 MiB.
    #[serde(default = "default_max_frame")]
    pub max_frame: u32,
    /// Withhold a snapshot that would empty a subscription that has publishers, so a registry
    /// glitch cannot drop every address at once. Default true. A service that really lost every
    /// publisher then keeps showing its last addresses until one comes back: turn this off where
    /// "none left" must be seen (the `roster subscribe` command does).
    #[serde(default = "default_true")]
    pub refuse_empty: bool,
    /// Directory for the last snapshot of every subscribed service, so an application restarting
    /// while the registry is unreachable still gets addresses. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// First pause before reconnecting after losing the session; doubles, with jitter, up to
    /// `reconnect_max_ms`. Default 50 ms.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Default 2000 ms.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Requests (publish, update, unpublish, subscribe, list, ping) this client has on the wire at
    /// once; more wait their turn, within `request_timeout_ms`. Re-registering everything on a new
    /// connection uses up to 16 more. A session server refuses requests beyond its own limit
    /// (`--max-requests-per-connection`, 64 by default), which must exceed this plus 18.
    /// Default 32.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
}

fn default_max_in_flight() -> u32 {
    32
}

fn default_true() -> bool {
    true
}
fn default_reconnect_min_ms() -> u64 {
    50
}
fn default_reconnect_max_ms() -> u64 {
    2_000
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_keep_alive_ms() -> u64 {
    500
}
fn default_dead_after_ms() -> u64 {
    1_500
}
fn default_idle_timeout_ms() -> u64 {
    4_000
}
fn default_max_frame() -> u32 {
    roster_common::frame::DEFAULT_MAX_FRAME
}

impl ClientConfig {
    /// A config with every default, for these session addresses and CA file.
    pub fn new(sessions: Vec<String>, ca: impl Into<PathBuf>) -> Self {
        ClientConfig {
            sessions,
            ca: ca.into(),
            server_name: None,
            token: None,
            token_file: None,
            client_name: String::new(),
            client_id: None,
            client_secret_file: None,
            connect_timeout_ms: default_connect_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            keep_alive_ms: default_keep_alive_ms(),
            dead_after_ms: default_dead_after_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            max_frame: default_max_frame(),
            max_in_flight: default_max_in_flight(),
            refuse_empty: true,
            cache_dir: None,
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
        }
    }

    /// Reads a TOML config file. A relative `ca` path is taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::InvalidArgument(format!("cannot read {}: {e}", path.display())))?;
        let mut config: ClientConfig = toml::from_str(&text)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        if let Some(dir) = path.parent() {
            if config.ca.is_relative() {
                config.ca = dir.join(&config.ca);
            }
            for path in [
                config.cache_dir.as_mut(),
                config.client_secret_file.as_mut(),
                config.token_file.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if path.is_relative() {
                    *path = dir.join(&*path);
                }
            }
        }
        if let Some(file) = &config.token_file {
            if config.token.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{}: give token or token-file, not both",
                    path.display()
                )));
            }
            let text = std::fs::read_to_string(file).map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot read the token file {}: {e}",
                    file.display()
                ))
            })?;
            config.token = Some(Secret::new(text.trim()));
        }
        config.validate()?;
        Ok(config)
    }

    /// The secret this client presents in `Hello`: read from `client_secret_file` (created with
    /// a random secret when missing), or a fresh random one.
    pub(crate) fn client_secret(&self) -> Result<Vec<u8>> {
        let Some(path) = &self.client_secret_file else {
            return Ok(roster_common::ids::new_client_secret().to_vec());
        };
        let fresh: String = roster_common::ids::new_client_secret()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Ok(mut file) => {
                std::io::Write::write_all(&mut file, format!("{fresh}\n").as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|e| {
                        Error::InvalidArgument(format!("cannot write {}: {e}", path.display()))
                    })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::InvalidArgument(format!(
                    "cannot create {}: {e}",
                    path.display()
                )));
            }
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::InvalidArgument(format!("cannot read {}: {e}", path.display())))?;
        let secret = text.trim().as_bytes().to_vec();
        let bounds = roster_common::ids::CLIENT_SECRET_LEN;
        if !bounds.contains(&secret.len()) {
            return Err(Error::InvalidArgument(format!(
                "{}: a client secret is {} to {} bytes of text; this one has {}",
                path.display(),
                bounds.start(),
                bounds.end(),
                secret.len()
            )));
        }
        Ok(secret)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a client config always serializes")
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.sessions.is_empty() {
            return Err(Error::InvalidArgument(
                "the client config names no session server".into(),
            ));
        }
        if !(1..=1024).contains(&self.max_in_flight) {
            return Err(Error::InvalidArgument(format!(
                "max_in_flight is {}; it must be 1 to 1024",
                self.max_in_flight
            )));
        }
        if let Some(token) = &self.token {
            roster_common::acl::token_id("the client's token", token.expose())?;
        }
        self.transport().transport(true)?;
        Ok(())
    }

    pub(crate) fn transport(&self) -> TransportSettings {
        TransportSettings {
            keep_alive: Duration::from_millis(self.keep_alive_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            ..TransportSettings::default()
        }
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_with_defaults_and_a_ca_relative_to_the_file() {
        let dir = std::env::temp_dir().join(format!("roster-client-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("client.toml");
        std::fs::write(&path, "sessions = [\"127.0.0.1:7300\"]\nca = \"ca.pem\"\n").unwrap();
        let config = ClientConfig::load(&path).unwrap();
        assert_eq!(config.ca, dir.join("ca.pem"));
        assert_eq!(config.idle_timeout_ms, 4_000);
        let round = toml::from_str::<ClientConfig>(&config.to_toml()).unwrap();
        assert_eq!(round, config);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_secret_file_is_created_once_kept_private_and_checked() {
        let dir = std::env::temp_dir().join(format!("roster-client-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("client.toml");
        std::fs::write(
            &path,
            "sessions = [\"127.0.0.1:7300\"]\nca = \"ca.pem\"\nclient_secret_file = \"my.secret\"\n",
        )
        .unwrap();
        let config = ClientConfig::load(&path).unwrap();
        assert_eq!(config.client_secret_file, Some(dir.join("my.secret")));
        let first = config.client_secret().unwrap();
        assert_eq!(first.len(), 64, "32 random bytes as hex");
        assert_eq!(
            config.client_secret().unwrap(),
            first,
            "the same secret next time"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("my.secret"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "readable by its owner only: {mode:o}");
        }
        // Without a file, every call draws a new one.
        let plain = ClientConfig::new(vec!["127.0.0.1:7300".into()], "ca.pem");
        assert_ne!(
            plain.client_secret().unwrap(),
            plain.client_secret().unwrap()
        );

        std::fs::write(dir.join("my.secret"), "too short\n").unwrap();
        assert!(matches!(
            config.client_secret(),
            Err(Error::InvalidArgument(m)) if m.contains("16 to 64")
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_keys_and_empty_session_lists_are_refused() {
        assert!(
            toml::from_str::<ClientConfig>("sessions = []\nca = \"x\"\nsesions = 1\n").is_err()
        );
        let config = ClientConfig::new(vec![], "ca.pem");
        assert!(matches!(config.validate(), Err(Error::InvalidArgument(_))));
    }
}
