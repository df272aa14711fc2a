//! Fair admission of connections and deadlines on them, for every listener (gRPC, HTTP).
//!
//! - **Caps**: at most `MAX_CONNECTIONS` open per listener and `MAX_CONNECTIONS_PER_IP`
//!   (gRPC: `MAX_GRPC_CONNECTIONS_PER_IP`) from one address; a connection past a cap is refused at once (closed; HTTP answers
//!   503 first), counted and logged at most once a minute. One client cannot exhaust the
//!   process's descriptors or lock the others out.
//! - **First bytes**: a connection must send its first `first_bytes` (the HTTP/2 preface of
//!   gRPC) within `FIRST_BYTES_TIMEOUT`, or it is closed: a half-sent preface holds nothing.
//! - **Idle**: with an idle limit, a connection that moves no byte either way for that long
//!   is closed (HTTP/1 keep-alive; gRPC connections are kept alive by pings instead, and
//!   streams such as Watch may be quiet for hours).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Open connections per listener.
pub const MAX_CONNECTIONS: usize = 1024;
/// Open connections per client address, per listener (below the total, so one address
/// cannot take them all; above the 64 streams a client may hold).
pub const MAX_CONNECTIONS_PER_IP: usize = 128;
/// Open gRPC connections per client address: a gRPC client multiplexes its calls and streams
/// on one connection, so a few suffice, and 32 addresses are needed to fill a listener.
pub const MAX_GRPC_CONNECTIONS_PER_IP: usize = 32;
/// Time a new connection has for its first bytes (gRPC: the 24-byte HTTP/2 preface).
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// The open connections of one listener, by client address.
#[derive(Debug)]
pub struct ConnLimits {
    /// The listener, for the log and the metrics.
    pub what: &'static str,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    max_total: usize,
    max_per_ip: usize,
    /// Connections refused at a cap, since start.
    pub refused: AtomicU64,
    /// When a refusal was last logged (s since the epoch).
    logged_s: AtomicI64,
}

/// The admission of a runtime's two listeners, shared with its metrics.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: Arc<ConnLimits>,
    pub http: Arc<ConnLimits>,
}

impl Default for Listeners {
    fn default() -> Listeners {
        Listeners {
            grpc: ConnLimits::with("grpc", MAX_CONNECTIONS, MAX_GRPC_CONNECTIONS_PER_IP),
            http: ConnLimits::new("http"),
        }
    }
}

impl Listeners {
    pub fn each(&self) -> [&ConnLimits; 2] {
        [&self.grpc, &self.http]
    }
}

/// One admitted connection: its place is given back when it drops.
#[derive(Debug)]
pub struct ConnPermit {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl ConnLimits {
    /// The limits of the listener `what` (for the log).
    pub fn new(what: &'static str) -> Arc<ConnLimits> {
        ConnLimits::with(what, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP)
    }

    pub fn with(what: &'static str, max_total: usize, max_per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            what,
            open: Mutex::new((0, HashMap::new())),
            max_total,
            max_per_ip,
            refused: AtomicU64::new(0),
            logged_s: AtomicI64::new(0),
        })
    }

    /// A place for a connection from `ip`, or why there is none (counted, logged at most
    /// once a minute).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, String> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = open.1.get(&ip).copied().unwrap_or(0);
        let why = if open.0 >= self.max_total {
            format!("{} connections open, the limit", self.max_total)
        } else if from_ip >= self.max_per_ip {
            format!(
                "{} connections open from {ip}, the limit per client",
                self.max_per_ip
            )
        } else {
            open.0 += 1;
            *open.1.entry(ip).or_default() += 1;
            return Ok(ConnPermit {
                limits: self.clone(),
                ip,
            });
        };
        drop(open);
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let last = self.logged_s.load(Ordering::Relaxed);
        if now - last >= 60
            && self
                .logged_s
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(listener = self.what, client = %ip, refused = self.refused.load(Ordering::Relaxed), "connection refused: {why}");
        }
        Err(why)
    }

    /// Connections open now.
    /// Connections the listener admits at most.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// A connection's stream with its permit and deadlines (see the module doc). A deadline
