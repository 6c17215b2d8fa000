//! Simulated members: many meters in one process, each a real
//! [`crate::protocol::member::Member`] talking HTTPS to a running gateway.
//!
//! ```text
//! Fleet --spawns--> agent (one task per member) --client (shared pool)--> gateway
//!   ^                  |
//!   +-- Stats, logs ---+   state files: <state-dir>/member-<id>.state
//! ```
//!
//! - [`client`]: the shared HTTPS client (HTTP/2 multiplexed over a few
//!   connections) and the downlink record framing.
//! - [`agent`]: one member's loop (attach, long poll, answer, confirm,
//!   readings, group messages with acks, rekeys, key updates) and its
//!   atomically written state file.
//! - [`run`]: `dapgw sim`, the command line over [`Fleet`].
//!
//! [`Fleet`] is the library face used by `dapgw sim` and the demo: spawn,
//! observe counters (and wait on them without sleeping), command members.
//!
//! A member with no state file starts reading the downlink at the cursor
//! its attach returns (the gateway's latest): wait for
//! [`Stats::attached`] before opening a round it must answer. A member with
//! a state file continues from its stored cursor.

pub mod agent;
pub mod bench;
pub mod client;
pub mod run;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::protocol::keys::MemberCredential;
use agent::{Agent, AgentConfig, AgentError, Command, GroupMessageOutcome, Stats};
use client::{ClientError, ClientOptions, GatewayClient};

/// Members per pooled connection when [`ClientOptions::connections`] is 0.
/// Each member keeps one long poll in flight and may post while it waits,
/// so it needs up to two streams; the gateway allows 64 concurrent streams
/// per connection (`gateway::server::MAX_STREAMS`). With more members than
/// half of that, a member's post would wait for a stream behind long polls
/// that only end when everyone has answered: a round would stall until its
/// deadline.
pub const STREAMS_PER_CONNECTION: usize = 32;

/// What a fleet runs.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// How to reach the gateway.
    pub client: ClientOptions,
    /// One agent per credential.
    pub credentials: Vec<MemberCredential>,
    /// Behaviour shared by all agents (state directory, reading rate,
    /// reconnect).
    pub agent: AgentConfig,
    /// Members with a client certificate of their own (for a gateway that
    /// checks the certificate's identity against the member id): each gets
    /// a client with this TLS configuration and a single connection, since
    /// a connection carries one identity. Others share [`Self::client`].
    pub member_tls: BTreeMap<u64, Arc<rustls::ClientConfig>>,
}

/// Why a fleet did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The client could not be built.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A member's stored state or credential is unusable.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The state directory could not be created.
    #[error("state directory {}: {source}", path.display())]
    StateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The same member id appears twice.
    #[error("member {0} appears twice in the credentials")]
    Duplicate(u64),
}

/// A running set of member agents sharing one client.
pub struct Fleet {
    stats: Arc<Stats>,
    client: GatewayClient,
    /// Clients of members with their own certificate.
    own_clients: Vec<GatewayClient>,
    commands: BTreeMap<u64, mpsc::Sender<Command>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<(u64, Result<(), AgentError>)>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("members", &self.commands.len())
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// Loads every member (restoring stored state) and spawns its agent on
    /// the current tokio runtime.
    pub fn spawn(config: FleetConfig) -> Result<Self, FleetError> {
        let dir = &config.agent.state_dir;
        std::fs::create_dir_all(dir).map_err(|source| FleetError::StateDir {
            path: dir.clone(),
            source,
        })?;
        let mut options = config.client.clone();
        if options.connections == 0 {
            options.connections = config
                .credentials
                .len()
                .div_ceil(STREAMS_PER_CONNECTION)
                .max(1);
        }
        let client = GatewayClient::new(options)?;
        let stats = Arc::new(Stats::default());
        let mut agents = Vec::with_capacity(config.credentials.len());
        let mut own_clients = Vec::new();
        for cred in config.credentials {
            let c = match config.member_tls.get(&cred.id) {
                Some(tls) => {
                    let c = GatewayClient::new(ClientOptions {
                        tls: tls.clone(),
                        connections: 1,
                        ..config.client.clone()
                    })?;
                    own_clients.push(c.clone());
                    c
                }
                None => client.clone(),
            };
            agents.push(Agent::load(cred, c, stats.clone(), config.agent.clone())?);
        }
        let (stop, _) = watch::channel(false);
        let mut commands = BTreeMap::new();
        let mut tasks = JoinSet::new();
        for agent in agents {
            let id = agent.id();
            let (tx, rx) = mpsc::channel(8);
            if commands.insert(id, tx).is_some() {
                return Err(FleetError::Duplicate(id));
            }
            let stop_rx = stop.subscribe();
            tasks.spawn(async move { (id, agent.run(rx, stop_rx).await) });
        }
        Ok(Self {
            stats,
            client,
            own_clients,
            commands,
            stop,
            tasks,
        })
    }

