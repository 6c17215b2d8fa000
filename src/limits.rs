//! Connection limits shared by the gateway's member listener and the UDC's
//! listener: the step between `accept` and hyper.
//!
//! ```text
//! accept (global cap) -> per-source cap (SourceSlots) -> TLS (handshake timeout)
//!   -> Watched (h2 frame scan / h1 head arming) -> hyper auto
//!        \-> Activity <- Watchdog: header timeout, idle timeout
//! ```
//!
//! Idle means "no request in flight and none started or finished for the
//! idle timeout": bytes do not count, so HTTP/2 PINGs, SETTINGS or a trickle
//! of bytes cannot hold a connection. A request head must be complete
//! within the header timeout from its first byte: for HTTP/1.1 from the
//! first byte read while no request is in flight, for HTTP/2 from the
//! first byte of any frame (a HEADERS frame's block runs until its
//! END_HEADERS), which [`Watched`] finds by reading the frame headers of the
//! decrypted stream (never the payloads).

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The connection limits of one listener.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnLimits {
    /// Open connections at most (beyond it, the kernel backlog).
    pub(crate) max_connections: usize,
    /// Open connections from one source at most (beyond it, closed at once).
    pub(crate) max_per_source: usize,
    /// TLS handshake, and each request head from its first byte.
    pub(crate) header_timeout: Duration,
    /// No request in flight and none started or ended for this long: closed.
    pub(crate) idle_timeout: Duration,
}

/// After a connection is asked to close (GOAWAY, 408), how long it may take.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The answer written to an HTTP/1.1 client whose request head is late.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 84\r\n\r\n{\"error\":\"timeout\",\"reason\":\"the request headers did not arrive in time; reconnect\"}";

/// The HTTP/2 client connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// ---------------------------------------------------------------------------
// Per-source connection cap
// ---------------------------------------------------------------------------

/// The key a source is counted under: IPv4 addresses (also IPv4-mapped
/// IPv6) on their own, IPv6 by their /64 (one subscriber's prefix; a host
/// picks any address inside it at will).
pub(crate) fn source_key(ip: IpAddr) -> [u8; 16] {
    let v6 = match ip {
        IpAddr::V4(v4) => return v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6,
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return v4.to_ipv6_mapped().octets();
    }
    let mut k = v6.octets();
    k[8..].fill(0);
    k
}

/// Open connections per source, capped.
#[derive(Debug)]
pub(crate) struct SourceSlots {
    max: usize,
    open: Mutex<HashMap<[u8; 16], usize>>,
}

impl SourceSlots {
    /// A table allowing `max` (at least 1) connections per source.
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(SourceSlots {
            max: max.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one more connection from `ip`, or `None` when it has its cap.
    pub(crate) fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            slots: self.clone(),
            key,
        })
    }
}

/// One open connection of a source; released on drop.
#[derive(Debug)]
pub(crate) struct SourceSlot {
    slots: Arc<SourceSlots>,
    key: [u8; 16],
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Activity of one connection
// ---------------------------------------------------------------------------

/// What the watchdog found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expired {
    /// A request head (or an HTTP/2 frame) began and did not end in time.
    Header,
    /// No request for the idle timeout.
    Idle,
}

/// Requests and partial heads of one connection, shared by [`Watched`],
/// the request guards and the connection's watchdog.
#[derive(Debug)]
pub(crate) struct Activity {
    base: Instant,
    /// Milliseconds after `base` when a request last started or ended.
    last_request_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// 1 + milliseconds after `base` when the pending head began; 0: none.
    partial_since: AtomicU64,
    h2: AtomicBool,
    /// Set by the watchdog: answer 408 and end the HTTP/1.1 connection.
    cut: AtomicBool,
    /// The reader to wake when `cut` is set.
    reader: Mutex<Option<Waker>>,
    /// A head began: the watchdog's deadline may be earlier now.
    changed: Notify,
}

impl Activity {
    /// A fresh connection: idle since now.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            base: Instant::now(),
            last_request_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            partial_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            reader: Mutex::new(None),
            changed: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    /// Whether the connection speaks HTTP/2 (known once the preface is read).
    pub(crate) fn is_h2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// Marks a head pending since `since_ms` (or none), waking the watchdog
    /// when one begins.
    fn set_partial(&self, since_ms: Option<u64>) {
        let v = since_ms.map_or(0, |ms| ms.saturating_add(1));
        let old = self.partial_since.swap(v, Ordering::Relaxed);
        if old == 0 && v != 0 {
            self.changed.notify_one();
        }
    }

