//! The operator API under `/v1/admin/` on the admin listener (bearer
//! token), handed to `admin::serve_with_fallback` next to `/metrics`,
//! `/healthz` and `/readyz`. The `dapgw udc ...` CLI subcommands call it.
//!
//! ```text
//! operator/CLI --Bearer--> admin listener --fallback--> route --> service::Udc / Store
//! ```
//!
//! Bodies are JSON; errors are `{"error", "reason"}` like the gateway-facing
//! server.
// `Err` carries the HTTP answer itself, built at most once per request.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq as _;

use super::server::error;
use super::service::{KeyUpdateOutcome, ServiceError, Udc, now_ms};
use crate::admin::{AdminResponse, Fallback};
use crate::protocol::wire::Purpose;
use crate::udc::rounds::parse_mode;
use crate::udc::store::{self, Store as _};

/// The fallback handler serving the operator API with bearer `token`.
pub fn fallback(udc: Arc<Udc>, token: String) -> Fallback {
    let token = Arc::new(token);
    Arc::new(move |req| {
        let udc = udc.clone();
        let token = token.clone();
        Box::pin(async move {
            if !req.uri().path().starts_with("/v1/admin/") {
                return None;
            }
            Some(handle(req, &udc, &token).await)
        })
    })
}

fn authorized(req: &Request<Bytes>, token: &str) -> bool {
    let Some(h) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(given) = h.strip_prefix("Bearer ") else {
        return false;
    };
    !token.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

fn json_resp(status: StatusCode, v: Value) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn bad(reason: &str) -> AdminResponse {
    error(StatusCode::BAD_REQUEST, "bad_request", reason)
}

fn svc_err(e: ServiceError) -> AdminResponse {
    match e {
        ServiceError::BadRequest(r) => bad(&r),
        ServiceError::NotFound(r) => error(StatusCode::NOT_FOUND, "not_found", &r),
        ServiceError::Conflict(r) => error(StatusCode::CONFLICT, "conflict", &r),
        ServiceError::Busy(r) => {
            let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, "busy", &r);
            resp.headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        other => {
            tracing::error!(error = ?other, "admin request failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request failed; see the UDC log",
            )
        }
    }
}

fn store_err(e: store::StoreError) -> AdminResponse {
    svc_err(e.into())
}

/// Refuses a group the UDC knows nothing of: no active member is in it
/// and no round or update ever used it. Opening a round, a schedule or an
/// update there would only wait for members that do not exist (a typo in
/// the group id), so the operator hears of it at once. A group row at its
/// first version was created and never written back, which no use leaves
/// behind (a round, an update, a rekey and an import all write it back):
/// an import that failed before its write, a gateway's batch naming a
/// group nobody is in, or `dapgw udc recover` creating a group it found
/// named (docs/udc.md).
async fn known_group(udc: &Udc, group: u32) -> Result<(), AdminResponse> {
    let store = udc.store();
    let used = |row: crate::udc::store::GroupRow| row.version > 1;
    if store
        .group(group)
        .await
        .map_err(store_err)?
        .is_some_and(used)
        || !store
            .group_members(group, None, 1)
            .await
            .map_err(store_err)?
            .is_empty()
    {
        return Ok(());
    }
    Err(error(
        StatusCode::NOT_FOUND,
        "unknown_group",
        &format!(
            "group {group} has no active member and was never used; add or import its members first"
        ),
    ))
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, AdminResponse> {
    serde_json::from_slice(body).map_err(|e| bad(&format!("invalid JSON body: {e}")))
}

/// A request's query string: its `key=value` pairs, percent-decoded
/// (RFC 3986: `+` stays a plus). A part without `=` is a parameter with
/// an empty value (so a bare `?limt` is named as unknown, and a bare
/// `?limit` is not a number); empty parts (`&&`) are skipped.
struct Query(Vec<(String, String)>);

impl Query {
    /// 400 naming the parameter if a `%` is not followed by two hex
    /// digits or the decoded bytes are not UTF-8.
    fn parse(query: Option<&str>) -> Result<Self, AdminResponse> {
        query
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .map(|(k, v)| {
                let k = percent_decode(k).ok_or_else(|| {
                    bad("a query parameter name is not valid percent-encoded UTF-8")
                })?;
                let v = percent_decode(v).ok_or_else(|| {
                    // The name is the client's: echoed, but not at any length.
                    let name: String = k.chars().take(64).collect();
                    bad(&format!(
                        "query parameter `{name}` is not valid percent-encoded UTF-8"
                    ))
                })?;
                Ok((k, v))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// 400 if a parameter is not one of `allowed` (naming it and the ones
    /// the endpoint takes) or is given twice: a misspelt `limit` or
    /// `after` silently ignored would page or filter other than asked.
    fn only(&self, allowed: &[&str]) -> Result<(), AdminResponse> {
        for (i, (k, _)) in self.0.iter().enumerate() {
            // The name is the client's: echoed, but not at any length.
            let name: String = k.chars().take(64).collect();
            if !allowed.contains(&k.as_str()) {
                return Err(bad(&if allowed.is_empty() {
                    format!("unknown query parameter `{name}`; this endpoint takes none")
                } else {
                    format!(
                        "unknown query parameter `{name}`; this endpoint takes {}",
                        allowed.join(", ")
                    )
                }));
            }
            if self.0[..i].iter().any(|(other, _)| other == k) {
                return Err(bad(&format!("query parameter `{name}` is given twice")));
            }
        }
        Ok(())
    }

    /// `after`, a member id, if given.
    fn after_member(&self) -> Result<Option<u64>, AdminResponse> {
        self.get("after").map(|a| num(a, "after")).transpose()
    }

    /// A page's `limit` ([`page_limit`]), `default` if not given.
    fn limit(&self, default: u32) -> Result<u32, AdminResponse> {
        self.get("limit").map_or(Ok(default), page_limit)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `s` percent-decoded; `None` if a `%` is not followed by two hex digits
/// (which `percent_encoding` would pass through as is) or the result is
/// not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let escapes_ok = b.iter().enumerate().all(|(i, c)| {
        *c != b'%'
            || b.get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(s).decode_utf8().ok()?;
    Some(decoded.into_owned())
}

fn num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, AdminResponse> {
    s.parse()
        .map_err(|_| bad(&format!("{what} must be an unsigned integer")))
}

/// A page's `limit`: at least 1 (a page of none would never advance),
/// capped at 10,000.
fn page_limit(s: &str) -> Result<u32, AdminResponse> {
    match num::<u32>(s, "limit")? {
        0 => Err(bad("limit must be at least 1")),
        n => Ok(n.min(10_000)),
    }
}

fn purpose_name(p: store::RoundPurpose) -> &'static str {
    match p {
        store::RoundPurpose::Auth => "auth",
        store::RoundPurpose::Read => "read",
    }
}

fn mode_name(m: crate::protocol::wire::Mode) -> &'static str {
    match m {
        crate::protocol::wire::Mode::Psk => "psk",
        crate::protocol::wire::Mode::PskEcdhe => "psk-ecdhe",
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRound {
    group: u32,
    mode: Option<String>,
    purpose: Option<String>,
    /// Hex bytes of the read request (read rounds).
    read_request: Option<String>,
    /// How long the round stays open (default 300 s).
    duration_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSchedule {
    group: u32,
    every_s: u64,
    mode: Option<String>,
    purpose: Option<String>,
    /// Hex bytes of the read request its read rounds carry.
    read_request: Option<String>,
}

/// The longest round (`duration_s`) and schedule period (`every_s`) the
/// operator API takes: a year. Longer ones mean nothing to a meter, and
/// times past the clock's range would overflow the round's deadline.
const MAX_PERIOD_S: u64 = 366 * 24 * 3600;

/// `v` (seconds, named `what`) if it is at most [`MAX_PERIOD_S`].
fn period_s(v: u64, what: &str) -> Result<u64, AdminResponse> {
    if v > MAX_PERIOD_S {
        return Err(bad(&format!(
            "{what} must be at most {MAX_PERIOD_S} (a year)"
        )));
    }
    Ok(v)
}

/// A round's purpose from the operator API's `purpose` (default auth) and
/// `read_request` (hex, read rounds only, at most
/// [`MAX_READ_REQUEST`](crate::protocol::wire::MAX_READ_REQUEST) bytes;
/// absent: empty), shared by rounds started now and schedules so both take
/// the same bodies.
fn purpose_of(purpose: Option<&str>, read_request: Option<&str>) -> Result<Purpose, AdminResponse> {
    match (purpose.unwrap_or("auth"), read_request) {
        ("auth", None) => Ok(Purpose::Auth),
        ("auth", Some(_)) => Err(bad("read_request is for purpose read only")),
        ("read", req) => {
            let req =
                hex::decode(req.unwrap_or("")).map_err(|_| bad("read_request must be hex"))?;
            let max = crate::protocol::wire::MAX_READ_REQUEST;
            if req.len() > max {
                return Err(bad(&format!(
                    "read_request of {} bytes is over the {max}-byte cap",
                    req.len()
                )));
            }
            Ok(Purpose::Read(Bytes::from(req)))
        }
        _ => Err(bad("purpose must be auth or read")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUpdate {
    payload_b64: Option<String>,
    payload_hex: Option<String>,
    valid_through_round: Option<u64>,
}

/// The optional body of a key update: the key version the operator saw,
/// so that repeating a call whose answer was lost does not rotate twice.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeyUpdateBody {
    expect_kv: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMember {
    id: u64,
    groups: Vec<u32>,
    kv: Option<u32>,
}

/// One gateway's entries in a round: accepted, and rejected by reason.
#[derive(Default)]
struct GatewayTally {
    accepted: u64,
    rejected: std::collections::BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Import {
    members: Vec<super::keys_cmd::ImportMember>,
}

/// Decodes standard base64 (with or without padding).
fn b64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= val(*c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

async fn handle(req: Request<Bytes>, udc: &Udc, token: &str) -> AdminResponse {
    if !authorized(&req, token) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the operator API needs Authorization: Bearer <token>",
        );
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        return r;
    }
    match route(&req, udc).await {
        Ok(r) | Err(r) => r,
    }
}

async fn route(req: &Request<Bytes>, udc: &Udc) -> Result<AdminResponse, AdminResponse> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let parts: Vec<&str> = path
        .strip_prefix("/v1/admin/")
        .unwrap_or("")
        .split('/')
        .collect();
    // HEAD is GET without the body (hyper drops it and keeps the length).
    let head = req.method() == Method::HEAD;
    let m = if head {
        Method::GET
    } else {
        req.method().clone()
    };
    let body = req.body();
    // The path, then the method, then the query: a wrong path is 404
    // and a wrong method 405 whatever the query says.
    let allowed = methods(&parts);
    if allowed.is_empty() {
        return Err(error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such operator endpoint",
        ));
    }
    if !allowed.contains(&m) {
        // Where GET is answered, so is HEAD.
        let allow = allowed
            .iter()
            .flat_map(|a| {
                let head = (*a == Method::GET).then_some("HEAD");
                std::iter::once(a.as_str()).chain(head)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let asked = req.method();
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{asked} is not allowed here; use {allow}"),
        );
        if let Ok(v) = HeaderValue::from_str(&allow) {
            r.headers_mut().insert(hyper::header::ALLOW, v);
        }
        return Err(r);
    }
    let q = Query::parse(req.uri().query())?;
    q.only(query_parameters(&m, &parts))?;
    match (m, parts.as_slice()) {
        (Method::POST, ["rounds"]) => {
            let b: StartRound = parse_json(body)?;
            let mode = parse_mode(b.mode.as_deref().unwrap_or("psk-ecdhe"))
                .ok_or_else(|| bad("mode must be psk or psk-ecdhe"))?;
            let purpose = purpose_of(b.purpose.as_deref(), b.read_request.as_deref())?;
            let duration = period_s(b.duration_s.unwrap_or(300), "duration_s")? * 1000;
            known_group(udc, b.group).await?;
            let round = udc
                .open_round(b.group, mode, purpose, Some(duration))
                .await
                .map_err(svc_err)?;
            Ok(json_resp(
                StatusCode::CREATED,
                json!({"group": b.group, "round": round}),
            ))
        }
        (Method::GET, ["rounds", g, r]) => {
            let g: u32 = num(g, "group")?;
            let r: u64 = num(r, "round")?;
            // The `rejected` and `missing` lists start after this member
            // (the next page of a round with more than 1000 of either).
            let list_after = q.after_member()?;
            let rep = udc
                .store()
                .round_report(g, r)
                .await
                .map_err(store_err)?
                .ok_or_else(|| error(StatusCode::NOT_FOUND, "not_found", "no such round"))?;
            let missing = udc
                .store()
                .round_missing(g, r, list_after, 1000)
                .await
                .map_err(store_err)?;
            // Page through the outcomes (by member id): tally them per
            // gateway and list up to 1000 rejections after `list_after`.
            // The store lists members in the signed order of their stored
            // (bit-cast) ids, so "after" compares the same way.
            let listed = |m: u64| list_after.is_none_or(|a| (m as i64) > (a as i64));
            let mut rejected: Vec<Value> = Vec::new();
            let mut by_gateway: std::collections::BTreeMap<String, GatewayTally> =
                std::collections::BTreeMap::new();
            let mut after = None;
            loop {
                let page = udc
                    .store()
                    .round_outcomes(g, r, after, 1000)
                    .await
                    .map_err(store_err)?;
                let Some(last) = page.last() else { break };
                after = Some(last.member);
                for o in &page {
                    let via = o.gateway.as_deref().unwrap_or("direct");
                    let tally = by_gateway.entry(via.to_owned()).or_default();
                    if o.kind == store::OutcomeKind::Accepted {
                        tally.accepted += 1;
                        continue;
                    }
                    *tally.rejected.entry(o.reason.to_string()).or_default() += 1;
                    if rejected.len() < 1000 && listed(o.member) {
                        rejected.push(
                            json!({"member": o.member, "reason": o.reason, "gateway": o.gateway}),
                        );
                    }
                }
                if page.len() < 1000 {
                    break;
                }
            }
            // The next page starts after the smaller last id of the lists
            // that were cut at 1000 (signed order, as the store lists them):
            // the other list may show members again, none is skipped.
            let last_rejected = (rejected.len() == 1000)
                .then(|| rejected.last().and_then(|v| v["member"].as_u64()))
                .flatten();
            let last_missing = (missing.len() == 1000)
                .then(|| missing.last().copied())
                .flatten();
            let next = last_rejected
                .into_iter()
                .chain(last_missing)
                .min_by_key(|m| *m as i64);
            let by_gateway: Vec<Value> = by_gateway
                .into_iter()
                .map(|(gw, t)| {
                    json!({
                        "gateway": gw,
                        "accepted": t.accepted,
                        "rejected_by_reason": t.rejected.iter().map(|(k, n)| json!({"reason": k, "count": n})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            Ok(json_resp(
                StatusCode::OK,
                json!({
                    "group": g,
                    "round": r,
                    "mode": mode_name(rep.round.mode),
                    "purpose": purpose_name(rep.round.purpose),
                    "status": format!("{:?}", rep.round.status).to_lowercase(),
                    "opened_at_ms": rep.round.opened_at_ms,
                    "closes_at_ms": rep.round.closes_at_ms,
                    "accepted": rep.accepted,
                    "rejected_by_reason": rep.rejected.iter().map(|(k, n)| json!({"reason": k, "count": n})).collect::<Vec<_>>(),
                    "rejected": rejected,
                    "by_gateway": by_gateway,
                    "unverified": rep.unverified,
                    "missing_count": rep.missing,
                    "missing": missing,
                    "next": next,
                    "localizations": rep.localizations,
                }),
            ))
        }
        (Method::POST, ["rounds", g, r, "close"]) => {
            let g: u32 = num(g, "group")?;
            let r: u64 = num(r, "round")?;
            let closed = udc.close_round(g, r).await.map_err(svc_err)?;
            Ok(json_resp(StatusCode::OK, json!({"closed": closed})))
        }
        (Method::POST, ["schedules"]) => {
            let b: NewSchedule = parse_json(body)?;
            if b.every_s == 0 {
                return Err(bad("every_s must be positive"));
            }
            period_s(b.every_s, "every_s")?;
            let mode = parse_mode(b.mode.as_deref().unwrap_or("psk-ecdhe"))
                .ok_or_else(|| bad("mode must be psk or psk-ecdhe"))?;
            let (purpose, read_request) =
                match purpose_of(b.purpose.as_deref(), b.read_request.as_deref())? {
                    Purpose::Auth => (store::RoundPurpose::Auth, Vec::new()),
                    Purpose::Read(req) => (store::RoundPurpose::Read, req.to_vec()),
                };
            let every_ms = b.every_s * 1000;
            known_group(udc, b.group).await?;
            let id = udc
                .store()
                .insert_schedule(store::ScheduleRow {
                    id: 0,
                    group: b.group,
                    every_ms,
                    mode,
                    purpose,
                    read_request,
                    next_at_ms: now_ms(),
                })
                .await
                .map_err(store_err)?;
            Ok(json_resp(StatusCode::CREATED, json!({"id": id})))
        }
        (Method::GET, ["schedules"]) => {
            let list = udc.store().schedules().await.map_err(store_err)?;
            let list: Vec<Value> = list
                .iter()
                .map(|s| {
                    // read_request: hex for read schedules, null for auth.
                    let read_request = (s.purpose == store::RoundPurpose::Read)
                        .then(|| hex::encode(&s.read_request));
                    json!({"id": s.id, "group": s.group, "every_s": s.every_ms / 1000,
                           "mode": mode_name(s.mode), "purpose": purpose_name(s.purpose),
                           "read_request": read_request, "next_at_ms": s.next_at_ms})
                })
                .collect();
            Ok(json_resp(StatusCode::OK, json!({ "schedules": list })))
        }
        (Method::DELETE, ["schedules", id]) => {
            let id: u64 = num(id, "schedule id")?;
            if udc.store().delete_schedule(id).await.map_err(store_err)? {
                Ok(json_resp(StatusCode::OK, json!({"deleted": id})))
            } else {
                Err(error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such schedule",
                ))
            }
        }
        (Method::POST, ["groups", g, "updates"]) => {
            let g: u32 = num(g, "group")?;
            let b: NewUpdate = parse_json(body)?;
            let payload = match (&b.payload_b64, &b.payload_hex) {
                (Some(s), None) => b64(s).ok_or_else(|| bad("payload_b64 is not base64"))?,
                (None, Some(s)) => hex::decode(s).map_err(|_| bad("payload_hex is not hex"))?,
                _ => return Err(bad("give exactly one of payload_b64 and payload_hex")),
            };
            known_group(udc, g).await?;
            let seq = udc
                .publish_update(g, &payload, b.valid_through_round)
                .await
                .map_err(svc_err)?;
            Ok(json_resp(
                StatusCode::CREATED,
                json!({"group": g, "seq": seq}),
            ))
        }
        (Method::GET, ["groups", g, "updates", seq]) => {
            let g: u32 = num(g, "group")?;
            let seq: u64 = num(seq, "seq")?;
            let msg = udc
                .store()
                .group_message(g, seq)
                .await
                .map_err(store_err)?
                .ok_or_else(|| error(StatusCode::NOT_FOUND, "not_found", "no such update"))?;
            let after = q.after_member()?;
            let limit = q.limit(1000)?;
            let page = udc
                .store()
                .acks(g, seq, after, limit)
                .await
                .map_err(store_err)?;
            // A full page may have more behind it: ask again with
            // `after` = `next`.
            let next = page
                .acks
                .last()
                .filter(|_| page.acks.len() == limit as usize)
                .map(|a| a.member);
            Ok(json_resp(
                StatusCode::OK,
                json!({
                    "group": g, "seq": seq, "epoch": msg.epoch,
                    "payload_sha256": hex::encode(msg.payload_hash),
                    "created_at_ms": msg.created_at_ms,
                    "acked_count": page.total,
                    "acked": page.acks.iter().map(|a| json!({"member": a.member, "at_ms": a.at_ms})).collect::<Vec<_>>(),
                    "next": next,
                }),
            ))
        }
        (Method::POST, ["members"]) => {
            let b: NewMember = parse_json(body)?;
            if b.groups.is_empty() {
                return Err(bad("groups must not be empty"));
            }
            if b.kv == Some(0) {
                return Err(bad("kv must be at least 1"));
            }
            let mut groups = b.groups;
            groups.sort_unstable();
            groups.dedup();
            udc.add_member(b.id, groups.clone(), b.kv)
                .await
                .map_err(svc_err)?;
            Ok(json_resp(
                StatusCode::CREATED,
                json!({"id": b.id, "groups": groups}),
            ))
        }
        (Method::POST, ["members", "import"]) => {
            let b: Import = parse_json(body)?;
            let now = now_ms();
            let rows = b
                .members
                .into_iter()
                .map(|m| {
                    if m.groups.is_empty() {
                        return Err(bad(&format!("member {}: groups must not be empty", m.id)));
                    }
                    if m.kv == 0 {
                        return Err(bad(&format!("member {}: kv must be at least 1", m.id)));
                    }
                    let key_source = match m.sealed_key {
                        None => store::KeySource::Derived,
                        Some(h) => {
                            store::KeySource::Imported(store::Sealed::new(hex::decode(h).map_err(
                                |_| bad(&format!("member {}: sealed_key is not hex", m.id)),
                            )?))
                        }
                    };
                    Ok(store::MemberRow {
                        id: m.id,
                        groups: m.groups,
                        key_source,
                        kv: m.kv,
                        min_kv: m.kv,
                        status: store::MemberStatus::Active,
                        added_at_ms: now,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let (imported, skipped) = udc.import_members(rows).await.map_err(svc_err)?;
            Ok(json_resp(
                StatusCode::CREATED,
                json!({"imported": imported, "skipped": skipped}),
            ))
        }
        (Method::POST, ["members", id, "revoke"]) => {
            let id: u64 = num(id, "member id")?;
            if udc.revoke_member(id).await.map_err(svc_err)? {
                Ok(json_resp(StatusCode::OK, json!({"revoked": id})))
            } else {
                Err(error(StatusCode::NOT_FOUND, "not_found", "no such member"))
            }
        }
        (Method::POST, ["members", id, "key-update"]) => {
            let id: u64 = num(id, "member id")?;
            let b: KeyUpdateBody = if body.is_empty() {
                KeyUpdateBody::default()
            } else {
                parse_json(body)?
            };
            match udc
                .update_member_key(id, b.expect_kv)
                .await
                .map_err(svc_err)?
            {
                KeyUpdateOutcome::Issued { kv, min_kv, groups } => Ok(json_resp(
                    StatusCode::OK,
                    json!({"id": id, "kv": kv, "min_kv": min_kv, "groups": groups}),
                )),
                KeyUpdateOutcome::UnknownMember => {
                    Err(error(StatusCode::NOT_FOUND, "not_found", "no such member"))
                }
                KeyUpdateOutcome::KvChanged { kv } => Err(error(
                    StatusCode::CONFLICT,
                    "kv_changed",
                    &format!(
                        "the member's key version is {kv}, not the expected one: a key update \
                         (or a re-add) went through already; check GET /v1/admin/members before \
                         another"
                    ),
                )),
                KeyUpdateOutcome::Revoked => Err(error(
                    StatusCode::CONFLICT,
                    "revoked",
                    "the member is revoked; add it again with a new credential",
                )),
                KeyUpdateOutcome::NeedsEcdhe => Err(error(
                    StatusCode::CONFLICT,
                    "needs_psk_ecdhe",
                    "the member has no psk-ecdhe session that can carry a key update (none is \
                     its newest session in any group, or their downlink counters are spent; in a \
                     psk session whoever holds the old key could read the new one): run a \
                     psk-ecdhe round in one of its groups, then retry once the member has \
                     answered it",
                )),
            }
        }
        (Method::GET, ["members"]) => {
            let after = q.after_member()?;
            let limit = q.limit(1000)?;
            let rows = udc
                .store()
                .list_members(after, limit)
                .await
                .map_err(store_err)?;
            // The page's sessions in one query (the page is a run of
            // members in the store's order), then by member.
            let sessions = match (rows.first(), rows.last()) {
                (Some(first), Some(last)) => udc
                    .store()
                    .member_sessions(first.id, last.id)
                    .await
                    .map_err(store_err)?,
                _ => Vec::new(),
            };
            let mut by_member: std::collections::HashMap<u64, Vec<store::StoredSlot>> =
                std::collections::HashMap::new();
            for s in sessions {
                by_member.entry(s.member).or_default().push(s);
            }
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let sessions = by_member.remove(&r.id).unwrap_or_default();
                // 0: a slot written without an authentication (a
                // revocation's empty slot for a member that had none).
                let last_auth = sessions
                    .iter()
                    .map(|s| s.last_auth_ms)
                    .filter(|&t| t > 0)
                    .max();
                out.push(json!({
                    "id": r.id,
                    "groups": r.groups,
                    "kv": r.kv,
                    "min_kv": r.min_kv.min(r.kv),
                    "status": format!("{:?}", r.status).to_lowercase(),
                    "key_source": match r.key_source { store::KeySource::Derived => "derived", store::KeySource::Imported(_) => "imported" },
                    "last_auth_ms": last_auth,
                    "sessions": sessions.iter().filter(|s| s.sid.is_some()).map(|s| json!({"group": s.group, "last_auth_ms": s.last_auth_ms})).collect::<Vec<_>>(),
                }));
            }
            Ok(json_resp(StatusCode::OK, json!({ "members": out })))
        }
        (Method::GET, ["readings"]) => {
            let member: u64 = num(
                q.get("member").ok_or_else(|| bad("member is required"))?,
                "member",
            )?;
            let from: u64 = match q.get("from") {
                Some(v) => num(v, "from")?,
                None => 0,
            };
            let to: u64 = match q.get("to") {
                Some(v) => num(v, "to")?,
                None => u64::MAX,
            };
            let limit = q.limit(10_000)?;
            let after = match q.get("after") {
                Some(t) => Some(store::ReadingKey::from_token(t).ok_or_else(|| {
                    bad("after must be a `next` token from an earlier readings page")
                })?),
                None => None,
            };
            let rows = udc
                .store()
                .readings_after(member, from, to, after, limit)
                .await
                .map_err(store_err)?;
            // A full page may have more behind it: the caller asks again
            // with `after` = `next`, the last reading's key.
            let truncated = rows.len() == limit as usize;
            let next = rows
                .last()
                .filter(|_| truncated)
                .map(|r| r.key().to_token());
            let list: Vec<Value> = rows
                .iter()
                .map(|r| {
                    json!({"member": r.member, "group": r.group, "ts_ms": r.ts_ms,
                           "kind": r.kind, "ctr": r.ctr, "payload_hex": hex::encode(&r.payload)})
                })
                .collect();
            Ok(json_resp(
                StatusCode::OK,
                json!({ "readings": list, "truncated": truncated, "next": next }),
            ))
        }
        (Method::GET, ["gateways"]) => {
            let rows = udc.store().gateways().await.map_err(store_err)?;
            let list: Vec<Value> = rows
                .iter()
                .map(|g| {
                    json!({"gateway": g.gateway, "batches": g.batches, "entries": g.entries,
                           "accepted": g.accepted, "rejected": g.entries.saturating_sub(g.accepted),
                           "localizations": g.localizations,
                           "unverified_via_gateway": g.unverified, "last_batch_ms": g.last_batch_ms})
                })
                .collect();
            Ok(json_resp(StatusCode::OK, json!({ "gateways": list })))
        }
        // `methods` names every arm above: not reached.
        _ => Err(error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such operator endpoint",
        )),
    }
}

/// The methods `route` answers on a path (its segments after
/// `/v1/admin/`); empty: no such endpoint. Must name exactly the arms of
/// `route`'s match.
fn methods(parts: &[&str]) -> &'static [Method] {
    match parts {
        ["rounds"] | ["rounds", _, _, "close"] | ["groups", _, "updates"] => &[Method::POST],
        ["members", "import"] | ["members", _, "revoke"] | ["members", _, "key-update"] => {
            &[Method::POST]
        }
        ["rounds", _, _] | ["groups", _, "updates", _] | ["readings"] | ["gateways"] => {
            &[Method::GET]
        }
        ["schedules"] | ["members"] => &[Method::GET, Method::POST],
        ["schedules", _] => &[Method::DELETE],
        _ => &[],
    }
}

/// The query parameters an endpoint takes (none unless listed).
fn query_parameters(method: &Method, parts: &[&str]) -> &'static [&'static str] {
    match (method, parts) {
        (&Method::GET, ["rounds", _, _]) => &["after"],
        (&Method::GET, ["members"]) | (&Method::GET, ["groups", _, "updates", _]) => {
            &["after", "limit"]
        }
        (&Method::GET, ["readings"]) => &["member", "from", "to", "after", "limit"],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::{ClientError, Value, b64, import_chunks, json, request};

    /// Addresses that are not `host:port` or `http://host:port` are refused
    /// as such before any connection (an `https://` one used to become a
    /// host named `https` and a misleading connection error).
    #[tokio::test]
    async fn admin_addresses_other_than_plain_http_are_refused() {
        for target in [
            "https://127.0.0.1:9091",
            "ftp://h:1",
            "localhost",
            ":9091",
            "",
        ] {
            let got = request(
                target,
                "GET",
                "/healthz",
                None,
                None,
                std::time::Duration::from_secs(1),
            )
            .await;
            assert!(
                matches!(got, Err(ClientError::BadTarget(_))),
                "{target}: {got:?}"
            );
        }
    }

    #[test]
    fn import_bodies_are_split_in_order() {
        let members: Vec<Value> = (0..2500)
            .map(|i| json!({"id": i, "kv": 1, "groups": [1]}))
            .collect();
        let chunks = import_chunks(&json!({ "members": members })).unwrap();
        assert_eq!(chunks.len(), 3);
        let ids: Vec<u64> = chunks
            .iter()
            .flat_map(|c| c["members"].as_array().unwrap().clone())
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, (0..2500).collect::<Vec<u64>>());
        assert!(
            chunks
                .iter()
                .all(|c| c.to_string().len() < crate::admin::MAX_FALLBACK_BODY)
        );
        assert!(import_chunks(&json!({"x": 1})).is_none());
        let empty = import_chunks(&json!({"members": []})).unwrap();
        assert_eq!(empty, vec![json!({"members": []})]);
    }

    #[test]
    fn imported_members_are_split_by_size() {
        // An imported member carries a sealed key (~360 hex characters):
        // 1000 of them would not fit the admin listener's 64 KiB.
        let sealed = "ab".repeat(180);
        let members: Vec<Value> = (0..1000)
            .map(|i| json!({"id": i, "kv": 1, "groups": [1], "sealed_key": sealed}))
            .collect();
        let chunks = import_chunks(&json!({ "members": members })).unwrap();
        assert!(chunks.len() > 1, "{}", chunks.len());
        assert!(
            chunks
                .iter()
                .all(|c| c.to_string().len() < crate::admin::MAX_FALLBACK_BODY)
        );
        let ids: Vec<u64> = chunks
            .iter()
            .flat_map(|c| c["members"].as_array().unwrap().clone())
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, (0..1000).collect::<Vec<u64>>());
    }

    #[test]
    fn query_values_are_strictly_percent_decoded() {
        use super::percent_decode as d;
        assert_eq!(d("a%41%3a%2B+").as_deref(), Some("aA:++"));
        assert_eq!(d("%2541").as_deref(), Some("%41"), "decoded once");
        assert_eq!(d("%C3%A9").as_deref(), Some("\u{e9}"));
        assert_eq!(d("").as_deref(), Some(""));
        for bad in ["%", "a%4", "%zz", "%4g", "%ff", "%C3%28"] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(b64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(b64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(b64("aGk=").unwrap(), b"hi");
        assert_eq!(b64("").unwrap(), b"");
        assert!(b64("a").is_none());
        assert!(b64("a$==").is_none());
    }
}

/// Most members per `POST /v1/admin/members/import` request.
pub const IMPORT_CHUNK: usize = 1000;

/// Most bytes of JSON per import request: the admin listener takes bodies
/// up to [`crate::admin::MAX_FALLBACK_BODY`] (64 KiB). A derived member is
/// about 40 bytes, an imported one (with its sealed key) about 400.
const IMPORT_CHUNK_BYTES: usize = crate::admin::MAX_FALLBACK_BODY - 4096;

/// Splits a registry import body (`{"members": [...]}`, the file `dapgw keys
/// members` or `keys import-vendor` writes) into bodies of at most
/// [`IMPORT_CHUNK`] members and 60 KiB each, in order. `None` when `body`
/// has no `members` array.
pub fn import_chunks(body: &Value) -> Option<Vec<Value>> {
    let members = body.get("members")?.as_array()?;
    let mut chunks = Vec::new();
    let mut chunk: Vec<Value> = Vec::new();
    let mut bytes = 0;
    for m in members {
        let len = m.to_string().len() + 1;
        if !chunk.is_empty() && (chunk.len() == IMPORT_CHUNK || bytes + len > IMPORT_CHUNK_BYTES) {
            chunks.push(json!({ "members": std::mem::take(&mut chunk) }));
            bytes = 0;
        }
        bytes += len;
        chunk.push(m.clone());
    }
    if !chunk.is_empty() || chunks.is_empty() {
        chunks.push(json!({ "members": chunk }));
    }
    Some(chunks)
}

/// Why [`request`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The target is not `host:port` or `http://host:port`.
    #[error("bad admin address `{0}`: expected host:port or http://host:port")]
    BadTarget(String),
    /// No connection or an HTTP failure.
    #[error("admin API at {target}: {reason}")]
    Failed {
        /// The address.
        target: String,
        /// What went wrong.
        reason: String,
    },
    /// No answer in time.
    #[error("no answer from the admin API at {0} in time")]
    Timeout(String),
}

/// One operator API request (the CLI's transport): plain HTTP/1.1 to the
/// admin listener at `target`, with bearer `token`. Returns the status
/// code and the body text.
pub async fn request(
    target: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
    timeout: std::time::Duration,
) -> Result<(u16, String), ClientError> {
    // The admin listener is plain HTTP: any other scheme (`https://`) is
    // refused here, not taken for a host named `https`.
    let rest = match target.split_once("://") {
        Some(("http", rest)) => rest,
        Some(_) => return Err(ClientError::BadTarget(target.to_owned())),
        None => target,
    };
    let authority = rest
        .split('/')
        .next()
        .unwrap_or("")
        .replace("0.0.0.0:", "127.0.0.1:");
    if !authority.contains(':') || authority.starts_with(':') {
        return Err(ClientError::BadTarget(target.to_owned()));
    }
    let fail = |reason: String| ClientError::Failed {
        target: authority.clone(),
        reason,
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|e| fail(e.to_string()))?;
    let work = async {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| fail(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority.as_str())
            .header(CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| fail(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        driver.abort();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout(authority.clone())),
    }
}
