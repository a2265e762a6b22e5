// condo's live dashboard: one table (a row per service, a column per host) fed by WS /v1/feed.
//
// Invariants:
// - Everything that comes from condo (service names, images, container names, errors, file
//   names) reaches the page as text: nodes are made with createElement and filled with text
//   nodes; the few attributes set are a fixed allow-list (class, title, data-*), never an event
//   handler, a URL or markup. No string is ever parsed as HTML.
// - The API token, when condo wants one, lives in `model.token` only: no cookie, no storage, no
//   URL of the page. It goes out as `Authorization: Bearer` (fetch) and `?token=` (the feed).
// - The feed reconnects by itself with exponential backoff (0.5 s doubling up to 10 s, jittered);
//   the header says "disconnected" meanwhile and the table is dimmed as stale.
// - Each service's deploy history (this host's) comes from the feed's `history` messages, so it
//   is there again after a reload; below it, the transitions this page saw, built here from
//   consecutive views of the same service on the same host: they start when the page opens (a
//   reconnect compares with the last view before the gap).
// - The first snapshot comes from the feed; /v1/state is only read to learn why a websocket was
//   refused (browsers hide the HTTP status of a failed handshake), and /healthz for the header.
"use strict";

(() => {
  const FEED_PATH = "/v1/feed";
  const STATE_PATH = "/v1/state";
  const HEALTH_PATH = "/healthz";
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const HEALTH_EVERY_MS = 5000;
  const TIMELINE_KEEP = 20;
  const TIMELINE_SHOW = 5;
  const HISTORY_SHOW = 5;
  const FAILING = new Set(["TryAgain", "TryAgainNext"]);
  const UNREACHABLE = "unreachable";
  const SAFE_ATTRIBUTE = /^(class|title|data-[a-z-]+)$/;

  const model = {
    local: null, // the last snapshot's state: {host, services}
    global: null, // the last "global" message: {hosts, stale}, or null without Consul
    seen: new Map(), // host -> Map(service -> view): the last view, to spot transitions
    timelines: new Map(), // service -> [{at, host, from, to, why}], oldest first
    history: new Map(), // service -> [DEPLOY], newest first: this host's, from the feed
    token: null, // the API token, in memory only
    filter: [], // lower-case words that must all match a row
  };
  const conn = {ws: null, attempt: 0, timer: null, retryAt: null, state: "connecting"};

  // --- DOM helpers (text only) ----------------------------------------------------------------

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (!SAFE_ATTRIBUTE.test(name)) throw new Error("attribute not allowed: " + name);
      node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function byId(id) {
    return document.getElementById(id);
  }

  function setText(node, text) {
    node.textContent = text;
  }

  // --- time ---------------------------------------------------------------------------------

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  function clock(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  // A span that the ticker keeps up to date: "3m 02s" since `at`, or the time left until it.
  function since(at, suffix) {
    return el("span", {class: "age", "data-since": at, "data-suffix": suffix || ""},
      duration(Date.now() / 1000 - at) + (suffix || ""));
  }

  function until(at) {
    return el("span", {class: "countdown", "data-until": at}, countdownText(at));
  }

  function countdownText(at) {
    const left = at - Date.now() / 1000;
    return left > 0 ? duration(Math.ceil(left)) : "now";
  }

  function tick() {
    const now = Date.now() / 1000;
    for (const node of document.querySelectorAll("[data-since]")) {
      setText(node, duration(now - Number(node.dataset.since)) + node.dataset.suffix);
    }
    for (const node of document.querySelectorAll("[data-until]")) {
      setText(node, countdownText(Number(node.dataset.until)));
    }
    if (conn.state === "disconnected") showConn();
  }

  // --- the model ----------------------------------------------------------------------------

  function handle(message) {
    const at = Date.now();
    if (message.type === "snapshot") {
      model.local = message.state;
      observe(message.state.host, message.state.services || {}, at);
    } else if (message.type === "history") {
      // Each list is the service's whole history: it replaces what the page had.
      for (const [name, deploys] of Object.entries(message.services || {})) {
        if (Array.isArray(deploys)) model.history.set(name, deploys);
      }
    } else if (message.type === "global") {
      model.global = {hosts: message.hosts || {}, stale: Boolean(message.stale)};
      for (const [host, body] of Object.entries(model.global.hosts)) {
        // The local host's column comes from the snapshots, which are fresher than Consul.
        if (host !== localHost()) observe(host, servicesOf(host), at);
      }
    } else {
      return; // a message type this page does not know: newer condo, older page
    }
    render();
  }

  function localHost() {
    return model.local ? model.local.host : null;
  }

  function hosts() {
    const local = localHost();
    const others = model.global
      ? Object.keys(model.global.hosts).filter((h) => h !== local).sort()
      : [];
    return local === null ? others : [local, ...others];
  }

  function servicesOf(host) {
    if (host === localHost()) return model.local.services || {};
    const body = model.global && model.global.hosts[host];
    if (body && body.live === false) return unreachableViews(body);
    return (body && body.services) || {};
  }

  // A host whose Consul session lapsed (cut off, its condo or agent dead) still runs what its
  // record says: shown as "unreachable", with what it last ran and when it was last seen.
  function unreachableViews(body) {
    const views = {};
    for (const [name, said] of Object.entries(body.runs || {})) {
      views[name] = {state: UNREACHABLE, current: null, image: said.image, last_state: said.state,
        last_seen: body.last_seen};
    }
    return views;
  }

  function unreachable(host) {
    const body = model.global && model.global.hosts[host];
    return Boolean(body && body.live === false && host !== localHost());
  }

  function serviceNames() {
    const names = new Set();
    for (const host of hosts()) for (const name of Object.keys(servicesOf(host))) names.add(name);
    return [...names].sort();
  }

  // Compare the new views of `host` with the last ones; record what changed, and why.
  function observe(host, services, at) {
    const before = model.seen.get(host);
    const after = new Map(Object.entries(services));
    model.seen.set(host, after);
    if (before === undefined) return; // the first view of a host: nothing to compare with
    for (const [name, view] of after) {
      const previous = before.get(name);
      if (previous === undefined) {
        record(name, {at, host, from: null, to: view.state, why: "spec added"});
        if (view.spec_error) record(name, specNote(at, host, view));
        continue;
      }
      if (previous.state !== view.state || previous.removed !== view.removed) {
        record(name, {at, host, from: previous.state, to: view.state, why: why(previous, view)});
      } else if (previous.current && view.current && previous.current.id !== view.current.id) {
        // Same state, another container (e.g. a Stable one died and was redeployed).
        record(name, {at, host, from: previous.state, to: view.state,
          why: `container ${previous.current.name} replaced by ${view.current.name}`});
      } else if (errorText(previous.error) !== errorText(view.error) && view.error) {
        record(name, {at, host, from: previous.state, to: view.state, why: view.error.message});
      }
      if (specErrorText(previous.spec_error) !== specErrorText(view.spec_error)) {
        record(name, view.spec_error
          ? specNote(at, host, view)
          : {at, host, note: "spec fixed", why: "the file is valid again"});
      }
    }
    for (const [name, previous] of before) {
      if (!after.has(name)) {
        record(name, {at, host, from: previous.state, to: null, why: "gone: its spec file was removed"});
      }
    }
  }

  function specNote(at, host, view) {
    return {at, host, note: "spec error", why: specErrorText(view.spec_error)};
  }

  function record(name, entry) {
    const list = model.timelines.get(name) || [];
    list.push(entry);
    if (list.length > TIMELINE_KEEP) list.splice(0, list.length - TIMELINE_KEEP);
    model.timelines.set(name, list);
  }

  function errorText(error) {
    return error ? error.message : null;
  }

  function where(specError) {
    const file = String(specError.file || "");
    const base = file.split("/").pop() || file;
    return specError.line === null || specError.line === undefined ? base : `${base}:${specError.line}`;
  }

  function specErrorText(specError) {
    return specError ? `${where(specError)}: ${specError.message}` : null;
  }

  function wanted(view) {
    return view.deploying || view.image || "?";
  }

  // The likely reason of a transition, from the two views around it.
  function why(before, after) {
    if (after.removed && !before.removed) return "spec file removed: retiring";
    const from = before.state;
    const to = after.state;
    if (FAILING.has(to)) return after.error ? after.error.message : "the deploy failed";
    if (to === "Wait") {
      if (from === "Init") return `deploying ${wanted(after)}`;
      if (FAILING.has(from)) return `retry ${after.attempt ? "#" + after.attempt + " " : ""}of ${wanted(after)}`;
      return `redeploying ${wanted(after)}`;
    }
    if (to === "WaitNext") {
      if (FAILING.has(from)) return `retrying ${wanted(after)} next to the stable one`;
      return `new spec: starting ${wanted(after)} next to the stable one`;
    }
    if (to === "Stable") {
      const now = after.current;
      if (!now) return "stable";
      if (from === "Wait") return `${now.name} is up and stable`;
      if (before.current && before.current.id !== now.id) {
        return `${now.name} took over from ${before.current.name}`;
      }
      if (FAILING.has(from)) return `back to ${now.name}`;
      return `${now.name} is stable`;
    }
    if (to === UNREACHABLE) return "host unreachable: its Consul session lapsed";
    if (from === UNREACHABLE) return "host reachable again";
    if (to === "Init") return after.removed ? "retired" : "nothing runs";
    return "";
  }

  // --- rendering ----------------------------------------------------------------------------

  function badge(state, extraClass) {
    // No state: the service was not there before (a new spec), or is gone now.
    return el("span", {class: `badge state-${state || "none"}${extraClass ? " " + extraClass : ""}`},
      state || "none");
  }

  function mono(text, cls) {
    return el("code", {class: cls || null, title: text}, text);
  }

  // A pinned image (a revert pins the digest, repo@sha256:…, or the id, sha256:…, of what ran)
  // carries 64 hex digits: shown with 12 of them, whole on hover.
  function imageCode(text) {
    const node = mono(text, "image");
    const pinned = /^(.*?)(sha256:[0-9a-f]{12})[0-9a-f]{52}$/.exec(text);
    if (pinned) setText(node, pinned[1] + pinned[2] + "\u2026");
    return node;
  }

  function line(cls, ...children) {
    return el("div", {class: `line ${cls}`}, ...children);
  }

  function cell(host, view) {
    if (!view) {
      return el("td", {class: "cell absent", "data-host": host}, el("span", {class: "muted"}, "not here"));
    }
    const state = view.state;
    const td = el("td", {class: `cell cell-${state}`, "data-host": host, "data-state": state});
    const head = el("div", {class: "cell-head"}, badge(state, "state"));
    if (view.removed) head.appendChild(el("span", {class: "chip"}, "removing"));
    if (view.draining) head.appendChild(el("span", {class: "chip"}, "draining"));
    if (view.attempt) head.appendChild(el("span", {class: "chip chip-bad"}, `attempt ${view.attempt}`));
    if (view.reverted) head.appendChild(el("span", {class: "chip chip-bad chip-reverted"}, "reverted"));
    td.appendChild(head);

    if (state === UNREACHABLE) {
      if (view.image) td.appendChild(line("image", imageCode(view.image)));
      td.appendChild(line("unreachable", el("span", {class: "label"}, "last seen"), " ",
        view.last_seen ? since(view.last_seen, " ago") : el("span", {class: "muted"}, "never, from here"),
        view.last_state ? el("span", {class: "muted"}, ` (${view.last_state})`) : null));
      return td;
    }
    const current = view.current;
    const image = current ? current.image : view.image;
    if (image) {
      const row = line("image", imageCode(image));
      // Under a revert the desired spec is held off: nothing is on its way to it.
      if (current && view.image && view.image !== current.image && state !== "WaitNext" && !view.reverted) {
        row.append(" \u2192 ", imageCode(view.image));
      }
      td.appendChild(row);
    }
    if (current) {
      const verb = state === "Wait" ? "started " : "up ";
      const row = line("container", mono(current.name, "cname"), " ",
        el("span", {class: "muted"}, verb), since(current.created_at));
      td.appendChild(row);
    }
    if (view.next && state === "WaitNext") {
      td.appendChild(line("next", el("span", {class: "label"}, view.draining ? "replacing with" : "candidate"),
        " ", mono(view.next.name, "cname"), " ", imageCode(view.next.image), " ",
        since(view.next.created_at, " old")));
    } else if (view.deploying && !view.next && state !== "Wait") {
      td.appendChild(line("next", el("span", {class: "label"}, "deploying"), " ", imageCode(view.deploying)));
    }
    if (view.probation_until) {
      td.appendChild(line("probation", el("span", {class: "label"}, "probation until"), " ",
        el("time", {class: "when"}, clock(view.probation_until * 1000)), " ",
        el("span", {class: "muted"}, "(", until(view.probation_until), " left)")));
    }
    if (view.reverted) {
      const reverted = view.reverted;
      td.appendChild(line("reverted", el("span", {class: "label"}, "reverted"), " from ",
        imageCode(String(reverted.from)), " \u2192 back to ", imageCode(String(reverted.to)),
        reverted.reason ? [": ", el("span", {class: "message"}, reverted.reason)] : null, " ",
        el("span", {class: "muted"}, "(", since(reverted.at, " ago"), ")")));
    }
    if (FAILING.has(state) && view.retry_at) {
      td.appendChild(line("retry", el("span", {class: "label"}, "retry in"), " ", until(view.retry_at)));
    }
    if (view.error) {
      td.appendChild(line("error", el("span", {class: "icon"}, "\u26a0"), " ",
        el("span", {class: "message"}, view.error.message), " ",
        el("span", {class: "muted"}, "(", since(view.error.at, " ago"), ")")));
    }
    if (view.failed && FAILING.has(state)) {
      td.appendChild(line("failed", el("span", {class: "label"}, "failed container"), " ",
        mono(view.failed.name, "cname")));
    }
    if (view.spec_error) {
      td.appendChild(line("spec-error", el("span", {class: "label"}, "spec error"), " ",
        el("code", {class: "where", title: String(view.spec_error.file || "")}, where(view.spec_error)),
        " ", el("span", {class: "message"}, view.spec_error.message)));
    }
    return td;
  }

  // One DEPLOY of the history: image, outcome, its times, its error.
  function deployItem(deploy) {
    const times = [];
    for (const [label, at] of [["started", deploy.started_at], ["stable", deploy.stable_at],
      ["ended", deploy.ended_at]]) {
      if (typeof at === "number") times.push(`${label} ${clock(at * 1000)}`);
    }
    const item = el("li", {class: "deploy-entry", "data-outcome": deploy.outcome},
      el("span", {class: `badge mini outcome outcome-${deploy.outcome}`}, deploy.outcome), " ",
      imageCode(String(deploy.image)),
      deploy.attempts > 1 ? el("span", {class: "muted"}, ` \u00d7${deploy.attempts}`) : null,
      el("div", {class: "deploy-times muted"}, times.join(" \u00b7 ")));
    if (deploy.error) {
      item.appendChild(el("div", {class: "deploy-error"}, el("span", {class: "icon"}, "\u26a0"), " ",
        el("span", {class: "message"}, deploy.error)));
    }
    return item;
  }

  // The history is this condo's (/v1/history): with several hosts shown, it says whose.
  function historyList(name, many) {
    const deploys = model.history.get(name) || [];
    if (!deploys.length) return null;
    const list = el("ol", {class: "deploys"});
    for (const deploy of deploys.slice(0, HISTORY_SHOW)) list.appendChild(deployItem(deploy));
    const box = el("div", {class: "history"},
      many ? el("div", {class: "label whose"}, `deploys on ${localHost()}`) : null, list);
    if (deploys.length > HISTORY_SHOW) {
      box.appendChild(el("div", {class: "muted more"}, `+ ${deploys.length - HISTORY_SHOW} earlier deploys`));
    }
    return box;
  }

  function timelineCell(name, many) {
    const entries = (model.timelines.get(name) || []).slice().reverse();
    const td = el("td", {class: "timeline"});
    const history = historyList(name, many);
    if (history) td.appendChild(history);
    if (!entries.length) {
      td.appendChild(el("span", {class: "muted"}, history ? "" : "no change seen yet"));
      return td;
    }
    if (history) td.appendChild(el("div", {class: "label seen"}, "seen by this page"));
    const list = el("ol", {class: "events"});
    for (const entry of entries.slice(0, TIMELINE_SHOW)) {
      const item = el("li", {class: "event"}, el("time", {class: "when"}, clock(entry.at)), " ");
      if (many) item.append(el("span", {class: "ev-host"}, entry.host), " ");
      if (entry.note) {
        item.append(el("span", {class: "badge note"}, entry.note));
      } else {
        item.append(badge(entry.from, "mini"), el("span", {class: "arrow"}, " \u2192 "), badge(entry.to, "mini"));
      }
      if (entry.why) item.append(" ", el("span", {class: "why"}, entry.why));
      list.appendChild(item);
    }
    td.appendChild(list);
    if (entries.length > TIMELINE_SHOW) {
      td.appendChild(el("div", {class: "muted more"}, `+ ${entries.length - TIMELINE_SHOW} earlier`));
    }
    return td;
  }

  function searchable(name, views) {
    const parts = [name];
    for (const view of views) {
      if (!view) continue;
      parts.push(view.state, view.image, view.deploying);
      for (const box of [view.current, view.next, view.failed]) if (box) parts.push(box.name, box.image);
      if (view.error) parts.push(view.error.message);
      if (view.spec_error) parts.push(specErrorText(view.spec_error));
      if (view.reverted) parts.push("reverted");
    }
    return parts.filter(Boolean).join("\n").toLowerCase();
  }

  function render() {
    const columns = hosts();
    const many = columns.length > 1;
    const local = localHost();

    const head = byId("head-row");
    head.replaceChildren(el("th", {class: "col-service"}, "service"),
      ...columns.map((host) => el("th", {class: "col-host", "data-host": host},
        el("span", {class: "mono"}, host), host === local && many ? el("span", {class: "muted"}, " (this condo)") : null,
        unreachable(host) ? el("span", {class: "chip chip-bad"}, "unreachable") : null)),
      el("th", {class: "col-timeline"}, "deploys and transitions"));

    const rows = document.createDocumentFragment();
    const counts = new Map();
    let shown = 0;
    const names = serviceNames();
    for (const name of names) {
      const views = columns.map((host) => servicesOf(host)[name]);
      const text = searchable(name, views);
      if (!model.filter.every((word) => text.includes(word))) continue;
      shown += 1;
      for (const view of views) if (view) counts.set(view.state, (counts.get(view.state) || 0) + 1);
      const bad = views.some((v) => v && (FAILING.has(v.state) || v.state === UNREACHABLE || v.error || v.spec_error));
      const deploy = views.find((v) => v && v.deploy);
      const nameCell = el("th", {class: "name"},
        el("div", {class: "service-name mono"}, name),
        deploy ? el("div", {class: "muted deploy"}, deployText(deploy.deploy)) : null);
      rows.appendChild(el("tr", {class: bad ? "row row-bad" : "row", "data-service": name},
        nameCell, ...columns.map((host, i) => cell(host, views[i])), timelineCell(name, many)));
    }
    byId("rows").replaceChildren(rows);

    const empty = byId("empty");
    if (!model.local) {
      setText(empty, "Waiting for the first snapshot from condo\u2026");
    } else if (!names.length) {
      setText(empty, "No services yet: put a NAME.edn spec file into a directory condo watches.");
    } else if (!shown) {
      setText(empty, "No service matches the filter.");
    }
    empty.hidden = shown > 0;
    byId("services").hidden = shown === 0;

    const order = ["Stable", "Wait", "WaitNext", "TryAgain", "TryAgainNext", "Init", UNREACHABLE];
    const parts = [model.filter.length ? `${shown} of ${names.length} services` : `${names.length} service${names.length === 1 ? "" : "s"}`];
    if (many) parts.push(`${columns.length} hosts`);
    const summary = byId("summary");
    summary.replaceChildren(parts.join(" \u00b7 "));
    for (const state of order) {
      if (counts.get(state)) summary.append(" ", el("span", {class: `badge mini state-${state}`}, `${counts.get(state)} ${state}`));
    }

    const banner = byId("stale-banner");
    const stale = Boolean(model.global && model.global.stale);
    setText(banner, stale ? "Consul cannot be read right now: the other hosts' columns may be out of date." : "");
    banner.hidden = !stale;
    if (local !== null) setText(byId("host"), local);
  }

  function deployText(deploy) {
    if (!Array.isArray(deploy) || !deploy.length) return "";
    return deploy[0] === "After" ? `deploy: After ${deploy[1]}s` : `deploy: ${deploy[0]}`;
  }

  // --- the header ---------------------------------------------------------------------------

  function showConn() {
    const node = byId("conn");
    document.body.dataset.conn = conn.state;
    node.dataset.state = conn.state;
    if (conn.state === "live") setText(node, "live");
    else if (conn.state === "connecting") setText(node, "connecting\u2026");
    else if (conn.state === "locked") setText(node, "token needed");
    else {
      const left = conn.retryAt === null ? 0 : Math.max(0, Math.ceil((conn.retryAt - Date.now()) / 1000));
      setText(node, left > 0 ? `disconnected \u00b7 retrying in ${left}s` : "disconnected \u00b7 retrying\u2026");
    }
  }

  function setConn(state) {
    conn.state = state;
    showConn();
  }

  async function pollHealth() {
    let health = null;
    try {
      const response = await fetch(HEALTH_PATH, {cache: "no-store"});
      health = await response.json();
    } catch (error) {
      health = null; // condo does not answer (restarting?): said in the header
    }
    showHealth(health);
    setTimeout(pollHealth, HEALTH_EVERY_MS);
  }

  function showHealth(health) {
    const engine = byId("engine");
    if (!health || typeof health !== "object") {
      setText(engine, "unknown (condo does not answer)");
      engine.dataset.ok = "unknown";
      return;
    }
    if (typeof health.host === "string") setText(byId("host"), health.host);
    if (typeof health.version === "string") setText(byId("version"), health.version);
    const status = health.engine || {};
    if (status.ok) {
      const degraded = health.state_file && health.state_file.ok === false;
      setText(engine, `ok \u00b7 API ${status.api_version || "?"}` +
        (degraded ? ` \u00b7 state file: ${health.state_file.error}` : ""));
      engine.dataset.ok = degraded ? "degraded" : "ok";
    } else {
      setText(engine, `down: ${status.error || health.error || "no answer"}`);
      engine.dataset.ok = "down";
    }
  }

  // --- the feed -----------------------------------------------------------------------------

  function feedUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = model.token === null ? "" : "?token=" + encodeURIComponent(model.token);
    return `${scheme}//${location.host}${FEED_PATH}${query}`;
  }

  function authHeaders() {
    return model.token === null ? {} : {Authorization: "Bearer " + model.token};
  }

  function connect() {
    clearTimeout(conn.timer);
    conn.timer = null;
    setConn("connecting");
    let ws;
    try {
      ws = new WebSocket(feedUrl());
    } catch (error) {
      scheduleRetry();
      return;
    }
    conn.ws = ws;
    let live = false;
    ws.onmessage = (event) => {
      if (conn.ws !== ws) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (error) {
        return; // not JSON: not condo's
      }
      if (!live) {
        live = true;
        conn.attempt = 0;
        setConn("live");
      }
      handle(message);
    };
    ws.onclose = () => {
      if (conn.ws !== ws) return;
      conn.ws = null;
      if (live) scheduleRetry();
      else probe();
    };
  }

  // The handshake failed: a browser does not say why, so ask an HTTP route (401 = token).
  async function probe() {
    setConn("disconnected");
    let status = 0;
    try {
      const response = await fetch(STATE_PATH, {headers: authHeaders(), cache: "no-store"});
      status = response.status;
    } catch (error) {
      status = 0; // nothing answers: condo is down or restarting
    }
    if (status === 401) askToken(model.token !== null);
    else scheduleRetry();
  }

  function scheduleRetry() {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** conn.attempt);
    const delay = base * (0.8 + Math.random() * 0.4);
    conn.attempt += 1;
    conn.retryAt = Date.now() + delay;
    setConn("disconnected");
    clearTimeout(conn.timer);
    conn.timer = setTimeout(connect, delay);
  }

  function askToken(refused) {
    clearTimeout(conn.timer);
    conn.timer = null;
    model.token = null;
    setConn("locked");
    const form = byId("token-form");
    const error = byId("token-error");
    setText(error, refused ? "condo refused that token: try again." : "");
    error.hidden = !refused;
    form.hidden = false;
    byId("token-input").focus();
  }

  function submitToken(event) {
    event.preventDefault();
    const input = byId("token-input");
    const token = input.value.trim();
    input.value = "";
    if (!token) return;
    model.token = token;
    byId("token-form").hidden = true;
    conn.attempt = 0;
    connect();
  }

  // --- start --------------------------------------------------------------------------------

  function start() {
    byId("token-form").addEventListener("submit", submitToken);
    byId("filter").addEventListener("input", (event) => {
      model.filter = event.target.value.toLowerCase().split(/\s+/).filter(Boolean);
      render();
    });
    render();
    connect();
    pollHealth();
    setInterval(tick, 1000);
  }

  // Loaded with `defer` as a file, or inline (the 401 page asks for the token): start either way.
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
