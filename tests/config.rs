//! The configuration surface: every `DAPGW_*` variable is read as documented,
//! bad values are refused naming the variable, and every problem is reported
//! at once. Each test runs in a `figment::Jail` (own cwd, restored env).

// `Jail::expect_with` fixes the closure's error type to figment's (large) one.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use dapgw::config::{
    ByteSize, ConfigError, DefaultMode, GatewayConfig, UdcConfig, load_gateway, load_udc,
};
use dapgw::telemetry::LogFormat;
use figment::Jail;

/// Real key material for the files a valid configuration names: a
/// development PKI (CA, server certificate, client certificate of gateway
/// `gw-1`) and a UDC key directory, made once per test binary. Validation
/// loads them, so placeholders would be refused.
fn material() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ids = IDENTITIES.map(String::from);
        dapgw::tls::dev_pki::generate(&dir.path().join("pki"), &[], &ids).unwrap();
        dapgw::udc::keys_cmd::init(&dir.path().join("keys")).unwrap();
        dir
    })
    .path()
}

/// Gateway ids the tests use, each with a client certificate in
/// [`material`].
const IDENTITIES: [&str; 7] = [
    "gw-1",
    "substation.7_b-x",
    "from-env",
    "0017",
    "1.50",
    "true",
    "0099",
];

/// Points the upstream client certificate and key at gateway `id`'s (the
/// gateway id must be its certificate's identity).
fn use_identity(jail: &mut Jail, id: &str) {
    for (var, ext) in [
        ("DAPGW_UPSTREAM_CLIENT_CERT", "pem"),
        ("DAPGW_UPSTREAM_CLIENT_KEY", "key"),
    ] {
        let text =
            std::fs::read_to_string(material().join(format!("pki/client-{id}.{ext}"))).unwrap();
        let name = format!("id-{id}.{ext}");
        jail.create_file(&name, &text).unwrap();
        jail.set_env(var, name);
    }
}

/// Creates `name` in the jail holding what a file of that name holds in a
/// valid configuration (by name: CA, certificate, key, UDC key file).
fn touch(jail: &Jail, name: &str) -> String {
    let source = match name {
        "udc-ca.pem" | "ca2.pem" | "member-ca.pem" | "b.pem" | "gw-ca.pem" => "pki/ca.pem",
        "gw.pem" => "pki/client-gw-1.pem",
        "gw.key" => "pki/client-gw-1.key",
        "c2.pem" => "pki/client-substation.7_b-x.pem",
        "k2.pem" => "pki/client-substation.7_b-x.key",
        "server.pem" | "s2.pem" | "a.pem" => "pki/server.pem",
        "server.key" | "s2.key" | "a.key" => "pki/server.key",
        "ms.bin" | "ms2" => "keys/master.key",
        "storage.key" | "sk2" => "keys/storage.key",
        "signing.key" | "sig2" => "keys/signing.key",
        "key.cert" | "kc2" => "keys/signing.cert",
        _ => {
            jail.create_file(name, "placeholder").unwrap();
            return name.to_string();
        }
    };
    let text = std::fs::read_to_string(material().join(source)).unwrap();
    jail.create_file(name, &text).unwrap();
    name.to_string()
}

/// The smallest valid gateway environment.
fn gateway_env(jail: &mut Jail) {
    jail.clear_env();
    jail.set_env("DAPGW_UPSTREAM_URL", "https://udc.example:9443");
    for (var, file) in [
        ("DAPGW_UPSTREAM_CA", "udc-ca.pem"),
        ("DAPGW_UPSTREAM_CLIENT_CERT", "gw.pem"),
        ("DAPGW_UPSTREAM_CLIENT_KEY", "gw.key"),
        ("DAPGW_TLS_CERT", "server.pem"),
        ("DAPGW_TLS_KEY", "server.key"),
    ] {
        let f = touch(jail, file);
        jail.set_env(var, f);
    }
    jail.set_env("DAPGW_GATEWAY_ID", "gw-1");
}

/// The smallest valid UDC environment.
fn udc_env(jail: &mut Jail) {
    jail.clear_env();
    for (var, file) in [
        ("DAPGW_TLS_CERT", "server.pem"),
        ("DAPGW_TLS_KEY", "server.key"),
        ("DAPGW_CLIENT_CA", "gw-ca.pem"),
        ("DAPGW_MASTER_SECRET_FILE", "ms.bin"),
        ("DAPGW_STORAGE_KEY_FILE", "storage.key"),
        ("DAPGW_SIGNING_KEY_FILE", "signing.key"),
        ("DAPGW_KEY_CERT_FILE", "key.cert"),
    ] {
        let f = touch(jail, file);
        jail.set_env(var, f);
    }
}

fn gw_err() -> ConfigError {
    load_gateway(None).expect_err("configuration should be refused")
}

fn udc_err() -> ConfigError {
    load_udc(None).expect_err("configuration should be refused")
}

