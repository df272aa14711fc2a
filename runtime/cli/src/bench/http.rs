//! `ferrotwin bench http`: the web browser's targets on a generated plant, measured with a raw
//! HTTP/1.1 client over loopback (no client library between us and the socket):
//! (a) time to first byte and full load of `/`, its static files and the first `browse` of
//! the root, and the browse of the widest nodes; (b) latency from a reading pushed to the
//! router to its `twin` message at an SSE client; (c) ingest throughput with 0 and with N open
//! SSE clients, each watching a line. A benchmark: it prints, never fails on speed.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrotwin_models::Timestamp;
use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{AssetId, Level, Property, Reading, Value, ValueType};
use ferrotwin_sim::generate::generate;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{load, percentile, plant_size};
use ferrotwin_runtime::{Runtime, RuntimeOptions};

pub struct HttpBench {
    pub sensors: u64,
    pub seconds: u64,
    pub clients: usize,
}

/// One GET with `Connection: close`: status, time to first byte, time to the last byte, body
/// bytes (headers excluded).
struct Fetched {
    status: u16,
    ttfb: Duration,
    total: Duration,
    body_bytes: usize,
}

async fn fetch(addr: SocketAddr, path: &str) -> Result<Fetched> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut ttfb = None;
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        ttfb.get_or_insert_with(|| t.elapsed());
        buf.extend_from_slice(&chunk[..n]);
    }
    let total = t.elapsed();
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let status = std::str::from_utf8(&buf[..head_end])?
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok(Fetched {
        status,
        ttfb: ttfb.unwrap_or(total),
        total,
        body_bytes: buf.len() - head_end - 4,
    })
}

/// An SSE stream read off a raw socket (chunked transfer encoding decoded here).
struct SseClient {
    r: BufReader<TcpStream>,
    text: String,
}

