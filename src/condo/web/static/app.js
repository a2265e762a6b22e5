// condo's live dashboard, fed by WS /v1/feed. Three views, chosen by the URL's hash (so that a
// reload or the browser's back button keeps them): the fleet (`#/`: a row per service, its
// states counted across hosts, its images, the hosts that need a look named), one service
// (`#/service/NAME`: a row per host, paginated) and one host (`#/host/HOST`: a row per service).
// `?problems=KIND` keeps only the rows with a problem (of that kind, or `any`).
//
// Invariants:
// - Everything that comes from condo (service names, images, container names, errors, file
//   names) reaches the page as text: nodes are made with createElement and filled with text
//   nodes; the few attributes set are a fixed allow-list (class, title, colspan, data-*,
//   aria-*), never an event handler, a URL or markup. No string is ever parsed as HTML.
// - The API token, when condo wants one, lives in `model.token` only: no cookie, no storage, no
//   URL of the page. It goes out as `Authorization: Bearer` (fetch) and `?token=` (the feed).
// - The feed reconnects by itself with exponential backoff (0.5 s doubling up to 10 s, jittered);
//   the header says "disconnected" meanwhile and the table is dimmed as stale.
// - Ages and countdowns count by condo's clock (`/healthz`'s `time`, asked again at every
//   connection), not the browser's: a skewed clock or a condo on another machine changes nothing.
// - Other hosts come as one `global` message, then `global_delta`s (only the hosts that
//   changed): the page keeps the whole picture and applies each delta to it.
// - Each service's deploy history (this host's) comes from the feed's `history` messages, so it
//   is there again after a reload; below it, the transitions this page saw, built here from
//   consecutive views of the same service on the same host: they start when the page opens (a
//   reconnect compares with the last view before the gap).
// - The first snapshot comes from the feed; /v1/state is only read to learn why a websocket was
//   refused (browsers hide the HTTP status of a failed handshake), and /healthz for the header.
// - Messages are applied as they come, drawn at most once per frame (a burst, once). Every
//   render is measured from the first message it draws (`performance.measure("condo:render")`),
//   and the first with every host marked (`condo:first-fleet`): the browser tests report them.
"use strict";