#[test]
fn gateway_defaults() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        let c = load_gateway(None).unwrap();
        let d = GatewayConfig::default();
        assert_eq!(c.listen, "0.0.0.0:8443".parse::<SocketAddr>().unwrap());
        assert_eq!(
            c.admin_listen,
            "127.0.0.1:9090".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.spool_dir, Path::new("/var/lib/dapgw/spool"));
        assert_eq!(c.spool_max_bytes, ByteSize(256 * 1024 * 1024));
        assert_eq!(c.batch_max_entries, 16384);
        assert_eq!(c.batch_linger_ms, 1000);
        assert_eq!(c.round_deadline_ms, 30_000);
        assert_eq!(c.chunk_size, 64);
        assert_eq!(c.member_client_ca, None);
        assert_eq!(c.log, "info");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.max_connections, d.max_connections);
        assert_eq!(c.max_body_bytes, d.max_body_bytes);
        assert_eq!(c.header_timeout_ms, d.header_timeout_ms);
        assert_eq!(c.idle_timeout_ms, d.idle_timeout_ms);
        assert_eq!(c.drain_grace_ms, d.drain_grace_ms);
        assert_eq!(c.upstream_timeout_ms, d.upstream_timeout_ms);
        assert_eq!(c.retry_max_ms, d.retry_max_ms);
        assert_eq!(c.attach_ttl_s, 7 * 24 * 3600);
        assert_eq!(c.attach_max_members_per_source, 125_000);
        assert_eq!(c.attach_max_groups_per_source, 512);
        assert_eq!(
            c.attach_share(),
            dapgw::gateway::AttachShare {
                members: 125_000,
                groups: 512
            }
        );
        Ok(())
    });
}

#[test]
fn every_gateway_variable_is_read() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        let member_ca = touch(jail, "member-ca.pem");
        jail.set_env("DAPGW_UPSTREAM_URL", "https://udc.other:10443/base");
        jail.set_env("DAPGW_UPSTREAM_CA", touch(jail, "ca2.pem"));
        jail.set_env("DAPGW_UPSTREAM_CLIENT_CERT", touch(jail, "c2.pem"));
        jail.set_env("DAPGW_UPSTREAM_CLIENT_KEY", touch(jail, "k2.pem"));
        jail.set_env("DAPGW_GATEWAY_ID", "substation.7_b-x");
        jail.set_env("DAPGW_LISTEN", "127.0.0.1:18443");
        jail.set_env("DAPGW_TLS_CERT", touch(jail, "s2.pem"));
        jail.set_env("DAPGW_TLS_KEY", touch(jail, "s2.key"));
        jail.set_env("DAPGW_MEMBER_CLIENT_CA", &member_ca);
        jail.set_env("DAPGW_ADMIN_LISTEN", "[::1]:19090");
        jail.set_env("DAPGW_SPOOL_DIR", "/data/spool");
        jail.set_env("DAPGW_SPOOL_MAX_BYTES", "1073741824");
        jail.set_env("DAPGW_BATCH_MAX_ENTRIES", "16384");
        jail.set_env("DAPGW_BATCH_LINGER_MS", "50");
        jail.set_env("DAPGW_ROUND_DEADLINE_MS", "60000");
        jail.set_env("DAPGW_CHUNK_SIZE", "128");
        jail.set_env("DAPGW_MAX_CONNECTIONS", "100");
        jail.set_env("DAPGW_MAX_BODY_BYTES", "64KiB");
        jail.set_env("DAPGW_HEADER_TIMEOUT_MS", "1500");
        jail.set_env("DAPGW_IDLE_TIMEOUT_MS", "2500");
        jail.set_env("DAPGW_DRAIN_GRACE_MS", "3500");
        jail.set_env("DAPGW_UPSTREAM_TIMEOUT_MS", "4500");
        jail.set_env("DAPGW_RETRY_MAX_MS", "5500");
        jail.set_env("DAPGW_ATTACH_TTL_S", "3600");
        jail.set_env("DAPGW_ATTACH_MAX_MEMBERS_PER_SOURCE", "1000000");
        jail.set_env("DAPGW_ATTACH_MAX_GROUPS_PER_SOURCE", "0");
        jail.set_env("DAPGW_LOG", "warn,dapgw=debug");
        jail.set_env("DAPGW_LOG_FORMAT", "json");
        let c = load_gateway(None).unwrap();
        assert_eq!(c.upstream_url.expose(), "https://udc.other:10443/base");
        assert_eq!(c.upstream_ca, Path::new("ca2.pem"));
        assert_eq!(c.upstream_client_cert, Path::new("c2.pem"));
        assert_eq!(c.upstream_client_key, Path::new("k2.pem"));
        assert_eq!(c.gateway_id, "substation.7_b-x");
        assert_eq!(c.listen, "127.0.0.1:18443".parse::<SocketAddr>().unwrap());
        assert_eq!(c.tls_cert, Path::new("s2.pem"));
        assert_eq!(c.tls_key, Path::new("s2.key"));
        assert_eq!(c.member_client_ca, Some(PathBuf::from(member_ca)));
        assert_eq!(c.admin_listen, "[::1]:19090".parse::<SocketAddr>().unwrap());
        assert_eq!(c.spool_dir, Path::new("/data/spool"));
        assert_eq!(c.spool_max_bytes, ByteSize(1 << 30));
        assert_eq!(c.batch_max_entries, 16384);
        assert_eq!(c.batch_linger_ms, 50);
        assert_eq!(c.round_deadline_ms, 60_000);
        assert_eq!(c.chunk_size, 128);
        assert_eq!(c.max_connections, 100);
        assert_eq!(c.max_body_bytes, ByteSize(65536));
        assert_eq!(c.header_timeout_ms, 1500);
        assert_eq!(c.idle_timeout_ms, 2500);
        assert_eq!(c.drain_grace_ms, 3500);
        assert_eq!(c.upstream_timeout_ms, 4500);
        assert_eq!(c.retry_max_ms, 5500);
        assert_eq!(c.log, "warn,dapgw=debug");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.retry_max().as_millis(), 5500);
        assert_eq!(c.attach_ttl_s, 3600);
        assert_eq!(c.attach_ttl().as_secs(), 3600);
        assert_eq!(c.attach_max_members_per_source, 1_000_000);
        assert_eq!(c.attach_max_groups_per_source, 0);
        Ok(())
    });
}

