// ferrotwin web: one page shell, views chosen from location.pathname.
//   /                 tree + the root asset
//   /asset/<path>     tree opened down to <path> + its twin page
//   /alarms[?path=]   alarm summary of the plant or a subtree
//   /overview[?path=] site -> lines (sites side by side at the enterprise)
// Reads the JSON API under /api/v1, live updates over Server-Sent Events (/api/v1/live).
//
// SECURITY: every string from the server (names, units, messages) reaches the DOM through
// textContent / createTextNode (the `h` helper below); innerHTML is never used.
(function () {
  "use strict";

  const API = "/api/v1";
  const SEVERITIES = ["critical", "high", "medium", "low", "info"];
  const SEV_RANK = { critical: 5, high: 4, medium: 3, low: 2, info: 1 };
  const SEV_SHORT = { critical: "CRIT", high: "HIGH", medium: "MED", low: "LOW", info: "INFO" };
  const LVL_SHORT = { enterprise: "ENT", site: "SITE", area: "AREA", line: "LINE", machine: "MCH", sensor: "SNS" };
  const RANGES = { "15m": 15 * 60e6, "1h": 3600e6, "24h": 24 * 3600e6 };
  const ACTIVE = new Set(["active_unacked", "active_acked", "returned_unacked"]);

  // ---------- DOM helpers (text only) ----------
  function h(tag, attrs) {
    const el = document.createElement(tag);
    if (attrs) {
      for (const k in attrs) {
        const v = attrs[k];
        if (v == null || v === false) continue;
        if (k === "class") el.className = v;
        else if (k === "text") el.textContent = v;
        else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
        else el.setAttribute(k, v === true ? "" : String(v));
      }
    }
    for (let i = 2; i < arguments.length; i++) append(el, arguments[i]);
    return el;
  }
  function append(el, c) {
    if (c == null || c === false) return;
    if (Array.isArray(c)) { c.forEach((x) => append(el, x)); return; }
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }
  function setText(el, s) { if (el.textContent !== s) el.textContent = s; }

  // ---------- formatting ----------
  function fmtNum(v) {
    if (v == null || Number.isNaN(v)) return "—";
    if (typeof v === "boolean") return v ? "ON" : "OFF";
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    const d = a >= 1000 ? 0 : a >= 100 ? 1 : a >= 1 ? 2 : 3;
    return v.toFixed(d);
  }
  function fmtPct(f) { return f == null || Number.isNaN(f) ? "—" : (f * 100).toFixed(1) + " %"; }
  function fmtTime(us) {
    if (!us) return "—";
    const d = new Date(us / 1000);
    const today = new Date().toDateString() === d.toDateString();
    const t = d.toLocaleTimeString([], { hour12: false });
    return today ? t : d.toLocaleDateString() + " " + t;
  }
  function fmtAge(us) {
    if (!us) return "";
    const s = Math.max(0, (Date.now() * 1000 - us) / 1e6);
    if (s < 60) return s.toFixed(0) + " s ago";
    if (s < 3600) return (s / 60).toFixed(0) + " min ago";
    if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
    return (s / 86400).toFixed(1) + " d ago";
  }
  function lastSeg(p) { const i = p.lastIndexOf("/"); return i < 0 ? p : p.slice(i + 1); }
  function parentOf(p) { const i = p.lastIndexOf("/"); return i < 0 ? "" : p.slice(0, i); }
  function ancestors(p) {
    const segs = p.split("/"); const out = [];
    for (let i = 1; i < segs.length; i++) out.push(segs.slice(0, i).join("/"));
    return out;
  }
  function assetHref(p) { return "/asset/" + p.split("/").map(encodeURIComponent).join("/"); }

  // Local inference of a machine (or sensor): each field absent while detectors are off
  // or still learning. Health is 0..100; RUL in hours.
  function healthOf(t) {
    const m = (t && (t.machine || t.sensor)) || {};
    const num = (k) => (typeof m[k] === "number" ? m[k] : null);
    const out = { health: num("health"), rul: num("rul_hours"), rulLow: num("rul_low_hours"),
      rulHigh: num("rul_high_hours"), anomaly: num("anomaly_score"), model: num("model_score"),
      anomalous: m.anomalous === true };
    out.any = [out.health, out.rul, out.anomaly, out.model].some((v) => v != null);
    return out;
  }
  function worstHealthOf(t) {
    const r = (t && t.rollup) || {};
    return typeof r.worst_health === "number" ? r.worst_health : null;
  }
  // The machine detectors raise a health anomaly below 60 by default.
  function healthClass(v) { return v == null ? "" : v < 40 ? "crit" : v < 60 ? "warn" : ""; }

  function activeAlarms(t) {
    const s = t && t.sensor;
    return s ? s.alarms.filter((a) => ACTIVE.has(a.state)) : [];
  }
  function stateLabel(s) {
    return { active_unacked: "ACTIVE · UNACKED", active_acked: "ACTIVE · acked", returned_unacked: "RETURNED · UNACKED", normal: "normal" }[s] || s;
  }

  // Marks of quality: a word and a colour. Good quality shows nothing in the tree.
  function qualityMark(q, full) {
    if (!q || !q.code || q.code === "unspecified") return full ? h("span", { class: "q q-none", text: "no value" }) : null;
    if (q.code === "good") return full ? h("span", { class: "q q-good", text: "GOOD" }) : null;
    const word = q.code === "bad" ? "BAD" : "UNCERTAIN";
    const reason = q.reason ? ": " + q.reason : "";
    return h("span", { class: "q q-" + q.code, title: q.code + reason, "data-testid": "quality" },
      full ? word + reason : (q.reason || word).toUpperCase());
  }
  // Solid: needs attention; outlined: acknowledged (the state is also in the title and tables).
  function sevBadge(sev, n, acked) {
    return h("span", { class: "sev sev-" + sev + (acked ? " acked" : ""), title: n + " " + sev + " alarm(s)" + (acked ? ", acknowledged" : "") },
      (n > 1 ? n + " " : "") + SEV_SHORT[sev]);
  }
  // Active-alarm badges: a sensor's own alarms, or the roll-up counts by severity.
  function alarmBadges(t) {
    const box = h("span", { class: "badges", "data-testid": "alarm-badges" });
    if (t.sensor) {
      for (const a of activeAlarms(t)) box.appendChild(sevBadge(a.severity, 1, a.state === "active_acked"));
    } else if (t.rollup && t.rollup.alarms_by_severity) {
      const c = t.rollup.alarms_by_severity;
      [4, 3, 2, 1, 0].forEach((i) => { if (c[i]) box.appendChild(sevBadge(SEVERITIES[4 - i], c[i], false)); });
    }
    return box.childNodes.length ? box : null;
  }
  function machineChip(m) {
    return m && m.state ? h("span", { class: "st st-" + m.state, "data-testid": "machine-state" }, m.state) : null;
  }
  function valueText(t) {
    const s = t.sensor;
    if (!s || !s.has_value || s.value == null) return "—";
    return fmtNum(s.value);
  }

  // ---------- API ----------
  async function api(path, params, init) {
    let url = API + path;
    if (params) {
      const q = new URLSearchParams();
      for (const k in params) if (params[k] != null && params[k] !== "") q.set(k, params[k]);
      const s = q.toString();
      if (s) url += "?" + s;
    }
    const r = await fetch(url, init);
    // Signed out (or the session ended): the sign-in page, then back here.
    if (r.status === 401) {
      location.assign("/signin?next=" + encodeURIComponent(location.pathname + location.search));
      throw new Error("sign in first");
    }
    let body = null;
    try { body = await r.json(); } catch (_) { /* not JSON */ }
    if (!r.ok) {
      const e = new Error((body && body.error) || r.status + " " + r.statusText);
      e.status = r.status; e.body = body;
      throw e;
    }
    return body;
  }
  async function browse(path, depth) {
    const out = [];
    let token = "";
    do {
      const page = await api("/browse", { path, depth, page_token: token, page_size: 10000 });
      out.push(...page.twins);
      token = page.next_page_token;
    } while (token);
    return out;
  }
  async function ackAlarm(path, alarm, btn) {
    if (btn) btn.disabled = true;
    try {
      await api("/alarms/ack", null, {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ path, alarm, by: "web", comment: "" }),
      });
      const t = await api("/twins/" + path);
      onTwin(t);
      refreshAlarmsSoon();
    } catch (e) {
      if (btn) { btn.disabled = false; btn.title = "acknowledge failed: " + e.message; }
      toast("Acknowledge failed: " + e.message);
    }
  }
  function toast(msg) {
    const el = h("div", { class: "err", style: "position:fixed;bottom:12px;right:12px;z-index:20" }, msg);
    document.body.appendChild(el);
    setTimeout(() => el.remove(), 5000);
  }

  // ---------- state ----------
  const twins = new Map();          // path -> latest twin
  const nodes = new Map();          // path -> { li, row, ul, expanded, loaded }
  const listeners = new Set();      // view callbacks for twin changes: fn(twin)
  const eventListeners = new Set(); // view callbacks for events: fn(event)
  let selected = "";
  let rootPath = "";
  let view = null;                  // { name, path, dispose? }

  // The server writes the selected path into the shell (escaped); "{{PATH}}" when the file is
  // opened without it.
  function injectedPath() {
    const v = document.body.dataset.path || "";
    return v.startsWith("{{") ? "" : v;
  }
  function route() {
    const p = location.pathname;
    const qp = new URLSearchParams(location.search).get("path") || "";
    if (p.startsWith("/asset/")) return { name: "asset", path: decodeURIComponent(p.slice(7)).replace(/\/+$/, "") };
    if (p === "/alarms") return { name: "alarms", path: qp };
    if (p === "/overview") return { name: "overview", path: qp };
    return { name: "asset", path: injectedPath() || qp };
  }

  // ---------- live updates (SSE) with coalesced DOM work ----------
  const pending = new Map();
  let frame = 0;
  function onTwin(t) {
    if (!t || !t.path) return;
    twins.set(t.path, t);
    pending.set(t.path, t);
    if (!frame) frame = requestAnimationFrame(flush);
  }
  function flush() {
    frame = 0;
    const batch = Array.from(pending.values());
    pending.clear();
    for (const t of batch) {
      const n = nodes.get(t.path);
      if (n) fillRow(n, t, true);
      listeners.forEach((fn) => fn(t));
    }
  }

  const live = { es: null, key: "", backoff: 1000, timer: 0, scopeTimer: 0 };
  // What the page shows: children of expanded tree nodes, plus what the view asks for.
  // The server takes at most MAX_PATHS twins per stream: the view's first, then tree rows.
  const MAX_PATHS = 1000;
  function liveScope() {
    const paths = new Set();
    if (view && view.live) (view.live().paths || []).forEach((p) => paths.add(p));
    nodes.forEach((n, p) => { if (n.li.isConnected && paths.size < MAX_PATHS) paths.add(p); });
    return { paths: Array.from(paths).slice(0, MAX_PATHS).sort() };
  }
  function rescope() {
    clearTimeout(live.scopeTimer);
    live.scopeTimer = setTimeout(connectLive, 150);
  }
  function setLiveStatus(state, text) {
    const el = document.getElementById("live-status");
    el.dataset.state = state;
    setText(el, text);
  }
  function connectLive() {
    const s = liveScope();
    const q = new URLSearchParams();
    if (s.paths.length) q.set("paths", s.paths.join(","));
    q.set("events", "true");
    const key = q.toString();
    if (live.es && key === live.key && live.es.readyState !== EventSource.CLOSED) return;
    if (live.es) live.es.close();
    clearTimeout(live.timer);
    live.key = key;
    setLiveStatus("connecting", "connecting");
    const es = new EventSource(API + "/live?" + key);
    live.es = es;
    const parse = (fn) => (m) => { try { fn(JSON.parse(m.data)); } catch (e) { console.warn("live message", e); } };
    es.addEventListener("open", () => { live.backoff = 1000; setLiveStatus("open", "live"); });
    es.addEventListener("snapshot", parse((m) => (m.twins || []).forEach(onTwin)));
    es.addEventListener("twin", parse(onTwin));
    es.addEventListener("event", parse((e) => eventListeners.forEach((fn) => fn(e))));
    es.addEventListener("resync", () => resync());
    es.addEventListener("model", parse(onModel));
    es.addEventListener("error", () => {
      // Our own reconnect with backoff: a fresh stream starts with a snapshot (the resync).
      es.close();
      if (live.es !== es) return;
      setLiveStatus("error", "reconnecting in " + Math.round(live.backoff / 1000) + " s");
      live.timer = setTimeout(() => { live.key = ""; connectLive(); resync(); }, live.backoff);
      live.backoff = Math.min(live.backoff * 2, 30000);
    });
  }
  // A live apply changed the plant at m.path: a removed subtree leaves the tree, and the
  // nearest loaded ancestor re-reads its children (added and changed ones show at once).
  function onModel(m) {
    if (m.op === "removed") {
      for (const p of Array.from(nodes.keys())) {
        if (p === m.path || p.startsWith(m.path + "/")) { nodes.get(p).li.remove(); nodes.delete(p); twins.delete(p); }
      }
    }
    let p = m.op === "changed" ? m.path : parentOf(m.path);
    while (p && !(nodes.get(p) && nodes.get(p).loaded)) p = parentOf(p);
    const n = p && nodes.get(p);
    if (n && n.expanded) loadChildren(n).then(rescope).catch((e) => toast(e.message));
    const here = view && view.path;
    if (here && (here === m.path || here.startsWith(m.path + "/")) && m.op === "removed") {
      toast("plant version " + m.version + ": " + m.path + " was removed");
    }
  }
  // After a gap (lag or reconnect): the views re-read what they list (alarms, events).
  function resync() { if (view && view.resync) view.resync(); refreshAlarmsSoon(); }

  // ---------- tree ----------
  const treeEl = document.getElementById("tree");

  function makeNode(t) {
    const hasKids = t.level !== "sensor";
    const tog = h("button", { class: "tog" + (hasKids ? "" : " leaf"), "data-testid": "toggle", "aria-label": "expand", tabindex: -1 }, hasKids ? "▶" : "");
    const name = h("a", { class: "name", href: assetHref(t.path), "data-testid": "name" });
    const row = h("div", { class: "row", role: "treeitem" }, tog, h("span", { class: "lvl" }, LVL_SHORT[t.level] || t.level), name);
    const li = h("li", { class: "node", "data-path": t.path, "data-level": t.level }, row);
    const n = { li, row, tog, name, ul: null, expanded: false, loaded: false, level: t.level, path: t.path, rest: null };
    nodes.set(t.path, n);
    tog.addEventListener("click", (e) => { e.stopPropagation(); toggle(n); });
    row.addEventListener("click", (e) => {
      if (e.ctrlKey || e.metaKey || e.button === 1) return;
      e.preventDefault();
      navigate(assetHref(t.path));
    });
    row.addEventListener("dblclick", (e) => { e.preventDefault(); toggle(n); });
    fillRow(n, t, false);
    return n;
  }
  // Writes a twin's marks into its tree row (rebuilding only the small marks box).
  function fillRow(n, t, isUpdate) {
    setText(n.name, t.name || lastSeg(t.path));
    n.name.title = t.path;
    if (n.rest) n.rest.forEach((el) => el.remove());
    const rest = [];
    if (t.sensor) {
      const v = h("span", { class: "val", "data-testid": "value" }, valueText(t));
      rest.push(v);
      if (t.sensor.unit) rest.push(h("span", { class: "unit", "data-testid": "unit", title: t.sensor.unit }, t.sensor.unit));
      if (isUpdate) v.classList.add("flash");
    }
    const meta = h("span", { class: "meta" });
    if (t.sensor) append(meta, qualityMark(t.sensor.quality, false));
    else if (t.rollup && (t.rollup.worst_quality === "bad" || t.rollup.worst_quality === "uncertain"))
      meta.appendChild(h("span", { class: "q q-" + t.rollup.worst_quality, title: "worst quality below: " + t.rollup.worst_quality }, t.rollup.worst_quality === "bad" ? "BAD" : "UNC"));
    if (t.machine) {
      append(meta, machineChip(t.machine));
      if (t.machine.oee) meta.appendChild(h("span", { class: "kpi", title: "OEE" }, "OEE ", h("b", null, fmtPct(t.machine.oee.oee).replace(" ", ""))));
    } else if (t.rollup && t.rollup.mean_oee != null && t.level !== "enterprise") {
      meta.appendChild(h("span", { class: "kpi", title: "mean OEE of the machines below" }, "OEE ", h("b", null, fmtPct(t.rollup.mean_oee).replace(" ", ""))));
    }
    const hl = healthOf(t);
    if (hl.health != null) meta.appendChild(h("span", { class: "kpi " + healthClass(hl.health), title: "health" + (hl.rul != null ? ", RUL " + fmtNum(hl.rul) + " h" : "") }, "H ", h("b", null, fmtNum(hl.health))));
    else if (t.rollup && typeof t.rollup.worst_health === "number" && !t.machine)
      meta.appendChild(h("span", { class: "kpi " + healthClass(t.rollup.worst_health), title: "worst machine health below" }, "H ", h("b", null, fmtNum(t.rollup.worst_health))));
    if (hl.anomalous) meta.appendChild(h("span", { class: "q q-uncertain", title: "anomaly (score " + fmtNum(hl.anomaly) + ")" }, "ANOM"));
    else if (t.rollup && t.rollup.anomalies > 0 && !t.machine)
      meta.appendChild(h("span", { class: "q q-uncertain", title: t.rollup.anomalies + " open anomalies below" }, "ANOM " + t.rollup.anomalies));
    append(meta, alarmBadges(t));
    rest.push(meta);
    rest.forEach((el) => n.row.appendChild(el));
    n.rest = rest;
  }
  async function loadChildren(n) {
    const list = await browse(n.path, 1);
    n.ul = n.ul || h("ul", { role: "group" });
    clear(n.ul);
    for (const t of list) {
      if (t.path === n.path) { onTwin(t); continue; }
      twins.set(t.path, t);
      const old = nodes.get(t.path);
      const c = old && old.expanded ? old : makeNode(t);
      n.ul.appendChild(c.li);
    }
    if (!n.ul.isConnected) n.li.appendChild(n.ul);
    n.loaded = true;
  }
  async function expand(n) {
    if (n.level === "sensor") return;
    if (!n.loaded) await loadChildren(n);
    n.expanded = true;
    n.ul.hidden = false;
    n.tog.textContent = "▼";
    n.tog.setAttribute("aria-label", "collapse");
    n.row.setAttribute("aria-expanded", "true");
    rescope();
  }
  function collapse(n) {
    n.expanded = false;
    if (n.ul) n.ul.hidden = true;
    n.tog.textContent = "▶";
    n.tog.setAttribute("aria-label", "expand");
    n.row.setAttribute("aria-expanded", "false");
    // Children out of sight leave the live scope (they stay cached for a quick re-open).
    if (n.ul) n.ul.remove(); n.loaded = false;
    rescope();
  }
  function toggle(n) { if (n.expanded) collapse(n); else expand(n).catch((e) => toast(e.message)); }

  async function initTree() {
    const list = await browse("", 1);
    if (!list.length) { treeEl.appendChild(h("li", { class: "empty" }, "empty plant")); return; }
    const root = list[0];
    rootPath = root.path;
    const n = makeNode(root);
    treeEl.appendChild(n.li);
    n.ul = h("ul", { role: "group" });
    for (const t of list.slice(1)) { twins.set(t.path, t); n.ul.appendChild(makeNode(t).li); }
    n.li.appendChild(n.ul);
    n.loaded = true; n.expanded = true; n.tog.textContent = "▼";
    twins.set(root.path, root);
  }
  // Opens the tree down to `path` (each ancestor's children loaded once) and marks it.
  async function reveal(path) {
    for (const a of ancestors(path)) {
      const n = nodes.get(a);
      if (!n) break;
      if (!n.expanded) await expand(n);
    }
    markSelected(path);
  }
  function markSelected(path) {
    const old = nodes.get(selected);
    if (old) old.li.classList.remove("sel");
    selected = path;
    const n = nodes.get(path);
    if (n) {
      n.li.classList.add("sel");
      const r = n.row.getBoundingClientRect();
      const pane = document.getElementById("tree-pane").getBoundingClientRect();
      if (r.top < pane.top || r.bottom > pane.bottom) n.row.scrollIntoView({ block: "center" });
    }
  }

  // ---------- search ----------
  function initSearch() {
    const input = document.getElementById("search");
    const box = document.getElementById("search-results");
    let timer = 0, seq = 0, hits = [], on = -1;
    const close = () => { box.hidden = true; on = -1; };
    const go = (p) => { close(); input.value = ""; navigate(assetHref(p)); };
    const paint = () => {
      clear(box);
      hits.forEach((hit, i) => box.appendChild(h("li", { class: i === on ? "on" : "", "data-path": hit.path, onmousedown: (e) => { e.preventDefault(); go(hit.path); } },
        h("b", null, hit.name), h("span", { class: "muted" }, parentOf(hit.path)), h("span", { class: "lvl" }, LVL_SHORT[hit.level] || hit.level))));
      if (!hits.length) box.appendChild(h("li", { class: "muted" }, "no asset matches"));
      box.hidden = false;
    };
    input.addEventListener("input", () => {
      clearTimeout(timer);
      const q = input.value.trim();
      if (!q) { close(); return; }
      timer = setTimeout(async () => {
        const my = ++seq;
        try {
          const r = await api("/search", { q, limit: 20 });
          if (my !== seq) return;
          hits = r.hits; on = hits.length ? 0 : -1; paint();
        } catch (e) { hits = []; clear(box); box.appendChild(h("li", { class: "muted" }, e.message)); box.hidden = false; }
      }, 150);
    });
    input.addEventListener("keydown", (e) => {
      if (box.hidden) return;
      if (e.key === "ArrowDown") { on = Math.min(on + 1, hits.length - 1); paint(); e.preventDefault(); }
      else if (e.key === "ArrowUp") { on = Math.max(on - 1, 0); paint(); e.preventDefault(); }
      else if (e.key === "Enter" && hits[on]) { go(hits[on].path); e.preventDefault(); }
      else if (e.key === "Escape") close();
    });
    input.addEventListener("blur", () => setTimeout(close, 100));
  }

  // ---------- views ----------
  const viewEl = document.getElementById("view");

  function navigate(href) {
    if (href !== location.pathname + location.search) history.pushState(null, "", href);
    render();
  }
  window.addEventListener("popstate", render);
  document.addEventListener("click", (e) => {
    // In-page links (tree names, breadcrumbs, tables) switch views without a reload.
    const a = e.target.closest && e.target.closest("a[href^='/']");
    if (!a || e.defaultPrevented || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0 || a.target) return;
    if (a.getAttribute("href").startsWith("/api/") || a.getAttribute("href").startsWith("/static/")) return;
    e.preventDefault();
    navigate(a.getAttribute("href"));
  });

  let renderSeq = 0;
  async function render() {
    const r = route();
    const my = ++renderSeq;
    if (view && view.dispose) view.dispose();
    listeners.clear(); eventListeners.clear();
    view = { name: r.name, path: r.path };
    document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("on", a.dataset.view === r.name));
    const scoped = r.path ? "?path=" + encodeURIComponent(r.path) : "";
    document.getElementById("nav-alarms").setAttribute("href", "/alarms" + scoped);
    document.getElementById("nav-overview").setAttribute("href", "/overview" + scoped);
    document.getElementById("nav-tree").setAttribute("href", r.path ? assetHref(r.path) : "/");
    clear(viewEl);
    const path = r.path || rootPath;
    try {
      if (path) await reveal(path);
      if (my !== renderSeq) return;
      if (r.name === "alarms") await alarmsView(path, my);
      else if (r.name === "overview") await overviewView(path, my);
      else await assetView(path, my);
    } catch (e) {
      if (my !== renderSeq) return;
      clear(viewEl);
      const box = h("div", { class: "err", "data-testid": "error" }, e.message);
      if (e.body && e.body.nearest_parent) append(box, [" — nearest existing parent: ", h("a", { href: assetHref(e.body.nearest_parent) }, e.body.nearest_parent)]);
      viewEl.appendChild(box);
    }
    rescope();
  }

  function crumbs(path) {
    const box = h("div", { class: "crumbs" });
    ancestors(path).forEach((a) => append(box, [h("a", { href: assetHref(a) }, lastSeg(a)), h("span", { class: "sep" }, "/")]));
    return box;
  }
  function card(title, ...body) { return h("div", { class: "card" }, title ? h("h2", null, title) : null, ...body); }
  function props(pairs) {
    const dl = h("dl", { class: "props" });
    for (const [k, v, attrs] of pairs) { if (v == null) continue; dl.appendChild(h("dt", null, k)); dl.appendChild(h("dd", attrs || null, v)); }
    return dl;
  }

  // ----- twin page -----
  async function assetView(path, my) {
    const t = await api("/twins/" + path);
    if (my !== renderSeq) return;
    onTwin(t);
    document.title = (t.name || lastSeg(t.path)) + " · ferrotwin";
    const head = h("div", null, crumbs(t.path),
      h("h1", { "data-testid": "twin-name" }, t.name || lastSeg(t.path), h("span", { class: "lvl" }, t.level), machineChip(t.machine)),
      h("div", { class: "sub" }, t.type ? "type " + t.type + " · " : "", "updated ", h("span", { "data-testid": "updated" }, fmtTime(t.updated_us)), t.restarts ? " · restarted " + t.restarts + "×" : "",
        t.mirror_age_ms != null ? " · mirror age " + fmtNum(t.mirror_age_ms / 1000) + " s" : ""));
    viewEl.appendChild(head);
    const live = { paths: [t.path] };
    view.live = () => live;
    if (t.level === "sensor") sensorPage(t);
    else await containerPage(t, live, my);
    if (my !== renderSeq) return;
    const rc = t.level === "sensor" ? null : rulesCard(t.path, t.level);
    if (rc) viewEl.appendChild(rc.el);
    const evCard = eventsCard(t.path);
    viewEl.appendChild(evCard.el);
    view.resync = () => { evCard.reload(); if (rc) rc.reload(); if (view.reloadAlarms) view.reloadAlarms(); };
  }

  function sensorPage(t) {
    const s = t.sensor;
    const valEl = h("span", { "data-testid": "twin-value" });
    const unitEl = h("span", { class: "unit", "data-testid": "twin-unit" });
    const qEl = h("span");
    const propsBox = h("div");
    const valueCard = card("Value", h("div", { class: "big" }, valEl, unitEl), propsBox);
    valueCard.style.minWidth = "320px";
    const alarmsBox = h("div");
    const alarmsCard = card("Alarms", alarmsBox);
    alarmsCard.style.flex = "1";
    viewEl.appendChild(h("div", { class: "cards" }, valueCard, alarmsCard));
    const chart = trendCard(t);
    viewEl.appendChild(chart.el);
    const paint = (t) => {
      const s = t.sensor;
      setText(valEl, valueText(t));
      setText(unitEl, s.unit || "");
      clear(qEl); append(qEl, qualityMark(s.quality, true));
      clear(propsBox).appendChild(props([
        ["quality", qEl],
        ["source time", fmtTime(s.source_ts_us) + " (" + fmtAge(s.source_ts_us) + ")", { "data-testid": "source-time" }],
        ["server time", fmtTime(s.server_ts_us)],
        ["kind", s.kind || null],
        s.stats && s.stats.count ? ["stats", "n " + s.stats.count + " · mean " + fmtNum(s.stats.mean) + " · σ " + fmtNum(s.stats.stddev) + " · min " + fmtNum(s.stats.min) + " · max " + fmtNum(s.stats.max)] : [],
        s.rejected ? ["rejected", String(s.rejected)] : [],
        typeof s.anomaly_score === "number" ? ["anomaly score", fmtNum(s.anomaly_score) + (s.anomalous ? " · ANOMALY" : ""), { "data-testid": "anomaly" }] : [],
      ]));
      // Rebuilt only when an alarm changed: a button replaced under the pointer loses the click.
      const sig = JSON.stringify(s.alarms);
      if (sig !== alarmsSig) { alarmsSig = sig; paintAlarms(t); }
      chart.onTwin(t);
    };
    let alarmsSig = "";
    const paintAlarms = (t) => {
      const s = t.sensor;
      clear(alarmsBox);
      if (!s.alarms.length) alarmsBox.appendChild(h("div", { class: "empty" }, "no alarm limits on this sensor"));
      else {
        const tb = h("tbody");
        for (const a of s.alarms) {
          const active = ACTIVE.has(a.state);
          tb.appendChild(h("tr", { "data-testid": "alarm-row", "data-alarm": a.name, "data-state": a.state },
            h("td", null, active ? sevBadge(a.severity, 1, a.state === "active_acked") : h("span", { class: "muted" }, a.severity)),
            h("td", null, a.name),
            h("td", null, a.kind + " " + fmtNum(a.limit) + (a.deadband ? " ±" + fmtNum(a.deadband) : "")),
            h("td", null, h("div", { "data-testid": "alarm-state" }, stateLabel(a.state)),
              active && a.since_us ? h("div", { class: "muted" }, "since " + fmtTime(a.since_us) + (a.shelved_until_us ? " · shelved" : "")) : null),
            h("td", null, a.state === "active_unacked" || a.state === "returned_unacked"
              ? h("button", { class: "btn ack", "data-testid": "ack", "data-path": t.path, "data-alarm": a.name, onclick: (e) => ackAlarm(t.path, a.name, e.currentTarget) }, "Acknowledge") : "")));
        }
        alarmsBox.appendChild(h("table", null, h("thead", null, h("tr", null, ["sev", "alarm", "limit", "state", ""].map((x) => h("th", null, x)))), tb));
      }
    };
    paint(t);
    let ageTimer = setInterval(() => { const c = twins.get(t.path); if (c) paint(c); }, 5000);
    listeners.add((u) => { if (u.path === t.path) paint(u); });
    view.dispose = () => { clearInterval(ageTimer); chart.dispose(); };
  }

  async function containerPage(t, live, my) {
    const top = h("div", { class: "cards" });
    viewEl.appendChild(top);
    const machineBox = h("div");
    const rollBox = h("div");
    const healthBox = h("div");
    if (t.machine) { const c = card("Machine", machineBox); top.appendChild(c); }
    const hc = card("Health", healthBox); hc.hidden = true; top.appendChild(hc);
    if (t.rollup) top.appendChild(card("Below", rollBox));

    const kidsBody = h("tbody");
    const kidsCard = card(t.level === "machine" ? "Sensors" : "Children", h("table", { "data-testid": "children" },
      h("thead", null, h("tr", null, ["name", "value", "quality", "state / OEE", "alarms"].map((x) => h("th", null, x)))), kidsBody));
    viewEl.appendChild(kidsCard);
    const alarmsBox = h("div");
    viewEl.appendChild(card("Active alarms below", alarmsBox));

    const rows = new Map();
    const paintKid = (k) => {
      const tr = rows.get(k.path);
      if (!tr) return;
      clear(tr);
      const val = k.sensor ? [h("b", { "data-testid": "value" }, valueText(k)), " ", h("span", { class: "muted" }, k.sensor.unit || "")]
        : k.rollup ? h("span", { class: "muted" }, k.rollup.machines + " machines · " + k.rollup.sensors + " sensors") : "";
      const q = k.sensor ? qualityMark(k.sensor.quality, true) : k.rollup && k.rollup.worst_quality !== "good" && k.rollup.worst_quality !== "unspecified" ? h("span", { class: "q q-" + k.rollup.worst_quality }, "worst " + k.rollup.worst_quality) : "";
      const st = k.machine ? [machineChip(k.machine), k.machine.oee ? " OEE " + fmtPct(k.machine.oee.oee) : ""]
        : k.rollup && k.rollup.mean_oee != null ? "OEE " + fmtPct(k.rollup.mean_oee) : "";
      append(tr, [h("td", null, h("a", { href: assetHref(k.path) }, k.name || lastSeg(k.path))), h("td", { class: "num" }, val), h("td", null, q), h("td", null, st), h("td", null, alarmBadges(k))]);
    };
    const paintSelf = (t) => {
      if (t.machine) {
        const m = t.machine; const o = m.oee;
        clear(machineBox).appendChild(props([
          ["state", h("span", null, machineChip(m), m.state_since_us ? " since " + fmtTime(m.state_since_us) : "")],
          ["parts", m.good_count + " good · " + m.scrap_count + " scrap"],
          ["ideal cycle", fmtNum(m.ideal_cycle_ms) + " ms"],
        ]));
        if (o) machineBox.appendChild(h("div", { class: "oee", "data-testid": "oee", style: "margin-top:8px" },
          h("div", { class: "term" }, h("b", null, fmtPct(o.availability)), h("small", null, "availability")), h("span", { class: "op" }, "×"),
          h("div", { class: "term" }, h("b", null, fmtPct(o.performance)), h("small", null, "performance")), h("span", { class: "op" }, "×"),
          h("div", { class: "term" }, h("b", null, fmtPct(o.quality)), h("small", null, "quality")), h("span", { class: "op" }, "="),
          h("div", { class: "term" }, h("b", null, fmtPct(o.oee)), h("small", null, "OEE"))));
      }
      const hl = healthOf(t);
      hc.hidden = !hl.any;
      if (hl.any) {
        clear(healthBox).appendChild(props([
          ["health", hl.health != null ? h("b", { class: "kpi " + healthClass(hl.health) }, fmtNum(hl.health)) : null, { "data-testid": "health" }],
          ["RUL", hl.rul != null ? fmtNum(hl.rul) + " h" + (hl.rulLow != null && hl.rulHigh != null ? " (" + fmtNum(hl.rulLow) + "–" + fmtNum(hl.rulHigh) + " h)" : "") : null, { "data-testid": "rul" }],
          ["anomaly score", hl.anomaly != null ? fmtNum(hl.anomaly) + (hl.anomalous ? " · ANOMALY" : "") : null],
          ["model score", hl.model != null ? fmtNum(hl.model) : null],
        ]));
      }
      if (t.rollup) {
        const r = t.rollup;
        const counts = h("span", { class: "badges" });
        [4, 3, 2, 1, 0].forEach((i) => { if (r.alarms_by_severity[i]) counts.appendChild(sevBadge(SEVERITIES[4 - i], r.alarms_by_severity[i], false)); });
        clear(rollBox).appendChild(props([
          ["machines", r.running + " running of " + r.machines],
          ["sensors", String(r.sensors)],
          ["throughput", fmtNum(r.throughput_per_h) + " parts/h"],
          ["mean OEE", r.mean_oee != null ? fmtPct(r.mean_oee) : null],
          ["worst health", worstHealthOf(t) != null ? fmtNum(worstHealthOf(t)) : null],
          ["worst quality", h("span", { class: "q q-" + r.worst_quality }, r.worst_quality)],
          ["alarms", h("span", null, r.active_alarms + " active, " + r.unacked_alarms + " unacked ", counts)],
        ]));
      }
    };
    paintSelf(t);
    const kids = (await browse(t.path, 1)).filter((k) => k.path !== t.path);
    if (my !== renderSeq) return;
    for (const k of kids) {
      twins.set(k.path, k);
      const tr = h("tr", { class: "clk", "data-path": k.path, onclick: (e) => { if (!e.target.closest("a")) navigate(assetHref(k.path)); } });
      rows.set(k.path, tr);
      kidsBody.appendChild(tr);
      paintKid(k);
      live.paths.push(k.path);
    }
    if (!kids.length) kidsBody.appendChild(h("tr", null, h("td", { class: "empty", colspan: 5 }, "nothing below")));
    listeners.add((u) => {
      if (u.path === t.path) paintSelf(u);
      else if (rows.has(u.path)) paintKid(u);
    });
    const al = alarmList(t.path, alarmsBox, { compact: true });
    view.reloadAlarms = al.reload;
    await al.reload();
    eventListeners.add((e) => { if (e.kind === "alarm") al.reloadSoon(); });
  }

  // The newest `keep` events matching `params`, newest first. Events come oldest first:
  // page through to the newest (a bounded number of pages).
  async function newestEvents(params, keep) {
    let after = 0, evs = [];
    for (let i = 0; i < 20; i++) {
      const page = await api("/events", Object.assign({}, params, { after_seq: after || null, limit: 10000 }));
      evs = evs.concat(page.events).slice(-keep);
      after = page.next_after_seq;
      if (!after) break;
    }
    return evs.reverse();
  }

  // A live row on top of a table of at most `keep` rows (its "empty" row goes).
  function prependRow(body, tr, keep) {
    const empty = body.querySelector(".empty"); if (empty) empty.parentNode.remove();
    body.insertBefore(tr, body.firstChild);
    while (body.childNodes.length > keep) body.lastChild.remove();
  }

  // Local action rules of the machines at and below `path`, and their recent firings (the
  // `action` events). Hidden above a machine when nothing below has a rule.
  function rulesCard(path, level) {
    const body = h("tbody");
    const actions = h("tbody");
    const el = card("Rules", h("table", { "data-testid": "rules" },
      h("thead", null, h("tr", null, (level === "machine" ? [] : ["machine"]).concat(["rule", "mode", "state", "when → then", "firings", "last firing"]).map((x) => h("th", null, x)))), body),
      h("h2", { style: "margin-top:12px" }, "Recent actions"),
      h("table", { "data-testid": "actions" }, actions));
    el.hidden = level !== "machine";
    const actionRow = (e) => h("tr", { "data-seq": e.seq },
      h("td", null, fmtTime(e.ts_us)),
      h("td", null, e.severity && e.severity !== "unspecified" ? h("span", { class: "sev sev-" + e.severity }, SEV_SHORT[e.severity] || e.severity) : ""),
      h("td", null, e.path === path ? "" : h("a", { href: assetHref(e.path) }, e.path.slice(path.length + 1))),
      h("td", { class: "msg" }, e.message));
    let seen = 0;
    let timer = null;
    const reload = async () => {
      try {
        const r = await api("/rules", { path, limit: 1000 });
        clear(body);
        el.hidden = level !== "machine" && !r.rules.length;
        if (!r.rules.length) body.appendChild(h("tr", null, h("td", { class: "empty", colspan: 7 }, "no rules on this machine")));
        for (const x of r.rules) {
          const cells = level === "machine" ? [] : [h("td", null, h("a", { href: assetHref(x.path) }, x.path.slice(path.length + 1)))];
          body.appendChild(h("tr", { "data-testid": "rule-row", "data-rule": x.name, "data-mode": x.mode, "data-phase": x.phase },
            ...cells,
            h("td", null, h("b", null, x.name)),
            h("td", { "data-testid": "rule-mode" }, x.mode),
            h("td", { "data-testid": "rule-phase" }, x.failed ? h("span", { class: "sev sev-high" }, "FAILED") : null, " ", x.phase),
            h("td", { class: "msg" }, x.when + " → " + x.then, h("div", { class: "muted" }, "re-arm: " + x.rearm)),
            h("td", { class: "num" }, String(x.firings) + (x.limited ? " (" + x.limited + " held back)" : "")),
            h("td", { class: "msg" }, x.last_fired_us ? [fmtTime(x.last_fired_us), h("div", { class: "muted" }, x.last_result)] : h("span", { class: "muted" }, "never"))));
        }
        if (r.truncated) body.appendChild(h("tr", null, h("td", { class: "muted", colspan: 7 }, "more rules than shown")));
        if (el.hidden) return;
        const evs = await newestEvents({ path, kind: "action" }, 20);
        clear(actions);
        evs.forEach((e) => actions.appendChild(actionRow(e)));
        seen = evs.length ? evs[0].seq : 0;
        if (!evs.length) actions.appendChild(h("tr", null, h("td", { class: "empty" }, "no actions yet")));
      } catch (e) { clear(body).appendChild(h("tr", null, h("td", { class: "err" }, e.message))); }
    };
    eventListeners.add((e) => {
      if (!(e.path === path || e.path.startsWith(path + "/"))) return;
      // A firing or a mode switch changes a rule's state; so does its alarm.
      if (e.kind === "action" || (e.kind === "alarm" && e.alarm && e.alarm.startsWith("rule:"))) {
        if (e.kind === "action" && e.seq > seen && !el.hidden) {
          seen = e.seq;
          prependRow(actions, actionRow(e), 20);
        }
        clearTimeout(timer);
        timer = setTimeout(reload, 300);
      }
    });
    reload();
    return { el, reload };
  }

  function eventsCard(path) {
    const body = h("tbody");
    const el = card("Recent events", h("table", { "data-testid": "events" }, body));
    let lastSeq = 0;
    const row = (e) => h("tr", { "data-seq": e.seq },
      h("td", null, fmtTime(e.ts_us)),
      h("td", null, e.severity && e.severity !== "unspecified" ? h("span", { class: "sev sev-" + e.severity }, SEV_SHORT[e.severity] || e.severity) : ""),
      h("td", null, h("span", { class: "ev-kind" }, e.kind)),
      h("td", null, e.path === path ? "" : h("a", { href: assetHref(e.path) }, e.path.slice(path.length + 1))),
      h("td", { class: "msg" }, (e.alarm ? e.alarm + ": " : "") + e.message));
    const reload = async () => {
      try {
        const evs = await newestEvents({ path }, 50);
        clear(body);
        evs.forEach((e) => body.appendChild(row(e)));
        lastSeq = evs.length ? evs[0].seq : 0;
        if (!evs.length) body.appendChild(h("tr", null, h("td", { class: "empty" }, "no events")));
      } catch (e) { clear(body).appendChild(h("tr", null, h("td", { class: "err" }, e.message))); }
    };
    eventListeners.add((e) => {
      if (!(e.path === path || e.path.startsWith(path + "/")) || e.seq <= lastSeq) return;
      lastSeq = e.seq;
      prependRow(body, row(e), 50);
    });
    reload();
    return { el, reload };
  }

  // ----- trend chart (own canvas chart: mean line, min/max band when downsampled) -----
  function trendCard(t) {
    const canvas = h("canvas", { "data-testid": "trend-canvas", "data-points": "0" });
    const tip = h("div", { class: "tip", hidden: true });
    const wrap = h("div", { class: "chart-wrap" }, canvas, tip);
    const note = h("div", { class: "chart-note", "data-testid": "chart-note" });
    const from = h("input", { type: "datetime-local", "data-testid": "range-from", step: 1 });
    const to = h("input", { type: "datetime-local", "data-testid": "range-to", step: 1 });
    const state = { range: "15m", points: [], from: 0, to: 0, downsampled: false, seq: 0, limits: [] };
    const buttons = {};
    const pick = (r) => { state.range = r; Object.entries(buttons).forEach(([k, b]) => b.classList.toggle("on", k === r)); load(); };
    const ranges = h("span", { class: "ranges" },
      ["15m", "1h", "24h"].map((r) => (buttons[r] = h("button", { class: "btn" + (r === state.range ? " on" : ""), "data-range": r, onclick: () => pick(r) }, r.replace("m", " min").replace("h", " h")))),
      from, "–", to, (buttons.custom = h("button", { class: "btn", "data-range": "custom", onclick: () => pick("custom") }, "custom")));
    const toLocalInput = (ms) => { const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60000); return d.toISOString().slice(0, 19); };
    to.value = toLocalInput(Date.now()); from.value = toLocalInput(Date.now() - 3600e3);
    const el = h("div", { class: "card" }, h("h2", null, "Trend", ranges), wrap, note);

    async function load() {
      const my = ++state.seq;
      const width = Math.max(200, Math.round(canvas.clientWidth || 800));
      const params = { path: t.path, max_points: width };
      if (state.range === "custom") {
        const f = Date.parse(from.value), u = Date.parse(to.value);
        if (!(f < u)) { setText(note, "custom range: 'from' must be before 'to'"); return; }
        params.from = Math.round(f * 1000); params.to = Math.round(u * 1000);
      } else params.range = state.range;
      try {
        const r = await api("/history", params);
        if (my !== state.seq) return;
        state.points = r.points; state.downsampled = r.downsampled;
        state.from = r.from_us || (state.range in RANGES ? Date.now() * 1000 - RANGES[state.range] : params.from);
        state.to = r.to_us || Date.now() * 1000;
        setText(note, r.points.length + " points" + (r.downsampled ? " (downsampled from " + r.raw_points + " readings; band = min/max per bucket)" : "") + " · " + fmtTime(state.from) + " – " + fmtTime(state.to));
        draw();
      } catch (e) { if (my === state.seq) setText(note, "history: " + e.message); }
    }
    function draw() {
      const dpr = window.devicePixelRatio || 1;
      const W = canvas.clientWidth, H = canvas.clientHeight;
      if (!W || !H) return;
      canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
      const g = canvas.getContext("2d");
      g.setTransform(dpr, 0, 0, dpr, 0, 0);
      g.clearRect(0, 0, W, H);
      const pts = state.points;
      canvas.dataset.points = String(pts.length);
      const L = 56, R = 10, T = 8, B = 22;
      const pw = W - L - R, ph = H - T - B;
      g.font = "11px system-ui, sans-serif";
      g.fillStyle = "#667085";
      if (!pts.length) { g.fillText("no history in this range", L + 10, T + 20); return; }
      let lo = Infinity, hi = -Infinity;
      for (const p of pts) { lo = Math.min(lo, p.min, p.value); hi = Math.max(hi, p.max, p.value); }
      for (const l of state.limits) { if (l > lo - (hi - lo) && l < hi + (hi - lo)) { lo = Math.min(lo, l); hi = Math.max(hi, l); } }
      if (hi === lo) { hi += 1; lo -= 1; }
      const pad = (hi - lo) * 0.06; lo -= pad; hi += pad;
      const x0 = state.from, x1 = Math.max(state.to, x0 + 1);
      const X = (ts) => L + ((ts - x0) / (x1 - x0)) * pw;
      const Y = (v) => T + (1 - (v - lo) / (hi - lo)) * ph;
      // grid + axes labels
      g.strokeStyle = "#e2e6ec"; g.lineWidth = 1;
      g.textAlign = "right"; g.textBaseline = "middle";
      const step = niceStep((hi - lo) / 5);
      for (let v = Math.ceil(lo / step) * step; v <= hi; v += step) {
        const y = Math.round(Y(v)) + 0.5;
        g.beginPath(); g.moveTo(L, y); g.lineTo(W - R, y); g.stroke();
        g.fillText(fmtNum(Math.abs(v) < step / 1e6 ? 0 : v), L - 6, y);
      }
      g.textAlign = "center"; g.textBaseline = "top";
      const spanS = (x1 - x0) / 1e6;
      const tstep = [10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400].find((s) => spanS / s <= 7) || 86400;
      for (let s = Math.ceil(x0 / 1e6 / tstep) * tstep; s * 1e6 <= x1; s += tstep) {
        const x = Math.round(X(s * 1e6)) + 0.5;
        g.beginPath(); g.moveTo(x, T); g.lineTo(x, T + ph); g.stroke();
        const d = new Date(s * 1000);
        g.fillText(tstep < 60 ? d.toLocaleTimeString([], { hour12: false }) : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false }), x, T + ph + 5);
      }
      // alarm limits
      g.save(); g.setLineDash([5, 4]); g.strokeStyle = "#c4320a";
      for (const l of state.limits) { const y = Y(l); if (y >= T && y <= T + ph) { g.beginPath(); g.moveTo(L, y); g.lineTo(W - R, y); g.stroke(); } }
      g.restore();
      g.save(); g.beginPath(); g.rect(L, T, pw, ph); g.clip();
      // min/max band
      if (pts.some((p) => p.max > p.min)) {
        g.fillStyle = "rgba(31,95,191,.16)";
        g.beginPath();
        pts.forEach((p, i) => (i ? g.lineTo(X(p.ts_us), Y(p.max)) : g.moveTo(X(p.ts_us), Y(p.max))));
        for (let i = pts.length - 1; i >= 0; i--) g.lineTo(X(pts[i].ts_us), Y(pts[i].min));
        g.closePath(); g.fill();
      }
      // mean line; points of bad/uncertain quality marked
      g.strokeStyle = "#1f5fbf"; g.lineWidth = 1.5;
      g.beginPath();
      pts.forEach((p, i) => (i ? g.lineTo(X(p.ts_us), Y(p.value)) : g.moveTo(X(p.ts_us), Y(p.value))));
      g.stroke();
      for (const p of pts) if (p.quality === "bad" || p.quality === "uncertain") {
        g.fillStyle = p.quality === "bad" ? "#b42318" : "#a05a00";
        g.fillRect(X(p.ts_us) - 1.5, T + ph - 4, 3, 4);
      }
      g.restore();
      g.strokeStyle = "#c5ccd6"; g.strokeRect(L + 0.5, T + 0.5, pw, ph);
      state.geom = { X, L, pw, x0, x1 };
    }
    function niceStep(raw) {
      const p = Math.pow(10, Math.floor(Math.log10(raw || 1)));
      const f = raw / p;
      return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
    }
    canvas.addEventListener("mousemove", (e) => {
      const gm = state.geom; const pts = state.points;
      if (!gm || !pts.length) return;
      const x = e.offsetX;
      let best = null, bd = Infinity;
      for (const p of pts) { const d = Math.abs(gm.X(p.ts_us) - x); if (d < bd) { bd = d; best = p; } }
      if (!best || bd > 30) { tip.hidden = true; return; }
      tip.textContent = fmtTime(best.ts_us) + "  " + fmtNum(best.value) + (best.count > 1 ? "  [" + fmtNum(best.min) + " … " + fmtNum(best.max) + ", n " + best.count + "]" : "") + (best.quality !== "good" ? "  " + best.quality : "");
      tip.hidden = false;
      tip.style.left = Math.min(x + 12, canvas.clientWidth - tip.offsetWidth - 4) + "px";
      tip.style.top = "6px";
    });
    canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
    // Live: relative ranges slide and take each new value as a point (no refetch).
    let lastTs = 0, redraw = 0, reloadTimer = setInterval(() => { if (state.range !== "custom") load(); }, 60000);
    const onTwin = (u) => {
      const s = u.sensor;
      state.limits = s.alarms.map((a) => a.limit);
      if (state.range === "custom" || !s.has_value || typeof s.value !== "number" || !s.source_ts_us || s.source_ts_us <= lastTs) return;
      lastTs = s.source_ts_us;
      if (!state.points.length && !state.seq) return;
      const q = s.quality ? s.quality.code : "good";
      state.points.push({ ts_us: s.source_ts_us, value: s.value, min: s.value, max: s.value, count: 1, quality: q });
      state.to = Math.max(Date.now() * 1000, s.source_ts_us);
      state.from = state.to - RANGES[state.range];
      while (state.points.length && state.points[0].ts_us < state.from) state.points.shift();
      if (!redraw) redraw = requestAnimationFrame(() => { redraw = 0; draw(); });
    };
    const ro = new ResizeObserver(() => draw());
    ro.observe(wrap);
    state.limits = t.sensor.alarms.map((a) => a.limit);
    requestAnimationFrame(load);
    return { el, onTwin, dispose: () => { ro.disconnect(); clearInterval(reloadTimer); state.seq++; } };
  }

  // ----- alarm lists (summary page and "below" cards) -----
  const alarmRefreshers = new Set();
  function refreshAlarmsSoon() { alarmRefreshers.forEach((f) => f()); }
  function alarmList(path, box, opts) {
    let stateFilter = opts.state || "";
    let timer = 0;
    const reload = async () => {
      try {
        const r = await api("/alarms", { path, state: stateFilter, limit: opts.compact ? 20 : 1000 });
        paint(r);
      } catch (e) { clear(box).appendChild(h("div", { class: "err" }, e.message)); }
    };
    const reloadSoon = () => { clearTimeout(timer); timer = setTimeout(reload, 250); };
    let sig = "";
    const paint = (r) => {
      if (opts.onCounts) opts.onCounts(r.counts, r);
      // Rebuilt only when the list changed (values aside): keeps buttons under the pointer.
      const next = JSON.stringify(r.alarms.map((a) => [a.path, a.name, a.state, a.since_us])) + r.truncated;
      if (next === sig) return;
      sig = next;
      clear(box);
      if (!r.alarms.length) { box.appendChild(h("div", { class: "empty", "data-testid": "no-alarms" }, "no alarms" + (stateFilter && stateFilter !== "all" ? " (" + stateFilter + ")" : ""))); return; }
      const tb = h("tbody");
      for (const a of r.alarms) {
        const rel = a.path.startsWith(path + "/") ? a.path.slice(path.length + 1) : a.path;
        tb.appendChild(h("tr", { "data-testid": "alarm-row", "data-path": a.path, "data-alarm": a.name, "data-state": a.state, title: a.message || null },
          h("td", null, sevBadge(a.severity, 1, a.state === "active_acked")),
          h("td", null, h("a", { href: assetHref(a.path) }, rel)),
          h("td", null, a.name),
          h("td", { "data-testid": "alarm-state" }, stateLabel(a.state)),
          h("td", null, fmtTime(a.since_us)),
          h("td", { class: "num" }, a.value != null ? fmtNum(a.value) : "—", " ", h("span", { class: "muted" }, a.unit || "")),
          h("td", null, a.state === "active_unacked" || a.state === "returned_unacked"
            ? h("button", { class: "btn ack", "data-testid": "ack", "data-path": a.path, "data-alarm": a.name, onclick: (e) => ackAlarm(a.path, a.name, e.currentTarget) }, "Acknowledge") : "")));
      }
      const heads = ["sev", "asset", "alarm", "state", "since", "value", ""];
      box.appendChild(h("table", null, h("thead", null, h("tr", null, heads.map((x) => h("th", null, x)))), tb));
      if (r.truncated) box.appendChild(h("div", { class: "muted" }, "more alarms than listed: ", h("a", { href: "/alarms?path=" + encodeURIComponent(path) }, "open the alarm summary")));
    };
    alarmRefreshers.add(reloadSoon);
    const poll = setInterval(reload, 10000);
    const prev = view.dispose;
    view.dispose = () => { if (prev) prev(); clearInterval(poll); clearTimeout(timer); alarmRefreshers.delete(reloadSoon); };
    return { reload, reloadSoon, setState: (s) => { stateFilter = s; reload(); } };
  }

  async function alarmsView(path, my) {
    document.title = "Alarms · ferrotwin";
    const countsBox = h("span", { class: "badges", "data-testid": "alarm-counts" });
    const sel = h("select", { "data-testid": "state-filter" },
      [["all", "all not normal"], ["active", "active (acked or not)"], ["unacked", "unacknowledged"]].map(([v, l]) => h("option", { value: v }, l)));
    const box = h("div");
    viewEl.appendChild(h("div", null,
      h("h1", null, "Alarms"),
      h("div", { class: "sub" }, "active alarms in ", path && path !== rootPath ? h("a", { href: assetHref(path) }, path) : "the whole plant",
        path && path !== rootPath ? [" · ", h("a", { href: "/alarms" }, "whole plant")] : "", " · most severe first, then newest"),
      h("div", { class: "counts" }, countsBox, h("label", { style: "margin-left:auto" }, "state ", sel)),
      card(null, box)));
    const al = alarmList(path, box, {
      onCounts: (c) => {
        clear(countsBox);
        SEVERITIES.forEach((s) => countsBox.appendChild(h("span", { class: "sev sev-" + s + (c[s] ? "" : " zero"), "data-testid": "count-" + s }, c[s] + " " + SEV_SHORT[s])));
      },
    });
    sel.addEventListener("change", () => al.setState(sel.value));
    view.resync = al.reload;
    // Alarm events of the subtree re-read the list (counts included).
    view.live = () => ({ paths: [] });
    eventListeners.add((e) => { if (e.kind === "alarm" && (!path || e.path.startsWith(path))) al.reloadSoon(); });
    await al.reload();
  }

  // ----- overview: site -> lines -----
  async function overviewView(path, my) {
    document.title = "Overview · ferrotwin";
    const scope = await api("/twins/" + path);
    if (my !== renderSeq) return;
    // Down to lines; machines too where a line's worst health must be computed.
    const depthToLine = { enterprise: 3, site: 2, area: 1, line: 0 }[scope.level];
    if (depthToLine == null) { viewEl.appendChild(h("div", { class: "err" }, "the overview starts at a line or above; " + path + " is a " + scope.level)); return; }
    const all = await browse(path, depthToLine + 1);
    if (my !== renderSeq) return;
    all.forEach((t) => twins.set(t.path, t));
    const sites = scope.level === "enterprise" ? all.filter((t) => t.level === "site") : [scope];
    const cells = new Map(); // path -> repaint
    viewEl.appendChild(h("h1", null, "Overview", h("span", { class: "lvl" }, scope.name || lastSeg(scope.path))));

    const cols = h("div", { class: "site-cols", "data-testid": "overview" });
    viewEl.appendChild(cols);
    const lineHealth = (line) => {
      let worst = worstHealthOf(twins.get(line.path) || line);
      if (worst != null) return worst;
      for (const [p, t] of twins) if (t.level === "machine" && p.startsWith(line.path + "/")) {
        const v = healthOf(t).health; if (v != null) worst = worst == null ? v : Math.min(worst, v);
      }
      return worst;
    };
    const bar = (f) => h("span", { class: "bar " + (f == null ? "" : f < 0.5 ? "crit" : f < 0.7 ? "warn" : "") }, h("i", { style: "width:" + Math.round(Math.max(0, Math.min(1, f || 0)) * 100) + "%" }));
    // Health comes from the inference host when it runs: the column only when a line has one.
    const showHealth = all.some((t) => t.level === "line" && lineHealth(t) != null);
    viewEl.insertBefore(h("div", { class: "sub" }, (scope.level === "enterprise" ? "sites side by side: " : "") + "lines with OEE, throughput" + (showHealth ? ", worst machine health" : "")), cols);
    for (const site of sites) {
      const head = h("div");
      const tb = h("tbody");
      const paintSite = () => {
        const s = twins.get(site.path) || site; const r = s.rollup || {};
        clear(head).appendChild(h("div", { class: "site-head" },
          h("h2", { style: "margin:0" }, h("a", { href: assetHref(s.path) }, s.name || lastSeg(s.path))),
          h("span", { class: "kpi" }, "OEE ", h("b", null, fmtPct(r.mean_oee))),
          h("span", { class: "kpi" }, "throughput ", h("b", null, fmtNum(r.throughput_per_h)), " /h"),
          h("span", { class: "kpi" }, "running ", h("b", null, r.running + "/" + r.machines)),
          s.mirror_age_ms != null ? h("span", { class: "kpi" + (s.mirror_age_ms > 10000 ? " warn" : "") }, "synced ", h("b", null, fmtNum(s.mirror_age_ms / 1000) + " s"), " ago") : null,
          alarmBadges(s)));
      };
      cells.set(site.path, paintSite);
      paintSite();
      const lines = all.filter((t) => t.level === "line" && (t.path === site.path || t.path.startsWith(site.path + "/")));
      for (const line of lines) {
        const tr = h("tr", { class: "clk", "data-path": line.path, onclick: (e) => { if (!e.target.closest("a")) navigate(assetHref(line.path)); } });
        const paintLine = () => {
          const l = twins.get(line.path) || line; const r = l.rollup || {};
          const wh = lineHealth(l);
          clear(tr);
          append(tr, [
            h("td", null, h("a", { href: assetHref(l.path) }, l.path.slice(site.path.length + 1) || l.name)),
            h("td", { class: "num", "data-testid": "line-oee" }, bar(r.mean_oee), " ", fmtPct(r.mean_oee)),
            h("td", { class: "num" }, fmtNum(r.throughput_per_h)),
            h("td", { class: "num" }, r.running + "/" + r.machines),
            showHealth ? h("td", { class: "num" }, wh == null ? h("span", { class: "muted" }, "—") : h("span", { class: "kpi " + healthClass(wh) }, h("b", null, fmtNum(wh)))) : null,
            h("td", null, r.worst_quality && r.worst_quality !== "good" && r.worst_quality !== "unspecified" ? h("span", { class: "q q-" + r.worst_quality, title: "worst quality of the line's sensors" }, r.worst_quality === "bad" ? "BAD" : "UNC") : "", " ", alarmBadges(l)),
          ]);
        };
        cells.set(line.path, paintLine);
        paintLine();
        tb.appendChild(tr);
      }
      if (!lines.length) tb.appendChild(h("tr", null, h("td", { class: "empty", colspan: 7 }, "no lines")));
      cols.appendChild(h("div", { class: "card" }, head, h("table", null,
        h("thead", null, h("tr", null, ["line", "OEE", "parts/h", "running"].concat(showHealth ? ["worst health"] : [], ["alarms"]).map((x) => h("th", null, x)))), tb)));
    }
    listeners.add((u) => {
      const f = cells.get(u.path); if (f) f();
      if (u.level === "machine") { const l = cells.get(parentOf(u.path)); if (l) l(); }
    });
    view.live = () => ({ paths: Array.from(cells.keys()) });
  }

  // ---------- start ----------
  async function start() {
    initSearch();
    try { await initTree(); }
    catch (e) { viewEl.appendChild(h("div", { class: "err" }, "cannot read the plant: " + e.message)); }
    // Alarm count in the nav bar: the root's roll-up (the root row is always in the live scope).
    const navCount = document.getElementById("nav-alarm-count");
    const paintNav = () => { const r = twins.get(rootPath); setText(navCount, r && r.rollup && r.rollup.active_alarms ? String(r.rollup.active_alarms) : ""); };
    paintNav();
    setInterval(paintNav, 1000);
    await render();
  }
  start();
})();
