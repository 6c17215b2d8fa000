//! Static checks of the code's shape that the design relies on.
//!
//! The gateway must never hold a key (issue 3: "no module of the gateway
//! names a key type"). `tests/e2e.rs` proves it at run time by scanning the
//! gateway process's memory; this test proves it at the source: no file
//! under `src/gateway/` names a key type, a key schedule, a cipher or the
//! modules that hold them.

use std::path::{Path, PathBuf};

/// Names the gateway's sources must not mention (whole words).
const FORBIDDEN: &[&str] = &[
    // modules holding keys and their use
    "keys",
    "suite",
    "member",
    "verifier",
    "udc",
    // key types, key schedules, ciphers
    "MasterSecret",
    "MemberKey",
    "MemberKeyDeriver",
    "Prk0",
    "ResponseKeys",
    "SessionKeys",
    "StorageKey",
    "MemberCredential",
    "Secret",
    "Key16",
    "Key32",
    "Iv12",
    "Gcm",
    "SigningKey",
    "EphemeralKeyPair",
    "SharedSecret",
    "Verifier",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The forbidden names used as paths or types in `text`: `protocol::NAME`
/// for the modules, the bare word for the types. Comments are skipped.
fn offences(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let words: Vec<&str> = code
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .collect();
        for name in FORBIDDEN {
            let is_module = name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
            let hit = if is_module {
                code.contains(&format!("protocol::{name}"))
                    || code.contains(&format!("crate::{name}"))
            } else {
                words.contains(name)
            };
            if hit {
                found.push(format!("line {}: {name}: {}", n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn no_gateway_source_names_a_key_type() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src/gateway"), &mut files);
    assert!(files.len() >= 5, "{files:?}");
    let mut all = Vec::new();
    for f in &files {
        for o in offences(&std::fs::read_to_string(f).unwrap()) {
            all.push(format!("{}: {o}", f.strip_prefix(root).unwrap().display()));
        }
    }
    assert!(
        all.is_empty(),
        "the gateway names key material:\n{}",
        all.join("\n")
    );

    // The check sees what it looks for: the UDC's sources name key types.
    let mut udc = Vec::new();
    rust_files(&root.join("src/udc"), &mut udc);
    let seen: usize = udc
        .iter()
        .map(|f| offences(&std::fs::read_to_string(f).unwrap()).len())
        .sum();
    assert!(seen > 10, "the scan finds nothing in src/udc ({seen})");
}