#[test]
fn udc_defaults_and_every_udc_variable_is_read() {
    Jail::expect_with(|jail| {
        udc_env(jail);
        let c = load_udc(None).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9443".parse::<SocketAddr>().unwrap());
        assert_eq!(
            c.admin_listen,
            "127.0.0.1:9091".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.store_url.expose(), "sqlite:///var/lib/dapgw/udc.sqlite3");
        assert_eq!(c.default_mode, DefaultMode::PskEcdhe);
        assert_eq!(c.admin_token_file, None);
        assert_eq!(c, UdcConfig { ..c.clone() });

        jail.set_env("DAPGW_LISTEN", "127.0.0.1:19443");
        jail.set_env("DAPGW_TLS_CERT", touch(jail, "a.pem"));
        jail.set_env("DAPGW_TLS_KEY", touch(jail, "a.key"));
        jail.set_env("DAPGW_CLIENT_CA", touch(jail, "b.pem"));
        jail.set_env("DAPGW_ADMIN_LISTEN", "127.0.0.1:19091");
        jail.set_env("DAPGW_ADMIN_TOKEN_FILE", touch(jail, "token"));
        jail.set_env("DAPGW_STORE_URL", "postgres://dapgw@db.local/udc");
        jail.set_env("DAPGW_MASTER_SECRET_FILE", touch(jail, "ms2"));
        jail.set_env("DAPGW_STORAGE_KEY_FILE", touch(jail, "sk2"));
        jail.set_env("DAPGW_SIGNING_KEY_FILE", touch(jail, "sig2"));
        jail.set_env("DAPGW_KEY_CERT_FILE", touch(jail, "kc2"));
        jail.set_env("DAPGW_DEFAULT_MODE", "psk");
        jail.set_env("DAPGW_LOCALIZE_TIMEOUT_MS", "777");
        jail.set_env("DAPGW_LOG", "debug");
        jail.set_env("DAPGW_LOG_FORMAT", "json");
        jail.set_env("DAPGW_DRAIN_GRACE_MS", "888");
        jail.set_env("DAPGW_MAX_BODY_BYTES", "1048576");
        let c = load_udc(None).unwrap();
        assert_eq!(c.listen, "127.0.0.1:19443".parse::<SocketAddr>().unwrap());
        assert_eq!(c.tls_cert, Path::new("a.pem"));
        assert_eq!(c.tls_key, Path::new("a.key"));
        assert_eq!(c.client_ca, Path::new("b.pem"));
        assert_eq!(
            c.admin_listen,
            "127.0.0.1:19091".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.admin_token_file, Some(PathBuf::from("token")));
        assert_eq!(c.store_url.expose(), "postgres://dapgw@db.local/udc");
        assert_eq!(c.master_secret_file, Path::new("ms2"));
        assert_eq!(c.storage_key_file, Path::new("sk2"));
        assert_eq!(c.signing_key_file, Path::new("sig2"));
        assert_eq!(c.key_cert_file, Path::new("kc2"));
        assert_eq!(c.default_mode, DefaultMode::Psk);
        assert_eq!(c.localize_timeout_ms, 777);
        assert_eq!(c.log, "debug");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.drain_grace_ms, 888);
        assert_eq!(c.max_body_bytes, ByteSize(1 << 20));
        Ok(())
    });
}

