//! The UDC (utility data center): the verifier's home. Gateways post batches
//! here, the sans-IO verifier (`protocol::verifier`) decides, and [`store`]
//! persists what it decided so that several UDC processes can share one
//! registry, one round state and one downlink queue.
//!
//! ```text
//! gateway --mTLS--> server --> service (verifier + seal) --> store
//! operator --bearer--> admin_api --> service
//! ```

pub mod admin_api;
pub mod keys_cmd;
pub mod rounds;
pub mod server;
pub mod service;
pub mod store;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::config::UdcConfig;
use crate::protocol::verifier::{Verifier, VerifierConfig};

/// The sockets `run` serves, bound by the caller (so a bad config fails
/// before anything is bound, and tests can bind port 0).
#[derive(Debug)]
pub struct Listeners {
    /// Gateway-facing HTTPS listener (`DAPGW_LISTEN`).
    pub udc: TcpListener,
    /// Admin listener (`DAPGW_ADMIN_LISTEN`).
    pub admin: TcpListener,
}

/// Loads the keys, opens the store and serves until `shutdown` completes;
/// then stops accepting, lets in-flight requests finish (the admin listener
/// reports not ready while draining) and returns.
pub async fn run(
    config: UdcConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let udc = build(&config).await?;
    let tls = crate::tls::server_config(
        &config.tls_cert,
        &config.tls_key,
        Some(&config.client_ca),
        false,
    )
    .context("loading the TLS server configuration")?;
    let registry = udc.registry().clone();
    let readiness = crate::admin::Readiness::udc();
    readiness.set_store(true);
    let probe = tokio::spawn(probe_store(udc.clone(), readiness.clone()));
    let token = match &config.admin_token_file {
        Some(p) => Some(
            crate::config::admin_token(p)
                .map_err(|e| anyhow::anyhow!("DAPGW_ADMIN_TOKEN_FILE: {e}"))?,
        ),
        None => None,
    };
    let fallback = token.map(|t| admin_api::fallback(udc.clone(), t));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let ms = std::time::Duration::from_millis;
    let opts = server::ServerOptions {
        max_body_bytes: usize::try_from(config.max_body_bytes.get()).unwrap_or(usize::MAX),
        max_connections: usize::try_from(config.max_connections).unwrap_or(usize::MAX),
        max_connections_per_ip: usize::try_from(config.max_connections_per_ip)
            .unwrap_or(usize::MAX),
        header_timeout: ms(config.header_timeout_ms),
        body_timeout: ms(config.body_timeout_ms),
        idle_timeout: ms(config.idle_timeout_ms),
        ..server::ServerOptions::default()
    };
    let server = tokio::spawn(server::serve(
        listeners.udc,
        tls.acceptor(),
        udc.clone(),
        opts,
        stopped(stop_rx.clone()),
    ));
    let admin = tokio::spawn(crate::admin::serve_with_fallback(
        listeners.admin,
        registry,
        readiness.clone(),
        fallback,
        stopped(stop_rx.clone()),
    ));
    let background = tokio::spawn(rounds::background(udc.clone(), stopped(stop_rx.clone())));
    shutdown.await;
    tracing::info!("draining");
    readiness.set_draining();
    probe.abort();
    let _ = stop_tx.send(true);
    let grace = std::time::Duration::from_millis(config.drain_grace_ms);
    let _ = tokio::time::timeout(grace, async {
        let _ = server.await;
        let _ = admin.await;
        let _ = background.await;
    })
    .await;
    Ok(())
}

/// How often `/readyz` asks the store.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A probe slower than this counts as a failure (a hung database).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Keeps the store's part of `/readyz` current: one indexed read (the
/// downlink cursor of a gateway name no gateway can have) every
/// [`PROBE_EVERY`]; an error or no answer within [`PROBE_TIMEOUT`] makes the
/// UDC not ready until a probe succeeds again.
async fn probe_store(udc: Arc<service::Udc>, readiness: crate::admin::Readiness) {
    use store::Store as _;
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ok = true;
    loop {
        every.tick().await;
        let ok = match tokio::time::timeout(PROBE_TIMEOUT, udc.store().latest_cursor("")).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                if was_ok {
                    tracing::error!(error = %e, "store probe failed; not ready");
                }
                false
            }
            Err(_) => {
                if was_ok {
                    tracing::error!("store probe timed out; not ready");
                }
                false
            }
        };
        if ok && !was_ok {
            tracing::info!("store probe answered; ready again");
        }
        readiness.set_store(ok);
        was_ok = ok;
    }
}

/// Loads the key files and opens the store of `config`.
pub async fn build(config: &UdcConfig) -> anyhow::Result<Arc<service::Udc>> {
    let ms = keys_cmd::load_master(&config.master_secret_file)?;
    let storage = keys_cmd::load_storage_key(&config.storage_key_file)?;
    let online = keys_cmd::load_signing_key(&config.signing_key_file)?;
    let cert = keys_cmd::load_key_cert(&config.key_cert_file)?;
    if cert.public_key != online.verifying_key().to_bytes() {
        anyhow::bail!(
            "{} does not certify the key in {}",
            config.key_cert_file.display(),
            config.signing_key_file.display()
        );
    }
    let verifier = Verifier::new(
        &ms,
        online,
        cert.key_id,
        Some(cert),
        VerifierConfig::default(),
    );
    let store = store::open(config.store_url.expose())
        .await
        .with_context(|| format!("opening the store {}", config.store_url.redacted()))?;
    let registry = prometheus::Registry::new();
    let metrics = crate::telemetry::UdcMetrics::register(&registry);
    crate::telemetry::ProcessMetrics::register(&registry)
        .context("registering the process metrics")?;
    let udc = service::Udc::new(
        verifier,
        storage,
        store,
        metrics,
        registry,
        config.localize_timeout_ms,
        service::Retention::from_days(
            config.readings_retention_days,
            config.verdicts_retention_days,
        ),
    );
    udc.load_gauges()
        .await
        .context("counting the stored sessions")?;
    Ok(udc)
}
