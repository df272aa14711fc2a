//! The web browser in a real browser: headless Chromium driven over WebDriver (chromedriver,
//! Debian's `chromium-driver`) against a runtime whose plant the simulator drives in real
//! time, as the demo does. Saves a PNG screenshot of each step under
//! `$CARGO_TARGET_DIR/browser-screenshots/` (the workspace's `target/` without it).
//!
//! Without `/usr/bin/chromedriver` the test is skipped with a message, unless `CI` is set:
//! there it fails (`.ci/run` installs the packages).

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use ferrotwin_models::spec::PlantSpec;
use ferrotwin_proto::v1 as pb;
use ferrotwin_sim::driver::{DriveOptions, run_realtime};
use ferrotwin_sim::model::PlantSim;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value as Json, json};

use crate::common::*;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// Every wait on the page: generous, the machine may be busy with other builds.
const WAIT_S: u64 = 30;
/// A unit with markup: a sensor name must be a slug, a unit is free text from the spec.
const SCRIPT_UNIT: &str = "<script>alert(1)</script>";
const DOOR: &str = "acme/berlin/assembly/line-1/oven-1/door";

/// The common test plant plus an oven sensor whose unit is markup, and a dry-run rule on the
/// ovens (the machine page lists it).
fn plant() -> PlantSpec {
    let extra = format!(
        "[[machine_types.oven.sensors]]\nname = \"door\"\nunit = \"{SCRIPT_UNIT}\"\nperiod_ms = 100\n\
         alarms = [{{ name = \"open\", kind = \"high\", limit = 1e9, severity = \"critical\" }}]\n\n\
         [[machine_types.oven.rules]]\nname = \"overheat-stop\"\nmode = \"dry-run\"\n\
         when = {{ alarm = \"door.open\" }}\n\
         then = {{ write = {{ property = \"run_enable\", value = false }} }}\n\n[[sites]]"
    );
    let text = PLANT.replacen("[[sites]]", &extra, 1);
    PlantSpec::from_toml(&text, "browser test plant").expect("browser test plant is valid")
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("browser-screenshots")
}

/// chromedriver on a free port; killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        // A free port: bind :0, read it, release it for chromedriver.
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        Driver { child, port }
    }

    async fn wait_ready(&self) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        wait_for(WAIT_S, "chromedriver to listen", || async move {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        })
        .await;
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let caps = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1440,900", "--hide-scrollbars",
                format!("--user-data-dir={}", profile.display()),
            ],
        }
    });
    let Json::Object(caps) = caps else {
        unreachable!("a JSON object literal")
    };
    ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// Polls `script` (a function body returning a value) until it returns something other than
/// null/false/"" and returns it.
async fn wait_js(c: &Client, script: &str, what: &str) -> Json {
    wait_for(WAIT_S, what, || async move {
        match c.execute(script, Vec::new()).await {
            Ok(Json::Null) | Ok(Json::Bool(false)) => None,
            Ok(Json::String(s)) if s.is_empty() => None,
            Ok(v) => Some(v),
            Err(_) => None,
        }
    })
    .await
}

async fn shot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let file = dir.join(format!("{name}.png"));
    std::fs::write(&file, png).unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
}

/// True (with a message) when there is no chromedriver here: the test is skipped, except on
/// CI, where it fails (`.ci/run` installs the packages).
fn no_browser() -> bool {
    if Path::new(CHROMEDRIVER).exists() {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{CHROMEDRIVER} is missing on CI: .ci/run must install chromium chromium-driver"
    );
    eprintln!(
        "skipped: install chromium chromium-driver (apt-get install -y chromium chromium-driver)"
    );
    true
}

/// Serves the site's HTTP (the web pages) on a free loopback port.
async fn serve_http(site: &Site) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind http");
    let http = listener.local_addr().expect("http addr");
    site.rt.serve_http(listener).expect("serve");
    http
}