/// Bad values of every gateway setting; each alone must be refused with a
/// problem naming its variable.
const GATEWAY_BAD: &[(&str, &str)] = &[
    ("DAPGW_UPSTREAM_URL", "http://udc.example:9443"),
    ("DAPGW_UPSTREAM_URL", "not a url"),
    ("DAPGW_UPSTREAM_CA", "missing-ca.pem"),
    ("DAPGW_UPSTREAM_CLIENT_CERT", "missing.pem"),
    ("DAPGW_UPSTREAM_CLIENT_KEY", "missing.key"),
    ("DAPGW_GATEWAY_ID", "Gateway 1"),
    (
        "DAPGW_GATEWAY_ID",
        "a-very-long-gateway-identifier-that-goes-on-and-on-past-sixty-four-bytes",
    ),
    ("DAPGW_LISTEN", "8443"),
    ("DAPGW_LISTEN", "localhost:http"),
    ("DAPGW_TLS_CERT", "missing.pem"),
    ("DAPGW_TLS_KEY", "missing.key"),
    ("DAPGW_MEMBER_CLIENT_CA", "missing-member-ca.pem"),
    ("DAPGW_ADMIN_LISTEN", "127.0.0.1"),
    ("DAPGW_ADMIN_LISTEN", "0.0.0.0:8443"), // same as DAPGW_LISTEN
    ("DAPGW_SPOOL_MAX_BYTES", "lots"),
    ("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE", "some"),
    ("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE", "-1"),
    ("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE", "1KiB"), // below twice the body cap
    ("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE", "1GiB"), // above the spool
    ("DAPGW_SPOOL_MAX_BYTES", "-5"),
    ("DAPGW_SPOOL_MAX_BYTES", "10MB"),
    ("DAPGW_SPOOL_MAX_BYTES", "1024"),
    ("DAPGW_BATCH_MAX_ENTRIES", "16385"),
    ("DAPGW_BATCH_MAX_ENTRIES", "0"),
    ("DAPGW_BATCH_MAX_ENTRIES", "many"),
    ("DAPGW_BATCH_LINGER_MS", "0.5"),
    ("DAPGW_BATCH_LINGER_MS", "40000"), // longer than the round deadline
    ("DAPGW_ROUND_DEADLINE_MS", "0"),
    ("DAPGW_ROUND_DEADLINE_MS", "true"),
    ("DAPGW_CHUNK_SIZE", "1025"),
    ("DAPGW_CHUNK_SIZE", "0"),
    ("DAPGW_CHUNK_SIZE", "70000"),
    ("DAPGW_MAX_CONNECTIONS", "0"),
    ("DAPGW_MAX_CONNECTIONS", "-1"),
    ("DAPGW_MAX_BODY_BYTES", "100"),
    ("DAPGW_MAX_BODY_BYTES", "big"),
    ("DAPGW_HEADER_TIMEOUT_MS", "0"),
    ("DAPGW_HEADER_TIMEOUT_MS", "10s"),
    ("DAPGW_IDLE_TIMEOUT_MS", "0"),
    ("DAPGW_IDLE_TIMEOUT_MS", "[1]"),
    ("DAPGW_DRAIN_GRACE_MS", "0"),
    ("DAPGW_DRAIN_GRACE_MS", "soon"),
    ("DAPGW_UPSTREAM_TIMEOUT_MS", "0"),
    ("DAPGW_UPSTREAM_TIMEOUT_MS", "1e3"),
    ("DAPGW_RETRY_MAX_MS", "0"),
    ("DAPGW_RETRY_MAX_MS", "never"),
    ("DAPGW_ATTACH_TTL_S", "0"),
    ("DAPGW_ATTACH_TTL_S", "7d"),
    ("DAPGW_ATTACH_TTL_S", "315360001"),
    ("DAPGW_ATTACH_MAX_MEMBERS_PER_SOURCE", "1000001"),
    ("DAPGW_ATTACH_MAX_MEMBERS_PER_SOURCE", "-1"),
    ("DAPGW_ATTACH_MAX_GROUPS_PER_SOURCE", "4097"),
    ("DAPGW_ATTACH_MAX_GROUPS_PER_SOURCE", "255"),
    ("DAPGW_ATTACH_MAX_GROUPS_PER_SOURCE", "many"),
    ("DAPGW_LOG", "dapgw=[{"),
    ("DAPGW_LOG_FORMAT", "xml"),
    ("DAPGW_LOG_FORMAT", "1"),
];

#[test]
fn each_bad_gateway_value_is_refused_naming_its_variable() {
    for &(var, bad) in GATEWAY_BAD {
        // NUL cannot be put in a real environment; that case is TOML-only.
        if bad.contains('\0') {
            continue;
        }
        Jail::expect_with(|jail| {
            gateway_env(jail);
            jail.set_env(var, bad);
            let err = gw_err();
            assert!(err.names(var), "{var}={bad:?}: {err}");
            // Only the bad variable is blamed.
            assert_eq!(err.problems().len(), 1, "{var}={bad:?}: {err}");
            let text = err.to_string();
            assert!(text.contains(var), "{text}");
            Ok(())
        });
    }
}

#[test]
fn each_bad_udc_value_is_refused_naming_its_variable() {
    const UDC_BAD: &[(&str, &str)] = &[
        ("DAPGW_LISTEN", "9443"),
        ("DAPGW_TLS_CERT", "nope.pem"),
        ("DAPGW_TLS_KEY", "nope.key"),
        ("DAPGW_CLIENT_CA", "nope-ca.pem"),
        ("DAPGW_ADMIN_LISTEN", "everywhere"),
        ("DAPGW_ADMIN_TOKEN_FILE", "no-token"),
        ("DAPGW_STORE_URL", "mysql://db/udc"),
        ("DAPGW_STORE_URL", "sqlite://relative.db"),
        ("DAPGW_MASTER_SECRET_FILE", "no-ms"),
        ("DAPGW_STORAGE_KEY_FILE", "no-sk"),
        ("DAPGW_SIGNING_KEY_FILE", "no-sig"),
        ("DAPGW_KEY_CERT_FILE", "no-kc"),
        ("DAPGW_DEFAULT_MODE", "ecdhe"),
        ("DAPGW_DEFAULT_MODE", "2"),
        ("DAPGW_LOCALIZE_TIMEOUT_MS", "0"),
        ("DAPGW_LOCALIZE_TIMEOUT_MS", "quick"),
        ("DAPGW_LOG", "x=[{"),
        ("DAPGW_LOG_FORMAT", "yaml"),
        ("DAPGW_DRAIN_GRACE_MS", "-3"),
        ("DAPGW_MAX_BODY_BYTES", "12"),
    ];
    for &(var, bad) in UDC_BAD {
        Jail::expect_with(|jail| {
            udc_env(jail);
            jail.set_env(var, bad);
            let err = udc_err();
            assert!(err.names(var), "{var}={bad:?}: {err}");
            assert_eq!(err.problems().len(), 1, "{var}={bad:?}: {err}");
            Ok(())
        });
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        jail.set_env("DAPGW_SPOOL_MAX_BYTES", "lots");
        jail.set_env("DAPGW_CHUNK_SIZE", "0");
        jail.set_env("DAPGW_LOG_FORMAT", "xml");
        jail.set_env("DAPGW_GATEWAY_ID", "UPPER");
        jail.set_env("DAPGW_LISTEN", "nowhere");
        let err = gw_err();
        for var in [
            "DAPGW_SPOOL_MAX_BYTES",
            "DAPGW_CHUNK_SIZE",
            "DAPGW_LOG_FORMAT",
            "DAPGW_GATEWAY_ID",
            "DAPGW_LISTEN",
        ] {
            assert!(err.names(var), "{var} missing from: {err}");
        }
        assert_eq!(err.problems().len(), 5, "{err}");
        // One line per problem under a header.
        let text = err.to_string();
        assert!(
            text.starts_with("invalid gateway configuration (5 problems):"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(
            text.contains("DAPGW_SPOOL_MAX_BYTES (from environment variable)"),
            "{text}"
        );
        assert!(
            text.contains("KiB, MiB or GiB"),
            "says what is expected: {text}"
        );
        Ok(())
    });
}

#[test]
fn missing_required_settings_are_all_named() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let err = gw_err();
        for var in [
            "DAPGW_UPSTREAM_URL",
            "DAPGW_UPSTREAM_CA",
            "DAPGW_UPSTREAM_CLIENT_CERT",
            "DAPGW_UPSTREAM_CLIENT_KEY",
            "DAPGW_GATEWAY_ID",
            "DAPGW_TLS_CERT",
            "DAPGW_TLS_KEY",
        ] {
            assert!(err.names(var), "{var} missing from: {err}");
        }
        assert_eq!(err.problems().len(), 7, "{err}");
        assert!(err.to_string().contains("required"));

        let err = udc_err();
        for var in [
            "DAPGW_TLS_CERT",
            "DAPGW_TLS_KEY",
            "DAPGW_CLIENT_CA",
            "DAPGW_MASTER_SECRET_FILE",
            "DAPGW_STORAGE_KEY_FILE",
            "DAPGW_SIGNING_KEY_FILE",
            "DAPGW_KEY_CERT_FILE",
        ] {
            assert!(err.names(var), "{var} missing from: {err}");
        }
        assert_eq!(err.problems().len(), 7, "{err}");
        Ok(())
    });
}