    fn partial(&self) -> Option<u64> {
        match self.partial_since.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v - 1),
        }
    }

    /// A request's head arrived: counts it in flight until the guard drops.
    pub(crate) fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.last_request_ms.store(self.now_ms(), Ordering::Relaxed);
        if !self.is_h2() {
            self.set_partial(None);
        }
        InFlight(self.clone())
    }

    /// Asks the HTTP/1.1 reader to answer 408 and end the connection.
    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        let waker = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Completes when a head has been pending for the header timeout, or
    /// the connection has been idle for the idle timeout.
    pub(crate) async fn expired(&self, limits: &ConnLimits) -> Expired {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let header_at = self.partial().map(|ms| self.at(ms) + limits.header_timeout);
            let idle_at = (!self.busy()).then(|| {
                self.at(self.last_request_ms.load(Ordering::Relaxed)) + limits.idle_timeout
            });
            if header_at.is_some_and(|t| t <= now) {
                return Expired::Header;
            }
            if idle_at.is_some_and(|t| t <= now) {
                return Expired::Idle;
            }
            // While busy, look again after an idle timeout: a request that
            // ends then starts the idle clock.
            let wake = match (header_at, idle_at) {
                (Some(h), Some(i)) => h.min(i),
                (Some(h), None) => h.min(now + limits.idle_timeout),
                (None, Some(i)) => i,
                (None, None) => now + limits.idle_timeout,
            };
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = &mut changed => {}
            }
        }
    }
}

/// Counts a request in flight for its lifetime.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_request_ms.store(a.now_ms(), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// The decrypted stream, watched
// ---------------------------------------------------------------------------

/// HTTP/2 frame boundaries, from the 9-byte frame headers alone.
#[derive(Debug, Default)]
struct Frames {
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: u32,
    /// A HEADERS frame without END_HEADERS: CONTINUATIONs follow.
    block_open: bool,
    /// When the pending frame or header block began.
    since: Option<u64>,
}

impl Frames {
    fn feed(&mut self, mut buf: &[u8], now: u64) {
        while !buf.is_empty() {
            if self.have < 9 {
                if self.have == 0 && !self.block_open {
                    self.since = Some(now);
                }
                let take = (9 - self.have).min(buf.len());
                self.header[self.have..self.have + take].copy_from_slice(&buf[..take]);
                self.have += take;
                buf = &buf[take..];
                if self.have == 9 {
                    let h = &self.header;
                    self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                    // HEADERS (0x1) or CONTINUATION (0x9); END_HEADERS = 0x4.
                    if matches!(h[3], 0x1 | 0x9) {
                        self.block_open = h[4] & 0x4 == 0;
                    }
                    if self.left == 0 {
                        self.frame_done();
                    }
                }
            } else {
                let take = self.left.min(u32::try_from(buf.len()).unwrap_or(u32::MAX));
                self.left -= take;
                buf = &buf[take as usize..];
                if self.left == 0 {
                    self.frame_done();
                }
            }
        }
    }

    fn frame_done(&mut self) {
        self.have = 0;
        if !self.block_open {
            self.since = None;
        }
    }
}

/// What the stream was found to speak.
#[derive(Debug)]
enum Proto {
    /// Bytes of the HTTP/2 preface matched so far.
    Sniff(usize),
    H1,
    H2(Frames),
}

/// The decrypted stream between TLS and hyper: tracks partial heads in
/// [`Activity`] and, when the watchdog cuts an HTTP/1.1 connection, writes
/// a 408 answer and reports end of stream.
#[derive(Debug)]
pub(crate) struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
    proto: Proto,
    /// Written but not yet flushed: a 408 now would interleave.
    dirty: bool,
    /// Bytes of the 408 answer written, once cut.
    cut_written: Option<usize>,
}

