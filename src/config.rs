//! Service configuration: what `dapgw gateway` and `dapgw udc` read before
//! they bind a single port.
//!
//! ```text
//! serde defaults -> TOML file (--config / DAPGW_CONFIG) -> DAPGW_* env -> validate()
//! ```
//!
//! Each layer overrides the one before. Four figment traps are closed here:
//!
//! - **Only the first bad value is reported.** Every setting is extracted on
//!   its own, and the problems from extraction, unknown keys and
//!   [`GatewayConfig::validate`] are all collected into one [`ConfigError`].
//! - **A named file that is missing is silently ignored.** A file named by
//!   `--config` or `DAPGW_CONFIG` must exist.
//! - **Environment values are parsed like TOML**, so `DAPGW_GATEWAY_ID=0017`
//!   would become the integer 17. Only the numeric settings are parsed;
//!   every other value is taken as the exact text of the variable.
//! - **Typos are silently ignored.** A `DAPGW_*` variable or TOML key that is
//!   not a setting of the service being started is an error naming it.
//!
//! An environment variable set to the empty string counts as not set.
//! The config holds file *paths*, never secret bytes; URLs that may carry a
//! password print as `<redacted>` in `Debug`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::telemetry::LogFormat;

/// Prefix of every environment variable dapgw reads.
pub const ENV_PREFIX: &str = "DAPGW_";

/// The variable that names a TOML config file (same role as `--config`).
pub const CONFIG_VAR: &str = "DAPGW_CONFIG";

/// Upper bound on `DAPGW_BATCH_MAX_ENTRIES`: the wire cap on entries in one
/// batch (docs/protocol.md, "Caps").
pub const MAX_BATCH_ENTRIES: u32 = 16_384;

/// Upper bound on `DAPGW_CHUNK_SIZE`: the wire cap on the chunk size c.
pub const MAX_CHUNK_SIZE: u16 = 1_024;

/// Default of `DAPGW_ATTACH_TTL_S`: a meter silent for a week is taken for
/// gone (meters report at least daily; a week rides out outages).
pub const DEFAULT_ATTACH_TTL_S: u64 = 7 * 24 * 3600;

/// Upper bound on `DAPGW_ATTACH_TTL_S` (ten years): keeps the expiry
/// arithmetic in milliseconds far from overflow.
pub const MAX_ATTACH_TTL_S: u64 = 10 * 365 * 24 * 3600;

/// Default of `DAPGW_ATTACH_MAX_MEMBERS_PER_SOURCE`: an eighth of the
/// attach registry, like the spool's share per source.
pub const DEFAULT_ATTACH_MEMBERS_PER_SOURCE: u64 = crate::gateway::MAX_ATTACHED_MEMBERS as u64 / 8;

/// Default of `DAPGW_ATTACH_MAX_GROUPS_PER_SOURCE`: an eighth of the
/// groups the UDC takes in one subscription.
pub const DEFAULT_ATTACH_GROUPS_PER_SOURCE: u64 = crate::protocol::MAX_SUBSCRIBED_GROUPS as u64 / 8;

/// Smallest accepted `DAPGW_MAX_BODY_BYTES`: one capped uplink (1,024-byte
/// payload) plus framing must always fit.
pub const MIN_BODY_BYTES: u64 = 4_096;

// ---------------------------------------------------------------------------
// Setting tables: the contract between variables, TOML keys and the structs.
// ---------------------------------------------------------------------------

/// How an environment value is turned into a figment value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Kept as the exact text of the variable (paths, URLs, ids, addresses).
    Text,
    /// Parsed like TOML, so `200` is an integer (and `256MiB` stays text for
    /// [`ByteSize`]).
    Number,
}

/// One setting: its TOML key (the variable is `DAPGW_` + key uppercased),
/// how its env value is read, and what a valid value looks like.
#[derive(Clone, Copy, Debug)]
struct Setting {
    key: &'static str,
    kind: Kind,
    expect: &'static str,
}

const fn text(key: &'static str, expect: &'static str) -> Setting {
    Setting {
        key,
        kind: Kind::Text,
        expect,
    }
}

const fn number(key: &'static str, expect: &'static str) -> Setting {
    Setting {
        key,
        kind: Kind::Number,
        expect,
    }
}

const PEM_FILE: &str = "a path to a PEM file";
const MS: &str = "a whole number of milliseconds greater than 0";
const BYTES: &str =
    "a size in bytes: an integer such as 268435456, or with a suffix KiB, MiB or GiB";
const ADDR: &str = "a socket address such as 127.0.0.1:9090 or [::]:8443";
const LOG: &str = "a tracing filter such as `info` or `info,dapgw=debug`";
const LOG_FORMAT: &str = "`text` or `json`";
const DAYS: &str = "a whole number of days (0 keeps forever)";

/// Settings of `dapgw gateway`, in the order they are documented.
const GATEWAY_SETTINGS: &[Setting] = &[
    text(
        "upstream_url",
        "an https:// URL of the UDC, e.g. https://udc.example:9443",
    ),
    text(
        "upstream_ca",
        "a path to the PEM file of the UDC's CA certificate",
    ),
    text("upstream_client_cert", PEM_FILE),
    text("upstream_client_key", PEM_FILE),
    text("gateway_id", "1 to 64 characters from [a-z0-9._-]"),
    text("listen", ADDR),
    text("tls_cert", PEM_FILE),
    text("tls_key", PEM_FILE),
    text("member_client_ca", PEM_FILE),
    text("admin_listen", ADDR),
    text("spool_dir", "a directory path"),
    number("spool_max_bytes", BYTES),
    number(
        "spool_max_bytes_per_source",
        "0 (no share), or a size in bytes (an integer, or with a suffix KiB, MiB or GiB) from twice DAPGW_MAX_BODY_BYTES to DAPGW_SPOOL_MAX_BYTES",
    ),
    number("batch_max_entries", "an integer from 1 to 16384"),
    number("batch_linger_ms", MS),
    number("round_deadline_ms", MS),
    number("chunk_size", "an integer from 1 to 1024"),
    number("max_connections", "an integer greater than 0"),
    number("max_connections_per_ip", "an integer greater than 0"),
    number("max_body_bytes", BYTES),
    number("header_timeout_ms", MS),
    number("idle_timeout_ms", MS),
    number("drain_grace_ms", MS),
    number("upstream_timeout_ms", MS),
    number("retry_max_ms", MS),
    number(
        "attach_ttl_s",
        "a whole number of seconds from 1 to 315360000 (ten years)",
    ),
    number(
        "attach_max_members_per_source",
        "0 (no share), or an integer from 1 to 1000000",
    ),
    number(
        "attach_max_groups_per_source",
        "0 (no share), or an integer from 256 (the groups one member may name) to 4096",
    ),
    text("log", LOG),
    text("log_format", LOG_FORMAT),
    text(
        "misbehave",
        "tamper:<member-id> (demonstration only; unset in production)",
    ),
];