#[test]
fn empty_variable_counts_as_unset() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        jail.set_env("DAPGW_MEMBER_CLIENT_CA", "");
        jail.set_env("DAPGW_CHUNK_SIZE", "");
        let c = load_gateway(None).unwrap();
        assert_eq!(c.member_client_ca, None);
        assert_eq!(c.chunk_size, 64);
        jail.set_env("DAPGW_GATEWAY_ID", "");
        assert!(gw_err().names("DAPGW_GATEWAY_ID"));
        Ok(())
    });
}

#[test]
fn missing_named_config_file_is_an_error() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        let err = load_gateway(Some(Path::new("nope.toml"))).unwrap_err();
        assert!(err.names("DAPGW_CONFIG"), "{err}");
        assert!(err.to_string().contains("nope.toml"), "{err}");
        assert!(err.to_string().contains("--config"), "{err}");

        jail.set_env("DAPGW_CONFIG", "also-missing.toml");
        let err = gw_err();
        assert!(err.names("DAPGW_CONFIG"), "{err}");
        assert!(err.to_string().contains("also-missing.toml"), "{err}");

        udc_env(jail);
        jail.set_env("DAPGW_CONFIG", "/nonexistent/udc.toml");
        assert!(udc_err().names("DAPGW_CONFIG"));
        Ok(())
    });
}

#[test]
fn unparsable_config_file_is_an_error() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        jail.create_file("bad.toml", "chunk_size = = 3")?;
        let err = load_gateway(Some(Path::new("bad.toml"))).unwrap_err();
        assert!(err.names("DAPGW_CONFIG"), "{err}");
        assert!(err.to_string().contains("bad.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn unknown_variables_are_named() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        jail.set_env("DAPGW_SPOOL_MAXBYTES", "5");
        jail.set_env("DAPGW_STORE_URL", "sqlite:///x.db");
        let err = gw_err();
        assert!(err.names("DAPGW_SPOOL_MAXBYTES"), "{err}");
        assert!(err.names("DAPGW_STORE_URL"), "{err}");
        assert!(err.to_string().contains("udc setting"), "{err}");
        assert_eq!(err.problems().len(), 2, "{err}");

        // And a gateway-only variable in the UDC's environment.
        udc_env(jail);
        jail.set_env("DAPGW_UPSTREAM_URL", "https://x");
        jail.set_env("DAPGW_CHUNK_SIZE", "64");
        let err = udc_err();
        assert!(err.names("DAPGW_UPSTREAM_URL"), "{err}");
        assert!(err.names("DAPGW_CHUNK_SIZE"), "{err}");
        assert!(err.to_string().contains("gateway setting"), "{err}");
        Ok(())
    });
}

#[test]
fn unknown_toml_keys_are_named() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        jail.create_file("gw.toml", "chunk_size = 32\nchunk_sise = 16\n")?;
        let err = load_gateway(Some(Path::new("gw.toml"))).unwrap_err();
        assert!(err.names("DAPGW_CHUNK_SISE"), "{err}");
        assert!(err.to_string().contains("chunk_sise"), "{err}");
        assert!(err.to_string().contains("gw.toml"), "{err}");
        assert_eq!(err.problems().len(), 1, "{err}");
        Ok(())
    });
}

