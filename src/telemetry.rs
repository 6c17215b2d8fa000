//! Logs and metrics of the gateway and the UDC: what the services report on
//! the side while data flows member -> gateway -> udc.
//!
//! - [`init_logging`] installs the tracing subscriber (stderr; every line
//!   JSON, or every line text).
//! - [`GatewayMetrics`] and [`UdcMetrics`] are the metric families, one
//!   struct each with `register(&Registry) -> Self` (linkerd2-proxy's style).
//!   Labelled families take typed label values ([`MemberEndpoint`],
//!   [`BatchOutcome`], ...) so no label can carry a member id or an address,
//!   and every label combination is created at registration so dashboards
//!   see each series at 0 from the start.
//! - [`ProcessMetrics`] reads `/proc/self` at scrape time (Linux).
//! - [`encode`] renders a registry in the Prometheus text format for
//!   `/metrics`.

use std::marker::PhantomData;
use std::path::Path;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Counter, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------

/// Log line format (`DAPGW_LOG_FORMAT`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    /// `DAPGW_LOG` is not a tracing filter (config validation normally
    /// catches this first).
    #[error("DAPGW_LOG: `{filter}` is not a valid tracing filter: {source}")]
    Filter {
        /// The filter text.
        filter: String,
        /// The parser's complaint.
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed in this process.
    #[error("logging is already initialised in this process")]
    AlreadySet,
}

/// Installs the global tracing subscriber writing to stderr: every line JSON
/// when `format` is [`LogFormat::Json`], every line text otherwise. Call
/// once, after the config is loaded.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<(), LoggingError> {
    let env_filter = tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|source| LoggingError::Filter {
            filter: filter.to_string(),
            source,
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    let res = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    res.map_err(|_| LoggingError::AlreadySet)
}

// ---------------------------------------------------------------------------
// Typed label values
// ---------------------------------------------------------------------------

/// A closed set of label values: every variant in `ALL`, `index` its position.
pub trait LabelValue: Copy + 'static {
    /// Every value, in index order.
    const ALL: &'static [Self];
    /// The label value as it appears on /metrics.
    fn as_str(self) -> &'static str;
    /// Position in `ALL`.
    fn index(self) -> usize;
}