/// Settings of `dapgw udc`, in the order they are documented.
const UDC_SETTINGS: &[Setting] = &[
    text("listen", ADDR),
    text("tls_cert", PEM_FILE),
    text("tls_key", PEM_FILE),
    text(
        "client_ca",
        "a path to the PEM file of the CA that signs gateway client certificates",
    ),
    text("admin_listen", ADDR),
    text(
        "admin_token_file",
        "a path to a file holding the operator API bearer token",
    ),
    text("store_url", "sqlite:///absolute/path or postgres://..."),
    text("master_secret_file", "a path to the master secret file"),
    text("storage_key_file", "a path to the storage key file"),
    text("signing_key_file", "a path to the online signing key file"),
    text("key_cert_file", "a path to the key certificate file"),
    text("default_mode", "`psk` or `psk-ecdhe`"),
    number("localize_timeout_ms", MS),
    number("readings_retention_days", DAYS),
    number("verdicts_retention_days", DAYS),
    text("log", LOG),
    text("log_format", LOG_FORMAT),
    number("drain_grace_ms", MS),
    number("max_body_bytes", BYTES),
    number("max_connections", "an integer greater than 0"),
    number("max_connections_per_ip", "an integer greater than 0"),
    number("header_timeout_ms", MS),
    number("body_timeout_ms", MS),
    number("idle_timeout_ms", MS),
];

/// Which service a configuration is for; selects the setting table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Service {
    Gateway,
    Udc,
}

impl Service {
    fn settings(self) -> &'static [Setting] {
        match self {
            Service::Gateway => GATEWAY_SETTINGS,
            Service::Udc => UDC_SETTINGS,
        }
    }

    fn other(self) -> Service {
        match self {
            Service::Gateway => Service::Udc,
            Service::Udc => Service::Gateway,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Udc => "udc",
        }
    }

    fn find(self, key: &str) -> Option<&'static Setting> {
        self.settings().iter().find(|s| s.key == key)
    }
}

/// The environment variable for a TOML key: `spool_max_bytes` ->
/// `DAPGW_SPOOL_MAX_BYTES` (a nested key `a.b` -> `DAPGW_A__B`).
fn var_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

// ---------------------------------------------------------------------------
// Value types
// ---------------------------------------------------------------------------

/// A size in bytes. Reads a plain integer (`268435456`) or a string with a
/// binary suffix (`"256MiB"`, `"64 KiB"`, `"1GiB"`, `"512B"`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// One mebibyte times `n`.
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }

    /// The size in bytes.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Parses the string form (see the type's doc).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = s[..digits].parse().ok()?;
        let mult: u64 = match s[digits..].trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(mult).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("negative size {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).ok_or_else(|| E::custom(format!("cannot read `{v}` as a size")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A URL that may carry credentials (`postgres://user:pw@host/db`). Reads and
/// compares as the exact text; `Debug` and `Display` hide the userinfo and
/// the query string.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL string.
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The full URL, credentials included: pass it to the client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the userinfo and query replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        let s = &self.0;
        let Some(scheme_end) = s.find("://") else {
            // Not URL-shaped: nothing can be safely shown.
            return if s.is_empty() {
                String::new()
            } else {
                "<redacted>".into()
            };
        };
        let (scheme, rest) = s.split_at(scheme_end + 3);
        let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(auth_end);
        let authority = match authority.rfind('@') {
            Some(at) => format!("<redacted>@{}", &authority[at + 1..]),
            None => authority.to_string(),
        };
        let tail = match tail.find('?') {
            Some(q) => format!("{}?<redacted>", &tail[..q]),
            None => tail.to_string(),
        };
        format!("{scheme}{authority}{tail}")
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// The session mode the UDC opens rounds with unless a group asks otherwise.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultMode {
    /// Pre-shared key only: cheapest, no forward secrecy.
    Psk,
    /// Pre-shared key plus an X25519 exchange: forward secrecy for the
    /// session keys, one X25519 per member on each side.
    #[default]
    PskEcdhe,
}

// ---------------------------------------------------------------------------
// Structs
// ---------------------------------------------------------------------------