#[test]
fn toml_then_env_precedence() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        jail.create_file(
            "gw.toml",
            r#"
                gateway_id = "from-toml"
                batch_linger_ms = 300
                chunk_size = 32
                spool_max_bytes = "512MiB"
                log_format = "json"
            "#,
        )?;
        jail.set_env("DAPGW_CHUNK_SIZE", "16");
        jail.set_env("DAPGW_GATEWAY_ID", "from-env");
        use_identity(jail, "from-env");
        let c = load_gateway(Some(Path::new("gw.toml"))).unwrap();
        assert_eq!(c.batch_linger_ms, 300, "TOML over default");
        assert_eq!(c.spool_max_bytes, ByteSize(512 << 20));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.chunk_size, 16, "env over TOML");
        assert_eq!(c.gateway_id, "from-env");

        // DAPGW_CONFIG names the file when --config is absent; --config wins.
        jail.create_file("other.toml", "batch_linger_ms = 400\n")?;
        jail.set_env("DAPGW_CONFIG", "other.toml");
        assert_eq!(load_gateway(None).unwrap().batch_linger_ms, 400);
        assert_eq!(
            load_gateway(Some(Path::new("gw.toml")))
                .unwrap()
                .batch_linger_ms,
            300
        );

        // A bad TOML value is reported with the file's name.
        jail.create_file("bad.toml", "batch_max_entries = \"lots\"\n")?;
        let err = load_gateway(Some(Path::new("bad.toml"))).unwrap_err();
        assert!(err.names("DAPGW_BATCH_MAX_ENTRIES"), "{err}");
        assert!(err.to_string().contains("bad.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn numeric_looking_strings_keep_their_text() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        jail.set_env("DAPGW_GATEWAY_ID", "0017");
        use_identity(jail, "0017");
        assert_eq!(load_gateway(None).unwrap().gateway_id, "0017");
        jail.set_env("DAPGW_GATEWAY_ID", "1.50");
        use_identity(jail, "1.50");
        assert_eq!(load_gateway(None).unwrap().gateway_id, "1.50");
        jail.set_env("DAPGW_GATEWAY_ID", "true");
        use_identity(jail, "true");
        assert_eq!(load_gateway(None).unwrap().gateway_id, "true");
        // Paths that look like numbers or TOML arrays stay paths.
        jail.set_env("DAPGW_SPOOL_DIR", "[1]");
        assert_eq!(load_gateway(None).unwrap().spool_dir, Path::new("[1]"));
        let server_pem = std::fs::read_to_string(material().join("pki/server.pem")).unwrap();
        jail.create_file("0042", &server_pem)?;
        jail.set_env("DAPGW_TLS_CERT", "0042");
        assert_eq!(load_gateway(None).unwrap().tls_cert, Path::new("0042"));

        jail.create_file("gw.toml", "gateway_id = \"0099\"\n")?;
        jail.set_env("DAPGW_GATEWAY_ID", "");
        use_identity(jail, "0099");
        let c = load_gateway(Some(Path::new("gw.toml"))).unwrap();
        assert_eq!(c.gateway_id, "0099");
        Ok(())
    });
}

#[test]
fn debug_and_errors_print_no_secret() {
    Jail::expect_with(|jail| {
        udc_env(jail);
        jail.set_env(
            "DAPGW_STORE_URL",
            "postgres://dapgw:hunter2@db/udc?password=hunter3",
        );
        let c = load_udc(None).unwrap();
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("hunter3"),
            "{debug}"
        );
        assert!(debug.contains("<redacted>"), "{debug}");
        assert_eq!(
            c.store_url.expose(),
            "postgres://dapgw:hunter2@db/udc?password=hunter3"
        );

        jail.set_env("DAPGW_STORE_URL", "mysql://root:hunter2@db/udc");
        let err = udc_err().to_string();
        assert!(
            err.contains("DAPGW_STORE_URL") && !err.contains("hunter2"),
            "{err}"
        );

        gateway_env(jail);
        jail.set_env("DAPGW_UPSTREAM_URL", "http://u:hunter2@udc");
        let err = gw_err().to_string();
        assert!(
            err.contains("DAPGW_UPSTREAM_URL") && !err.contains("hunter2"),
            "{err}"
        );
        Ok(())
    });
}

