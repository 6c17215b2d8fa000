//! A counting TCP relay: `dapgw bench role relay --upstream ADDR` listens
//! on loopback and forwards every connection byte for byte to `ADDR`,
//! counting what passes (TLS records included: TCP payload, as the
//! baselines count it).
//!
//! ```text
//! client ──TCP──> relay (counts bytes_in / bytes_out) ──TCP──> upstream
//! ```
//!
//! It stands in front of a service whose code the bench does not touch
//! (the real UDC and gateway), so that service's traffic is counted at the
//! TCP layer while its CPU time stays its own: the relay is a process of
//! its own, and copying costs the relay, not the service.

use std::sync::Arc;

use anyhow::Context as _;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};

use super::{ControlIn, Counting, Traffic, emit};

/// Arguments of `dapgw bench role relay`.
#[derive(clap::Args, Debug, Clone)]
pub struct RelayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Where every connection is forwarded.
    #[arg(long)]
    pub upstream: std::net::SocketAddr,
}

/// Forwards one accepted connection until either side closes.
async fn forward(client: TcpStream, upstream: std::net::SocketAddr, traffic: Arc<Traffic>) {
    let _ = client.set_nodelay(true);
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    // Reads from the client are what the upstream receives (`bytes_in`).
    let mut client = Counting::new(client, traffic);
    let mut server = server;
    // A reset on either side just ends the relayed connection.
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

/// A counting relay running as a task: what every connection to
/// [`addr`](Self::addr) sends is forwarded to the upstream and counted in
/// [`traffic`](Self::traffic) (`bytes_in`: what the upstream receives, TLS
/// records included). Stops when dropped.
pub(crate) struct Relay {
    /// Where the relay listens.
    pub(crate) addr: std::net::SocketAddr,
    /// Bytes and connections so far.
    pub(crate) traffic: Arc<Traffic>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Binds `listen` and forwards every connection to `upstream`.
    pub(crate) async fn spawn(
        listen: std::net::SocketAddr,
        upstream: std::net::SocketAddr,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr()?;
        let traffic: Arc<Traffic> = Arc::default();
        let accept_traffic = traffic.clone();
        let accept = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((tcp, _)) => {
                        tokio::spawn(forward(tcp, upstream, accept_traffic.clone()));
                    }
                    // Out of descriptors, say: back off instead of spinning.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
        });
        Ok(Self {
            addr,
            traffic,
            accept,
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// `dapgw bench role relay`.
pub(crate) async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let relay = Relay::spawn(args.listen, args.upstream).await?;
    emit(json!({"event": "ready", "addr": relay.addr.to_string()}));
    let traffic = relay.traffic.clone();
    let counters = || {
        let mut m = Map::new();
        traffic.fill(&mut m);
        Value::Object(m)
    };
    ControlIn::new().serve(counters).await
}