/// Configuration of `dapgw gateway`. Every field is the TOML key of the
/// variable `DAPGW_<FIELD>`; the README lists them with their defaults.
/// Required paths and strings are empty when unset and refused by
/// [`validate`](Self::validate).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// `DAPGW_UPSTREAM_URL` (required): https URL of the UDC.
    pub upstream_url: SecretUrl,
    /// `DAPGW_UPSTREAM_CA` (required): PEM of the UDC's CA, the only CA
    /// trusted for the upstream link.
    pub upstream_ca: PathBuf,
    /// `DAPGW_UPSTREAM_CLIENT_CERT` (required): the gateway's client
    /// certificate chain, PEM.
    pub upstream_client_cert: PathBuf,
    /// `DAPGW_UPSTREAM_CLIENT_KEY` (required): its private key, PEM.
    pub upstream_client_key: PathBuf,
    /// `DAPGW_GATEWAY_ID` (required): `[a-z0-9._-]{1,64}`, kept as text.
    pub gateway_id: String,
    /// `DAPGW_LISTEN` (default `0.0.0.0:8443`): member-facing HTTPS listener.
    pub listen: SocketAddr,
    /// `DAPGW_TLS_CERT` (required): member-facing server certificate, PEM.
    pub tls_cert: PathBuf,
    /// `DAPGW_TLS_KEY` (required): its private key, PEM.
    pub tls_key: PathBuf,
    /// `DAPGW_MEMBER_CLIENT_CA` (optional): when set, members must present a
    /// client certificate signed by this CA.
    pub member_client_ca: Option<PathBuf>,
    /// `DAPGW_ADMIN_LISTEN` (default `127.0.0.1:9090`): plain-HTTP admin
    /// listener (`/metrics`, `/healthz`, `/readyz`). Loopback by default;
    /// set `0.0.0.0:9090` for a scraper outside the host or pod.
    pub admin_listen: SocketAddr,
    /// `DAPGW_SPOOL_DIR` (default `/var/lib/dapgw/spool`).
    pub spool_dir: PathBuf,
    /// `DAPGW_SPOOL_MAX_BYTES` (default 256 MiB): members get 503 beyond it.
    pub spool_max_bytes: ByteSize,
    /// `DAPGW_SPOOL_MAX_BYTES_PER_SOURCE` (default unset: an eighth of
    /// `DAPGW_SPOOL_MAX_BYTES`, at least twice `DAPGW_MAX_BODY_BYTES`; `0`
    /// turns the share off): what one source
    /// (an IPv4 address, an IPv6 /64) may hold in the spool until the UDC
    /// answers for it; beyond it that source gets 503 while others are
    /// served. See [`GatewayConfig::spool_share`].
    pub spool_max_bytes_per_source: Option<ByteSize>,
    /// `DAPGW_BATCH_MAX_ENTRIES` (default 16384, the wire cap).
    pub batch_max_entries: u32,
    /// `DAPGW_BATCH_LINGER_MS` (default 1000): how long a batch of uplinks
    /// waits to fill, counted from its first uplink's arrival (its spool
    /// commit included, up to half the linger).
    pub batch_linger_ms: u64,
    /// `DAPGW_ROUND_DEADLINE_MS` (default 30000): a round's responses are
    /// sent upstream when this passes, whoever is missing.
    pub round_deadline_ms: u64,
    /// `DAPGW_CHUNK_SIZE` (default 64, 1..=1024): entries per aggregate tag.
    pub chunk_size: u16,
    /// `DAPGW_MAX_CONNECTIONS` (default 4096): concurrent member connections.
    pub max_connections: u32,
    /// `DAPGW_MAX_CONNECTIONS_PER_IP` (default 64): concurrent member
    /// connections from one source address (an IPv6 source is its /64);
    /// beyond it a new connection is closed at once.
    pub max_connections_per_ip: u32,
    /// `DAPGW_MAX_BODY_BYTES` (default 16 KiB): largest member request body.
    pub max_body_bytes: ByteSize,
    /// `DAPGW_HEADER_TIMEOUT_MS` (default 10000): time for a member to send
    /// its request headers.
    pub header_timeout_ms: u64,
    /// `DAPGW_IDLE_TIMEOUT_MS` (default 60000): idle member connections close.
    pub idle_timeout_ms: u64,
    /// `DAPGW_DRAIN_GRACE_MS` (default 10000): hard cap on the SIGTERM drain.
    pub drain_grace_ms: u64,
    /// `DAPGW_UPSTREAM_TIMEOUT_MS` (default 30000): one upstream request.
    pub upstream_timeout_ms: u64,
    /// `DAPGW_RETRY_MAX_MS` (default 30000): cap of the jittered exponential
    /// backoff between upstream retries.
    pub retry_max_ms: u64,
    /// `DAPGW_ATTACH_TTL_S` (default 604800, 7 days): a member that sends
    /// no request for this long is dropped from the attach registry (no
    /// longer expected in rounds, its groups unsubscribed when it was their
    /// last member). Any member request naming it refreshes it.
    pub attach_ttl_s: u64,
    /// `DAPGW_ATTACH_MAX_MEMBERS_PER_SOURCE` (default 125000, an eighth of
    /// the registry's 1,000,000; `0` turns the share off): how many members
    /// one source (an IPv4 address, an IPv6 /64) may keep attached; beyond
    /// it that source's new members get 503 while others attach.
    pub attach_max_members_per_source: u64,
    /// `DAPGW_ATTACH_MAX_GROUPS_PER_SOURCE` (default 512, an eighth of the
    /// UDC's 4,096-group subscription cap; `0` turns the share off): how
    /// many distinct groups the members one source attached may name
    /// together, so one client cannot fill the subscription for all.
    pub attach_max_groups_per_source: u64,
    /// `DAPGW_LOG` (default `info`): tracing filter.
    pub log: String,
    /// `DAPGW_LOG_FORMAT` (default `text`): `text` or `json`.
    pub log_format: LogFormat,
    /// `DAPGW_MISBEHAVE` (unset): demonstration only. `tamper:<member-id>`
    /// makes this gateway dishonest (it alters one response per round and
    /// invents one for `<member-id>`) so the UDC can be seen catching it;
    /// see [`crate::gateway::misbehave`].
    pub misbehave: Option<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            upstream_url: SecretUrl::default(),
            upstream_ca: PathBuf::new(),
            upstream_client_cert: PathBuf::new(),
            upstream_client_key: PathBuf::new(),
            gateway_id: String::new(),
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            member_client_ca: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            spool_dir: PathBuf::from("/var/lib/dapgw/spool"),
            spool_max_bytes: ByteSize::mib(256),
            spool_max_bytes_per_source: None,
            batch_max_entries: 16384,
            batch_linger_ms: 1000,
            round_deadline_ms: 30_000,
            chunk_size: 64,
            max_connections: 4096,
            max_connections_per_ip: 64,
            max_body_bytes: ByteSize(16 * 1024),
            header_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            drain_grace_ms: 10_000,
            upstream_timeout_ms: 30_000,
            retry_max_ms: 30_000,
            attach_ttl_s: DEFAULT_ATTACH_TTL_S,
            attach_max_members_per_source: DEFAULT_ATTACH_MEMBERS_PER_SOURCE,
            attach_max_groups_per_source: DEFAULT_ATTACH_GROUPS_PER_SOURCE,
            log: "info".into(),
            log_format: LogFormat::Text,
            misbehave: None,
        }
    }
}

/// Configuration of `dapgw udc`. Every field is the TOML key of the variable
/// `DAPGW_<FIELD>`; required paths are empty when unset and refused by
/// [`validate`](Self::validate).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UdcConfig {
    /// `DAPGW_LISTEN` (default `0.0.0.0:9443`): HTTPS listener for gateways
    /// and direct members.
    pub listen: SocketAddr,
    /// `DAPGW_TLS_CERT` (required): server certificate, PEM.
    pub tls_cert: PathBuf,
    /// `DAPGW_TLS_KEY` (required): its private key, PEM.
    pub tls_key: PathBuf,
    /// `DAPGW_CLIENT_CA` (required): CA of the gateways' client certificates.
    pub client_ca: PathBuf,
    /// `DAPGW_ADMIN_LISTEN` (default `127.0.0.1:9091`, one above the
    /// gateway's so both run on one host): admin listener.
    pub admin_listen: SocketAddr,
    /// `DAPGW_ADMIN_TOKEN_FILE` (optional): bearer token of the operator API;
    /// without it the operator API is off.
    pub admin_token_file: Option<PathBuf>,
    /// `DAPGW_STORE_URL` (default `sqlite:///var/lib/dapgw/udc.sqlite3`):
    /// `sqlite:///absolute/path` or `postgres://user@host/db`.
    pub store_url: SecretUrl,
    /// `DAPGW_MASTER_SECRET_FILE` (required): the master secret MS.
    pub master_secret_file: PathBuf,
    /// `DAPGW_STORAGE_KEY_FILE` (required): key encrypting rows at rest.
    pub storage_key_file: PathBuf,
    /// `DAPGW_SIGNING_KEY_FILE` (required): the online Ed25519 signing key.
    pub signing_key_file: PathBuf,
    /// `DAPGW_KEY_CERT_FILE` (required): the root's certificate of that key.
    pub key_cert_file: PathBuf,
    /// `DAPGW_DEFAULT_MODE` (default `psk-ecdhe`).
    pub default_mode: DefaultMode,
    /// `DAPGW_LOCALIZE_TIMEOUT_MS` (default 30000): how long the UDC waits
    /// for a gateway's individual tags of a failed chunk.
    pub localize_timeout_ms: u64,
    /// `DAPGW_READINGS_RETENTION_DAYS` (default 400; 0 keeps forever):
    /// readings and alarms older than this are deleted.
    pub readings_retention_days: u64,
    /// `DAPGW_VERDICTS_RETENTION_DAYS` (default 30; 0 keeps forever): final
    /// batch verdicts older than this are deleted (a batch retried later is
    /// judged again).
    pub verdicts_retention_days: u64,
    /// `DAPGW_LOG` (default `info`).
    pub log: String,
    /// `DAPGW_LOG_FORMAT` (default `text`).
    pub log_format: LogFormat,
    /// `DAPGW_DRAIN_GRACE_MS` (default 10000).
    pub drain_grace_ms: u64,
    /// `DAPGW_MAX_BODY_BYTES` (default 32 MiB): a full batch of 16384
    /// entries fits.
    pub max_body_bytes: ByteSize,
    /// `DAPGW_MAX_CONNECTIONS` (default 1024): concurrent connections
    /// (gateways and direct members).
    pub max_connections: u32,
    /// `DAPGW_MAX_CONNECTIONS_PER_IP` (default 64): concurrent connections
    /// from one source address (an IPv6 source is its /64).
    pub max_connections_per_ip: u32,
    /// `DAPGW_HEADER_TIMEOUT_MS` (default 10000): TLS handshake, and each
    /// request head from its first byte.
    pub header_timeout_ms: u64,
    /// `DAPGW_BODY_TIMEOUT_MS` (default 60000): a whole request body (a
    /// full batch is 32 MiB).
    pub body_timeout_ms: u64,
    /// `DAPGW_IDLE_TIMEOUT_MS` (default 60000): connections with no request
    /// for this long close.
    pub idle_timeout_ms: u64,
}

