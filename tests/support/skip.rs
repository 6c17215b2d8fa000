//! The one way a test says it skipped: a test that needs an outside program
//! (PostgreSQL, promtool, buildah, ...) calls [`skip`] where the program is
//! missing. Included with `#[path = "support/skip.rs"] mod skip;`.
//!
//! The message goes straight to the process's stderr, because libtest
//! captures `eprintln!` of a passing test and a plain `cargo test` would
//! never show it. Under `CI=true` a skip is a failure: .ci/run installs the
//! programs first.
#![allow(dead_code)]

use std::io::Write as _;

/// Whether the tests run in CI (`CI=true`), where nothing may be skipped.
pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Reports that the calling test skips its check because `what` is not
/// available (`why`: the reason and the install command); panics under
/// `CI=true` instead.
pub(crate) fn skip(what: &str, why: &dyn std::fmt::Display) {
    assert!(!in_ci(), "CI=true but {what} is required: {why}");
    let _ = writeln!(std::io::stderr(), "skipped: {what}: {why}");
}