    /// The shared counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The member ids in this fleet.
    pub fn members(&self) -> impl Iterator<Item = u64> + '_ {
        self.commands.keys().copied()
    }

    /// TLS connections opened to the gateway so far.
    pub fn connections_opened(&self) -> u64 {
        self.client.connections_opened()
            + self
                .own_clients
                .iter()
                .map(GatewayClient::connections_opened)
                .sum::<u64>()
    }

    /// Waits until `cond` holds (checked on every counter change) or
    /// `timeout` passes; true when it holds.
    pub async fn wait_for(&self, timeout: Duration, cond: impl Fn(&Stats) -> bool) -> bool {
        let mut rx = self.stats.subscribe();
        let wait = async {
            loop {
                if cond(&self.stats) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return cond(&self.stats);
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Has `member` seal and send one reading now.
    pub async fn send_reading(&self, member: u64) -> Result<(), String> {
        let tx = self
            .commands
            .get(&member)
            .ok_or_else(|| format!("member {member} is not in this fleet"))?;
        let (reply, rx) = oneshot::channel();
        tx.send(Command::SendReading(reply))
            .await
            .map_err(|_| format!("member {member}'s agent has stopped"))?;
        rx.await
            .map_err(|_| format!("member {member}'s agent has stopped"))?
    }

    /// Every group message `member` received, with what became of it.
    pub fn group_log(&self, member: u64) -> Vec<GroupMessageOutcome> {
        self.stats.group_log(member)
    }

    /// Whether `member` could read update `seq` of `group`: `Some(Ok(()))`
    /// it decrypted and applied it, `Some(Err(reason))` it refused it (the
    /// member's reason), `None` it has not received it.
    pub fn could_read(&self, member: u64, group: u32, seq: u64) -> Option<Result<(), String>> {
        self.group_log(member)
            .into_iter()
            .rev()
            .find(|o| o.group == group && o.seq == Some(seq))
            .map(|o| o.result)
    }

    /// Stops every agent and waits for them; the agents that failed, with
    /// their error (a panicked task counts, under member id 0 when unknown).
    pub async fn shutdown(mut self) -> Vec<(u64, AgentError)> {
        let _ = self.stop.send(true);
        let mut failed = Vec::new();
        while let Some(res) = self.tasks.join_next().await {
            match res {
                Ok((_, Ok(()))) => {}
                Ok((id, Err(e))) => failed.push((id, e)),
                Err(_) => failed.push((0, AgentError::Panicked)),
            }
        }
        failed
    }

    /// Agents that have already stopped on their own with an error (only
    /// without reconnect); does not wait.
    pub fn try_failed(&mut self) -> Vec<(u64, AgentError)> {
        let mut failed = Vec::new();
        while let Some(res) = self.tasks.try_join_next() {
            match res {
                Ok((_, Ok(()))) => {}
                Ok((id, Err(e))) => failed.push((id, e)),
                Err(_) => failed.push((0, AgentError::Panicked)),
            }
        }
        failed
    }
}

// A member needs up to two streams at once (its long poll and a post).
const _: () = assert!(2 * STREAMS_PER_CONNECTION <= crate::gateway::server::MAX_STREAMS as usize);