impl Default for UdcConfig {
    fn default() -> Self {
        UdcConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 9443)),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            client_ca: PathBuf::new(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            admin_token_file: None,
            store_url: SecretUrl::new("sqlite:///var/lib/dapgw/udc.sqlite3"),
            master_secret_file: PathBuf::new(),
            storage_key_file: PathBuf::new(),
            signing_key_file: PathBuf::new(),
            key_cert_file: PathBuf::new(),
            default_mode: DefaultMode::PskEcdhe,
            localize_timeout_ms: 30_000,
            readings_retention_days: 400,
            verdicts_retention_days: 30,
            log: "info".into(),
            log_format: LogFormat::Text,
            drain_grace_ms: 10_000,
            max_body_bytes: ByteSize::mib(32),
            max_connections: 1024,
            max_connections_per_ip: 64,
            header_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            idle_timeout_ms: 60_000,
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl GatewayConfig {
    /// `batch_linger_ms` as a duration.
    pub fn batch_linger(&self) -> Duration {
        ms(self.batch_linger_ms)
    }
    /// `round_deadline_ms` as a duration.
    pub fn round_deadline(&self) -> Duration {
        ms(self.round_deadline_ms)
    }
    /// `header_timeout_ms` as a duration.
    pub fn header_timeout(&self) -> Duration {
        ms(self.header_timeout_ms)
    }
    /// `idle_timeout_ms` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        ms(self.idle_timeout_ms)
    }
    /// `drain_grace_ms` as a duration.
    pub fn drain_grace(&self) -> Duration {
        ms(self.drain_grace_ms)
    }
    /// `upstream_timeout_ms` as a duration.
    pub fn upstream_timeout(&self) -> Duration {
        ms(self.upstream_timeout_ms)
    }
    /// `retry_max_ms` as a duration.
    pub fn retry_max(&self) -> Duration {
        ms(self.retry_max_ms)
    }
    /// `attach_ttl_s` as a duration.
    pub fn attach_ttl(&self) -> Duration {
        Duration::from_secs(self.attach_ttl_s)
    }

    /// What one source may hold of the attach registry
    /// (`DAPGW_ATTACH_MAX_MEMBERS_PER_SOURCE`,
    /// `DAPGW_ATTACH_MAX_GROUPS_PER_SOURCE`; 0 = no share).
    pub fn attach_share(&self) -> crate::gateway::AttachShare {
        crate::gateway::AttachShare {
            members: usize::try_from(self.attach_max_members_per_source).unwrap_or(usize::MAX),
            groups: usize::try_from(self.attach_max_groups_per_source).unwrap_or(usize::MAX),
        }
    }

    /// What one source may hold in the spool, in accounted bytes (0 = no
    /// share): `DAPGW_SPOOL_MAX_BYTES_PER_SOURCE`, or when unset an eighth
    /// of `DAPGW_SPOOL_MAX_BYTES` (but at least twice
    /// `DAPGW_MAX_BODY_BYTES`, so a largest message always fits, and at most
    /// the spool). A default that is on, because a
    /// gateway in front of many members must not let one client fill the
    /// spool for all; an eighth still leaves a busy source (a NAT in front
    /// of many meters) room for a long UDC outage, and a fraction follows
    /// an operator who resizes the spool.
    pub fn spool_share(&self) -> u64 {
        match self.spool_max_bytes_per_source {
            Some(b) => b.get(),
            None => (self.spool_max_bytes.get() / 8)
                .max(self.max_body_bytes.get().saturating_mul(2))
                .min(self.spool_max_bytes.get()),
        }
    }

    /// Checks every setting and returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::new(Service::Gateway);
        self.check(&mut p);
        p.into_result()
    }

    fn check(&self, p: &mut Problems) {
        check_https_url(p, "upstream_url", self.upstream_url.expose());
        p.file("upstream_ca", &self.upstream_ca);
        p.file("upstream_client_cert", &self.upstream_client_cert);
        p.file("upstream_client_key", &self.upstream_client_key);
        check_gateway_id(p, &self.gateway_id);
        p.file("tls_cert", &self.tls_cert);
        p.file("tls_key", &self.tls_key);
        if let Some(ca) = &self.member_client_ca {
            p.file("member_client_ca", ca);
        }
        check_tls_pair(p, ("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key));
        if let Some(ca) = &self.member_client_ca {
            check_roots(p, "member_client_ca", ca);
        }
        check_roots(p, "upstream_ca", &self.upstream_ca);
        if check_tls_pair(
            p,
            ("upstream_client_cert", &self.upstream_client_cert),
            ("upstream_client_key", &self.upstream_client_key),
        ) {
            check_gateway_identity(p, &self.gateway_id, &self.upstream_client_cert);
        }
        if self.spool_dir.as_os_str().is_empty() {
            p.push("spool_dir", "must not be empty");
        }
        if self.spool_max_bytes.get() < 1024 * 1024 {
            p.push("spool_max_bytes", "must be at least 1 MiB (1048576)");
        }
        if let Some(share) = self.spool_max_bytes_per_source
            && share.get() != 0
        {
            let low = self.max_body_bytes.get().saturating_mul(2);
            let high = self.spool_max_bytes.get();
            if share.get() < low || share.get() > high {
                p.push(
                    "spool_max_bytes_per_source",
                    format!(
                        "must be 0 (no share) or from {low} (twice DAPGW_MAX_BODY_BYTES) to {high} (DAPGW_SPOOL_MAX_BYTES)"
                    ),
                );
            }
        }
        p.range(
            "batch_max_entries",
            self.batch_max_entries.into(),
            1,
            MAX_BATCH_ENTRIES.into(),
        );
        p.range(
            "chunk_size",
            self.chunk_size.into(),
            1,
            MAX_CHUNK_SIZE.into(),
        );
        p.range(
            "max_connections",
            self.max_connections.into(),
            1,
            u32::MAX.into(),
        );
        p.range(
            "max_connections_per_ip",
            self.max_connections_per_ip.into(),
            1,
            u32::MAX.into(),
        );
        check_body(p, self.max_body_bytes);
        p.range("attach_ttl_s", self.attach_ttl_s, 1, MAX_ATTACH_TTL_S);
        p.range(
            "attach_max_members_per_source",
            self.attach_max_members_per_source,
            0,
            crate::gateway::MAX_ATTACHED_MEMBERS as u64,
        );
        // A share below what one member may name would refuse that member
        // from a fresh source, every time it asks (503 until it gives up).
        let (lo, hi) = (
            crate::gateway::MAX_MEMBER_GROUPS as u64,
            crate::protocol::MAX_SUBSCRIBED_GROUPS as u64,
        );
        let groups = self.attach_max_groups_per_source;
        if groups != 0 && !(lo..=hi).contains(&groups) {
            p.push(
                "attach_max_groups_per_source",
                format!(
                    "{groups} is out of range; expected 0 (no share) or {lo} (the groups one \
                     member may name) to {hi}"
                ),
            );
        }
        for (key, v) in [
            ("batch_linger_ms", self.batch_linger_ms),
            ("round_deadline_ms", self.round_deadline_ms),
            ("header_timeout_ms", self.header_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("drain_grace_ms", self.drain_grace_ms),
            ("upstream_timeout_ms", self.upstream_timeout_ms),
            ("retry_max_ms", self.retry_max_ms),
        ] {
            p.positive_ms(key, v);
        }
        if self.round_deadline_ms > 0 && self.batch_linger_ms >= self.round_deadline_ms {
            p.push(
                "batch_linger_ms",
                format!(
                    "must be shorter than DAPGW_ROUND_DEADLINE_MS ({} ms), or no batch is sent before a round ends",
                    self.round_deadline_ms
                ),
            );
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            p.push("admin_listen", "must differ from DAPGW_LISTEN");
        }
        check_log(p, &self.log);
        if let Some(m) = &self.misbehave
            && let Err(reason) = crate::gateway::misbehave::MisbehaveSpec::parse(m)
        {
            p.push("misbehave", reason);
        }
    }
}

impl UdcConfig {
    /// `localize_timeout_ms` as a duration.
    pub fn localize_timeout(&self) -> Duration {
        ms(self.localize_timeout_ms)
    }
    /// `drain_grace_ms` as a duration.
    pub fn drain_grace(&self) -> Duration {
        ms(self.drain_grace_ms)
    }

    /// Checks every setting and returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::new(Service::Udc);
        self.check(&mut p);
        p.into_result()
    }

    fn check(&self, p: &mut Problems) {
        p.file("tls_cert", &self.tls_cert);
        p.file("tls_key", &self.tls_key);
        p.file("client_ca", &self.client_ca);
        check_tls_pair(p, ("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key));
        check_roots(p, "client_ca", &self.client_ca);
        if let Some(f) = &self.admin_token_file {
            p.file("admin_token_file", f);
            check_admin_token(p, f);
        }
        check_store_url(p, self.store_url.expose());
        p.file("master_secret_file", &self.master_secret_file);
        p.file("storage_key_file", &self.storage_key_file);
        p.file("signing_key_file", &self.signing_key_file);
        p.file("key_cert_file", &self.key_cert_file);
        check_udc_keys(p, self);
        p.positive_ms("localize_timeout_ms", self.localize_timeout_ms);
        p.positive_ms("drain_grace_ms", self.drain_grace_ms);
        check_body(p, self.max_body_bytes);
        for (key, v) in [
            ("max_connections", self.max_connections),
            ("max_connections_per_ip", self.max_connections_per_ip),
        ] {
            p.range(key, v.into(), 1, u32::MAX.into());
        }
        for (key, v) in [
            ("header_timeout_ms", self.header_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            p.positive_ms(key, v);
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            p.push("admin_listen", "must differ from DAPGW_LISTEN");
        }
        check_log(p, &self.log);
    }
}

/// Loads a certificate chain and its key (when both files exist, which
/// `Problems::file` checks) so that a file holding the wrong thing, or a key
/// that does not match its certificate, stops startup before any port is
/// bound. True when the pair is usable.
fn check_tls_pair(p: &mut Problems, cert: (&str, &Path), key: (&str, &Path)) -> bool {
    use crate::tls::TlsError;
    if !cert.1.is_file() || !key.1.is_file() {
        return false;
    }
    match crate::tls::ReloadableCert::load(cert.1, key.1) {
        Ok(_) => true,
        Err(e) => {
            let var = match &e {
                TlsError::NoPrivateKey { .. } | TlsError::Key { .. } => key.0,
                TlsError::Read { path, .. } | TlsError::Pem { path, .. } if path == key.1 => key.0,
                _ => cert.0,
            };
            let message = match &e {
                TlsError::Key { source, .. } => format!(
                    "`{}` cannot be used with the certificate in {}: {source}",
                    key.1.display(),
                    var_name(cert.0)
                ),
                other => other.to_string(),
            };
            p.push(var, message);
            false
        }
    }
}

/// Reads the UDC's key files (those that exist) as the UDC will, so a file
/// holding the wrong thing stops startup before any port is bound; the
/// online key must be the one its certificate certifies. Messages never
/// quote a file's content.
/// The admin token must be usable as a bearer token: without it the
/// operator API would start and refuse every call (401), where leaving the
/// variable unset turns the API off (404). Nothing of the file's content is
/// put in the message.
fn check_admin_token(p: &mut Problems, file: &Path) {
    if !file.is_file() {
        return; // `p.file` reported it
    }
    if let Err(e) = admin_token(file) {
        p.push("admin_token_file", e);
    }
}

/// The operator API's bearer token from `file` (its one line, trimmed),
/// as [`UdcConfig::validate`] checks it and the UDC serves it. The error
/// never quotes the file's content.
pub fn admin_token(file: &Path) -> Result<String, String> {
    let text = std::fs::read(file).map_err(|e| format!("`{}`: {e}", file.display()))?;
    let token = String::from_utf8(text).unwrap_or_default();
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a file holding the token (printable ASCII without spaces, one line; it is empty or holds other characters)".into());
    }
    Ok(token.to_owned())
}

fn check_udc_keys(p: &mut Problems, c: &UdcConfig) {
    use crate::udc::keys_cmd;
    fn show(e: keys_cmd::KeysError) -> String {
        e.to_string()
    }
    if c.master_secret_file.is_file()
        && let Err(e) = keys_cmd::load_master(&c.master_secret_file)
    {
        p.push("master_secret_file", show(e));
    }
    if c.storage_key_file.is_file()
        && let Err(e) = keys_cmd::load_storage_key(&c.storage_key_file)
    {
        p.push("storage_key_file", show(e));
    }
    let signing = c
        .signing_key_file
        .is_file()
        .then(|| keys_cmd::load_signing_key(&c.signing_key_file));
    let cert = c
        .key_cert_file
        .is_file()
        .then(|| keys_cmd::load_key_cert(&c.key_cert_file));
    match (signing, cert) {
        (Some(Err(e)), _) => p.push("signing_key_file", show(e)),
        (_, Some(Err(e))) => p.push("key_cert_file", show(e)),
        (Some(Ok(key)), Some(Ok(cert))) if cert.public_key != key.verifying_key().to_bytes() => {
            p.push(
                "key_cert_file",
                "certifies another public key than the one of DAPGW_SIGNING_KEY_FILE",
            );
        }
        _ => {}
    }
}

/// Loads a CA file as trust anchors (when it exists).
fn check_roots(p: &mut Problems, key: &str, path: &Path) {
    if path.is_file()
        && let Err(e) = crate::tls::load_roots(path)
    {
        p.push(key, e.to_string());
    }
}

/// The UDC identifies a gateway by its client certificate (the first DNS
/// name, or the CN) and refuses every batch whose gateway id differs: a
/// gateway whose `DAPGW_GATEWAY_ID` is not its certificate's identity could
/// never deliver anything, so it does not start.
fn check_gateway_identity(p: &mut Problems, gateway_id: &str, cert: &Path) {
    if gateway_id.is_empty() {
        return; // reported as required
    }
    let Ok(chain) = crate::tls::load_certs(cert) else {
        return;
    };
    let identity = chain
        .first()
        .and_then(|leaf| crate::tls::identity_from_der(leaf));
    match identity {
        Some(id) if id == gateway_id => {}
        Some(id) => p.push(
            "gateway_id",
            format!(
                "`{gateway_id}` is not the identity `{id}` of the client certificate in \
                 DAPGW_UPSTREAM_CLIENT_CERT; the UDC would refuse every batch"
            ),
        ),
        None => p.push(
            "upstream_client_cert",
            "the leaf certificate names no DNS subjectAltName or printable CN; the UDC could not identify this gateway",
        ),
    }
}

fn check_https_url(p: &mut Problems, key: &'static str, url: &str) {
    if url.is_empty() {
        p.required(key);
        return;
    }
    let shown = SecretUrl::new(url).redacted();
    match url.parse::<hyper::Uri>() {
        Ok(uri)
            if uri.scheme_str() == Some("https") && uri.host().is_some_and(|h| !h.is_empty()) =>
        {
            if uri.query().is_some() {
                p.push(key, format!("`{shown}` must not have a query string"));
            }
        }
        Ok(_) => p.push(key, format!("`{shown}` is not an https:// URL with a host")),
        Err(e) => p.push(key, format!("`{shown}` is not a valid URL: {e}")),
    }
}

fn check_gateway_id(p: &mut Problems, id: &str) {
    if id.is_empty() {
        p.required("gateway_id");
    } else if id.len() > 64
        || !id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
    {
        p.push(
            "gateway_id",
            format!("`{id}` must be 1 to 64 characters from [a-z0-9._-]"),
        );
    }
}

fn check_store_url(p: &mut Problems, url: &str) {
    let shown = SecretUrl::new(url).redacted();
    if let Some(path) = url.strip_prefix("sqlite://") {
        if !path.starts_with('/') || path.len() < 2 {
            p.push(
                "store_url",
                format!(
                    "`{shown}` must name an absolute path: sqlite:///var/lib/dapgw/udc.sqlite3"
                ),
            );
        }
    } else if let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        if rest.is_empty() {
            p.push("store_url", format!("`{shown}` names no host"));
        }
    } else if url.is_empty() {
        p.required("store_url");
    } else {
        p.push(
            "store_url",
            format!("`{shown}` must start with sqlite:/// or postgres://"),
        );
    }
}

fn check_body(p: &mut Problems, size: ByteSize) {
    if size.get() < MIN_BODY_BYTES {
        p.push(
            "max_body_bytes",
            format!("must be at least {MIN_BODY_BYTES}"),
        );
    }
}

fn check_log(p: &mut Problems, filter: &str) {
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(filter) {
        p.push(
            "log",
            format!("`{filter}` is not a valid tracing filter: {e}"),
        );
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// One thing wrong with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The environment variable concerned, e.g. `DAPGW_SPOOL_MAX_BYTES`.
    pub variable: String,
    /// Where the bad value came from (`environment variable`, `TOML file
    /// /etc/dapgw.toml`), when known.
    pub origin: Option<String>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(o) => write!(f, "{} (from {o}): {}", self.variable, self.message),
            None => write!(f, "{}: {}", self.variable, self.message),
        }
    }
}

/// Every problem found in a configuration. `Display` prints one line per
/// problem under a header, ready for stderr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    service: &'static str,
    problems: Vec<Problem>,
}

