//! `dapgw demo` end to end: the real binary provisions a deployment, runs a
//! UDC and two gateways as child processes, simulated members over TLS, and
//! the six steps; its `--json` summary is checked field by field.

use std::process::Command;

fn demo(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dapgw"))
        .arg("demo")
        .args(args)
        .output()
        .expect("run dapgw demo");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_runs_every_step_and_reports_json() {
    run_and_check(24, "psk");
}

/// The same six steps with an ephemeral X25519 exchange in every session.
#[test]
fn demo_runs_in_psk_ecdhe_mode() {
    run_and_check(12, "psk-ecdhe");
}

/// Runs the demo with `members` in `mode` and checks its JSON summary
/// field by field.
fn run_and_check(members: u64, mode: &str) {
    let (status, stdout, stderr) = demo(&[
        "--members",
        &members.to_string(),
        "--mode",
        mode,
        "--json",
        "--step-timeout-s",
        "90",
    ]);
    assert!(status.success(), "demo failed: {stderr}\n{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["members"], members);
    assert_eq!(v["mode"], mode);
    assert_eq!(v["authenticated"], members, "step 1: every member");
    // Step 2 (read round) and step 3 (unsolicited): one reading each.
    assert_eq!(v["readings_delivered"], 2 * members);
    // Step 4: every member acks; step 5: all but the revoked one.
    assert_eq!(v["acks"], 2 * members - 1);
    assert_eq!(v["revoked_could_read"], false);
    assert!(
        v["revoked_reason"].as_str().is_some_and(|r| !r.is_empty()),
        "the revoked member says why it could not read: {v}"
    );
    assert_eq!(
        v["misbehaviour_rejected"], 2,
        "the altered and the invented entry"
    );
    assert_eq!(v["honest_rejected"], 0);
    assert!(v["localizations"].as_u64().unwrap() >= 1);
    // Rejected: the revoked member, the altered one and the offline one
    // (id members + 1) the gateway invented a response for.
    let rejected: Vec<u64> = v["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["member"].as_u64().unwrap())
        .collect();
    assert_eq!(rejected.len(), 3, "{v}");
    assert!(rejected.contains(&1) && rejected.contains(&(members + 1)));
    let cpu = v["udc_cpu_us_per_member"].as_f64().unwrap();
    let bytes = v["udc_bytes_per_member"].as_f64().unwrap();
    let tls_bytes = v["tls_bytes_per_handshake"].as_f64().unwrap();
    assert!(cpu > 0.0, "{v}");
    assert!(v["tls_udc_cpu_us_per_handshake"].as_f64().unwrap() > 0.0);
    assert!(bytes > 0.0 && bytes < tls_bytes, "{v}");
    assert!(v["elapsed_s"].as_f64().unwrap() > 0.0);
    let checks = v["checks"].as_array().unwrap();
    assert!(checks.len() >= 12, "{v}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{v}");
    assert!(v["kept"].is_null());
}

#[test]
fn demo_refuses_an_existing_keep_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (status, _, stderr) = demo(&["--members", "4", "--keep", dir.path().to_str().unwrap()]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("exists"), "{stderr}");
}

#[test]
fn demo_refuses_too_few_members() {
    let (status, _, stderr) = demo(&["--members", "1"]);
    assert_eq!(status.code(), Some(2), "a clap usage error: {stderr}");
}