macro_rules! label_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        pub enum $name { $($(#[$vm])* $v,)+ }

        impl LabelValue for $name {
            const ALL: &'static [Self] = &[$($name::$v,)+];
            fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)+ }
            }
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

label_enum! {
    /// Member-facing endpoint of the gateway (label `endpoint`).
    MemberEndpoint {
        /// A member announcing its id and groups.
        Attach = "attach",
        /// A member's response to a challenge.
        Response = "response",
        /// A member's unsolicited uplink.
        Uplink = "uplink",
        /// A member fetching its downlink messages.
        Poll = "poll",
        /// Any other path (answered 404).
        Other = "other",
    }
}

label_enum! {
    /// Member-facing endpoint whose requests are timed (label `endpoint` of
    /// `dapgw_member_request_duration_seconds`): every [`MemberEndpoint`]
    /// but the long poll, whose duration is mostly the wait for records.
    TimedEndpoint {
        /// A member announcing its id and groups.
        Attach = "attach",
        /// A member's response to a challenge.
        Response = "response",
        /// A member's unsolicited uplink.
        Uplink = "uplink",
        /// Any other path (answered 404).
        Other = "other",
    }
}

impl MemberEndpoint {
    /// The label of this endpoint's request duration; `None` for the long
    /// poll, which is not timed.
    pub fn timed(self) -> Option<TimedEndpoint> {
        match self {
            MemberEndpoint::Attach => Some(TimedEndpoint::Attach),
            MemberEndpoint::Response => Some(TimedEndpoint::Response),
            MemberEndpoint::Uplink => Some(TimedEndpoint::Uplink),
            MemberEndpoint::Poll => None,
            MemberEndpoint::Other => Some(TimedEndpoint::Other),
        }
    }
}

label_enum! {
    /// Result of a member request (label `outcome`).
    RequestOutcome {
        /// Accepted (2xx).
        Ok = "ok",
        /// Refused as malformed (4xx); see `dapgw_malformed_requests_total`.
        Malformed = "malformed",
        /// Pushed back because the spool or a limit is full (503).
        Overloaded = "overloaded",
        /// Failed on the gateway's side (5xx).
        Error = "error",
    }
}

label_enum! {
    /// Why a member request was malformed (label `reason`).
    MalformedReason {
        /// The body did not decode (codec error).
        Decode = "decode",
        /// The body exceeded `DAPGW_MAX_BODY_BYTES` or a wire cap.
        TooLarge = "too_large",
        /// A message type that this endpoint does not take.
        WrongType = "wrong_type",
        /// Wrong HTTP method (405).
        Method = "method",
        /// A content type this endpoint does not take (415).
        ContentType = "content_type",
        /// The body did not arrive within `DAPGW_HEADER_TIMEOUT_MS` (408).
        Timeout = "timeout",
        /// The round or group it names is not open at this gateway.
        Stale = "stale",
        /// The same member answered the same round twice.
        Duplicate = "duplicate",
    }
}

label_enum! {
    /// Why a listener refused or closed a connection (label `reason`).
    LimitReason {
        /// The source already holds its `DAPGW_MAX_CONNECTIONS_PER_IP`
        /// connections: closed at accept.
        PerIpLimit = "per_ip_limit",
        /// The TLS handshake did not finish within `DAPGW_HEADER_TIMEOUT_MS`.
        HandshakeTimeout = "handshake_timeout",
        /// A request head (or an HTTP/2 frame) began and did not end within
        /// `DAPGW_HEADER_TIMEOUT_MS`.
        HeaderTimeout = "header_timeout",
        /// No request for `DAPGW_IDLE_TIMEOUT_MS`.
        IdleTimeout = "idle_timeout",
    }
}

label_enum! {
    /// What a batch or an upward entry carries (label `kind`).
    EntryKind {
        /// Responses to a challenge (one round).
        Response = "response",
        /// Unsolicited uplinks.
        Uplink = "uplink",
    }
}

label_enum! {
    /// Downlink message types relayed to members (label `kind`).
    DownlinkKind {
        /// Challenge of a round.
        Challenge = "challenge",
        /// Per-member confirm of an accepted entry.
        Confirm = "confirm",
        /// Group message.
        Group = "group",
        /// Rekey of one member.
        Rekey = "rekey",
        /// Member key update.
        KeyUpdate = "key_update",
    }
}

label_enum! {
    /// How the gateway's batch upload ended (label `outcome`).
    BatchOutcome {
        /// The UDC took the batch and answered with a verdict.
        Ok = "ok",
        /// The UDC refused the batch (4xx); it is not retried.
        Rejected = "rejected",
        /// Transport error, timeout or 5xx; the batch stays spooled and is
        /// retried.
        Error = "error",
        /// The UDC answered with its final verdict (counted `ok`), but
        /// storing the verdict in the spool failed (disk); the batch stays
        /// sealed and is sent again after a backoff.
        Unstored = "unstored",
    }
}

label_enum! {
    /// How a round ended at the gateway (label `outcome`).
    GatewayRoundOutcome {
        /// Every expected member answered.
        Complete = "complete",
        /// `DAPGW_ROUND_DEADLINE_MS` passed with members missing.
        Deadline = "deadline",
    }
}

label_enum! {
    /// Byte direction, seen from the gateway (label `direction`).
    Direction {
        /// Bytes read from the peer.
        Received = "received",
        /// Bytes written to the peer.
        Sent = "sent",
    }
}

label_enum! {
    /// Session mode a member authenticated with (label `mode`).
    ModeLabel {
        /// Pre-shared key only.
        Psk = "psk",
        /// Pre-shared key plus X25519.
        PskEcdhe = "psk-ecdhe",
    }
}

label_enum! {
    /// Why the UDC rejected an entry (label `reason`).
    RejectReason {
        /// Its individual tag did not verify (after localization).
        BadTag = "bad_tag",
        /// It names a member the UDC does not know.
        UnknownMember = "unknown_member",
        /// A round, sequence or counter already seen.
        Replay = "replay",
        /// It answers a round that is closed or not open.
        StaleRound = "stale_round",
        /// It did not decode.
        Malformed = "malformed",
    }
}

label_enum! {
    /// How the UDC handled a batch (label `outcome`).
    UdcBatchOutcome {
        /// Every chunk aggregate matched.
        Accepted = "accepted",
        /// At least one chunk failed and was localized.
        Localized = "localized",
        /// Refused as malformed or from the wrong gateway.
        Rejected = "rejected",
        /// Failed on the UDC's side (store error).
        Error = "error",
    }
}

label_enum! {
    /// How a round ended at the UDC (label `outcome`).
    UdcRoundOutcome {
        /// Every member of the group answered.
        Complete = "complete",
        /// Closed with members missing.
        Partial = "partial",
        /// Closed without any batch from the gateway.
        Expired = "expired",
    }
}

label_enum! {
    /// Store operation timed (label `op`).
    StoreOp {
        /// Reading rows.
        Read = "read",
        /// Writing rows (one transaction).
        Write = "write",
        /// Deleting superseded keys and ended epochs.
        Delete = "delete",
    }
}

label_enum! {
    /// A step of a member root-key update (label `event`).
    KeyUpdateEvent {
        /// Issued: the new version stored and queued to the member.
        Issued = "issued",
        /// Confirmed: the member answered a round under the new version,
        /// and older versions are no longer accepted.
        Confirmed = "confirmed",
    }
}

label_enum! {
    /// A gateway behaviour the protocol detects (label `kind`).
    MisbehaviourKind {
        /// A chunk aggregate did not match its entries.
        ChunkMismatch = "chunk_mismatch",
        /// A tag reply whose individual tags do not match the chunk.
        BadTagReply = "bad_tag_reply",
        /// No tag reply within `DAPGW_LOCALIZE_TIMEOUT_MS`.
        TagReplyTimeout = "tag_reply_timeout",
        /// A batch that replays or reorders entries already seen.
        Replay = "replay",
        /// A batch that does not decode.
        MalformedBatch = "malformed_batch",
        /// Members repeatedly missing from psk-ecdhe rounds.
        DroppedEcdhe = "dropped_ecdhe",
    }
}

label_enum! {
    /// One of the UDC's in-memory caches (label `cache`).
    UdcCache {
        /// Member records, valid at one registry version.
        Registry = "registry",
        /// Opened session slots this process wrote.
        Slot = "slot",
    }
}

label_enum! {
    /// Which cap refused an attach (label `reason`).
    AttachRefusal {
        /// The registry holds its 1,000,000 members.
        Members = "members",
        /// The subscription holds the UDC's 4,096 groups.
        Groups = "groups",
        /// The source keeps its share of members attached.
        SourceMembers = "source_members",
        /// The source's members name its share of groups.
        SourceGroups = "source_groups",
    }
}

label_enum! {
    /// Whether a cache held what a batch needed (label `outcome`).
    CacheOutcome {
        /// Served from memory.
        Hit = "hit",
        /// Read (and, for a slot, opened) from the store.
        Miss = "miss",
    }
}

// ---------------------------------------------------------------------------
// Pre-resolved families
// ---------------------------------------------------------------------------

/// A counter family with one typed label; every child created up front.
#[derive(Clone, Debug)]
pub struct Counter1<A> {
    children: Vec<IntCounter>,
    _a: PhantomData<A>,
}

impl<A: LabelValue> Counter1<A> {
    fn register(r: &Registry, name: &str, help: &str, label: &str) -> prometheus::Result<Self> {
        let vec = IntCounterVec::new(Opts::new(name, help), &[label])?;
        r.register(Box::new(vec.clone()))?;
        let children = A::ALL
            .iter()
            .map(|a| vec.with_label_values(&[a.as_str()]))
            .collect();
        Ok(Counter1 {
            children,
            _a: PhantomData,
        })
    }

    /// The counter for label value `a`.
    pub fn get(&self, a: A) -> &IntCounter {
        &self.children[a.index()]
    }
}

/// A counter family with two typed labels; every child created up front.
#[derive(Clone, Debug)]
pub struct Counter2<A, B> {
    children: Vec<IntCounter>,
    _ab: PhantomData<(A, B)>,
}

impl<A: LabelValue, B: LabelValue> Counter2<A, B> {
    fn register(
        r: &Registry,
        name: &str,
        help: &str,
        labels: [&str; 2],
    ) -> prometheus::Result<Self> {
        let vec = IntCounterVec::new(Opts::new(name, help), &labels)?;
        r.register(Box::new(vec.clone()))?;
        let mut children = Vec::with_capacity(A::ALL.len() * B::ALL.len());
        for a in A::ALL {
            for b in B::ALL {
                children.push(vec.with_label_values(&[a.as_str(), b.as_str()]));
            }
        }
        Ok(Counter2 {
            children,
            _ab: PhantomData,
        })
    }

    /// The counter for label values `(a, b)`.
    pub fn get(&self, a: A, b: B) -> &IntCounter {
        &self.children[a.index() * B::ALL.len() + b.index()]
    }
}

/// A histogram family with one typed label; every child created up front.
#[derive(Clone, Debug)]
pub struct Histogram1<A> {
    children: Vec<Histogram>,
    _a: PhantomData<A>,
}

impl<A: LabelValue> Histogram1<A> {
    fn register(
        r: &Registry,
        name: &str,
        help: &str,
        label: &str,
        buckets: &[f64],
    ) -> prometheus::Result<Self> {
        let vec = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            &[label],
        )?;
        r.register(Box::new(vec.clone()))?;
        let children = A::ALL
            .iter()
            .map(|a| vec.with_label_values(&[a.as_str()]))
            .collect();
        Ok(Histogram1 {
            children,
            _a: PhantomData,
        })
    }

    /// The histogram for label value `a`.
    pub fn get(&self, a: A) -> &Histogram {
        &self.children[a.index()]
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Registers `dapgw_build_info{version}` = 1.
fn build_info(r: &Registry) -> prometheus::Result<()> {
    let g = GaugeVec::new(
        Opts::new("dapgw_build_info", "Build of this dapgw binary; always 1."),
        &["version"],
    )?;
    r.register(Box::new(g.clone()))?;
    g.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1.0);
    Ok(())
}

/// Buckets of `dapgw_batch_entries`: powers of 4 up to the wire cap 16384.
pub const BATCH_ENTRY_BUCKETS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0];