impl<T> Watched<T> {
    /// Watches `inner` for `activity`.
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        Watched {
            inner,
            activity,
            proto: Proto::Sniff(0),
            dirty: false,
            cut_written: None,
        }
    }

    fn saw(&mut self, mut buf: &[u8]) {
        let now = self.activity.now_ms();
        if let Proto::Sniff(n) = &mut self.proto {
            let take = (H2_PREFACE.len() - *n).min(buf.len());
            if buf[..take] == H2_PREFACE[*n..*n + take] {
                *n += take;
                buf = &buf[take..];
                if *n == H2_PREFACE.len() {
                    self.activity.h2.store(true, Ordering::Relaxed);
                    self.proto = Proto::H2(Frames::default());
                } else if self.activity.partial().is_none() {
                    self.activity.set_partial(Some(now));
                }
            } else {
                self.proto = Proto::H1;
            }
        }
        match &mut self.proto {
            Proto::H2(frames) => {
                frames.feed(buf, now);
                if frames.since != self.activity.partial() {
                    self.activity.set_partial(frames.since);
                }
            }
            Proto::H1 => {
                // Bytes while no request is in flight begin the next head
                // (a request's body arrives while it is in flight).
                if !self.activity.busy() && self.activity.partial().is_none() {
                    self.activity.set_partial(Some(now));
                }
            }
            Proto::Sniff(_) => {}
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Watched<T> {
    /// Writes the 408 answer (unless a response is half written) and flushes.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut done = match self.cut_written {
            Some(n) => n,
            None if self.dirty => REQUEST_TIMEOUT.len(),
            None => 0,
        };
        while done < REQUEST_TIMEOUT.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &REQUEST_TIMEOUT[done..]) {
                Poll::Ready(Ok(0)) => break,
                Poll::Ready(Ok(n)) => {
                    done += n;
                    self.cut_written = Some(done);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.cut_written = Some(done);
                    return Poll::Pending;
                }
            }
        }
        self.cut_written = Some(REQUEST_TIMEOUT.len());
        Pin::new(&mut self.inner).poll_flush(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.activity.cut.load(Ordering::Acquire) {
            // End of stream for hyper once the answer is out.
            return match this.poll_cut(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(_) => Poll::Ready(Ok(())),
            };
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.saw(&buf.filled()[before..]);
            }
            // Only HTTP/1.1 is ever cut through the reader (HTTP/2 is
            // dropped), so the HTTP/2 path takes no lock.
            Poll::Pending if !matches!(this.proto, Proto::H2(_)) => {
                let mut reader = this
                    .activity
                    .reader
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *reader = Some(cx.waker().clone());
                }
                drop(reader);
                // A cut set between the read and the registration.
                if this.activity.cut.load(Ordering::Acquire) {
                    cx.waker().wake_by_ref();
                }
            }
            _ => {}
        }
        res
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.dirty = true;
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.dirty = true;
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(res, Poll::Ready(Ok(()))) {
            self.dirty = false;
        }
        res
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_share_a_slot_count() {
        let s = SourceSlots::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let x = s.try_take(a).unwrap();
        let _y = s.try_take(mapped).unwrap();
        assert!(s.try_take(a).is_none(), "IPv4-mapped counts as IPv4");
        assert!(s.try_take("10.0.0.2".parse().unwrap()).is_some());
        drop(x);
        assert!(s.try_take(a).is_some());
        let p1: IpAddr = "2001:db8::1".parse().unwrap();
        let p2: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let _p = (s.try_take(p1).unwrap(), s.try_take(p2).unwrap());
        assert!(s.try_take(p1).is_none(), "one /64 is one source");
        assert!(s.try_take("2001:db8:0:1::1".parse().unwrap()).is_some());
    }

    fn frame(len: u32, ty: u8, flags: u8) -> Vec<u8> {
        let l = len.to_be_bytes();
        let mut f = vec![l[1], l[2], l[3], ty, flags, 0, 0, 0, 1];
        f.resize(9 + len as usize, 0);
        f
    }

    #[test]
    fn frames_mark_partial_heads() {
        let mut f = Frames::default();
        let ping = frame(8, 0x6, 0);
        f.feed(&ping, 1);
        assert_eq!(f.since, None, "a whole frame is no pending head");
        f.feed(&ping[..5], 2);
        assert_eq!(f.since, Some(2));
        f.feed(&ping[5..], 3);
        assert_eq!(f.since, None);
        // HEADERS without END_HEADERS, then a CONTINUATION that ends it.
        let h = frame(10, 0x1, 0);
        f.feed(&h, 4);
        assert_eq!(f.since, Some(4), "header block still open");
        f.feed(&ping, 5);
        assert_eq!(f.since, Some(4));
        let c = frame(3, 0x9, 0x4);
        f.feed(&c[..4], 6);
        assert_eq!(f.since, Some(4));
        f.feed(&c[4..], 7);
        assert_eq!(f.since, None);
        // Several frames in one read, the last one cut short.
        let mut many = frame(4, 0x0, 0);
        many.extend(frame(0, 0x4, 0x1));
        many.extend(&frame(20, 0x1, 0x4)[..12]);
        f.feed(&many, 8);
        assert_eq!(f.since, Some(8));
    }
}
