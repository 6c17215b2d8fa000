//! The allocator settings of the processes that act as a UDC: a module of
//! the `dapgw` binary (src/main.rs), which benches/udc.rs includes too
//! (`#[path]`) so that it measures the same UDC. It is not part of the
//! library, which forbids unsafe code.

/// Tells glibc's allocator to keep freed memory for reuse instead of
/// handing it back to the kernel after each batch.
///
/// The UDC's work comes in batches whose buffers (a request body, the rows
/// of one transaction, the downlink it writes) are megabytes, freed and
/// needed again a moment later. By default glibc gives a free top of heap
/// above its trim threshold back to the kernel, serves blocks above its
/// mmap threshold from fresh `mmap`s (both start at 128 KiB and rise as
/// such blocks are freed), and gives each busy thread an arena of its own
/// that warms up separately. Every page handed back faults in again
/// zeroed, which costs microseconds on a VM whose host reclaims free guest
/// memory. Kept instead: up to 64 MiB of free heap per arena, blocks up to
/// 32 MiB from the heap, one arena per core (at least two), so the process
/// can hold up to about cores x 64 MiB of free heap after a peak.
///
/// Measured on the 2-core VM of docs/udc.md ("Session 10"): a first
/// 10,000-member round's page faults fell from 4,966-5,444 to
/// 3,166-4,103, and an uplink phase's from 99-528 to none in most runs
/// (0 in 7 of 11, at most 745); CPU time per member did not change
/// measurably at that machine's noise. The gateway
/// keeps glibc's defaults (no difference in its relay bench, and it may
/// run on a small substation box). An operator's own `glibc.malloc.*`
/// settings in `GLIBC_TUNABLES` win: then nothing is set here.
///
/// Returns whether glibc took every setting (also `true` when there was
/// nothing to set).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() -> bool {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return true;
    }
    let arenas = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let arenas = libc::c_int::try_from(arenas).unwrap_or(libc::c_int::MAX);
    let mut accepted = true;
    for (param, value) in [
        (libc::M_ARENA_MAX, arenas),
        (libc::M_MMAP_THRESHOLD, 32 << 20),
        (libc::M_TRIM_THRESHOLD, 64 << 20),
    ] {
        // SAFETY: called first thing in `main` (of `dapgw` or of the udc
        // bench), while that is the only thread (glibc marks mallopt
        // MT-unsafe). It only sets allocator parameters that later calls
        // read (M_ARENA_MAX: arenas created from now on) and touches no
        // Rust-owned memory.
        accepted &= unsafe { libc::mallopt(param, value) } == 1;
    }
    accepted
}

/// Other platforms' allocators keep their own policies.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() -> bool {
    true
}