impl ConfigError {
    /// The problems, in the documented order of the settings.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Whether any problem names `variable` (e.g. `DAPGW_GATEWAY_ID`).
    pub fn names(&self, variable: &str) -> bool {
        self.problems.iter().any(|p| p.variable == variable)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid {} configuration ({n} problem{}):",
            self.service,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Collects problems for one service, naming variables from TOML keys.
struct Problems {
    service: Service,
    list: Vec<Problem>,
}

impl Problems {
    fn new(service: Service) -> Self {
        Problems {
            service,
            list: Vec::new(),
        }
    }

    fn add(&mut self, variable: String, origin: Option<String>, message: String) {
        self.list.push(Problem {
            variable,
            origin,
            message,
        });
    }

    fn push(&mut self, key: &str, message: impl Into<String>) {
        self.add(var_name(key), None, message.into());
    }

    fn required(&mut self, key: &str) {
        let expect = self.service.find(key).map_or("a value", |s| s.expect);
        self.push(key, format!("required but not set; expected {expect}"));
    }

    fn file(&mut self, key: &str, path: &Path) {
        if path.as_os_str().is_empty() {
            self.required(key);
        } else if !path.is_file() {
            self.push(
                key,
                format!(
                    "`{}` does not exist or is not a regular file",
                    path.display()
                ),
            );
        }
    }

    fn range(&mut self, key: &str, v: u64, lo: u64, hi: u64) {
        if v < lo || v > hi {
            self.push(key, format!("{v} is out of range; expected {lo} to {hi}"));
        }
    }

    fn positive_ms(&mut self, key: &str, v: u64) {
        if v == 0 {
            self.push(key, "must be greater than 0 (milliseconds)");
        }
    }

    fn mentions(&self, variable: &str) -> bool {
        self.list.iter().any(|p| p.variable == variable)
    }

    fn into_result(self) -> Result<(), ConfigError> {
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                service: self.service.name(),
                problems: self.list,
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/// The `DAPGW_*` environment as a figment provider: numeric settings parsed,
/// every other value kept as its exact text, unknown and empty variables
/// left out (unknown ones are reported by [`unknown_env`]).
struct DapgwEnv {
    service: Service,
}

fn env() -> Env {
    Env::prefixed(ENV_PREFIX).split("__")
}

impl Provider for DapgwEnv {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable").interpolater(|_, keys| var_name(&keys.join(".")))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, raw) in env().iter() {
            let Some(setting) = self.service.find(key.as_str()) else {
                continue;
            };
            if raw.is_empty() {
                continue;
            }
            let value = match setting.kind {
                Kind::Text => Value::from(raw),
                Kind::Number => raw.parse().unwrap_or_else(|never| match never {}),
            };
            dict.insert(setting.key.to_string(), value);
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// `DAPGW_*` variables that are not settings of `service`.
fn unknown_env(service: Service, p: &mut Problems) {
    for (key, _) in env().iter() {
        let key = key.as_str();
        if key == "config" || service.find(key).is_some() {
            continue;
        }
        let hint = if service.other().find(key).is_some() {
            format!(
                "is a {} setting, not a {} one; remove it from this service's environment",
                service.other().name(),
                service.name()
            )
        } else {
            format!("unknown variable for the {} (a typo?)", service.name())
        };
        p.add(var_name(key), Some("environment variable".into()), hint);
    }
}

/// Builds the layered figment (file, then environment) and records
/// problems with the file and with unknown variables or keys.
fn layered(service: Service, config_path: Option<&Path>, p: &mut Problems) -> Figment {
    let mut fig = Figment::new();
    let from_env = std::env::var_os(CONFIG_VAR).filter(|v| !v.is_empty());
    let named = config_path
        .map(|c| (c.to_path_buf(), "--config"))
        .or_else(|| from_env.map(|v| (PathBuf::from(v), CONFIG_VAR)));
    if let Some((path, how)) = named {
        if path.is_file() {
            fig = fig.merge(Toml::file_exact(&path));
            unknown_toml(service, &path, p);
        } else {
            p.add(
                CONFIG_VAR.into(),
                Some(how.into()),
                format!(
                    "config file `{}` does not exist or is not a regular file",
                    path.display()
                ),
            );
        }
    }
    unknown_env(service, p);
    fig.merge(DapgwEnv { service })
}

/// Reads the TOML file once more on its own to report syntax errors and
/// unknown keys with the file's name.
fn unknown_toml(service: Service, path: &Path, p: &mut Problems) {
    let origin = format!("TOML file {}", path.display());
    match Toml::file_exact(path).data() {
        Ok(map) => {
            for dict in map.values() {
                for key in dict.keys() {
                    if service.find(key).is_none() {
                        p.add(
                            var_name(key),
                            Some(origin.clone()),
                            format!("unknown key `{key}` for the {}", service.name()),
                        );
                    }
                }
            }
        }
        Err(e) => p.add(
            CONFIG_VAR.into(),
            Some(origin),
            format!("cannot parse the file: {}", e.kind),
        ),
    }
}

/// Extracts one setting, falling back to `default` when it is not set or
/// (after recording the problem) cannot be read.
fn field<T: DeserializeOwned>(fig: &Figment, p: &mut Problems, key: &'static str, default: T) -> T {
    if fig.find_value(key).is_err() {
        return default;
    }
    match fig.extract_inner::<T>(key) {
        Ok(v) => v,
        Err(e) => {
            let variable = var_name(key);
            // An unknown key or unparsable file is already reported.
            if !p.mentions(&variable) {
                let origin = fig.find_metadata(key).map(|m| match &m.source {
                    Some(src) => format!("{} {src}", m.name),
                    None => m.name.to_string(),
                });
                let expect = p.service.find(key).map_or("", |s| s.expect);
                p.add(variable, origin, format!("{}; expected {expect}", e.kind));
            }
            default
        }
    }
}

/// Runs validation and merges its problems, skipping variables that already
/// have a problem from extraction (their value is the default stand-in).
fn finish(mut p: Problems, check: impl FnOnce(&mut Problems)) -> Result<(), ConfigError> {
    let mut v = Problems::new(p.service);
    check(&mut v);
    for problem in v.list {
        if !p.mentions(&problem.variable) {
            p.list.push(problem);
        }
    }
    // Report in the documented order of settings; config-file problems first.
    let order = |var: &str| {
        p.service
            .settings()
            .iter()
            .position(|s| var_name(s.key) == var)
            .map_or(if var == CONFIG_VAR { 0 } else { usize::MAX }, |i| i + 1)
    };
    p.list.sort_by_key(|x| order(&x.variable));
    p.into_result()
}

/// Loads the gateway configuration: defaults, then the TOML file named by
/// `config_path` (`--config`) or else by `DAPGW_CONFIG`, then `DAPGW_*`
/// variables, then [`GatewayConfig::validate`]. Every problem is reported.
pub fn load_gateway(config_path: Option<&Path>) -> Result<GatewayConfig, ConfigError> {
    let mut p = Problems::new(Service::Gateway);
    let fig = layered(Service::Gateway, config_path, &mut p);
    let d = GatewayConfig::default();
    let c = GatewayConfig {
        upstream_url: field(&fig, &mut p, "upstream_url", d.upstream_url),
        upstream_ca: field(&fig, &mut p, "upstream_ca", d.upstream_ca),
        upstream_client_cert: field(&fig, &mut p, "upstream_client_cert", d.upstream_client_cert),
        upstream_client_key: field(&fig, &mut p, "upstream_client_key", d.upstream_client_key),
        gateway_id: field(&fig, &mut p, "gateway_id", d.gateway_id),
        listen: field(&fig, &mut p, "listen", d.listen),
        tls_cert: field(&fig, &mut p, "tls_cert", d.tls_cert),
        tls_key: field(&fig, &mut p, "tls_key", d.tls_key),
        member_client_ca: field(&fig, &mut p, "member_client_ca", d.member_client_ca),
        admin_listen: field(&fig, &mut p, "admin_listen", d.admin_listen),
        spool_dir: field(&fig, &mut p, "spool_dir", d.spool_dir),
        spool_max_bytes: field(&fig, &mut p, "spool_max_bytes", d.spool_max_bytes),
        spool_max_bytes_per_source: field(
            &fig,
            &mut p,
            "spool_max_bytes_per_source",
            d.spool_max_bytes_per_source,
        ),
        batch_max_entries: field(&fig, &mut p, "batch_max_entries", d.batch_max_entries),
        batch_linger_ms: field(&fig, &mut p, "batch_linger_ms", d.batch_linger_ms),
        round_deadline_ms: field(&fig, &mut p, "round_deadline_ms", d.round_deadline_ms),
        chunk_size: field(&fig, &mut p, "chunk_size", d.chunk_size),
        max_connections: field(&fig, &mut p, "max_connections", d.max_connections),
        max_connections_per_ip: field(
            &fig,
            &mut p,
            "max_connections_per_ip",
            d.max_connections_per_ip,
        ),
        max_body_bytes: field(&fig, &mut p, "max_body_bytes", d.max_body_bytes),
        header_timeout_ms: field(&fig, &mut p, "header_timeout_ms", d.header_timeout_ms),
        idle_timeout_ms: field(&fig, &mut p, "idle_timeout_ms", d.idle_timeout_ms),
        drain_grace_ms: field(&fig, &mut p, "drain_grace_ms", d.drain_grace_ms),
        upstream_timeout_ms: field(&fig, &mut p, "upstream_timeout_ms", d.upstream_timeout_ms),
        retry_max_ms: field(&fig, &mut p, "retry_max_ms", d.retry_max_ms),
        attach_ttl_s: field(&fig, &mut p, "attach_ttl_s", d.attach_ttl_s),
        attach_max_members_per_source: field(
            &fig,
            &mut p,
            "attach_max_members_per_source",
            d.attach_max_members_per_source,
        ),
        attach_max_groups_per_source: field(
            &fig,
            &mut p,
            "attach_max_groups_per_source",
            d.attach_max_groups_per_source,
        ),
        log: field(&fig, &mut p, "log", d.log),
        log_format: field(&fig, &mut p, "log_format", d.log_format),
        misbehave: field(&fig, &mut p, "misbehave", d.misbehave),
    };
    finish(p, |v| c.check(v))?;
    Ok(c)
}

/// Loads the UDC configuration, in the same layers as [`load_gateway`].
pub fn load_udc(config_path: Option<&Path>) -> Result<UdcConfig, ConfigError> {
    let mut p = Problems::new(Service::Udc);
    let fig = layered(Service::Udc, config_path, &mut p);
    let d = UdcConfig::default();
    let c = UdcConfig {
        listen: field(&fig, &mut p, "listen", d.listen),
        tls_cert: field(&fig, &mut p, "tls_cert", d.tls_cert),
        tls_key: field(&fig, &mut p, "tls_key", d.tls_key),
        client_ca: field(&fig, &mut p, "client_ca", d.client_ca),
        admin_listen: field(&fig, &mut p, "admin_listen", d.admin_listen),
        admin_token_file: field(&fig, &mut p, "admin_token_file", d.admin_token_file),
        store_url: field(&fig, &mut p, "store_url", d.store_url),
        master_secret_file: field(&fig, &mut p, "master_secret_file", d.master_secret_file),
        storage_key_file: field(&fig, &mut p, "storage_key_file", d.storage_key_file),
        signing_key_file: field(&fig, &mut p, "signing_key_file", d.signing_key_file),
        key_cert_file: field(&fig, &mut p, "key_cert_file", d.key_cert_file),
        default_mode: field(&fig, &mut p, "default_mode", d.default_mode),
        localize_timeout_ms: field(&fig, &mut p, "localize_timeout_ms", d.localize_timeout_ms),
        readings_retention_days: field(
            &fig,
            &mut p,
            "readings_retention_days",
            d.readings_retention_days,
        ),
        verdicts_retention_days: field(
            &fig,
            &mut p,
            "verdicts_retention_days",
            d.verdicts_retention_days,
        ),
        log: field(&fig, &mut p, "log", d.log),
        log_format: field(&fig, &mut p, "log_format", d.log_format),
        drain_grace_ms: field(&fig, &mut p, "drain_grace_ms", d.drain_grace_ms),
        max_body_bytes: field(&fig, &mut p, "max_body_bytes", d.max_body_bytes),
        max_connections: field(&fig, &mut p, "max_connections", d.max_connections),
        max_connections_per_ip: field(
            &fig,
            &mut p,
            "max_connections_per_ip",
            d.max_connections_per_ip,
        ),
        header_timeout_ms: field(&fig, &mut p, "header_timeout_ms", d.header_timeout_ms),
        body_timeout_ms: field(&fig, &mut p, "body_timeout_ms", d.body_timeout_ms),
        idle_timeout_ms: field(&fig, &mut p, "idle_timeout_ms", d.idle_timeout_ms),
    };
    finish(p, |v| c.check(v))?;
    Ok(c)
}

/// The documented variables of a service with their expected values, for
/// `--help` output and the README: `(variable, expected)`.
pub fn gateway_variables() -> impl Iterator<Item = (String, &'static str)> {
    GATEWAY_SETTINGS.iter().map(|s| (var_name(s.key), s.expect))
}

/// Like [`gateway_variables`], for the UDC.
pub fn udc_variables() -> impl Iterator<Item = (String, &'static str)> {
    UDC_SETTINGS.iter().map(|s| (var_name(s.key), s.expect))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The setting tables and the structs name the same keys, in order.
    #[test]
    fn tables_match_structs() {
        fn keys<T: Serialize>(v: &T) -> Vec<String> {
            let Value::Dict(_, d) = Value::serialize(v).unwrap() else {
                panic!("not a dict")
            };
            let mut k: Vec<_> = d.keys().cloned().collect();
            k.sort();
            k
        }
        let mut g: Vec<_> = GATEWAY_SETTINGS.iter().map(|s| s.key.to_string()).collect();
        g.sort();
        // Optional fields are None by default and then omitted: fill them.
        let gk = keys(&GatewayConfig {
            member_client_ca: Some("x".into()),
            misbehave: Some("x".into()),
            ..GatewayConfig::default()
        });
        assert_eq!(g, gk);
        let mut u: Vec<_> = UDC_SETTINGS.iter().map(|s| s.key.to_string()).collect();
        u.sort();
        let uk = keys(&UdcConfig {
            admin_token_file: Some("x".into()),
            ..UdcConfig::default()
        });
        assert_eq!(u, uk);
    }

    #[test]
    fn byte_size_forms() {
        assert_eq!(ByteSize::parse("268435456"), Some(ByteSize::mib(256)));
        assert_eq!(ByteSize::parse("256MiB"), Some(ByteSize::mib(256)));
        assert_eq!(ByteSize::parse("64 KiB"), Some(ByteSize(65536)));
        assert_eq!(ByteSize::parse("1GiB"), Some(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("12B"), Some(ByteSize(12)));
        assert_eq!(ByteSize::parse("MiB"), None);
        assert_eq!(ByteSize::parse("10MB"), None);
        assert_eq!(ByteSize::parse("-1"), None);
        assert_eq!(ByteSize::parse("99999999999999999999GiB"), None);
    }

    #[test]
    fn urls_are_redacted() {
        let u = SecretUrl::new("postgres://dapgw:hunter2@db:5432/udc?sslmode=require&password=x");
        assert_eq!(u.redacted(), "postgres://<redacted>@db:5432/udc?<redacted>");
        assert!(!format!("{u:?}").contains("hunter2"));
        assert_eq!(
            SecretUrl::new("sqlite:///var/lib/x.db").redacted(),
            "sqlite:///var/lib/x.db"
        );
        assert_eq!(
            SecretUrl::new("https://udc:9443").redacted(),
            "https://udc:9443"
        );
        assert_eq!(SecretUrl::new("user:pw@host").redacted(), "<redacted>");
    }
}