/// Buckets of upstream latency, up to 30 s (a slow WAN hop and retries).
pub const UPSTREAM_SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
];

/// Buckets of local work (verification, store calls), 100 µs to 10 s.
pub const LOCAL_SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

// ---------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------

/// Every metric the gateway exports. Cheap to clone (handles to shared
/// atomics).
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    /// `dapgw_members_connected`: open member connections.
    pub members_connected: IntGauge,
    /// `dapgw_member_requests_total{endpoint,outcome}`.
    pub member_requests: Counter2<MemberEndpoint, RequestOutcome>,
    /// `dapgw_malformed_requests_total{endpoint,reason}`.
    pub malformed_requests: Counter2<MemberEndpoint, MalformedReason>,
    /// `dapgw_member_request_duration_seconds{endpoint}`: from the request
    /// head to the response, whatever the outcome; long polls excluded.
    pub member_request_duration: Histogram1<TimedEndpoint>,
    /// `dapgw_uplink_entries_total{kind}`: entries accepted from members.
    pub uplink_entries: Counter1<EntryKind>,
    /// `dapgw_downlink_messages_total{kind}`: messages relayed to members.
    pub downlink_messages: Counter1<DownlinkKind>,
    /// `dapgw_batches_total{kind,outcome}`: batch uploads to the UDC.
    pub batches: Counter2<EntryKind, BatchOutcome>,
    /// `dapgw_batch_entries`: entries per batch sent.
    pub batch_entries: Histogram,
    /// `dapgw_upstream_request_duration_seconds`.
    pub upstream_request_duration: Histogram,
    /// `dapgw_upstream_up`: 1 while the upstream link works, else 0.
    pub upstream_up: IntGauge,
    /// `dapgw_spool_bytes`: bytes on disk in the spool.
    pub spool_bytes: IntGauge,
    /// `dapgw_spool_entries`: entries waiting in the spool.
    pub spool_entries: IntGauge,
    /// `dapgw_spool_sealed_batches`: sealed batches waiting for the UDC's
    /// answer (in flight or not sent yet).
    pub spool_sealed_batches: IntGauge,
    /// `dapgw_batch_progress_timestamp_seconds`: unix time a batch last
    /// left the pipeline (its final verdict stored, or the UDC's refusal
    /// kept as a dead letter), or batches began to wait after none did,
    /// or of the gateway's start. With sealed batches waiting, a
    /// time far behind says the pipeline is stuck.
    pub batch_progress: prometheus::Gauge,
    /// `dapgw_spool_max_bytes`: the configured spool limit
    /// (`DAPGW_SPOOL_MAX_BYTES`), so alerts compare `dapgw_spool_bytes`
    /// against the limit each gateway really has.
    pub spool_max_bytes: IntGauge,
    /// `dapgw_spool_rejected_total`: member requests refused for a full spool.
    pub spool_rejected: IntCounter,
    /// `dapgw_spool_source_rejected_total`: member requests refused because
    /// their source held its share of the spool
    /// (`DAPGW_SPOOL_MAX_BYTES_PER_SOURCE`).
    pub spool_source_rejected: IntCounter,
    /// `dapgw_tag_requests_total`: localization requests from the UDC.
    pub tag_requests: IntCounter,
    /// `dapgw_rounds_total{outcome}`.
    pub rounds: Counter1<GatewayRoundOutcome>,
    /// `dapgw_round_missing_members_total`: members who did not answer by the
    /// round's end.
    pub round_missing_members: IntCounter,
    /// `dapgw_member_bytes_total{direction}`.
    pub member_bytes: Counter1<Direction>,
    /// `dapgw_upstream_bytes_total{direction}`.
    pub upstream_bytes: Counter1<Direction>,
    /// `dapgw_attached_members`: members in the attach registry.
    pub attached_members: IntGauge,
    /// `dapgw_attach_expired_total`: members dropped from the attach
    /// registry after `DAPGW_ATTACH_TTL_S` without a request.
    pub attach_expired: IntCounter,
    /// `dapgw_attach_rejected_total{reason}`: attaches refused by a cap of
    /// the registry or a source's share of it.
    pub attach_rejected: Counter1<AttachRefusal>,
    /// `dapgw_member_connections_closed_total{reason}`: member connections
    /// refused or closed by a limit.
    pub connections_closed: Counter1<LimitReason>,
}