/// chromedriver and a headless Chromium session on a profile of its own (kept until the
/// test ends: dropping the driver kills chromedriver).
async fn open_browser() -> (Driver, tempfile::TempDir, Client) {
    let driver = Driver::start();
    driver.wait_ready().await;
    let profile = tempfile::tempdir().expect("profile dir");
    let c = browser(&driver, profile.path()).await;
    (driver, profile, c)
}

fn row(path: &str) -> String {
    format!("#tree li[data-path=\"{path}\"]")
}

/// Clicks the expand toggle of tree node `path` and waits for the child `child` to show.
async fn expand(c: &Client, path: &str, child: &str) {
    c.wait()
        .at_most(Duration::from_secs(WAIT_S))
        .for_element(Locator::Css(&format!(
            "{} > .row [data-testid=toggle]",
            row(path)
        )))
        .await
        .unwrap_or_else(|e| panic!("tree node {path}: {e}"))
        .click()
        .await
        .expect("click toggle");
    c.wait()
        .at_most(Duration::from_secs(WAIT_S))
        .for_element(Locator::Css(&row(child)))
        .await
        .unwrap_or_else(|e| panic!("{child} under {path} after expanding: {e}"));
}

/// Finds and clicks `css`, again while the page re-renders it (a stale element is retried).
async fn click(c: &Client, css: &str, what: &str) {
    wait_for(WAIT_S, what, || async move {
        let e = c.find(Locator::Css(css)).await.ok()?;
        e.click().await.ok()
    })
    .await;
}

