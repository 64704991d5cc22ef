//! Server settings, each declared once.
//!
//! A server setting (`roster meta --slots`, `roster session --drain-timeout-ms`, …) reaches the
//! server along four paths, earlier winning: its long flag, its `ROSTER_*` environment variable,
//! its key in the `--config` TOML file, and the server's own default. [`settings!`] declares a
//! group of settings as one table, a row per setting, and generates from it:
//!
//! - a clap [`Args`](clap::Args) struct with a field per setting (an `Option`, or a `bool` for a
//!   switch). The field name is the setting's long flag and its config-file key, both in
//!   kebab-case; the row's doc comment is its help, followed by the default the server uses
//!   (`[default: 3000]`), read from the server's config defaults so the help cannot drift from
//!   them;
//! - the [`Settings`] trait: the group's config-file keys, how the file fills in what flags and
//!   environment left unset, and how the settings given are copied into the server's config.
//!
//! Flags and environment are clap's business (a flag beats its variable); [`ConfigFile`] is the
//! third layer; whatever is still unset keeps the value the server's config starts with.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;

/// A group of server settings, implemented by [`settings!`].
pub trait Settings: DeserializeOwned + Default {
    /// The server config the group's settings are copied into; `()` for a group the server reads
    /// by hand.
    type Config;
    /// The settings' field names. In kebab-case (`_` as `-`) each is the setting's long flag and
    /// config-file key.
    const FIELDS: &'static [&'static str];
    /// Takes every setting that neither flag nor environment gave from `lower` (the config file).
    fn fill_from(&mut self, lower: Self);
    /// Copies every setting given and bound to a config field (`=> field`) into `config`,
    /// converting its unit.
    fn apply(&self, config: &mut Self::Config);
}

/// A server config with a value for every field: the defaults that `--help` shows.
pub trait Defaults {
    fn defaults() -> Self;
}

/// One setting's value, filled in from a lower layer when unset.
pub trait Layer {
    fn fill_from(&mut self, lower: Self);
}

impl<T> Layer for Option<T> {
    fn fill_from(&mut self, lower: Self) {
        if self.is_none() {
            *self = lower;
        }
    }
}

/// A switch is on when any layer turns it on.
impl Layer for bool {
    fn fill_from(&mut self, lower: Self) {
        *self |= lower;
    }
}

/// How a setting's value becomes its config field's, and how the field's default is shown.
pub trait Unit<Value, Field> {
    fn to_field(value: Value) -> Field;
    fn show(field: &Field) -> String;
}

/// The setting and its config field are the same type.
pub struct Plain;

impl<T: Display> Unit<T, T> for Plain {
    fn to_field(value: T) -> T {
        value
    }

    fn show(field: &T) -> String {
        field.to_string()
    }
}

/// The setting is a whole number of milliseconds, its config field a [`Duration`].
pub struct Millis;