/// that passes fails the next read with `TimedOut`, which ends the connection.
pub struct Guarded<S> {
    inner: S,
    _permit: ConnPermit,
    /// Bytes still owed before the first-bytes deadline is lifted.
    first_owed: usize,
    first: Option<Pin<Box<Sleep>>>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    /// Requests being answered: a connection is idle only with none (a slow answer that
    /// sends nothing for a while is not an idle connection).
    busy: Option<Arc<AtomicUsize>>,
}

impl<S> Guarded<S> {
    /// `inner` admitted by `permit`: its first `first_bytes` within `FIRST_BYTES_TIMEOUT`
    /// (0: no such deadline), closed after `idle` without a byte either way (`None`: never).
    pub fn new(
        inner: S,
        permit: ConnPermit,
        first_bytes: usize,
        idle: Option<Duration>,
    ) -> Guarded<S> {
        Guarded {
            inner,
            _permit: permit,
            first_owed: first_bytes,
            first: (first_bytes > 0).then(|| Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT))),
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            busy: None,
        }
    }

    /// Counts the requests in progress on this connection (see `busy`).
    pub fn set_busy(&mut self, busy: Arc<AtomicUsize>) {
        self.busy = Some(busy);
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn active(&mut self) {
        if let Some((d, t)) = &mut self.idle {
            t.as_mut().reset(Instant::now() + *d);
        }
    }

    /// `Err` once a deadline has passed (and registers the wakers of those still to come).
    fn deadlines(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if let Some(t) = &mut self.first
            && t.as_mut().poll(cx).is_ready()
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection did not send its first bytes in time",
            ));
        }
        let busy = self
            .busy
            .as_ref()
            .is_some_and(|b| b.load(Ordering::Acquire) > 0);
        if let Some((d, t)) = &mut self.idle
            && t.as_mut().poll(cx).is_ready()
        {
            if !busy {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection was idle too long",
                ));
            }
            // A request is being answered: look again a period later.
            t.as_mut().reset(Instant::now() + *d);
            let _ = t.as_mut().poll(cx);
        }
        Ok(())
    }
}

use std::future::Future as _;

/// tonic reads the peer's address and certificates through the stream it wraps.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.active();
                    this.first_owed = this.first_owed.saturating_sub(n);
                    if this.first_owed == 0 {
                        this.first = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.deadlines(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn caps_hold_per_client_and_in_all_and_places_come_back() {
        let limits = ConnLimits::with("test", 3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let a1 = limits.admit(a).expect("first");
        let _a2 = limits.admit(a).expect("second");
        let e = limits.admit(a).expect_err("third from a");
        assert!(e.contains("per client"), "{e}");
        let _b1 = limits.admit(b).expect("b");
        let e = limits.admit(b).expect_err("the total");
        assert!(e.contains("3 connections open"), "{e}");
        assert_eq!(limits.refused.load(Ordering::Relaxed), 2);
        drop(a1);
        assert_eq!(limits.open(), 2);
        limits.admit(b).expect("a place came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_sent_preface_and_an_idle_connection_are_closed() {
        let limits = ConnLimits::new("test");
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        // 3 of 24 bytes, then silence: the read fails after the deadline.
        let (mut client, server) = tokio::io::duplex(64);
        let mut g = Guarded::new(server, limits.admit(ip).expect("admit"), 24, None);
        client.write_all(b"PRI").await.expect("write");
        let mut buf = [0u8; 64];
        assert_eq!(g.read(&mut buf).await.expect("3 bytes"), 3);
        let e = g.read(&mut buf).await.expect_err("deadline");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        // The whole preface lifts it; then only the idle limit applies.
        let (mut client, server) = tokio::io::duplex(64);
        let mut g = Guarded::new(
            server,
            limits.admit(ip).expect("admit"),
            3,
            Some(Duration::from_secs(60)),
        );
        client.write_all(b"PRI").await.expect("write");
        assert_eq!(g.read(&mut buf).await.expect("3 bytes"), 3);
        tokio::time::advance(Duration::from_secs(30)).await;
        client.write_all(b"x").await.expect("write");
        assert_eq!(g.read(&mut buf).await.expect("1 byte"), 1);
        let started = Instant::now();
        let e = g.read(&mut buf).await.expect_err("idle");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(59));
    }
}