/// TLS material and UDC key files are loaded during validation: a file
/// that exists but holds the wrong thing, a key that is not its
/// certificate's, or a gateway id that is not its certificate's identity
/// is refused naming the variable (exit 64 before any port is bound, see
/// `cli_refuses_unusable_tls_material_before_binding`).
#[test]
fn unusable_tls_and_key_files_are_refused_naming_their_variable() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        // The UDC would refuse every batch of a gateway whose id is not its
        // certificate's.
        jail.set_env("DAPGW_GATEWAY_ID", "gw-2");
        let err = gw_err();
        assert!(err.names("DAPGW_GATEWAY_ID"), "{err}");
        assert!(err.to_string().contains("`gw-1`"), "{err}");

        gateway_env(jail);
        jail.create_file("garbage.pem", "not a certificate")?;
        jail.set_env("DAPGW_TLS_CERT", "garbage.pem");
        let err = gw_err();
        assert!(err.names("DAPGW_TLS_CERT"), "{err}");

        gateway_env(jail);
        // The server's key with the gateway's client certificate.
        jail.set_env("DAPGW_UPSTREAM_CLIENT_KEY", touch(jail, "server.key"));
        let err = gw_err();
        assert!(err.names("DAPGW_UPSTREAM_CLIENT_KEY"), "{err}");
        assert!(!err.names("DAPGW_GATEWAY_ID"), "{err}");

        gateway_env(jail);
        jail.set_env("DAPGW_UPSTREAM_CA", "garbage.pem");
        assert!(gw_err().names("DAPGW_UPSTREAM_CA"));
        jail.set_env("DAPGW_UPSTREAM_CA", touch(jail, "udc-ca.pem"));
        jail.set_env("DAPGW_MEMBER_CLIENT_CA", "garbage.pem");
        assert!(gw_err().names("DAPGW_MEMBER_CLIENT_CA"));

        udc_env(jail);
        jail.create_file("short.key", "abcd\n")?;
        jail.set_env("DAPGW_MASTER_SECRET_FILE", "short.key");
        jail.set_env("DAPGW_STORAGE_KEY_FILE", "short.key");
        jail.set_env("DAPGW_CLIENT_CA", "garbage.pem");
        let err = udc_err();
        for var in [
            "DAPGW_MASTER_SECRET_FILE",
            "DAPGW_STORAGE_KEY_FILE",
            "DAPGW_CLIENT_CA",
        ] {
            assert!(err.names(var), "{var}: {err}");
        }

        // An online key that its certificate does not certify.
        udc_env(jail);
        jail.create_file("other.key", &format!("{}\n", "11".repeat(32)))?;
        jail.set_env("DAPGW_SIGNING_KEY_FILE", "other.key");
        let err = udc_err();
        assert!(err.names("DAPGW_KEY_CERT_FILE"), "{err}");
        assert!(!err.to_string().contains(&"11".repeat(32)), "{err}");
        Ok(())
    });
}

/// The `dapgw` binary with a clean environment.
fn dapgw(dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dapgw"));
    cmd.env_clear().current_dir(dir);
    cmd
}

#[test]
fn cli_exits_64_naming_every_bad_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = dapgw(dir.path())
        .args(["gateway"])
        .env("DAPGW_GATEWAY_ID", "0017")
        .env("DAPGW_CHUNK_SIZE", "4096")
        .env("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE", "512MiB")
        .env("DAPGW_STORE_URL", "sqlite:///x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    for var in [
        "DAPGW_UPSTREAM_URL",
        "DAPGW_CHUNK_SIZE",
        "DAPGW_SPOOL_MAX_BYTES_PER_SOURCE",
        "DAPGW_STORE_URL",
        "DAPGW_TLS_CERT",
    ] {
        assert!(err.contains(var), "{var} not named: {err}");
    }
    assert!(
        !err.contains("DAPGW_GATEWAY_ID"),
        "0017 is a valid id: {err}"
    );

    let out = dapgw(dir.path())
        .args(["udc", "--config", "missing.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn cli_refuses_unusable_tls_material_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dapgw::tls::dev_pki::generate(dir.path(), &[], &["gw-1".into()]).unwrap();
    // Held: a gateway that got as far as binding would fail with exit 1.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let out = dapgw(dir.path())
        .args(["gateway"])
        .env("DAPGW_UPSTREAM_URL", "https://localhost:9443")
        .env("DAPGW_UPSTREAM_CA", &pki.ca_cert)
        .env("DAPGW_UPSTREAM_CLIENT_CERT", &pki.clients[0].1)
        .env("DAPGW_UPSTREAM_CLIENT_KEY", &pki.clients[0].2)
        .env("DAPGW_GATEWAY_ID", "gw-2")
        .env("DAPGW_TLS_CERT", &garbage)
        .env("DAPGW_TLS_KEY", &pki.server_key)
        .env("DAPGW_LISTEN", held.local_addr().unwrap().to_string())
        .env("DAPGW_SPOOL_DIR", dir.path().join("spool"))
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(64), "{err}");
    for var in ["DAPGW_GATEWAY_ID", "DAPGW_TLS_CERT"] {
        assert!(err.contains(var), "{var} not named: {err}");
    }
}

#[test]
fn cli_json_logs_are_all_json() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dapgw::tls::dev_pki::generate(dir.path(), &[], &["gw-1".into()]).unwrap();
    // Hold the admin port so the gateway fails right after logging starts.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = held.local_addr().unwrap().to_string();
    let out = dapgw(dir.path())
        .args(["gateway"])
        .env("DAPGW_UPSTREAM_URL", "https://localhost:9443")
        .env("DAPGW_UPSTREAM_CA", &pki.ca_cert)
        .env("DAPGW_UPSTREAM_CLIENT_CERT", &pki.clients[0].1)
        .env("DAPGW_UPSTREAM_CLIENT_KEY", &pki.clients[0].2)
        .env("DAPGW_GATEWAY_ID", "gw-1")
        .env("DAPGW_TLS_CERT", &pki.server_cert)
        .env("DAPGW_TLS_KEY", &pki.server_key)
        .env("DAPGW_LISTEN", "127.0.0.1:0")
        .env("DAPGW_SPOOL_DIR", dir.path().join("spool"))
        .env("DAPGW_ADMIN_LISTEN", &admin)
        .env("DAPGW_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!err.trim().is_empty());
    for line in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(err.contains("DAPGW_ADMIN_LISTEN"), "{err}");
    drop(held);
}