impl GatewayMetrics {
    /// Registers every gateway family (and `dapgw_build_info`) in `r`.
    ///
    /// # Panics
    /// If a family of the same name is already registered in `r` (a
    /// programming error: give each service its own registry).
    pub fn register(r: &Registry) -> Self {
        match Self::try_register(r) {
            Ok(m) => m,
            Err(e) => panic!("registering gateway metrics: {e}"),
        }
    }

    /// Like [`register`](Self::register), returning the registry's error.
    pub fn try_register(r: &Registry) -> prometheus::Result<Self> {
        build_info(r)?;
        Ok(GatewayMetrics {
            members_connected: gauge(r, "dapgw_members_connected", "Open member connections.")?,
            member_requests: Counter2::register(
                r,
                "dapgw_member_requests_total",
                "Member requests by endpoint and outcome.",
                ["endpoint", "outcome"],
            )?,
            malformed_requests: Counter2::register(
                r,
                "dapgw_malformed_requests_total",
                "Member requests refused as malformed, by endpoint and reason.",
                ["endpoint", "reason"],
            )?,
            member_request_duration: Histogram1::register(
                r,
                "dapgw_member_request_duration_seconds",
                "Duration of member requests (body read, checks, spool write) by endpoint; long polls excluded.",
                "endpoint",
                LOCAL_SECONDS_BUCKETS,
            )?,
            uplink_entries: Counter1::register(
                r,
                "dapgw_uplink_entries_total",
                "Entries accepted from members, by kind.",
                "kind",
            )?,
            downlink_messages: Counter1::register(
                r,
                "dapgw_downlink_messages_total",
                "Messages relayed from the UDC to members, by kind.",
                "kind",
            )?,
            batches: Counter2::register(
                r,
                "dapgw_batches_total",
                "Batch uploads to the UDC, by kind and outcome.",
                ["kind", "outcome"],
            )?,
            batch_entries: histogram(
                r,
                "dapgw_batch_entries",
                "Entries per batch sent to the UDC.",
                BATCH_ENTRY_BUCKETS,
            )?,
            upstream_request_duration: histogram(
                r,
                "dapgw_upstream_request_duration_seconds",
                "Duration of requests to the UDC.",
                UPSTREAM_SECONDS_BUCKETS,
            )?,
            upstream_up: gauge(
                r,
                "dapgw_upstream_up",
                "1 while the upstream link to the UDC works.",
            )?,
            spool_bytes: gauge(r, "dapgw_spool_bytes", "Bytes held in the spool on disk.")?,
            spool_entries: gauge(r, "dapgw_spool_entries", "Entries waiting in the spool.")?,
            spool_sealed_batches: gauge(
                r,
                "dapgw_spool_sealed_batches",
                "Sealed batches waiting for the UDC's answer.",
            )?,
            batch_progress: {
                let g = prometheus::Gauge::new(
                    "dapgw_batch_progress_timestamp_seconds",
                    "Unix time a batch last left the pipeline (verdict stored, or refused and dead-lettered), or batches began to wait after none did, or of the gateway's start.",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            spool_max_bytes: gauge(
                r,
                "dapgw_spool_max_bytes",
                "Configured spool limit; beyond it members are pushed back (503).",
            )?,
            spool_rejected: counter(
                r,
                "dapgw_spool_rejected_total",
                "Member requests refused because the spool was full.",
            )?,
            spool_source_rejected: counter(
                r,
                "dapgw_spool_source_rejected_total",
                "Member requests refused because their source held its share of the spool.",
            )?,
            tag_requests: counter(
                r,
                "dapgw_tag_requests_total",
                "Tag requests (localization) received from the UDC.",
            )?,
            rounds: Counter1::register(
                r,
                "dapgw_rounds_total",
                "Rounds closed at the gateway, by outcome.",
                "outcome",
            )?,
            round_missing_members: counter(
                r,
                "dapgw_round_missing_members_total",
                "Members that had not answered when their round closed.",
            )?,
            member_bytes: Counter1::register(
                r,
                "dapgw_member_bytes_total",
                "Body bytes exchanged with members, by direction.",
                "direction",
            )?,
            upstream_bytes: Counter1::register(
                r,
                "dapgw_upstream_bytes_total",
                "Body bytes exchanged with the UDC, by direction.",
                "direction",
            )?,
            attached_members: gauge(
                r,
                "dapgw_attached_members",
                "Members in the attach registry (expected in their groups' rounds).",
            )?,
            attach_expired: counter(
                r,
                "dapgw_attach_expired_total",
                "Members dropped from the attach registry after DAPGW_ATTACH_TTL_S without a request.",
            )?,
            attach_rejected: Counter1::register(
                r,
                "dapgw_attach_rejected_total",
                "Attaches refused by a cap of the attach registry or a source's share of it, by reason.",
                "reason",
            )?,
            connections_closed: Counter1::register(
                r,
                "dapgw_member_connections_closed_total",
                "Member connections refused or closed by a limit, by reason.",
                "reason",
            )?,
        })
    }
}

// ---------------------------------------------------------------------------
// UDC
// ---------------------------------------------------------------------------

/// Every metric the UDC exports. Cheap to clone.
#[derive(Clone, Debug)]
pub struct UdcMetrics {
    /// `dapgw_udc_members_authenticated_total{mode}`.
    pub members_authenticated: Counter1<ModeLabel>,
    /// `dapgw_udc_entries_rejected_total{reason}`.
    pub entries_rejected: Counter1<RejectReason>,
    /// `dapgw_udc_batches_total{kind,outcome}`.
    pub batches: Counter2<EntryKind, UdcBatchOutcome>,
    /// `dapgw_udc_batch_verify_seconds`: time to verify one batch.
    pub batch_verify: Histogram,
    /// `dapgw_udc_localizations_total`: failed chunks localized.
    pub localizations: IntCounter,
    /// `dapgw_udc_rounds_total{outcome}`.
    pub rounds: Counter1<UdcRoundOutcome>,
    /// `dapgw_udc_readings_total`: readings accepted.
    pub readings: IntCounter,
    /// `dapgw_udc_group_updates_total`: group messages sent.
    pub group_updates: IntCounter,
    /// `dapgw_udc_acks_total`: member acknowledgements accepted.
    pub acks: IntCounter,
    /// `dapgw_udc_store_seconds{op}`.
    pub store: Histogram1<StoreOp>,
    /// `dapgw_udc_sessions_active`: sessions held.
    pub sessions_active: IntGauge,
    /// `dapgw_udc_key_updates_total{event}`: member root-key updates
    /// issued, and confirmed by the member's answer under the new version.
    pub key_updates: Counter1<KeyUpdateEvent>,
    /// `dapgw_udc_gateway_misbehaviour_total{kind}`.
    pub gateway_misbehaviour: Counter1<MisbehaviourKind>,
    /// `dapgw_udc_connections_closed_total{reason}`: connections refused
    /// or closed by a limit.
    pub connections_closed: Counter1<LimitReason>,
    /// `dapgw_udc_cache_lookups_total{cache,outcome}`: per member record
    /// or stored session slot loaded (for a batch, or a rekey), whether it
    /// came from memory.
    pub cache_lookups: Counter2<UdcCache, CacheOutcome>,
}

impl UdcMetrics {
    /// Counts the lookups of one batch (or rekey) in `cache`.
    pub fn count_cache(&self, cache: UdcCache, hits: u64, misses: u64) {
        self.cache_lookups
            .get(cache, CacheOutcome::Hit)
            .inc_by(hits);
        self.cache_lookups
            .get(cache, CacheOutcome::Miss)
            .inc_by(misses);
    }

    /// Registers every UDC family (and `dapgw_build_info`) in `r`.
    ///
    /// # Panics
    /// If a family of the same name is already registered in `r`.
    pub fn register(r: &Registry) -> Self {
        match Self::try_register(r) {
            Ok(m) => m,
            Err(e) => panic!("registering udc metrics: {e}"),
        }
    }

    /// Like [`register`](Self::register), returning the registry's error.
    pub fn try_register(r: &Registry) -> prometheus::Result<Self> {
        build_info(r)?;
        Ok(UdcMetrics {
            members_authenticated: Counter1::register(
                r,
                "dapgw_udc_members_authenticated_total",
                "Members authenticated, by session mode.",
                "mode",
            )?,
            entries_rejected: Counter1::register(
                r,
                "dapgw_udc_entries_rejected_total",
                "Entries rejected, by reason.",
                "reason",
            )?,
            batches: Counter2::register(
                r,
                "dapgw_udc_batches_total",
                "Batches received from gateways, by kind and outcome.",
                ["kind", "outcome"],
            )?,
            batch_verify: histogram(
                r,
                "dapgw_udc_batch_verify_seconds",
                "Time to verify one batch.",
                LOCAL_SECONDS_BUCKETS,
            )?,
            localizations: counter(
                r,
                "dapgw_udc_localizations_total",
                "Failed chunks localized through a tag request.",
            )?,
            rounds: Counter1::register(
                r,
                "dapgw_udc_rounds_total",
                "Rounds closed, by outcome.",
                "outcome",
            )?,
            readings: counter(r, "dapgw_udc_readings_total", "Readings accepted.")?,
            group_updates: counter(r, "dapgw_udc_group_updates_total", "Group messages sent.")?,
            acks: counter(
                r,
                "dapgw_udc_acks_total",
                "Member acknowledgements accepted.",
            )?,
            store: Histogram1::register(
                r,
                "dapgw_udc_store_seconds",
                "Duration of store operations, by operation.",
                "op",
                LOCAL_SECONDS_BUCKETS,
            )?,
            sessions_active: gauge(r, "dapgw_udc_sessions_active", "Sessions currently held.")?,
            key_updates: Counter1::register(
                r,
                "dapgw_udc_key_updates_total",
                "Member root-key updates, issued and confirmed.",
                "event",
            )?,
            gateway_misbehaviour: Counter1::register(
                r,
                "dapgw_udc_gateway_misbehaviour_total",
                "Gateway misbehaviour detected, by kind.",
                "kind",
            )?,
            connections_closed: Counter1::register(
                r,
                "dapgw_udc_connections_closed_total",
                "Connections refused or closed by a limit, by reason.",
                "reason",
            )?,
            cache_lookups: Counter2::register(
                r,
                "dapgw_udc_cache_lookups_total",
                "Member records and stored session slots loaded, from memory (hit) or the \
                 store (miss), by cache.",
                ["cache", "outcome"],
            )?,
        })
    }
}

// ---------------------------------------------------------------------------
// Process metrics (Linux /proc)
// ---------------------------------------------------------------------------

/// `dapgw_process_cpu_seconds_total`, `dapgw_process_resident_memory_bytes`
/// and `dapgw_process_open_fds`, read each time the registry is gathered
/// (CPU from the process CPU clock, the rest from `/proc/self`; on systems
/// without `/proc` those stay 0).
#[derive(Clone, Debug)]
pub struct ProcessMetrics {
    cpu: Counter,
    rss: IntGauge,
    fds: IntGauge,
}

impl ProcessMetrics {
    /// Registers the process collector in `r`.
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        let m = ProcessMetrics {
            cpu: Counter::new(
                "dapgw_process_cpu_seconds_total",
                "User and system CPU time of this process.",
            )?,
            rss: IntGauge::new(
                "dapgw_process_resident_memory_bytes",
                "Resident memory of this process.",
            )?,
            fds: IntGauge::new(
                "dapgw_process_open_fds",
                "Open file descriptors of this process.",
            )?,
        };
        r.register(Box::new(m.clone()))?;
        Ok(m)
    }

    fn refresh(&self) {
        if let Some(secs) = process_cpu_seconds() {
            // A counter only moves forward; /proc never goes back.
            let delta = secs - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
        }
        if let Some(bytes) = read_rss_bytes(Path::new("/proc/self/statm")) {
            self.rss.set(bytes);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of the entries.
            self.fds.set(dir.count().saturating_sub(1) as i64);
        }
    }
}

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.cpu.desc();
        d.extend(self.rss.desc());
        d.extend(self.fds.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        let mut m = self.cpu.collect();
        m.extend(self.rss.collect());
        m.extend(self.fds.collect());
        m
    }
}

