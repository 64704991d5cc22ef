//! The names of the files `roster dev` writes and the other commands look for.

/// Where `roster dev` writes, and client commands look, by default.
pub const DEFAULT_DIR: &str = ".roster";
/// The client config file `roster dev` writes and client commands read by default.
pub const CLIENT_CONFIG_FILE: &str = "client.toml";
/// The cluster config file `roster dev` writes and `roster cluster` / `roster acl` read by default.
pub const CLUSTER_CONFIG_FILE: &str = "cluster.toml";
/// The Prometheus file-based service discovery list `roster dev` writes: every server's admin port.
pub const TARGETS_FILE: &str = "targets.json";
/// The file a cluster's admin token is kept in: in `roster dev`'s directory, and in a single
/// bootstrap voter's data directory when no `--admin-token-file` is given.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
