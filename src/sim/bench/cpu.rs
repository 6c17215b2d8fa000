//! CPU time of a bench role process, read from the OS: `utime + stime` of
//! `/proc/<pid>/stat` (every thread of the process, live or exited), in
//! clock ticks converted with the kernel's tick rate; and a role's own
//! `CLOCK_PROCESS_CPUTIME_ID` (`telemetry::process_cpu_time`), the same
//! accounting with nanosecond resolution, which server roles report at each
//! snapshot ([`reported_cpu`]).
//!
//! The crate forbids `unsafe`, so the tick rate comes from the auxiliary
//! vector in `/proc/self/auxv` (`AT_CLKTCK`, the value `sysconf(_SC_CLK_TCK)`
//! returns) instead of calling `libc::sysconf`.

use std::path::Path;
use std::time::Duration;

/// `AT_CLKTCK` in the auxiliary vector (Linux `include/uapi/linux/auxvec.h`).
const AT_CLKTCK: u64 = 17;

/// Errors reading a process's CPU time.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// `/proc/<pid>/stat` could not be read (no such process, not Linux).
    #[error("cannot read /proc/{pid}/stat: {source}")]
    Read {
        /// The process.
        pid: u32,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A role reported a `cpu_ns` that is not a count of nanoseconds.
    #[error("a role reported cpu_ns {0}, not a count of nanoseconds")]
    Reported(String),
    /// The stat line does not have the expected fields.
    #[error("/proc/{pid}/stat is not in the expected format")]
    Format {
        /// The process.
        pid: u32,
    },
}

/// Clock ticks per second (`USER_HZ`): `AT_CLKTCK` from `/proc/self/auxv`,
/// else 100, the value on every mainstream Linux architecture.
pub fn clock_ticks_per_second() -> u64 {
    auxv_value(Path::new("/proc/self/auxv"), AT_CLKTCK)
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Looks `key` up in an auxiliary vector of native-endian `u64` pairs.
fn auxv_value(path: &Path, key: u64) -> Option<u64> {
    let raw = std::fs::read(path).ok()?;
    let word = std::mem::size_of::<u64>();
    raw.chunks_exact(2 * word).find_map(|pair| {
        let (k, v) = pair.split_at(word);
        let k = u64::from_ne_bytes(k.try_into().ok()?);
        let v = u64::from_ne_bytes(v.try_into().ok()?);
        (k == key).then_some(v)
    })
}

/// `utime + stime` in clock ticks from the text of a `/proc/<pid>/stat`.
///
/// Field 2 (`comm`) is in parentheses and may hold spaces or `)`, so the
/// fields are counted from the last `)`: utime and stime are fields 14 and
/// 15, the 12th and 13th after it.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// CPU time (user + system) consumed so far by process `pid`.
pub fn process_cpu(pid: u32) -> Result<Duration, CpuError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| CpuError::Read { pid, source })?;
    let ticks = parse_stat_ticks(&stat).ok_or(CpuError::Format { pid })?;
    let hz = clock_ticks_per_second();
    Ok(Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz))
}

/// The CPU time a role reported in a control event (`"cpu_ns"`, see
/// `telemetry::process_cpu_time`): `None` if it reported none, an error if
/// the value is not a count of nanoseconds.
pub fn reported_cpu(event: &serde_json::Value) -> Result<Option<Duration>, CpuError> {
    match event.get("cpu_ns") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|ns| Some(Duration::from_nanos(ns)))
            .ok_or_else(|| CpuError::Reported(v.to_string())),
    }
}

/// Profiling hook: switches a `perf record --control fifo:CTL,ACK -D -1`
/// session on (`"enable"`) or off (`"disable"`) when `BENCH_PERF_CTL` and
/// `BENCH_PERF_ACK` name its control and ack FIFOs, so that a profile holds
/// the measured phase only (docs/benchmarks.md, "Profiling a phase").
/// Without those variables it does nothing. Not a `DAPGW_*` setting: a
/// measurement aid of the benchmarks only.
pub fn perf_ctl(cmd: &str) {
    let (Ok(ctl), Ok(ack)) = (
        std::env::var("BENCH_PERF_CTL"),
        std::env::var("BENCH_PERF_ACK"),
    ) else {
        return;
    };
    if let Err(e) = std::fs::write(&ctl, format!("{cmd}\n")) {
        eprintln!("perf control FIFO {ctl}: {e}");
        return;
    }
    // perf answers "ack\n" once the command took effect and keeps the FIFO
    // open: read those four bytes, not to the end.
    let mut answer = [0u8; 4];
    if let Err(e) =
        std::fs::File::open(&ack).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut answer))
    {
        eprintln!("perf ack FIFO {ack}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::process_cpu_time;

    #[test]
    fn parses_utime_and_stime_after_a_tricky_comm() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194304 100 0 0 0 \
                    250 75 0 0 20 0 3 0 1000 0 0";
        assert_eq!(parse_stat_ticks(line), Some(325));
        assert_eq!(parse_stat_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat_ticks("no parenthesis"), None);
    }

    #[test]
    fn reported_cpu_is_read_from_the_event() {
        let ev = serde_json::json!({"event": "snapshot", "cpu_ns": 1_500});
        assert_eq!(
            reported_cpu(&ev).unwrap(),
            Some(Duration::from_nanos(1_500))
        );
        let ev = serde_json::json!({"event": "snapshot"});
        assert_eq!(reported_cpu(&ev).unwrap(), None);
        for ev in [
            serde_json::json!({"event": "snapshot", "cpu_ns": "1500"}),
            serde_json::json!({"event": "snapshot", "cpu_ns": -1}),
            serde_json::json!({"event": "snapshot", "cpu_ns": 1.5}),
        ] {
            assert!(reported_cpu(&ev).is_err(), "{ev}");
        }
    }

    #[test]
    fn process_clock_resolves_below_a_tick_and_agrees_with_proc() {
        let res = rustix::time::clock_getres(rustix::time::ClockId::ProcessCPUTime);
        let tick = Duration::from_secs(1) / clock_ticks_per_second() as u32;
        assert!(
            Duration::new(res.tv_sec as u64, res.tv_nsec as u32) < tick / 100,
            "resolution {res:?}"
        );
        let before = process_cpu_time();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let spent = process_cpu_time() - before;
        // Some CPU was spent (the loop runs on this thread), and the clock
        // counts the same as /proc within a few ticks.
        assert!(spent > Duration::ZERO);
        let proc = process_cpu(std::process::id()).unwrap();
        let own = process_cpu_time();
        assert!(
            own + 4 * tick >= proc && proc + 4 * tick >= own,
            "{own:?} {proc:?}"
        );
    }

    #[test]
    fn own_process_cpu_is_readable_and_grows() {
        let me = std::process::id();
        let before = process_cpu(me).unwrap();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        // Burn CPU until the tick counter must have moved.
        while start.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(process_cpu(me).unwrap() >= before);
        assert!((1..=10_000).contains(&clock_ticks_per_second()));
    }
}