(() => {
  const FEED_PATH = "/v1/feed";
  const STATE_PATH = "/v1/state";
  const HEALTH_PATH = "/healthz";
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const HEALTH_EVERY_MS = 5000;
  const TIMELINE_KEEP = 20;
  const TIMELINE_SHOW = 3; // in a fleet or host row; the service view shows all it keeps
  const HISTORY_SHOW = 3; // likewise
  const HISTORY_SHOW_ALL = 20;
  const ODD_SHOW = 6; // hosts named in a fleet row; the service view lists every one
  const PAGE_SIZE = 25; // rows per page of a view
  const MEASURES_KEEP = 1000;
  const FAILING = new Set(["TryAgain", "TryAgainNext"]);
  const UNREACHABLE = "unreachable";
  const STATES = ["Stable", "Wait", "WaitNext", "TryAgain", "TryAgainNext", "Init", UNREACHABLE];
  // Every kind of problem: [kind, one, many]. A row has one when any of its views does.
  const PROBLEMS = [
    ["spec", "spec error", "spec errors"],
    ["failed", "failed deploy", "failed deploys"],
    ["reverted", "reverted", "reverted"],
    ["unreachable", "unreachable host", "unreachable hosts"],
    ["stale", "stale picture", "stale picture"],
    ["proxy", "proxy error", "proxy error"],
  ];
  const SAFE_ATTRIBUTE = /^(class|title|colspan|data-[a-z-]+|aria-[a-z]+)$/;

  const model = {
    local: null, // the last snapshot's state: {host, services, proxy?}
    global: null, // the "global" picture, deltas applied: {hosts, stale, read_at}; null without Consul
    seen: new Map(), // host -> Map(service -> view): the last view, to spot transitions
    timelines: new Map(), // service -> [{at, host, from, to, why}], oldest first
    history: new Map(), // service -> [DEPLOY], newest first: this host's, from the feed
    token: null, // the API token, in memory only
    filter: [], // lower-case words that must all match a row
    skew: 0, // seconds: condo's clock minus the browser's
    rendered: false, // a render with every host done (for the first-fleet mark)
  };
  // --- DOM helpers (text only) ----------------------------------------------------------------

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (!SAFE_ATTRIBUTE.test(name)) throw new Error("attribute not allowed: " + name);
      node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
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

  // Now by condo's clock, in seconds.
  function now() {
    return Date.now() / 1000 + model.skew;
  }

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

  // A span that the ticker keeps up to date: "3m 02s" since `at`, or the time left until it
  // ("retry in 4s"; once due, `due`: "retrying").
  function since(at, suffix) {
    return el("span", {class: "age", "data-since": at, "data-suffix": suffix || ""},
      duration(now() - at) + (suffix || ""));
  }

  function until(at, prefix, due) {
    const attributes = {class: "countdown", "data-until": at, "data-prefix": prefix || "",
      "data-due": due || "0s"};
    return el("span", attributes, countdownText(at, prefix || "", due || "0s"));
  }

  function countdownText(at, prefix, due) {
    const left = at - now();
    return left >= 0.5 ? prefix + duration(Math.ceil(left)) : due;
  }

  function tick() {
    const at = now();
    for (const node of document.querySelectorAll("[data-since]")) {
      setText(node, duration(at - Number(node.dataset.since)) + node.dataset.suffix);
    }
    for (const node of document.querySelectorAll("[data-until]")) {
      setText(node, countdownText(Number(node.dataset.until), node.dataset.prefix, node.dataset.due));
    }
    if (conn.state === "disconnected") showConn();
  }

  // --- the model ----------------------------------------------------------------------------

  function handle(message) {
    const started = performance.now();
    const at = now() * 1000;
    if (message.type === "snapshot") {
      model.local = message.state;
      observe(message.state.host, message.state.services || {}, at);
    } else if (message.type === "history") {
      // Each list is the service's whole history: it replaces what the page had.
      for (const [name, deploys] of Object.entries(message.services || {})) {
        if (Array.isArray(deploys)) model.history.set(name, deploys);
      }
    } else if (message.type === "global") {
      // Without a prototype: a host may be named `__proto__` or `constructor` (any name
      // without a slash), and a delta's `hosts[host] = body` must make it a host like any other.
      model.global = {hosts: Object.assign(Object.create(null), message.hosts || {}),
        stale: Boolean(message.stale), read_at: message.read_at || null};
      for (const host of Object.keys(model.global.hosts)) {
        // The local host's row comes from the snapshots, which are fresher than Consul.
        if (host !== localHost()) observe(host, servicesOf(host), at);
      }
      for (const host of model.seen.keys()) {
        // Gone while the page was away: nothing to compare with any more.
        if (host !== localHost() && !(host in model.global.hosts)) model.seen.delete(host);
      }
    } else if (message.type === "global_delta") {
      if (!model.global) return; // never before a "global" on one connection
      model.global.stale = Boolean(message.stale);
      model.global.read_at = message.read_at || null;
      for (const [host, body] of Object.entries(message.hosts || {})) {
        model.global.hosts[host] = body;
        if (host !== localHost()) observe(host, servicesOf(host), at);
      }
      for (const host of message.gone || []) {
        delete model.global.hosts[host];
        model.seen.delete(host); // forgotten: nothing to compare with any more
      }
    } else {
      return; // a message type this page does not know: newer condo, older page
    }
    renderSoon(started);
  }

  // At most a render per frame: every message is applied to the model as it comes (cheap), and
  // a burst of them (a busy fleet) is drawn once, so the page never falls behind the feed.
  // A render's measure runs from the first message it draws, so it is the update's latency.
  let drawFrom = null; // performance.now() of the first message not drawn yet
  function renderSoon(started) {
    if (drawFrom !== null) return;
    drawFrom = started;
    requestAnimationFrame(() => {
      const from = drawFrom;
      drawFrom = null;
      render();
      // Measures pile up in the page's timeline for as long as it is open: keep the newest.
      if (performance.getEntriesByName("condo:render").length >= MEASURES_KEEP) {
        performance.clearMeasures("condo:render");
      }
      performance.measure("condo:render", {start: from});
      if (!model.rendered && model.local && model.global) {
        model.rendered = true; // the first render with every host (with Consul)
        performance.mark("condo:first-fleet");
      }
    });
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

  // --- problems -----------------------------------------------------------------------------

  // The kinds of problem of one service's view on one host (see PROBLEMS).
  function problemsOf(host, view) {
    const kinds = [];
    if (!view) return kinds;
    // Every other host is as of the last read of Consul, an unreachable one too.
    const stale = host !== localHost() && model.global && model.global.stale;
    if (view.state === UNREACHABLE) {
      kinds.push("unreachable");
      if (stale) kinds.push("stale");
      return kinds; // what it last said is all there is: no error of its own
    }
    if (view.spec_error) kinds.push("spec");
    if (FAILING.has(view.state) || view.error) kinds.push("failed");
    if (view.reverted) kinds.push("reverted");
    if (host === localHost() && model.local && model.local.proxy && Array.isArray(view.proxy) &&
      view.proxy.length) kinds.push("proxy");
    if (stale) kinds.push("stale");
    return kinds;
  }

  function wantedProblem(kinds) {
    const want = route().problems;
    if (!want) return true;
    return want === "any" ? kinds.length > 0 : kinds.includes(want);
  }

  // Every view of every host, by service: name -> [{host, view, kinds}], hosts in column order.
  function index() {
    const byService = new Map();
    for (const host of hosts()) {
      for (const [name, view] of Object.entries(servicesOf(host))) {
        if (!byService.has(name)) byService.set(name, []);
        byService.get(name).push({host, view, kinds: problemsOf(host, view)});
      }
    }
    return byService;
  }

  // --- routes -------------------------------------------------------------------------------

  // "#/service/web?problems=any&page=2" -> {view: "service", name: "web", problems, page}
  function route() {
    const raw = location.hash.replace(/^#\/?/, "");
    const cut = raw.indexOf("?");
    const path = cut < 0 ? raw : raw.slice(0, cut);
    const params = new URLSearchParams(cut < 0 ? "" : raw.slice(cut + 1));
    const slash = path.indexOf("/");
    let view = slash < 0 ? path : path.slice(0, slash);
    let name = slash < 0 ? null : path.slice(slash + 1);
    try {
      name = name === null ? null : decodeURIComponent(name);
    } catch (error) {
      name = null; // a mangled address: the fleet
    }
    if (!(view === "service" || view === "host") || !name) view = "fleet";
    const known = new Set(["any", ...PROBLEMS.map(([kind]) => kind)]);
    const problems = known.has(params.get("problems")) ? params.get("problems") : null;
    const page = Math.max(1, Math.floor(Number(params.get("page"))) || 1);
    return {view, name: view === "fleet" ? null : name, problems, page};
  }

  function hashOf(next) {
    const path = next.view === "fleet" ? "/" : `/${next.view}/${encodeURIComponent(next.name)}`;
    const params = new URLSearchParams();
    if (next.problems) params.set("problems", next.problems);
    if (next.page > 1) params.set("page", String(next.page));
    const query = params.toString();
    return "#" + path + (query ? "?" + query : "");
  }

  // A new entry in the browser's history (back returns), unless it is where the page is.
  function go(changes) {
    const next = Object.assign(route(), {page: 1}, changes);
    const hash = hashOf(next);
    if (hash !== location.hash) location.hash = hash; // hashchange renders
  }

  function onClick(event) {
    const target = event.target instanceof Element ? event.target.closest("[data-go]") : null;
    if (!target) return;
    event.preventDefault();
    const where = target.dataset.go;
    if (where === "fleet") go({view: "fleet", name: null});
    else if (where === "service") go({view: "service", name: target.dataset.name});
    else if (where === "host") go({view: "host", name: target.dataset.name});
    else if (where === "page") go({page: Number(target.dataset.page)});
    else if (where === "problems") {
      const kind = target.dataset.kind;
      go({problems: route().problems === kind ? null : kind});
    }
  }

  function link(where, name, ...children) {
    return el("button", {class: `link go-${where}`, "data-go": where, "data-name": name}, ...children);
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

  // "as of 12s ago" under another host's cell while Consul cannot be read.
  function staleNote(host) {
    if (host === localHost() || !model.global || !model.global.stale) return null;
    return line("stale-note", "as of ", model.global.read_at ? since(model.global.read_at, " ago") : "an unknown time",
      " (Consul cannot be read)");
  }

  function cell(host, view, span) {
    if (!view) {
      return el("td", {class: "cell absent", "data-host": host}, el("span", {class: "muted"}, "not here"));
    }
    const state = view.state;
    const td = el("td", {class: `cell cell-${state}`, "data-host": host, "data-state": state,
      colspan: span || null});
    const head = el("div", {class: "cell-head"}, badge(state, "state"));
    if (view.removed) head.appendChild(el("span", {class: "chip"}, "removing"));
    if (view.draining) head.appendChild(el("span", {class: "chip"}, "draining"));
    if (view.attempt) head.appendChild(el("span", {class: "chip chip-bad"}, `attempt ${view.attempt}`));
    if (view.reverted) head.appendChild(el("span", {class: "chip chip-bad chip-reverted"}, "reverted"));
    if (span) head.appendChild(el("span", {class: "muted on-host"}, "on ", link("host", host, host)));
    td.appendChild(head);

    if (state === UNREACHABLE) {
      if (view.image) td.appendChild(line("image", imageCode(view.image)));
      td.appendChild(line("unreachable", el("span", {class: "label"}, "last seen"), " ",
        view.last_seen ? since(view.last_seen, " ago") : el("span", {class: "muted"}, "never, from here"),
        view.last_state ? el("span", {class: "muted"}, ` (${view.last_state})`) : null));
      const note = staleNote(host);
      if (note) td.appendChild(note);
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
      td.appendChild(line("retry", retryCountdown(view.retry_at)));
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
    const note = staleNote(host);
    if (note) td.appendChild(note);
    if (view.spec_error) {
      td.appendChild(line("spec-error", el("span", {class: "label"}, "spec error"), " ",
        el("code", {class: "where", title: String(view.spec_error.file || "")}, where(view.spec_error)),
        " ", el("span", {class: "message"}, view.spec_error.message)));
    }
    return td;
  }

  // "retry in 4s", then "retrying" once the attempt is due (condo is at it, or about to be).
  function retryCountdown(at) {
    return until(at, "retry in ", "retrying");
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

  // The history is this condo's (/v1/history): with several hosts known, it says whose.
  function historyList(name, show) {
    const deploys = model.history.get(name) || [];
    if (!deploys.length) return null;
    const list = el("ol", {class: "deploys"});
    for (const deploy of deploys.slice(0, show)) list.appendChild(deployItem(deploy));
    const box = el("div", {class: "history"},
      hosts().length > 1 ? el("div", {class: "label whose"}, `deploys on ${localHost()} (this condo)`) : null, list);
    if (deploys.length > show) {
      box.appendChild(el("div", {class: "muted more"}, `+ ${deploys.length - show} earlier deploys`));
    }
    return box;
  }

  // This host's deploys of `name`, then the transitions this page saw (of `host` alone, if
  // given): `show` of each.
  function timeline(tag, name, show, host) {
    const many = hosts().length > 1;
    const entries = (model.timelines.get(name) || [])
      .filter((entry) => host === undefined || entry.host === host).reverse();
    const box = el(tag, {class: "timeline"});
    const history = host === undefined || host === localHost() ? historyList(name, show) : null;
    if (history) box.appendChild(history);
    else if (host !== undefined) {
      box.appendChild(el("div", {class: "muted whose"}, `deploy history: on ${host}'s own dashboard`));
    }
    if (!entries.length) {
      if (!history) box.appendChild(el("span", {class: "muted"}, "no change seen yet"));
      return box;
    }
    if (history) box.appendChild(el("div", {class: "label seen"}, "seen by this page"));
    const list = el("ol", {class: "events"});
    for (const entry of entries.slice(0, show)) {
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
    box.appendChild(list);
    if (entries.length > show) {
      box.appendChild(el("div", {class: "muted more"}, `+ ${entries.length - show} earlier`));
    }
    return box;
  }

  function searchable(parts, views) {
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

  function matches(parts, views) {
    if (!model.filter.length) return true;
    const text = searchable(parts, views);
    return model.filter.every((word) => text.includes(word));
  }

  function countStates(entries) {
    const counts = new Map();
    for (const {view} of entries) counts.set(view.state, (counts.get(view.state) || 0) + 1);
    return counts;
  }

  function stateCounts(counts) {
    const line = el("div", {class: "counts"});
    for (const state of STATES) {
      const count = counts.get(state);
      if (count) line.append(el("span", {class: `badge mini state-${state}`, "data-state": state}, `${state} ${count}`), " ");
    }
    return line;
  }

  // image -> how many hosts, most first
  function tally(images) {
    const counts = new Map();
    for (const image of images) if (image) counts.set(image, (counts.get(image) || 0) + 1);
    return [...counts].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
  }

  function imagesLine(cls, label, tallied, total) {
    const row = line(cls, el("span", {class: "label"}, label), " ");
    tallied.forEach(([image, count], i) => {
      if (i) row.append(" \u00b7 ");
      row.append(imageCode(image));
      if (count !== total || tallied.length > 1) row.append(el("span", {class: "muted"}, ` \u00d7${count}`));
    });
    return row;
  }

  function runningImage(view) {
    if (view.state === UNREACHABLE) return view.image;
    return view.current ? view.current.image : null;
  }

  function wantedImage(view) {
    if (view.state === UNREACHABLE || view.reverted) return null; // a revert holds it off
    return view.deploying || view.image || null;
  }

  // Why a host stands out in a service's row, or null: not Stable, on another image than most,
  // a spec error, an error, reverted, unreachable.
  function oddity(view, common) {
    if (view.state === UNREACHABLE) {
      return view.last_seen ? ["last seen ", since(view.last_seen, " ago")] : ["never seen from here"];
    }
    if (view.spec_error) return [`spec error ${specErrorText(view.spec_error)}`];
    if (view.reverted) return [`reverted from ${view.reverted.from}`];
    if (FAILING.has(view.state)) {
      return [view.error ? view.error.message : "the deploy failed", view.retry_at ? [" \u00b7 ", retryCountdown(view.retry_at)] : null];
    }
    if (view.error) return [view.error.message];
    if (view.state !== "Stable") return [view.deploying || view.image ? `deploying ${wanted(view)}` : view.state];
    const image = runningImage(view);
    if (image && common && image !== common) return ["on ", imageCode(image)];
    return null;
  }

  // --- the fleet view: a row per service ----------------------------------------------------

  function fleetView(byService, names) {
    const many = hosts().length > 1;
    const head = [el("th", {class: "col-service"}, "service"),
      el("th", {class: many ? "col-hosts" : "col-cell"}, many ? "hosts" : "state"),
      many ? el("th", {class: "col-odd"}, "hosts to look at") : null,
      el("th", {class: "col-timeline"}, "deploys and transitions")].filter(Boolean);
    const rows = [];
    for (const name of names) {
      const entries = byService.get(name);
      if (!wantedProblem(entries.flatMap((e) => e.kinds))) continue;
      if (!matches([name, ...entries.map((e) => e.host)], entries.map((e) => e.view))) continue;
      rows.push(name);
    }
    return {head, rows, row: (name) => fleetRow(name, byService.get(name))};
  }

  function fleetRow(name, entries) {
    const bad = entries.some((e) => e.kinds.length);
    const deploy = entries.find((e) => e.view.deploy);
    const tr = el("tr", {class: bad ? "row row-bad" : "row", "data-service": name},
      el("th", {class: "name"}, link("service", name, el("span", {class: "service-name mono"}, name)),
        deploy ? el("div", {class: "muted deploy"}, deployText(deploy.view.deploy)) : null));
    if (entries.length === 1) {
      // One host runs it: that host's cell says it all (across both columns of a fleet).
      tr.appendChild(cell(entries[0].host, entries[0].view, hosts().length > 1 ? 2 : null));
    } else {
      const running = tally(entries.map((e) => runningImage(e.view)));
      const wanting = tally(entries.map((e) => wantedImage(e.view)));
      const common = running.length ? running[0][0] : null;
      const summary = el("td", {class: "fleet", "data-hosts": entries.length},
        stateCounts(countStates(entries)),
        running.length ? imagesLine("running", "running", running, entries.length) : null);
      // "wanted" only while some host is on its way to another image than it runs.
      const moving = entries.some((e) => wantedImage(e.view) && wantedImage(e.view) !== runningImage(e.view));
      if (moving) summary.appendChild(imagesLine("wanted", "wanted", wanting, entries.length));
      tr.appendChild(summary);
      tr.appendChild(oddHosts(name, entries, common, ODD_SHOW));
    }
    tr.appendChild(timeline("td", name, TIMELINE_SHOW));
    return tr;
  }

  function oddHosts(name, entries, common, show) {
    const td = el("td", {class: "odd"});
    const odd = [];
    for (const entry of entries) {
      const why = oddity(entry.view, common);
      if (why) odd.push({...entry, why});
    }
    // Problems first, then the rest; by host name within each.
    odd.sort((a, b) => (b.kinds.length > 0) - (a.kinds.length > 0) || (a.host < b.host ? -1 : 1));
    const list = el("ul", {class: "odd-hosts"});
    for (const entry of odd.slice(0, show)) {
      list.appendChild(el("li", {class: entry.kinds.length ? "odd-host bad" : "odd-host", "data-host": entry.host},
        link("host", entry.host, el("span", {class: "mono"}, entry.host)), " ",
        badge(entry.view.state, "mini"), " ", el("span", {class: "why"}, entry.why)));
    }
    if (odd.length) td.appendChild(list);
    if (odd.length > show) {
      td.appendChild(link("service", name, `+ ${odd.length - show} more hosts`));
    }
    if (!odd.length) td.appendChild(el("span", {class: "muted"}, `all ${entries.length} Stable on one image`));
    if (model.global && model.global.stale) {
      td.appendChild(el("div", {class: "stale-note"}, "other hosts as of ",
        model.global.read_at ? since(model.global.read_at, " ago") : "an unknown time",
        " (Consul cannot be read)"));
    }
    return td;
  }

  // --- one service: a row per host ----------------------------------------------------------

  function serviceView(byService, name) {
    const entries = byService.get(name) || [];
    const common = tally(entries.map((e) => runningImage(e.view)));
    const local = localHost();
    const order = (e) => [e.kinds.length ? 0 : oddity(e.view, common.length ? common[0][0] : null) ? 1 : 2,
      e.host === local ? "" : e.host];
    const sorted = entries.slice().sort((a, b) => {
      const [x, y] = [order(a), order(b)];
      return x[0] - y[0] || (x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0);
    });
    const rows = sorted.filter((e) => wantedProblem(e.kinds) && matches([e.host], [e.view]));
    const head = [el("th", {class: "col-host"}, "host"), el("th", {class: "col-cell"}, name)];
    return {head, rows, row: (e) => el("tr", {class: e.kinds.length ? "row row-bad" : "row",
      "data-service": name, "data-host": e.host}, hostName(e.host), cell(e.host, e.view))};
  }

  function hostName(host) {
    const local = host === localHost();
    return el("th", {class: "name host-name"}, link("host", host, el("span", {class: "mono"}, host)),
      local && hosts().length > 1 ? el("span", {class: "muted"}, " (this condo)") : null,
      unreachable(host) ? [" ", el("span", {class: "chip chip-bad"}, "unreachable")] : null);
  }

  // --- one host: a row per service ----------------------------------------------------------

  function hostView(byService, host) {
    const rows = [];
    for (const [name, entries] of byService) {
      const entry = entries.find((e) => e.host === host);
      if (entry && wantedProblem(entry.kinds) && matches([name], [entry.view])) rows.push({name, ...entry});
    }
    rows.sort((a, b) => (a.name < b.name ? -1 : 1));
    const head = [el("th", {class: "col-service"}, "service"), el("th", {class: "col-cell"}, host),
      el("th", {class: "col-timeline"}, "deploys and transitions")];
    return {head, rows, row: (e) => el("tr", {class: e.kinds.length ? "row row-bad" : "row",
      "data-service": e.name, "data-host": host},
      el("th", {class: "name"}, link("service", e.name, el("span", {class: "service-name mono"}, e.name))),
      cell(host, e.view), timeline("td", e.name, TIMELINE_SHOW, host))};
  }

  // --- the whole page -----------------------------------------------------------------------

  function render() {
    const where = route();
    const byService = index();
    const names = [...byService.keys()].sort();
    const local = localHost();
    document.body.dataset.view = where.view;

    let view;
    if (where.view === "service") view = serviceView(byService, where.name);
    else if (where.view === "host") view = hostView(byService, where.name);
    else view = fleetView(byService, names);

    const pages = Math.max(1, Math.ceil(view.rows.length / PAGE_SIZE));
    const page = Math.min(where.page, pages);
    const shown = view.rows.slice((page - 1) * PAGE_SIZE, page * PAGE_SIZE);
    byId("head-row").replaceChildren(...view.head);
    const rows = document.createDocumentFragment();
    for (const item of shown) rows.appendChild(view.row(item));
    byId("rows").replaceChildren(rows);
    renderPager(page, pages, view.rows.length);
    renderCrumbs(where, byService);
    renderSide(where);

    const empty = byId("empty");
    if (!model.local) {
      setText(empty, "Waiting for the first snapshot from condo\u2026");
    } else if (where.view === "service" && !byService.has(where.name)) {
      setText(empty, `No host runs ${where.name}.`);
    } else if (where.view === "host" && !hosts().includes(where.name)) {
      setText(empty, `No host ${where.name} is known.`);
    } else if (!names.length) {
      setText(empty, "No services yet: put a NAME.edn spec file into a directory condo watches.");
    } else if (!view.rows.length) {
      setText(empty, where.problems ? "No row has that problem." : "No service matches the filter.");
    }
    empty.hidden = view.rows.length > 0;
    byId("services").hidden = view.rows.length === 0;
    renderIdleHosts(where);

    renderSummary(byService, names);
    const banner = byId("stale-banner");
    const stale = Boolean(model.global && model.global.stale);
    setText(banner, stale ? "Consul cannot be read right now: the other hosts' rows may be out of date." : "");
    if (stale && model.global.read_at) banner.append(" Last read ", since(model.global.read_at, " ago"), ".");
    banner.hidden = !stale;
    const proxy = byId("proxy-banner");
    const proxyError = model.local && model.local.proxy;
    setText(proxy, proxyError ? `The proxy cannot run: ${proxyError.error}` : "");
    proxy.hidden = !proxyError;
    if (local !== null) setText(byId("host"), local);
  }

  // An unreachable host that ran nothing has no row in any service: the fleet names it (its
  // chip counts it, and a chip must lead somewhere), so that it is found, and forgotten.
  function renderIdleHosts(where) {
    const node = byId("idle-hosts");
    const idle = where.view !== "fleet" || (where.problems && !["any", "unreachable"].includes(where.problems))
      ? []
      : hosts().filter((host) => unreachable(host) && !Object.keys(servicesOf(host)).length);
    node.hidden = !idle.length;
    if (!idle.length) return node.replaceChildren();
    node.replaceChildren(el("span", {class: "chip chip-bad"}, "unreachable"), " running nothing: ",
      ...idle.map((host, i) => {
        const seen = model.global.hosts[host].last_seen;
        return el("span", {class: "idle-host", "data-host": host}, i ? ", " : null,
          link("host", host, el("span", {class: "mono"}, host)),
          el("span", {class: "muted"}, " last seen ", seen ? since(seen, " ago") : "never, from here"));
      }));
  }

  function renderPager(page, pages, total) {
    const pager = byId("pager");
    pager.hidden = pages <= 1;
    if (pages <= 1) return pager.replaceChildren();
    const first = (page - 1) * PAGE_SIZE + 1;
    const last = Math.min(total, page * PAGE_SIZE);
    pager.replaceChildren(
      page > 1 ? el("button", {class: "link", "data-go": "page", "data-page": page - 1}, "\u2039 previous") : null,
      el("span", {class: "muted"}, ` rows ${first}\u2013${last} of ${total} `),
      page < pages ? el("button", {class: "link", "data-go": "page", "data-page": page + 1}, "next \u203a") : null);
  }

  function renderCrumbs(where, byService) {
    const crumbs = byId("crumbs");
    if (where.view === "fleet") {
      crumbs.hidden = true;
      return crumbs.replaceChildren();
    }
    crumbs.hidden = false;
    const parts = [link("fleet", "", "\u2190 all services"), " "];
    if (where.view === "service") {
      const entries = byService.get(where.name) || [];
      parts.push(el("h2", {}, el("span", {class: "muted"}, "service "), el("span", {class: "mono"}, where.name)),
        el("span", {class: "muted"}, ` on ${entries.length} host${entries.length === 1 ? "" : "s"} `),
        stateCounts(countStates(entries)));
    } else {
      const body = model.global && model.global.hosts[where.name];
      parts.push(el("h2", {}, el("span", {class: "muted"}, "host "), el("span", {class: "mono"}, where.name)),
        where.name === localHost() && hosts().length > 1 ? el("span", {class: "muted"}, " (this condo) ") : " ",
        unreachable(where.name) ? el("span", {class: "chip chip-bad"}, "unreachable") : null,
        unreachable(where.name) && body.last_seen ? el("span", {class: "muted"}, " last seen ", since(body.last_seen, " ago")) : null);
    }
    crumbs.replaceChildren(...parts);
  }

  // The service view's side panel: its whole history here, every transition seen.
  function renderSide(where) {
    const side = byId("side");
    side.hidden = where.view !== "service";
    if (where.view !== "service") return side.replaceChildren();
    side.replaceChildren(el("h3", {}, "deploys and transitions"),
      timeline("div", where.name, HISTORY_SHOW_ALL),
      hosts().length > 1 ? el("p", {class: "muted note"}, "Deploy histories are per condo: each host's is on its own dashboard and its /v1/history.") : null);
  }

  function renderSummary(byService, names) {
    const counts = new Map();
    const problems = new Map();
    for (const entries of byService.values()) {
      for (const {view, kinds} of entries) {
        counts.set(view.state, (counts.get(view.state) || 0) + 1);
        for (const kind of kinds) problems.set(kind, (problems.get(kind) || 0) + 1);
      }
    }
    // Hosts, not their services, for these: one flag each.
    problems.set("unreachable", hosts().filter(unreachable).length);
    problems.set("stale", model.global && model.global.stale ? 1 : 0);
    problems.set("proxy", model.local && model.local.proxy ? 1 : 0);
    const many = hosts().length;
    const summary = byId("summary");
    summary.replaceChildren(`${names.length} service${names.length === 1 ? "" : "s"}` +
      (many > 1 ? ` \u00b7 ${many} hosts` : ""));
    for (const state of STATES) {
      if (counts.get(state)) summary.append(" ", el("span", {class: `badge mini state-${state}`}, `${counts.get(state)} ${state}`));
    }
    const chips = byId("problems");
    const want = route().problems;
    const items = [];
    let total = 0;
    for (const [kind, one, several] of PROBLEMS) {
      const count = problems.get(kind) || 0;
      if (!count && want !== kind) continue;
      total += count;
      const label = kind === "stale" || kind === "proxy" ? one : `${count} ${count === 1 ? one : several}`;
      items.push(el("button", {class: `chip chip-problem${want === kind ? " on" : ""}`, "data-go": "problems",
        "data-kind": kind, "aria-pressed": want === kind ? "true" : "false"}, label));
    }
    const any = el("button", {class: `chip chip-filter${want === "any" ? " on" : ""}`, "data-go": "problems",
      "data-kind": "any", "aria-pressed": want === "any" ? "true" : "false"},
      total ? "problems only" : "no problems");
    chips.replaceChildren(any, ...items);
    chips.dataset.count = String(total);
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

  // /healthz now (the header; condo's clock), then every HEALTH_EVERY_MS.
  async function pollHealth() {
    await checkHealth();
    setTimeout(pollHealth, HEALTH_EVERY_MS);
  }

  async function checkHealth() {
    let health = null;
    const sent = Date.now();
    try {
      const response = await fetch(HEALTH_PATH, {cache: "no-store"});
      health = await response.json();
    } catch (error) {
      health = null; // condo does not answer (restarting?): said in the header
    }
    if (health && typeof health.time === "number") {
      // condo read its clock about half-way through the round trip.
      model.skew = health.time - (sent + Date.now()) / 2000;
      tick();
    }
    showHealth(health);
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
    // Other hosts' pictures as deltas: a message grows with what changed, not with the fleet.
    let query = "?global=delta";
    if (model.token !== null) query += "&token=" + encodeURIComponent(model.token);
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
        // The other hosts as this connection says: a condo that came back without Consul
        // sends none, and the picture from before the gap is nobody's any more. (`seen` stays:
        // a host that is still there is compared with its last view before the gap.)
        model.global = null;
        setConn("live");
        checkHealth(); // condo may have come back on another machine, with another clock
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
    document.addEventListener("click", onClick);
    window.addEventListener("hashchange", () => {
      render();
      window.scrollTo(0, 0);
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