async fn text_of(c: &Client, css: &str) -> String {
    let js = format!(
        "const e = document.querySelector({}); return e ? e.textContent : null;",
        Json::String(css.to_string())
    );
    match c.execute(&js, Vec::new()).await.expect("execute") {
        Json::String(s) => s,
        other => panic!("no element {css} ({other})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_page_shows_live_tree_trend_and_acknowledges_alarms_in_headless_chromium() {
    if no_browser() {
        return;
    }
    let shots = screenshot_dir();
    std::fs::create_dir_all(&shots).expect("screenshot dir");

    // A runtime like the demo's: the simulator drives the plant in real time.
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_plant_in(&plant(), dir.path(), options()).await;
    let http = serve_http(&site).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sim = {
        let (stop, router, spec) = (stop.clone(), site.rt.ingest(), plant());
        std::thread::spawn(move || {
            let mut sim = PlantSim::new(&spec, 7, now());
            run_realtime(&mut sim, router.as_ref(), &DriveOptions::default(), &stop)
        })
    };

    let (driver, _profile, c) = open_browser().await;
    let base = format!("http://{http}");

    // 1. The tree, expanded by clicks down to a machine's sensors.
    c.goto(&format!("{base}/"))
        .await
        .expect("open the start page");
    c.wait()
        .at_most(Duration::from_secs(WAIT_S))
        .for_element(Locator::Css(&row("acme/berlin")))
        .await
        .expect("the tree shows the site under the enterprise");
    expand(&c, "acme/berlin", "acme/berlin/assembly").await;
    expand(&c, "acme/berlin/assembly", "acme/berlin/assembly/line-1").await;
    expand(&c, "acme/berlin/assembly/line-1", PRESS).await;
    expand(&c, PRESS, FORCE).await;
    let value_css = format!("{} [data-testid=value]", row(FORCE));
    let first = wait_js(
        &c,
        &format!(
            "const e = document.querySelector({}); return e && e.textContent !== '—' ? e.textContent : null;",
            Json::String(value_css.clone())
        ),
        "a value on the force sensor's row",
    )
    .await;
    shot(&c, &shots, "01-tree").await;

    // 2. The value changes without a reload (live updates over SSE).
    c.execute("window.__noReload = true;", Vec::new())
        .await
        .expect("mark the page");
    let changed = wait_js(
        &c,
        &format!(
            "const e = document.querySelector({}); return e && e.textContent !== {} ? e.textContent : null;",
            Json::String(value_css.clone()),
            first
        ),
        "the force value to change in the page",
    )
    .await;
    assert_ne!(changed, first);
    assert_eq!(
        c.execute("return window.__noReload === true;", Vec::new())
            .await
            .expect("execute"),
        Json::Bool(true),
        "the page was not reloaded"
    );
    shot(&c, &shots, "02-live-value").await;

    // 3. Selecting the sensor opens its twin page (shareable URL) with a trend chart of data.
    click(
        &c,
        &format!("{} > .row .name", row(FORCE)),
        "a click on the force sensor",
    )
    .await;
    let url = c.current_url().await.expect("url");
    assert_eq!(
        url.path(),
        format!("/asset/{FORCE}"),
        "the URL names the asset"
    );
    let points = wait_js(
        &c,
        "const e = document.querySelector('[data-testid=trend-canvas]'); \
         return e && Number(e.dataset.points) > 1 ? Number(e.dataset.points) : null;",
        "the trend chart to draw history points",
    )
    .await;
    assert!(points.as_u64().is_some_and(|n| n > 1), "{points}");
    shot(&c, &shots, "03-trend").await;

    // 4. An alarm raised by a reading over the limit shows with an Acknowledge button.
    // Its row is there already: the press was expanded in step 1 and the tree stays open.
    click(
        &c,
        &format!("{} > .row .name", row(TEMP)),
        "a click on the temp sensor",
    )
    .await;
    c.wait()
        .at_most(Duration::from_secs(WAIT_S))
        .for_element(Locator::Css("[data-testid=alarm-row][data-alarm=high]"))
        .await
        .expect("the temp twin page lists its alarm");
    push(&site, vec![float(TEMP, 150.0)]).await;
    let ack_css = format!("[data-testid=ack][data-path=\"{TEMP}\"][data-alarm=high]");
    c.wait()
        .at_most(Duration::from_secs(WAIT_S))
        .for_element(Locator::Css(&ack_css))
        .await
        .expect("an Acknowledge button for the raised alarm");
    wait_js(
        &c,
        &format!(
            "return document.querySelector('{} [data-testid=alarm-badges] .sev-high') !== null;",
            row(TEMP).replace('\'', "\\'")
        ),
        "a HIGH badge on the temp row of the tree",
    )
    .await;
    shot(&c, &shots, "04-alarm").await;

    // 5. Acknowledging in the page acknowledges the alarm in the twin.
    click(&c, &ack_css, "a click on Acknowledge").await;
    let mut grpc = site.client.clone();
    wait_for(WAIT_S, "the alarm acknowledged by the page", || {
        let mut g = grpc.clone();
        async move {
            let s = alarm_state(&get(&mut g, TEMP).await, "high");
            matches!(s, pb::AlarmState::ActiveAcked | pb::AlarmState::Normal).then_some(())
        }
    })
    .await;
    wait_js(
        &c,
        &format!(
            "const r = document.querySelector('[data-testid=alarm-row][data-alarm=high]'); \
             return r && !r.dataset.state.endsWith('unacked') && !document.querySelector({});",
            Json::String(ack_css.clone())
        ),
        "the page to show the alarm acknowledged",
    )
    .await;
    let acked = events(&mut grpc, TEMP).await;
    assert!(
        acked.iter().any(|e| e.message.contains("by web")),
        "the ack event names the page's user: {acked:?}"
    );
    shot(&c, &shots, "05-acked").await;

    // 6. Markup from the plant spec is shown as text, never run.
    c.goto(&format!("{base}/asset/{DOOR}"))
        .await
        .expect("open the door sensor");
    let unit = wait_js(
        &c,
        "const e = document.querySelector('[data-testid=twin-unit]'); return e ? e.textContent : null;",
        "the door sensor's unit on its twin page",
    )
    .await;
    assert_eq!(unit, Json::String(SCRIPT_UNIT.into()));
    assert_eq!(
        text_of(&c, &format!("{} [data-testid=unit]", row(DOOR))).await,
        SCRIPT_UNIT,
        "the tree row shows the unit as text"
    );
    assert!(
        c.get_alert_text().await.is_err(),
        "no alert dialog: the unit's script did not run"
    );
    let injected = c
        .execute(
            "return Array.from(document.scripts).filter(s => s.textContent.includes('alert(1)')).length;",
            Vec::new(),
        )
        .await
        .expect("execute");
    assert_eq!(injected, json!(0), "no script element made from the unit");
    shot(&c, &shots, "06-escaped-unit").await;

    // 7. The search box jumps to an asset (URL and tree follow).
    let zone = "acme/berlin/assembly/line-1/oven-1/zone-temp";
    c.find(Locator::Css("#search"))
        .await
        .expect("search box")
        .send_keys("zone-te")
        .await
        .expect("type a search");
    c.wait()
        .at_most(Duration::from_secs(WAIT_S))
        .for_element(Locator::Css(&format!(
            "#search-results li[data-path=\"{zone}\"]"
        )))
        .await
        .expect("the search lists the zone-temp sensor");
    c.find(Locator::Css("#search"))
        .await
        .expect("search box")
        .send_keys("\u{E007}")
        .await
        .expect("press Enter");
    wait_js(
        &c,
        &format!(
            "return location.pathname === '/asset/{zone}' && document.querySelector('{}.sel') !== null;",
            row(zone).replace('\'', "\\'")
        ),
        "the search to open the zone-temp sensor in the URL and the tree",
    )
    .await;

    // 8. Alarm summary and overview render (screenshots for review).
    c.goto(&format!("{base}/alarms"))
        .await
        .expect("alarms page");
    wait_js(
        &c,
        "return document.querySelector('[data-testid=alarm-counts] .sev') !== null;",
        "the alarm summary's counts",
    )
    .await;
    shot(&c, &shots, "07-alarms").await;
    c.goto(&format!("{base}/overview"))
        .await
        .expect("overview page");
    wait_js(
        &c,
        "return document.querySelector('[data-testid=line-oee]') !== null;",
        "the overview's lines",
    )
    .await;
    shot(&c, &shots, "08-overview").await;

    // 9. A machine's page lists its rules (mode, state, condition → action) and its actions.
    c.goto(&format!("{base}/asset/acme/berlin/assembly/line-1/oven-1"))
        .await
        .expect("the oven's page");
    let rule = wait_js(
        &c,
        "const r = document.querySelector('[data-testid=rule-row][data-rule=overheat-stop]'); \
         return r && document.querySelector('[data-testid=actions] tr') ? [r.dataset.mode, r.dataset.phase, r.textContent] : null;",
        "the oven's rule in its page",
    )
    .await;
    assert_eq!(rule[0], "dry-run", "{rule}");
    assert!(
        rule[2]
            .as_str()
            .is_some_and(|t| t.contains("write run_enable = false")),
        "{rule}"
    );
    shot(&c, &shots, "09-rules").await;

    c.close().await.expect("close the browser");
    drop(driver);
    stop.store(true, Ordering::Release);
    let _ = sim.join();
    site.rt.shutdown().await;
    eprintln!("browser screenshots in {}", shots.display());
}

/// With security on, the page asks for a sign-in: the form takes a service token, the session
/// cookie is `HttpOnly` (no script reads it), and the page then works under the
/// Content-Security-Policy (no inline script or style) with the live tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_with_a_token_opens_the_page_in_headless_chromium() {
    if no_browser() {
        return;
    }
    let shots = screenshot_dir();
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let (token, hash) =
        ferrotwin_runtime::security::authn::new_service_token("web").expect("token");
    let mut o = options();
    o.security = Some(
        toml::from_str(&format!(
            "[[tokens]]\nname = \"web\"\nhash = \"{hash}\"\n[[grants]]\nsubject = \"token:web\"\nrole = \"operator\"\npaths = [\"**\"]\n"
        ))
        .expect("security"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_plant_in(&plant(), dir.path(), o).await;
    let http = serve_http(&site).await;
    let (_driver, _profile, c) = open_browser().await;
    let base = format!("http://{http}");
    c.goto(&format!("{base}/alarms"))
        .await
        .expect("open a page");
    c.wait()
        .at_most(Duration::from_secs(WAIT_S))
        .for_element(Locator::Css("#signin"))
        .await
        .expect("the sign-in form instead of the page");
    // A wrong token: the form again, with the refusal.
    c.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys("ftk.web.0000")
        .await
        .expect("type");
    click(&c, "#signin-submit", "sign in").await;
    c.wait()
        .at_most(Duration::from_secs(WAIT_S))
        .for_element(Locator::Css("#signin-error"))
        .await
        .expect("the refusal is shown");
    c.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys(&token)
        .await
        .expect("type");
    click(&c, "#signin-submit", "sign in").await;
    // Back on the page asked for, signed in; then the tree works.
    wait_js(
        &c,
        "return location.pathname === '/alarms' ? true : null;",
        "back on /alarms after the sign-in",
    )
    .await;
    c.goto(&format!("{base}/")).await.expect("the start page");
    c.wait()
        .at_most(Duration::from_secs(WAIT_S))
        .for_element(Locator::Css(&row("acme/berlin")))
        .await
        .expect("the tree under the CSP, signed in");
    shot(&c, &shots, "10-signed-in").await;
    match c
        .execute("return document.cookie;", Vec::new())
        .await
        .expect("js")
    {
        Json::String(s) => assert!(!s.contains("ft_token"), "the session is readable: {s}"),
        other => panic!("{other}"),
    }
    c.close().await.expect("close");
    site.rt.shutdown().await;
}

/// A live apply shows in an open page without a reload: the removed press leaves the tree,
/// the added line appears under its area.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tree_follows_a_live_plant_change_without_a_reload_in_headless_chromium() {
    if no_browser() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_plant_in(&spec(), dir.path(), options()).await;
    let http = serve_http(&site).await;
    let (_driver, _profile, c) = open_browser().await;
    c.goto(&format!("http://{http}/"))
        .await
        .expect("open the start page");
    c.wait()
        .at_most(Duration::from_secs(WAIT_S))
        .for_element(Locator::Css(&row("acme/berlin")))
        .await
        .expect("the tree shows the site");
    let area = "acme/berlin/assembly";
    let line = "acme/berlin/assembly/line-1";
    expand(&c, "acme/berlin", area).await;
    expand(&c, area, line).await;
    expand(&c, line, PRESS).await;
    c.execute("window.__noReload = true;", Vec::new())
        .await
        .expect("mark the page");
    // The stream follows the rows shown, reconnecting a moment after each expand: let it
    // settle (a change while it reconnects is not replayed).
    tokio::time::sleep(Duration::from_millis(600)).await;
    wait_js(
        &c,
        "return document.getElementById('live-status').dataset.state === 'open';",
        "the live stream open",
    )
    .await;
    let changed = PLANT
        .replace(r#"{ name = "press-1", type = "press" }, "#, "")
        .replace(
            "[[sites.areas.lines]]\nname = \"line-1\"",
            "[[sites.areas.lines]]\nname = \"line-2\"\nmachines = [{ name = \"press-9\", type = \"press\" }]\n[[sites.areas.lines]]\nname = \"line-1\"",
        );
    site.client
        .clone()
        .apply_plant(pb::ApplyPlantRequest {
            plant_toml: changed,
            base_version: 1,
            dry_run: false,
            by: "test".into(),
            site_toml: String::new(),
        })
        .await
        .expect("applied");
    let gone_and_new = format!(
        "return !document.querySelector({}) && !!document.querySelector({});",
        Json::String(row(PRESS)),
        Json::String(row("acme/berlin/assembly/line-2"))
    );
    wait_js(&c, &gone_and_new, "press-1 gone and line-2 shown").await;
    assert_eq!(
        c.execute("return window.__noReload === true;", Vec::new())
            .await
            .expect("execute"),
        Json::Bool(true),
        "the page was not reloaded"
    );
    let _ = c.close().await;
    site.rt.shutdown().await;
}