/// `DAPGW_SPOOL_MAX_BYTES_PER_SOURCE`: unset by default, which is an
/// eighth of `DAPGW_SPOOL_MAX_BYTES` (at least twice the body cap); read
/// from the environment and a TOML file as bytes or with a suffix; `0`
/// turns the share off; outside twice the body cap..the spool it is
/// refused naming the variable.
#[test]
fn gateway_spool_max_bytes_per_source() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        let c = load_gateway(None).unwrap();
        assert_eq!(c.spool_max_bytes_per_source, None);
        assert_eq!(c.spool_share(), 32 * 1024 * 1024);
        jail.create_file("gw.toml", "spool_max_bytes_per_source = \"96KiB\"\n")?;
        let c = load_gateway(Some(Path::new("gw.toml"))).unwrap();
        assert_eq!(c.spool_share(), 96 * 1024);
        jail.set_env("DAPGW_SPOOL_MAX_BYTES", "1MiB");
        jail.set_env("DAPGW_MAX_BODY_BYTES", "256KiB");
        assert_eq!(load_gateway(None).unwrap().spool_share(), 512 * 1024);
        jail.set_env("DAPGW_MAX_BODY_BYTES", "16KiB");
        assert_eq!(load_gateway(None).unwrap().spool_share(), 128 * 1024);
        jail.set_env("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE", "64KiB");
        let c = load_gateway(None).unwrap();
        assert_eq!(c.spool_max_bytes_per_source, Some(ByteSize(64 * 1024)));
        assert_eq!(c.spool_share(), 64 * 1024);
        jail.set_env("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE", "0");
        assert_eq!(load_gateway(None).unwrap().spool_share(), 0);
        jail.set_env("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE", "1048576");
        assert_eq!(load_gateway(None).unwrap().spool_share(), 1 << 20);
        jail.set_env("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE", "1048577");
        let e = gw_err();
        assert!(e.names("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE"), "{e}");
        jail.set_env("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE", "32767");
        let e = gw_err();
        assert!(e.names("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE"), "{e}");
        assert!(e.to_string().contains("32768"), "{e}");
        Ok(())
    });
}

/// `DAPGW_MAX_CONNECTIONS_PER_IP`: default 64, read from the environment,
/// refused naming the variable when not a positive integer.
#[test]
fn gateway_max_connections_per_ip() {
    Jail::expect_with(|jail| {
        gateway_env(jail);
        assert_eq!(load_gateway(None).unwrap().max_connections_per_ip, 64);
        jail.set_env("DAPGW_MAX_CONNECTIONS_PER_IP", "8");
        assert_eq!(load_gateway(None).unwrap().max_connections_per_ip, 8);
        for bad in ["0", "-1", "many", "4294967296"] {
            jail.set_env("DAPGW_MAX_CONNECTIONS_PER_IP", bad);
            let e = gw_err();
            assert!(
                e.to_string().contains("DAPGW_MAX_CONNECTIONS_PER_IP"),
                "{bad}: {e}"
            );
        }
        Ok(())
    });
}

/// An admin token file that holds no usable token (empty, or with spaces
/// or control characters inside) stops the UDC at start, naming the
/// variable and not the content; without the variable the API is off.
#[test]
fn udc_admin_token_must_be_usable() {
    Jail::expect_with(|jail| {
        udc_env(jail);
        jail.set_env("DAPGW_ADMIN_TOKEN_FILE", "token");
        for bad in ["", " \n", "two words\n", "tab\there"] {
            jail.create_file("token", bad)?;
            let e = udc_err().to_string();
            assert!(e.contains("DAPGW_ADMIN_TOKEN_FILE"), "{e}");
            if !bad.trim().is_empty() {
                assert!(!e.contains(bad.trim()), "the content leaked: {e}");
            }
        }
        jail.create_file("token", "0123456789abcdef-Token_1\n")?;
        assert_eq!(
            load_udc(None).unwrap().admin_token_file,
            Some(PathBuf::from("token"))
        );
        Ok(())
    });
}

/// The UDC's connection limits: defaults, read from the environment, and
/// refused naming the variable when zero or not a number.
#[test]
fn udc_connection_limits() {
    Jail::expect_with(|jail| {
        udc_env(jail);
        let c = load_udc(None).unwrap();
        assert_eq!(
            (
                c.max_connections,
                c.max_connections_per_ip,
                c.header_timeout_ms,
                c.body_timeout_ms,
                c.idle_timeout_ms
            ),
            (1024, 64, 10_000, 60_000, 60_000)
        );
        jail.set_env("DAPGW_MAX_CONNECTIONS", "10");
        jail.set_env("DAPGW_MAX_CONNECTIONS_PER_IP", "3");
        jail.set_env("DAPGW_HEADER_TIMEOUT_MS", "1500");
        jail.set_env("DAPGW_BODY_TIMEOUT_MS", "2500");
        jail.set_env("DAPGW_IDLE_TIMEOUT_MS", "3500");
        let c = load_udc(None).unwrap();
        assert_eq!(
            (
                c.max_connections,
                c.max_connections_per_ip,
                c.header_timeout_ms,
                c.body_timeout_ms,
                c.idle_timeout_ms
            ),
            (10, 3, 1500, 2500, 3500)
        );
        for var in [
            "DAPGW_MAX_CONNECTIONS",
            "DAPGW_MAX_CONNECTIONS_PER_IP",
            "DAPGW_HEADER_TIMEOUT_MS",
            "DAPGW_BODY_TIMEOUT_MS",
            "DAPGW_IDLE_TIMEOUT_MS",
        ] {
            for bad in ["0", "soon"] {
                jail.set_env(var, bad);
                let e = udc_err();
                assert!(e.to_string().contains(var), "{var}={bad}: {e}");
                jail.set_env(var, "100");
            }
        }
        Ok(())
    });
}