impl Unit<u64, Duration> for Millis {
    fn to_field(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    fn show(field: &Duration) -> String {
        millis(*field)
    }
}

/// `duration` in whole milliseconds, as a `--…-ms` flag takes it.
pub fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// A setting's help: its doc comment lines joined into one paragraph (as clap joins them), without
/// a final period, then `[default: DEFAULT]`, or DEFAULT put where the doc says `{default}`.
pub fn help(doc: &[&str], default: Option<String>) -> String {
    let text = doc
        .iter()
        .map(|line| line.trim())
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let text = match text.strip_suffix('.') {
        Some(stripped) if !stripped.ends_with('.') => stripped.to_owned(),
        _ => text,
    };
    match default {
        Some(default) if text.contains("{default}") => text.replace("{default}", &default),
        Some(default) => format!("{text} [default: {default}]"),
        None => text,
    }
}

/// A server's `--config` TOML file (or none: then it gives nothing).
pub struct ConfigFile {
    path: PathBuf,
    table: toml::Table,
}

impl ConfigFile {
    /// Reads the file at `path`, refusing keys that name no setting of `groups` (a misspelt key
    /// silently ignored is a setting silently lost).
    pub fn read(path: Option<&Path>, groups: &[&[&str]]) -> anyhow::Result<ConfigFile> {
        let Some(path) = path else {
            return Ok(ConfigFile {
                path: PathBuf::new(),
                table: toml::Table::new(),
            });
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
        let mut known: Vec<String> = groups
            .iter()
            .flat_map(|fields| fields.iter())
            .map(|field| field.replace('_', "-"))
            .collect();
        if let Some(unknown) = table.keys().find(|key| !known.contains(key)) {
            known.sort_unstable();
            bail!(
                "config file {}: unknown key `{unknown}`; known keys: {}",
                path.display(),
                known.join(", ")
            );
        }
        Ok(ConfigFile {
            path: path.to_owned(),
            table,
        })
    }

    /// Fills the settings of `group` that flags and environment left unset from this file.
    pub fn fill<S: Settings>(&self, group: &mut S) -> anyhow::Result<()> {
        if self.table.is_empty() {
            return Ok(());
        }
        // Keys of the other groups are ignored here; `read` has checked them all.
        let from_file = S::deserialize(self.table.clone())
            .with_context(|| format!("config file {}", self.path.display()))?;
        group.fill_from(from_file);
        Ok(())
    }
}

/// Declares a group of server settings: a struct of clap flags that a config file can also set,
/// and its [`Settings`] implementation. See the module documentation.
///
/// ```text
/// settings! {
///     /// Settings of `roster example`.
///     pub struct ExampleSettings for ExampleConfig {
///         /// Help text; the default is appended.
///         slots: Option<u32> [env = "ROSTER_SLOTS"] => slot_count;
///         /// A field in milliseconds, nested in the config.
///         grace_ms: Option<u64> [env = "ROSTER_GRACE_MS", value_name = "MS"]
///             => timers.grace in millis;
///         /// Not copied into the config by `apply`; the server reads it by hand.
///         name: Option<String> [env = "ROSTER_NAME"] default("the host name");
///         /// A switch.
///         verbose: bool [env = "ROSTER_VERBOSE"];
///     }
/// }
/// ```
///
/// Each row is: the doc comment (the help), the field name (flag and config-file key), its type,
/// the rest of clap's `#[arg(long, ...)]` in brackets (the environment variable at least), then
/// optionally `=> FIELD.PATH` (`in millis` when the config holds a `Duration`), which `apply` sets
/// and whose default `--help` shows, or `default(EXPR)` for a default shown but applied by hand.
/// A group without a config (`struct Name { ... }`) is read by hand. A group that several servers
/// share can be generic over the server's config (`struct Name<S: Bound> for S { ... }`): each
/// server's `--help` then shows its own defaults, through `default(EXPR)` rows that name `S`.
macro_rules! settings {
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident { $($rows:tt)* }
    ) => {
        $crate::settings::settings! { $(#[$attr])* $vis struct $name for () { $($rows)* } }
    };
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident $(<$server:ident : $bound:path>)? for $config:ty {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty [ $($arg:tt)* ]
                $( => $($path:ident).+ $(in $unit:ident)? )?
                $( default($shown:expr) )?
                ;
            )*
        }
    ) => {
        $(#[$attr])*
        #[derive(clap::Args, serde::Deserialize, Debug)]
        // `bound = ""`: serde would otherwise ask a generic group's server type for `Default`.
        #[serde(rename_all = "kebab-case", default, bound = "")]
        $vis struct $name $(<$server: $bound>)? {
            $(
                $(#[doc = $doc])*
                #[arg(
                    long,
                    help = $crate::settings::help(
                        &[$($doc),*],
                        [
                            $(<$crate::settings::settings!(@unit $($unit)?)
                                as $crate::settings::Unit<_, _>>::show(
                                &<$config as $crate::settings::Defaults>::defaults().$($path).+
                            ),)?
                            $(($shown).to_string(),)?
                        ]
                        .into_iter()
                        .next(),
                    ),
                    $($arg)*
                )]
                $field: $ty,
            )*
            $(
                /// The server whose defaults the help shows; no flag, no key.
                #[arg(skip)]
                #[serde(skip)]
                server: std::marker::PhantomData<fn() -> $server>,
            )?
        }

        impl $(<$server: $bound>)? Default for $name $(<$server>)? {
            fn default() -> Self {
                Self {
                    $($field: Default::default(),)*
                    $(server: std::marker::PhantomData::<fn() -> $server>,)?
                }
            }
        }

        impl $(<$server: $bound>)? $crate::settings::Settings for $name $(<$server>)? {
            type Config = $config;

            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

            fn fill_from(&mut self, lower: Self) {
                $( $crate::settings::Layer::fill_from(&mut self.$field, lower.$field); )*
            }

            #[allow(unused_variables)]
            fn apply(&self, config: &mut $config) {
                $($(
                    if let Some(value) = self.$field {
                        config.$($path).+ = <$crate::settings::settings!(@unit $($unit)?)
                            as $crate::settings::Unit<_, _>>::to_field(value);
                    }
                )?)*
            }
        }
    };
    (@unit) => { $crate::settings::Plain };
    (@unit millis) => { $crate::settings::Millis };
}

pub(crate) use settings;

#[cfg(test)]
mod tests {
    use super::help;

    #[test]
    fn help_joins_lines_and_shows_the_default() {
        let doc = [" Data servers per slot,", " leader included."];
        assert_eq!(
            help(&doc, Some("3".into())),
            "Data servers per slot, leader included [default: 3]"
        );
        assert_eq!(help(&doc, None), "Data servers per slot, leader included");
        assert_eq!(
            help(
                &[" Frozen below it [default: {default}, never]."],
                Some("0".into())
            ),
            "Frozen below it [default: 0, never]"
        );
    }
}
