//! `dapgw bench` end to end with a tiny N: every scenario (the three
//! baselines and dapgw in psk and psk-ecdhe mode, with the real UDC and
//! gateway) runs as real processes over real TLS on loopback, every
//! member's reading reaches the UDC exactly once, every dapgw member
//! authenticates, and the JSON report has every field and every ratio. The
//! figures themselves are not asserted (they depend on the machine).
#![cfg(feature = "service")]

use std::process::Command;

use serde_json::Value;

const MEMBERS: u64 = 20;

fn run_bench(extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_dapgw"))
        .args([
            "bench",
            "--members",
            &MEMBERS.to_string(),
            "--concurrency",
            "8",
            "--json",
        ])
        .args(["--timeout-s", "240"])
        .args(extra)
        .output()
        .expect("running dapgw bench");
    assert!(
        out.status.success(),
        "dapgw bench failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    serde_json::from_str(stdout.trim()).expect("one JSON object")
}

fn number(obj: &Value, key: &str) -> f64 {
    obj.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{key} missing or not a number in {obj}"))
}

fn assert_exactly_once(name: &str, s: &Value) {
    assert_eq!(s["members"], MEMBERS, "{name}");
    assert_eq!(s["readings_delivered"], MEMBERS, "{name}: readings");
    assert_eq!(s["members_delivered"], MEMBERS, "{name}: distinct members");
    assert_eq!(s["readings_duplicate"], 0, "{name}: duplicates");
    assert_eq!(s["readings_rejected"], 0, "{name}: rejected");
    assert_eq!(s["members_missing"], 0, "{name}: missing");
    assert_eq!(s["driver"]["ok"], MEMBERS, "{name}: driver ok");
    assert_eq!(s["driver"]["failed"], 0, "{name}: driver failed");
}

fn assert_phase_fields(name: &str, s: &Value, gateway: bool) {
    for key in [
        "wall_s",
        "udc_cpu_us_per_member",
        "udc_bytes_per_member",
        "udc_bytes_out_per_member",
        "udc_requests_per_member",
        "udc_connections",
        "members_cpu_us_per_member",
    ] {
        assert!(number(s, key) >= 0.0, "{name}: {key}");
    }
    // Bytes the UDC received were counted.
    assert!(number(s, "udc_bytes_per_member") > 0.0, "{name}");
    // The UDC's CPU is its own process clock in nanoseconds, not /proc's
    // 10 ms ticks (a whole microsecond per member at 10,000 members).
    assert_eq!(s["udc_cpu_clock"], "process_clock_ns", "{name}");
    if gateway {
        assert!(number(s, "gateway_cpu_us_per_member") >= 0.0, "{name}");
        assert!(number(s, "gateway_bytes_per_member") > 0.0, "{name}");
    } else {
        assert!(s["gateway_cpu_us_per_member"].is_null(), "{name}");
        assert!(s["gateway_bytes_per_member"].is_null(), "{name}");
    }
}

const BASELINES: [&str; 3] = ["direct-mtls", "direct-mtls-resumed", "hop-by-hop"];
const DAPGW: [&str; 2] = ["dapgw-psk", "dapgw-psk-ecdhe"];

/// dapgw: every member authenticated in the round and delivered its
/// reading; the UDC saw a few batched requests, never one per member.
fn assert_dapgw(name: &str, s: &Value) {
    assert_exactly_once(name, s);
    assert_phase_fields(name, s, true);
    assert_eq!(s["members_authenticated"], MEMBERS, "{name}");
    assert_eq!(s["driver"]["authenticated"], MEMBERS, "{name}");
    assert_eq!(s["driver"]["readings_stored_at_udc"], MEMBERS, "{name}");
    assert!(s["driver"]["round"].as_u64().is_some(), "{name}");
    let requests = number(s, "udc_requests_per_member");
    assert!(requests > 0.0 && requests < 1.0, "{name}: {requests}");
    // The gateway's link to the UDC was opened before the measurement.
    assert_eq!(s["udc_connections"], 0, "{name}");
    assert!(s["warmup"].is_null(), "{name}");
    // The measured phase is cut in two where every member was
    // authenticated: the round, then the readings. The parts add up to the
    // whole (the same snapshots bound them).
    let parts = s["parts"].as_object().expect("parts object");
    let names: Vec<_> = parts.keys().map(String::as_str).collect();
    assert_eq!(names, ["auth", "reading"], "{name}");
    let (auth, reading) = (&parts["auth"], &parts["reading"]);
    assert_phase_fields(&format!("{name} auth"), auth, true);
    assert_phase_fields(&format!("{name} reading"), reading, true);
    assert_eq!(auth["driver"]["authenticated"], MEMBERS, "{name}");
    assert_eq!(reading["driver"]["ok"], MEMBERS, "{name}");
    for key in ["udc_cpu_us_per_member", "udc_bytes_per_member"] {
        let sum = number(auth, key) + number(reading, key);
        let whole = number(s, key);
        assert!(
            (sum - whole).abs() <= 1e-6 * whole.max(1.0),
            "{name} {key}: {sum} vs {whole}"
        );
    }
}

#[test]
fn every_scenario_delivers_every_reading_once_and_reports_every_field() {
    let report = run_bench(&[]);
    assert_eq!(report["members"], MEMBERS);
    assert!(report["build"].is_string());
    let scenarios = report["scenarios"].as_object().expect("scenarios object");
    let names: Vec<_> = scenarios.keys().map(String::as_str).collect();
    assert_eq!(names.len(), 5, "{names:?}");

    // Each baseline against each dapgw mode, CPU and bytes.
    let ratios = report["ratios"].as_object().expect("ratios object");
    assert_eq!(ratios.len(), BASELINES.len() * DAPGW.len(), "{ratios:?}");
    for b in BASELINES {
        for d in DAPGW {
            let r = &ratios[&format!("{b}/{d}")];
            assert!(r["udc_bytes"].as_f64().is_some_and(|x| x > 0.0), "{b}/{d}");
            assert!(r.get("udc_cpu").is_some(), "{b}/{d}");
        }
    }
    for d in DAPGW {
        assert_dapgw(d, &scenarios[d]);
    }

    let direct = &scenarios["direct-mtls"];
    assert_exactly_once("direct-mtls", direct);
    assert_phase_fields("direct-mtls", direct, false);
    // One request per member.
    assert_eq!(number(direct, "udc_requests_per_member"), 1.0);
    // One connection per member, each a full handshake.
    assert_eq!(direct["udc_connections"], MEMBERS);
    assert_eq!(direct["driver"]["full_handshakes"], MEMBERS);
    assert!(direct["warmup"].is_null());
    // The baselines' drivers do not cut their phase.
    assert_eq!(direct["parts"], Value::Object(Default::default()));

    let resumed = &scenarios["direct-mtls-resumed"];
    assert_exactly_once("direct-mtls-resumed", resumed);
    assert_phase_fields("direct-mtls-resumed", resumed, false);
    // The measured connections all resumed; the warm-up did the full ones
    // and delivered no reading.
    assert_eq!(resumed["driver"]["resumed_handshakes"], MEMBERS);
    assert_eq!(resumed["driver"]["full_handshakes"], 0);
    let warm = &resumed["warmup"];
    assert_phase_fields("direct-mtls-resumed warm-up", warm, false);
    assert_eq!(warm["driver"]["full_handshakes"], MEMBERS);
    assert_eq!(warm["udc_connections"], MEMBERS);

    let hop = &scenarios["hop-by-hop"];
    assert_exactly_once("hop-by-hop", hop);
    assert_phase_fields("hop-by-hop", hop, true);
    assert_eq!(number(hop, "udc_requests_per_member"), 1.0);
    // The gateway's single upstream link was opened before the measurement.
    assert_eq!(hop["udc_connections"], 0);
}

#[test]
fn one_scenario_can_be_chosen_and_an_unknown_one_is_refused() {
    let report = run_bench(&["--scenario", "hop-by-hop"]);
    let scenarios = report["scenarios"].as_object().expect("scenarios object");
    assert_eq!(scenarios.len(), 1);
    assert_exactly_once("hop-by-hop", &scenarios["hop-by-hop"]);
    // No dapgw scenario ran: the ratios object is there and empty.
    assert_eq!(report["ratios"], Value::Object(Default::default()));

    let out = Command::new(env!("CARGO_BIN_EXE_dapgw"))
        .args(["bench", "--members", "2", "--scenario", "nope"])
        .output()
        .expect("running dapgw bench");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario nope"));
}
