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

/// `dapgw bench role relay`.
pub(crate) async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let traffic: Arc<Traffic> = Arc::default();
    emit(json!({"event": "ready", "addr": listener.local_addr()?.to_string()}));
    let accept_traffic = traffic.clone();
    let upstream = args.upstream;
    let accept = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(forward(tcp, upstream, accept_traffic.clone()));
        }
    });
    let counters = || {
        let mut m = Map::new();
        traffic.fill(&mut m);
        Value::Object(m)
    };
    let res = ControlIn::new().serve(counters).await;
    accept.abort();
    res
}
