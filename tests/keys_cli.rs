//! `dapgw keys` as an operator runs it: every subcommand through the built
//! binary, and nothing secret it writes is ever printed (stdout or stderr),
//! while the secrets are in their files (mode 0600).

use std::path::Path;
use std::process::Command;

/// Runs `dapgw keys ARGS`; asserts success; returns stdout + stderr.
fn keys(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dapgw"))
        .arg("keys")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "keys {args:?}: {text}");
    text
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn no_keys_subcommand_prints_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let k = d.join("keys");
    let mut printed = String::new();
    printed += &keys(&["init", "--out", &s(&k)]);
    printed += &keys(&["rotate-signing-key", "--dir", &s(&k)]);
    let creds = d.join("creds.json");
    printed += &keys(&[
        "members",
        "--keys",
        &s(&k),
        "--from",
        "100",
        "--count",
        "3",
        "--groups",
        "7",
        "--out",
        &s(&creds),
    ]);
    let vendor = d.join("vendor.csv");
    let vendor_keys = ["5e".repeat(16), "a7".repeat(32)];
    std::fs::write(
        &vendor,
        format!("id,key\n200,{}\n201,{}\n", vendor_keys[0], vendor_keys[1]),
    )
    .unwrap();
    let vendor_creds = d.join("vendor-creds.json");
    printed += &keys(&[
        "import-vendor",
        "--keys",
        &s(&k),
        "--vendor-keys",
        &s(&vendor),
        "--groups",
        "7",
        "--out",
        &s(&d.join("vendor.import.json")),
        "--credentials",
        &s(&vendor_creds),
    ]);
    let pki = d.join("pki");
    printed += &keys(&["dev-pki", "--out", &s(&pki), "--client", "gw-1"]);

    // Every secret written: the key files' hex, the member keys in both
    // credential files, the vendor keys, the private keys' PEM bodies.
    let mut secrets: Vec<(String, String)> = Vec::new();
    for f in ["master.key", "storage.key", "root.key", "signing.key"] {
        secrets.push((f.into(), read(&k.join(f)).trim().to_owned()));
        #[cfg(unix)]
        assert_eq!(mode(&k.join(f)), 0o600, "{f}");
    }
    for file in [&creds, &vendor_creds] {
        #[cfg(unix)]
        assert_eq!(mode(file), 0o600, "{}", file.display());
        let v: serde_json::Value = serde_json::from_str(&read(file)).unwrap();
        for m in v["members"].as_array().unwrap() {
            secrets.push((
                format!("key of member {}", m["id"]),
                m["key"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for (i, v) in vendor_keys.iter().enumerate() {
        secrets.push((format!("vendor key {i}"), v.clone()));
    }
    for f in ["ca.key", "server.key", "client-gw-1.key"] {
        let pem = read(&pki.join(f));
        let body = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .max_by_key(|l| l.len())
            .unwrap()
            .to_owned();
        secrets.push((f.into(), body));
    }
    assert_eq!(secrets.len(), 14);
    for (name, secret) in &secrets {
        assert!(secret.len() >= 32, "{name} is too short to search for");
        assert!(
            !printed.contains(secret.as_str()),
            "{name} was printed:\n{printed}"
        );
    }
    // What it does print: where each file went.
    assert!(
        printed.contains("master.key") && printed.contains("creds.json"),
        "{printed}"
    );
}