impl SseClient {
    async fn open(addr: SocketAddr, path: &str) -> Result<SseClient> {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await?;
        if !line.contains(" 200 ") {
            bail!("live stream {path}: {}", line.trim());
        }
        loop {
            line.clear();
            r.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Ok(SseClient {
            r,
            text: String::new(),
        })
    }

    /// Next chunk of the body appended to `text`; false at the end of the stream.
    async fn read_chunk(&mut self) -> Result<bool> {
        let mut line = String::new();
        self.r.read_line(&mut line).await?;
        let size = usize::from_str_radix(line.trim(), 16).context("chunk size")?;
        if size == 0 {
            return Ok(false);
        }
        let mut data = vec![0u8; size + 2];
        self.r.read_exact(&mut data).await?;
        self.text.push_str(std::str::from_utf8(&data[..size])?);
        Ok(true)
    }

    /// The next message: (event name, data).
    async fn next(&mut self) -> Result<(String, String)> {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for l in block.lines() {
                    if let Some(v) = l.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = l.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    return Ok((name, data));
                }
                continue;
            }
            if !self.read_chunk().await? {
                bail!("live stream ended");
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Readings applied per second while `load` pushes as fast as the router takes them.
async fn max_rate(
    rt: &Runtime,
    ids: &Arc<Vec<(AssetId, ValueType)>>,
    dur: Duration,
) -> Result<f64> {
    while rt.readings_in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let applied0 = rt.metrics().readings_applied.load(Ordering::Relaxed);
    let t = Instant::now();
    let (r, i) = (rt.ingest(), ids.clone());
    tokio::task::spawn_blocking(move || load(r.as_ref(), &i, dur, None)).await?;
    let secs = t.elapsed().as_secs_f64();
    Ok((rt.metrics().readings_applied.load(Ordering::Relaxed) - applied0) as f64 / secs)
}

/// `n` samples of push → `twin` message at an SSE client watching `machine` (its sensors
/// are its children), one sensor at a time, 250 ms apart (above the 5/s coalescing).
async fn sse_latency(
    rt: &Runtime,
    addr: SocketAddr,
    machine: &str,
    sensors: &[(AssetId, String)],
    n: usize,
) -> Result<Vec<f64>> {
    let mut c = SseClient::open(addr, &format!("/api/v1/live?path={machine}")).await?;
    let (first, _) = c.next().await?;
    if first != "snapshot" {
        bail!("live stream began with {first:?}, not a snapshot");
    }
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let (id, path) = &sensors[k % sensors.len()];
        // A value no earlier sample had: the message we wait for is this reading's.
        let v = 1000.0 + k as f64;
        let reading = Reading::good(*id, Property::Value, Value::Float(v), Timestamp::now());
        let t = Instant::now();
        let mut batch = vec![reading];
        loop {
            match rt.ingest().try_push(batch) {
                Ok(()) => break,
                Err(pb) => {
                    batch = pb.batch;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        let needle = format!("\"path\":\"{path}\"");
        let value = format!("\"value\":{v:?}");
        loop {
            let (name, data) = tokio::time::timeout(Duration::from_secs(30), c.next())
                .await
                .context("no twin message within 30 s")??;
            if name == "twin" && data.contains(&needle) && data.contains(&value) {
                out.push(ms(t.elapsed()));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(out)
}

pub async fn http(b: HttpBench) -> Result<String> {
    let mut out = String::new();
    let spec = generate(plant_size(b.sensors), 1);
    let dir = tempfile::tempdir()?;
    let mut opts = RuntimeOptions::default();
    // No reading is late in a benchmark: keep the sweeper out of the figures.
    opts.ingest.stale_sweep_ms = 3_600_000;
    let rt = Runtime::start(&spec, dir.path(), opts).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    rt.serve_http(listener).expect("serve");
    let all = rt.api().entries_below(None);
    let ids: Arc<Vec<(AssetId, ValueType)>> = Arc::new(super::sensor_ids(&spec));
    let lines: Vec<String> = all
        .iter()
        .filter(|e| e.level() == Level::Line)
        .map(|e| e.path().to_string())
        .collect();
    let _ = writeln!(
        out,
        "plant: {} sensors, {} twins, {} lines; HTTP on {addr}",
        ids.len(),
        rt.api().twin_count(),
        lines.len()
    );

    // (a) First paint: the page, its files, the first browse (the root and its children).
    let t = Instant::now();
    let page = fetch(addr, "/").await?;
    let js = fetch(addr, "/static/app.js").await?;
    let css = fetch(addr, "/static/app.css").await?;
    let root = fetch(addr, "/api/v1/browse?depth=1").await?;
    let first_paint = t.elapsed();
    for (what, f) in [
        ("/", &page),
        ("app.js", &js),
        ("app.css", &css),
        ("browse", &root),
    ] {
        if f.status != 200 {
            bail!("{what}: status {}", f.status);
        }
    }
    let _ = writeln!(
        out,
        "(a) cold: / TTFB {:.2} ms, full {:.2} ms ({} B); app.js {:.2} ms, app.css {:.2} ms; browse of the root {:.2} ms ({} B); all in sequence {:.2} ms",
        ms(page.ttfb),
        ms(page.total),
        page.body_bytes,
        ms(js.total),
        ms(css.total),
        ms(root.total),
        root.body_bytes,
        ms(first_paint)
    );
    let mut seq = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        fetch(addr, "/").await?;
        fetch(addr, "/static/app.js").await?;
        fetch(addr, "/static/app.css").await?;
        fetch(addr, "/api/v1/browse?depth=1").await?;
        seq.push(ms(t.elapsed()));
    }
    let _ = writeln!(
        out,
        "    warm (20 loads): page + files + root browse p50 {:.2} ms, max {:.2} ms",
        percentile(&mut seq, 0.5),
        percentile(&mut seq, 1.0)
    );
    // The widest expansions: an area (its lines), a line (its machines), a machine.
    for level in [Level::Site, Level::Area, Level::Line, Level::Machine] {
        if let Some(e) = all.iter().find(|e| e.level() == level) {
            let f = fetch(addr, &format!("/api/v1/browse?path={}&depth=1", e.path())).await?;
            let _ = writeln!(
                out,
                "    expand {level} {} ({} children): {:.2} ms, {} B",
                e.path(),
                all.iter()
                    .filter(|c| c.path().parent().as_ref() == Some(e.path()))
                    .count(),
                ms(f.total),
                f.body_bytes
            );
        }
    }

    let dur = Duration::from_secs(b.seconds.max(1));
    // (c) Ingest with 0 live clients, with N each watching a line (its machines: what the
    // tree shows there) and with N each watching a machine (its sensors: every value change,
    // coalesced to 5/s per twin), alternating, three times after a warm-up run: the machine
    // is shared with other work, one run each would mostly measure noise.
    let machines: Vec<String> = all
        .iter()
        .filter(|e| e.level() == Level::Machine)
        .map(|e| e.path().to_string())
        .collect();
    let mut rates = [Vec::new(), Vec::new(), Vec::new()];
    let mut received = [0u64; 3];
    let mut resyncs = [0u64; 3];
    // A first run warms the twins (first history chunks, allocations): not counted.
    max_rate(&rt, &ids, dur).await?;
    for _round in 0..3 {
        for (k, scopes) in [None, Some(&lines), Some(&machines)]
            .into_iter()
            .enumerate()
        {
            let stop = Arc::new(AtomicBool::new(false));
            let messages = Arc::new(AtomicU64::new(0));
            let resynced = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for i in 0..scopes.map_or(0, |_| b.clients) {
                let scopes = scopes.context("scopes")?;
                let path = &scopes[(i * 7919) % scopes.len()];
                let mut c = SseClient::open(addr, &format!("/api/v1/live?path={path}")).await?;
                let (stop, messages, resynced) = (stop.clone(), messages.clone(), resynced.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match tokio::time::timeout(Duration::from_millis(200), c.next()).await {
                            Ok(Ok((name, _))) => {
                                messages.fetch_add(1, Ordering::Relaxed);
                                if name == "resync" {
                                    resynced.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Ok(Err(_)) => return,
                            Err(_) => {}
                        }
                    }
                }));
            }
            rates[k].push(max_rate(&rt, &ids, dur).await?);
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                let _ = t.await;
            }
            received[k] += messages.load(Ordering::Relaxed);
            resyncs[k] += resynced.load(Ordering::Relaxed);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        percentile(&mut v, 0.5)
    };
    let runs = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let r0 = median(&rates[0]);
    let _ = writeln!(
        out,
        "(c) ingest, {} s per run, readings/s applied: 0 live clients {} → median {r0:.0}",
        dur.as_secs(),
        runs(&rates[0]),
    );
    for (k, what) in [(1, "lines"), (2, "machines")] {
        let r = median(&rates[k]);
        let _ = writeln!(
            out,
            "    {} clients on {what}: {} → median {r:.0} ({:+.1} %); they got {} messages, {} resyncs",
            b.clients,
            runs(&rates[k]),
            100.0 * (r - r0) / r0,
            received[k],
            resyncs[k]
        );
    }

    // (b) Push → SSE `twin` message at the client, idle and under half the max ingest rate.
    let machine = all
        .iter()
        .find(|e| e.level() == Level::Machine)
        .context("no machine")?;
    let sensors: Vec<(AssetId, String)> = all
        .iter()
        .filter(|c| c.path().parent().as_ref() == Some(machine.path()))
        .filter(|e| {
            matches!(&e.def.kind, AssetKind::Sensor { spec, .. } if spec.value_type == ValueType::Float)
        })
        .map(|e| (e.id, e.path().to_string()))
        .collect();
    while rt.readings_in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut idle = sse_latency(&rt, addr, machine.path().as_str(), &sensors, 40).await?;
    let half = r0 / 2.0;
    let stop_load = Arc::new(AtomicBool::new(false));
    // Not the sampled machine's sensors: a background value would replace the sampled one
    // before the stream sends it (both coalesce to the latest).
    let sampled: std::collections::HashSet<AssetId> = sensors.iter().map(|(id, _)| *id).collect();
    let others: Arc<Vec<(AssetId, ValueType)>> = Arc::new(
        ids.iter()
            .filter(|(id, _)| !sampled.contains(id))
            .copied()
            .collect(),
    );
    let (r, i, st) = (rt.ingest(), others, stop_load.clone());
    let bg = tokio::task::spawn_blocking(move || {
        // Paced load in slices so that it stops soon after the samples are taken.
        let mut sent = 0;
        while !st.load(Ordering::Relaxed) {
            sent += load(r.as_ref(), &i, Duration::from_millis(500), Some(half));
        }
        sent
    });
    let mut loaded = sse_latency(&rt, addr, machine.path().as_str(), &sensors, 40).await?;
    stop_load.store(true, Ordering::Relaxed);
    let _ = bg.await?;
    let _ = writeln!(
        out,
        "(b) reading pushed → its SSE twin message at the client: idle p50 {:.2} ms p99 {:.2} ms max {:.2} ms; under {half:.0} readings/s p50 {:.2} ms p99 {:.2} ms max {:.2} ms (40 samples each)",
        percentile(&mut idle, 0.5),
        percentile(&mut idle, 0.99),
        percentile(&mut idle, 1.0),
        percentile(&mut loaded, 0.5),
        percentile(&mut loaded, 0.99),
        percentile(&mut loaded, 1.0),
    );
    rt.shutdown().await;
    Ok(out)
}