/// CPU time of the whole process (user + system, every thread, live or
/// exited): `CLOCK_PROCESS_CPUTIME_ID`, with nanosecond resolution
/// (`/proc/self/stat` counts 10 ms ticks, too coarse to tell what one
/// round of a few thousand members costs). Also what `dapgw bench`'s
/// server roles report of themselves.
pub(crate) fn process_cpu_time() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// [`process_cpu_time`] in seconds.
fn process_cpu_seconds() -> Option<f64> {
    Some(process_cpu_time().as_secs_f64())
}

/// Resident memory in bytes, from `/proc/self/statm` (its second field, in
/// pages). `/proc/self/status` says the same in kB but costs the kernel far
/// more to render (every field of the task): in a `dapgw bench` profile
/// this collector (that read and the `/proc/self/fd` listing) was about
/// half of what a scrape of the UDC's `/metrics` cost.
///
/// The page size comes from rustix: `sysconf` where rustix uses libc (the
/// tests and benches), the kernel's auxiliary vector in the release
/// binary's raw-syscall backend, cached after the first call (the process
/// CPU clock's vDSO lookup, which runs first in every scrape, has already
/// read it).
fn read_rss_bytes(path: &Path) -> Option<i64> {
    let statm = std::fs::read_to_string(path).ok()?;
    parse_statm_rss(&statm, rustix::param::page_size())
}

