//! A TCP relay on 127.0.0.1 in front of a server: counts the bytes each way and can cut the
//! link (every open connection reset, new ones refused until `restore`) or slow it down.
//! The replication benchmark measures wire bytes and outages with it; the end-to-end tests
//! cut and throttle the site → enterprise link with it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    /// Where clients connect instead of the server.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    up: AtomicU64,
    down: AtomicU64,
    cut: AtomicBool,
    /// Bytes per second in each direction; 0 = unlimited.
    rate: AtomicU64,
    /// Bumped by `cut`: connections of an older generation end.
    generation: AtomicU64,
}

impl Relay {
    pub async fn to(target: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let s = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if s.cut.load(Ordering::Relaxed) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let generation = s.generation.load(Ordering::Relaxed);
                let s = s.clone();
                tokio::spawn(async move {
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        () = pump(cr, sw, &s, generation, true) => {}
                        () = pump(sr, cw, &s, generation, false) => {}
                    }
                });
            }
        });
        Ok(Relay { addr, state, task })
    }

    /// Resets every open connection and refuses new ones.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::Relaxed);
        self.state.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::Relaxed);
    }

    /// Limits each direction to about `bytes_per_s` (0: unlimited).
    pub fn throttle(&self, bytes_per_s: u64) {
        self.state.rate.store(bytes_per_s, Ordering::Relaxed);
    }

    /// Bytes relayed client → server so far.
    pub fn bytes_up(&self) -> u64 {
        self.state.up.load(Ordering::Relaxed)
    }

    /// Bytes relayed server → client so far.
    pub fn bytes_down(&self) -> u64 {
        self.state.down.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    s: &State,
    generation: u64,
    up: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            () = async {
                while s.generation.load(Ordering::Relaxed) == generation {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            } => return,
        };
        if s.generation.load(Ordering::Relaxed) != generation
            || to.write_all(&buf[..n]).await.is_err()
        {
            return;
        }
        let counter = if up { &s.up } else { &s.down };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        let rate = s.rate.load(Ordering::Relaxed);
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
}