fn parse_statm_rss(statm: &str, page_size: usize) -> Option<i64> {
    let pages: u64 = statm.split_ascii_whitespace().nth(1)?.parse().ok()?;
    let bytes = pages.checked_mul(u64::try_from(page_size).ok()?)?;
    i64::try_from(bytes).ok()
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Content type of [`encode`]'s output.
pub const METRICS_CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Renders every family in `r` in the Prometheus text format. A family that
/// cannot be encoded (never expected) is replaced by a comment line.
pub fn encode(r: &Registry) -> String {
    match TextEncoder::new().encode_to_string(&r.gather()) {
        Ok(s) => s,
        Err(e) => format!("# encoding metrics failed: {e}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_combination_is_present_at_zero() {
        let r = Registry::new();
        let m = GatewayMetrics::register(&r);
        let text = encode(&r);
        for e in MemberEndpoint::ALL {
            for o in RequestOutcome::ALL {
                let series = format!(
                    "dapgw_member_requests_total{{endpoint=\"{}\",outcome=\"{}\"}} 0",
                    e.as_str(),
                    o.as_str()
                );
                assert!(text.contains(&series), "missing {series}");
            }
        }
        m.member_requests
            .get(MemberEndpoint::Uplink, RequestOutcome::Overloaded)
            .inc();
        let text = encode(&r);
        assert!(
            text.contains(
                "dapgw_member_requests_total{endpoint=\"uplink\",outcome=\"overloaded\"} 1"
            )
        );
        assert!(text.contains("dapgw_member_requests_total{endpoint=\"uplink\",outcome=\"ok\"} 0"));
        assert!(text.contains(&format!(
            "dapgw_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn udc_and_gateway_each_register_once() {
        let r = Registry::new();
        UdcMetrics::register(&r);
        assert!(UdcMetrics::try_register(&r).is_err());
        assert!(
            GatewayMetrics::try_register(&r).is_err(),
            "build_info clashes"
        );
    }

    #[test]
    fn proc_parsers() {
        let a = process_cpu_seconds().expect("a CPU clock");
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(
            process_cpu_seconds().expect("a CPU clock") > a,
            "the clock moves with work"
        );
        assert_eq!(
            parse_statm_rss("5120 512 300 80 0 900 0\n", 4096),
            Some(512 * 4096)
        );
        assert_eq!(
            parse_statm_rss("5120 512 300 80 0 900 0", 65536),
            Some(512 * 65536)
        );
        assert_eq!(parse_statm_rss("5120\n", 4096), None);
        assert_eq!(parse_statm_rss("5120 x 300", 4096), None);
        assert_eq!(parse_statm_rss("5120 -5 300", 4096), None);
        assert_eq!(parse_statm_rss("", 4096), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_read_proc() {
        let r = Registry::new();
        ProcessMetrics::register(&r).unwrap();
        let text = encode(&r);
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix("dapgw_process_resident_memory_bytes "))
            .unwrap();
        let rss: i64 = rss.parse().unwrap();
        // The same figure as the kernel's own `VmRSS` (in kB), give or take
        // what the process allocated between the two reads.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm_rss_kb: i64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .expect("VmRSS in /proc/self/status");
        let vm_rss = vm_rss_kb * 1024;
        assert!(
            rss > vm_rss / 2 && rss < vm_rss * 2,
            "statm gives {rss} bytes, VmRSS {vm_rss}"
        );
        let fds = text
            .lines()
            .find_map(|l| l.strip_prefix("dapgw_process_open_fds "))
            .unwrap();
        assert!(fds.parse::<i64>().unwrap() >= 3);
    }
}
