// The embedq dashboard: one page, no dependencies, no external assets.
//
// Views are addressed by the URL fragment (#overview, #failed, #jobs?state=dead, #job/42, ...).
// Each view is a `fetch` (API calls) and a `render` (DOM); live views are fetched again every
// few seconds and re-rendered only when the data changed, so a quiet page keeps its buttons
// and its unfolded errors in place. API data only ever reaches the page as text (text nodes,
// attribute values), never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "embedq.token";
  const REFRESH_MS = 3000;
  const NOTICE_MS = 8000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const STATE_COLORS = {
    succeeded: "var(--ok)",
    dead: "var(--bad)",
    cancelled: "var(--muted)",
    superseded: "var(--accent)",
  };

  const $ = (id) => document.getElementById(id);

  let token = sessionStorage.getItem(TOKEN_KEY);
  let current = { view: null, arg: null, params: new URLSearchParams() };
  let generation = 0; // bumped on every navigation: responses for an older view are dropped
  let inflight = false;
  let lastRendered = null; // JSON of the data the current view shows
  let noticeTimer = null;
  let staleError = false; // the banner reports a failed refresh: the next good one clears it
  const expandedErrors = new Set(); // failed-job ids whose error is unfolded

  // --- DOM helpers ----------------------------------------------------------------------

  /** Create an element: el("td", {class: "num", testid: "x"}, "text", childNode, ...). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "testid") node.setAttribute("data-testid", value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
  }

  function append(node, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  /** Replace a node's children; null entries are skipped (replaceChildren writes "null"). */
  function fill(node, ...children) {
    node.replaceChildren();
    append(node, children);
  }

  function replaceRows(tbody, rows, columns, emptyText) {
    if (rows.length === 0) {
      rows = [el("tr", { class: "empty" }, el("td", { colspan: columns }, emptyText))];
    }
    tbody.replaceChildren(...rows);
  }

  function pill(text, testid) {
    return el("span", { class: `pill state-${text}`, testid }, text);
  }

  // --- formatting -----------------------------------------------------------------------

  function fmtNum(n) {
    if (n === null || n === undefined) return "–";
    return typeof n === "number" ? n.toLocaleString("en-US") : String(n);
  }

  function fmtSecs(s) {
    if (s === null || s === undefined) return "–";
    const v = Number(s);
    if (v < 1) return `${Math.round(v * 1000)} ms`;
    if (v < 60) return `${v.toFixed(1)} s`;
    if (v < 3600) return `${(v / 60).toFixed(1)} min`;
    if (v < 86400) return `${(v / 3600).toFixed(1)} h`;
    return `${(v / 86400).toFixed(1)} d`;
  }

  function fmtTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const time = d.toLocaleTimeString("en-GB", { hour12: false });
    const today = new Date().toDateString() === d.toDateString();
    return today ? time : `${d.toLocaleDateString("en-CA")} ${time}`;
  }

  function fmtClock(date) {
    return date.toLocaleTimeString("en-GB", { hour12: false, hour: "2-digit", minute: "2-digit" });
  }

  function timeCell(iso) {
    return el("td", { class: "nowrap", title: iso || null }, fmtTime(iso));
  }

  function fmtValue(v) {
    if (v === null || v === undefined) return "";
    return typeof v === "string" ? v : JSON.stringify(v);
  }

  function firstLine(text, max = 120) {
    const line = String(text || "").split("\n").find((l) => l.trim()) || "";
    return line.length > max ? `${line.slice(0, max - 1)}…` : line;
  }

  // --- API ------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, requestId) {
      super(message);
      this.status = status;
      this.code = code;
      this.requestId = requestId;
    }
  }

  /** Call the API; resolve to its JSON, or reject with an ApiError from the error envelope. */
  async function api(method, path, body, withToken = token) {
    const headers = { Accept: "application/json", Authorization: `Bearer ${withToken}` };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (exc) {
      throw new ApiError(0, "unreachable", `cannot reach the embedq service (${exc.message})`);
    }
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!resp.ok) {
      const e = (data && data.error) || {};
      const detail = data && typeof data.detail === "string" ? data.detail : null;
      throw new ApiError(
        resp.status,
        e.code || "http_error",
        e.message || detail || `${resp.status} ${resp.statusText || "error"}`.trim(),
        e.request_id || resp.headers.get("X-Request-ID"),
      );
    }
    return data;
  }

  const enc = encodeURIComponent;

  // --- notices and errors ---------------------------------------------------------------

  function showNotice(text, link) {
    const box = $("notice");
    box.replaceChildren(el("span", { testid: "notice-text" }, text));
    if (link) {
      box.append(" ", el("a", { href: link.href, testid: "notice-link" }, link.text));
    }
    box.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => {
      box.hidden = true;
    }, NOTICE_MS);
  }

  function showError(err, fromRefresh = false) {
    if (err instanceof ApiError && err.status === 401) {
      logout(err.message);
      return;
    }
    staleError = fromRefresh;
    $("error-message").textContent = err.message || String(err);
    const rid = err instanceof ApiError && err.requestId;
    $("error-request-id").textContent = rid ? `request id ${rid}` : "";
    $("error-banner").hidden = false;
  }

  function clearError() {
    staleError = false;
    $("error-banner").hidden = true;
  }

  /** Run a button's action: disable it meanwhile, report failures in the banner. */
  async function act(button, action) {
    button.disabled = true;
    try {
      await action();
    } catch (err) {
      showError(err);
    } finally {
      button.disabled = false;
    }
  }

  // --- session --------------------------------------------------------------------------

  function setSession(who) {
    const name = who && who.name ? who.name : "signed in";
    const scopes = who && Array.isArray(who.scopes) ? who.scopes.join(", ") : "";
    $("whoami").textContent = scopes ? `${name} (${scopes})` : name;
    $("session").hidden = false;
    $("nav").hidden = false;
    $("footer").hidden = false;
  }

  function logout(message) {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    generation += 1;
    lastRendered = null;
    for (const id of ["stats", "chart", "queues-body", "tasks-body", "failed-body", "jobs-body",
      "job-detail", "job-events-body", "workers-body", "collections-body", "search-results",
      "settings-body"]) {
      $(id).replaceChildren();
    }
    $("session").hidden = true;
    $("nav").hidden = true;
    $("footer").hidden = true;
    clearError();
    const box = $("login-error");
    box.textContent = message || "";
    box.hidden = !message;
    show("login");
    $("login-token").focus();
  }

  async function login(event) {
    event.preventDefault();
    const input = $("login-token");
    const candidate = input.value.trim();
    const box = $("login-error");
    box.hidden = true;
    $("login-submit").disabled = true;
    try {
      const who = await api("GET", "/v1/whoami", undefined, candidate);
      token = candidate;
      sessionStorage.setItem(TOKEN_KEY, token);
      input.value = "";
      setSession(who);
      if (!location.hash || location.hash === "#login") location.hash = "#overview";
      else route();
    } catch (err) {
      const rid = err.requestId ? ` (request id ${err.requestId})` : "";
      box.textContent =
        err.status === 401 ? `Token refused: ${err.message}${rid}` : `${err.message}${rid}`;
      box.hidden = false;
    } finally {
      $("login-submit").disabled = false;
    }
  }

  // --- routing and refresh --------------------------------------------------------------

  function show(view) {
    for (const section of document.querySelectorAll("section.view")) {
      section.hidden = section.id !== `view-${view}`;
    }
    const tab = view === "job" ? "jobs" : view;
    for (const a of document.querySelectorAll("#nav a")) {
      a.classList.toggle("active", a.dataset.view === tab);
      if (a.dataset.view === tab) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
  }

  function route() {
    if (!token) {
      logout(null);
      return;
    }
    const hash = location.hash.replace(/^#/, "") || "overview";
    const [path, query] = hash.split("?");
    const [view, arg] = path.split("/");
    if (!VIEWS[view] || view === "login") {
      location.hash = "#overview";
      return;
    }
    generation += 1;
    lastRendered = null;
    current = { view, arg: arg ? decodeURIComponent(arg) : null, params: new URLSearchParams(query) };
    clearError();
    show(view);
    if (VIEWS[view].enter) VIEWS[view].enter(current);
    refresh(true);
  }

  /** Fetch the current view's data and render it if it changed (always, when `force`). */
  async function refresh(force = false) {
    const spec = VIEWS[current.view];
    if (!token || !spec || !spec.fetch) return;
    if (inflight && !force) return;
    const gen = generation;
    inflight = true;
    try {
      const data = await spec.fetch(current);
      if (gen !== generation) return;
      const key = JSON.stringify(data);
      if (force || key !== lastRendered) {
        lastRendered = key;
        spec.render(data, current);
      }
      $("refreshed").textContent = `updated ${fmtTime(new Date().toISOString())}`;
      if (staleError) clearError();
    } catch (err) {
      if (gen === generation) showError(err, true);
    } finally {
      inflight = false;
    }
  }

  function tick() {
    const spec = VIEWS[current.view];
    if (token && spec && spec.live && $("auto-refresh").checked && !document.hidden) refresh();
  }

  // --- overview -------------------------------------------------------------------------

  const STATS = [
    ["pending", "pending"],
    ["due", "due now"],
    ["running", "running"],
    ["stuck", "stuck"],
    ["dead", "dead"],
    ["succeeded_last_minute", "succeeded / min"],
    ["succeeded_last_hour", "succeeded / hour"],
    ["dead_last_hour", "dead / hour"],
    ["oldest_due_age_s", "oldest due"],
    ["workers_alive", "workers alive"],
  ];

  async function fetchOverview() {
    const [queues, stats] = await Promise.all([
      api("GET", "/v1/queues"),
      api("GET", "/v1/queues/stats?hours=1"),
    ]);
    // The minute is part of the data: an idle queue's chart still moves along with the clock.
    return { queues, stats, minute: Math.floor(Date.now() / 60000) };
  }

  function renderOverview({ queues, stats }) {
    const o = queues.overview || {};
    $("stats").replaceChildren(
      ...STATS.filter(([key]) => key in o).map(([key, label]) => {
        const v = o[key];
        const cls = ["stat"];
        if ((key === "dead" || key === "stuck") && v > 0) cls.push("bad");
        if (key === "workers_alive" && v === 0) cls.push("warn");
        return el(
          "div",
          { class: cls.join(" "), testid: `stat-${key}` },
          el("div", { class: "stat-value", testid: `stat-value-${key}` },
            key.endsWith("_s") ? fmtSecs(v) : fmtNum(v)),
          el("div", { class: "stat-label" }, label),
        );
      }),
    );
    const badge = $("failed-badge");
    badge.textContent = o.dead ? String(o.dead) : "";
    badge.hidden = !o.dead;

    const entries = Object.entries(queues.queues || {}).sort(([a], [b]) => a.localeCompare(b));
    $("queue-names").replaceChildren(...entries.map(([name]) => el("option", { value: name })));
    replaceRows(
      $("queues-body"),
      entries.map(([name, q]) =>
        el(
          "tr",
          { testid: `queue-row-${name}` },
          el("td", {}, el("a", { href: `#jobs?queue=${enc(name)}` }, name)),
          el("td", { class: "num" }, fmtNum(q.pending)),
          el("td", { class: "num" }, fmtNum(q.running)),
          el("td", { class: "num" }, fmtNum(q.succeeded_1h)),
          el("td", { class: "num" }, fmtNum(q.dead_1h)),
          el("td", { class: "num" }, fmtNum(q.cancelled_1h)),
          el("td", {}, pill(q.paused ? "paused" : "active", `queue-state-${name}`)),
          el("td", { class: "actions" }, queueButton(name, q.paused)),
        ),
      ),
      8,
      "No queues yet.",
    );

    replaceRows(
      $("tasks-body"),
      (stats.tasks || []).map((t) =>
        el(
          "tr",
          {},
          el("td", {}, el("a", { href: `#jobs?task=${enc(t.task)}` }, t.task)),
          el("td", {}, t.queue),
          el("td", { class: "num" }, fmtNum(t.succeeded)),
          el("td", { class: "num" }, fmtNum(t.dead)),
          el("td", { class: "num" }, fmtNum(t.cancelled)),
          el("td", { class: "num" }, fmtNum(t.superseded)),
          el("td", { class: "num" }, fmtSecs(t.avg_run_s)),
          el("td", { class: "num" }, fmtSecs(t.p95_run_s)),
          el("td", { class: "num" }, fmtSecs(t.avg_wait_s)),
        ),
      ),
      9,
      "No jobs finished in this window.",
    );
    drawThroughput($("chart"), stats.throughput_per_minute || []);
  }

  function queueButton(name, paused) {
    const action = paused ? "resume" : "pause";
    const button = el("button", { type: "button", testid: `${action}-${name}` },
      paused ? "Resume" : "Pause");
    button.addEventListener("click", () =>
      act(button, async () => {
        await api("POST", `/v1/queues/${enc(name)}/${action}`);
        showNotice(`Queue ${name} ${paused ? "resumed" : "paused"}.`);
        await refresh(true);
      }),
    );
    return button;
  }

  /** Stacked bars of jobs finished per minute and state, as inline SVG. */
  function drawThroughput(container, rows) {
    const W = 640;
    const H = 200;
    const pad = { left: 36, right: 8, top: 10, bottom: 22 };
    const minutes = 60;
    const perMinute = new Map(); // minute number -> {state: n}
    const states = new Set(["succeeded", "dead"]);
    let newest = Math.floor(Date.now() / 60000);
    for (const r of rows) {
      const t = Date.parse(r.minute);
      if (Number.isNaN(t)) continue;
      const m = Math.floor(t / 60000);
      newest = Math.max(newest, m);
      const bucket = perMinute.get(m) || {};
      bucket[r.state] = (bucket[r.state] || 0) + Number(r.n || 0);
      perMinute.set(m, bucket);
      states.add(r.state);
    }
    const first = newest - minutes + 1;
    const order = [...states].sort(
      (a, b) => Object.keys(STATE_COLORS).indexOf(a) - Object.keys(STATE_COLORS).indexOf(b),
    );
    let top = 0;
    let total = 0;
    for (const [m, bucket] of perMinute) {
      if (m < first) continue;
      const sum = Object.values(bucket).reduce((a, b) => a + b, 0);
      top = Math.max(top, sum);
      total += sum;
    }
    const yMax = niceCeil(top);
    const plotW = W - pad.left - pad.right;
    const plotH = H - pad.top - pad.bottom;
    const slot = plotW / minutes;
    const y = (v) => pad.top + plotH - (v / yMax) * plotH;

    const root = svg("svg", {
      viewBox: `0 0 ${W} ${H}`,
      role: "img",
      "aria-label": `Jobs finished per minute over the last hour: ${total} in all`,
      class: "chart-svg",
    });
    for (const v of [0, yMax / 2, yMax]) {
      root.append(
        svg("line", { x1: pad.left, x2: W - pad.right, y1: y(v), y2: y(v), class: "grid" }),
        svg("text", { x: pad.left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" },
          fmtNum(Math.round(v * 10) / 10)),
      );
    }
    for (let i = 0; i < minutes; i += 1) {
      const m = first + i;
      const x = pad.left + i * slot;
      if (i % 15 === 0 || i === minutes - 1) {
        const label = i === minutes - 1 ? "now" : fmtClock(new Date(m * 60000));
        root.append(svg("text", { x: x + slot / 2, y: H - 6, class: "axis", "text-anchor": "middle" }, label));
      }
      const bucket = perMinute.get(m);
      if (!bucket) continue;
      const g = svg("g", { class: "bar", "data-testid": "chart-bar", "data-minute": new Date(m * 60000).toISOString() });
      let base = 0;
      const parts = [];
      for (const state of order) {
        const n = bucket[state] || 0;
        if (!n) continue;
        g.append(svg("rect", {
          x: x + 0.5,
          width: Math.max(1, slot - 1.5),
          y: y(base + n),
          height: Math.max(0.5, y(base) - y(base + n)),
          fill: STATE_COLORS[state] || "var(--other)",
        }));
        base += n;
        parts.push(`${state} ${n}`);
      }
      g.prepend(svg("title", {}, `${fmtClock(new Date(m * 60000))}: ${parts.join(", ")}`));
      root.append(g);
    }
    if (total === 0) {
      root.append(svg("text", { x: pad.left + plotW / 2, y: pad.top + plotH / 2, class: "axis empty", "text-anchor": "middle" },
        "No jobs finished in the last hour."));
    }
    const legend = el("div", { class: "legend" },
      order.map((state) => el("span", {},
        el("i", { class: "swatch", "data-state": state }), state)),
      el("span", { class: "muted", testid: "chart-total" }, `${fmtNum(total)} in the last hour`));
    for (const i of legend.querySelectorAll("i.swatch")) {
      i.style.background = STATE_COLORS[i.dataset.state] || "var(--other)";
    }
    container.replaceChildren(root, legend);
  }

  function niceCeil(v) {
    if (v <= 4) return 4;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const f of [1, 2, 2.5, 5, 10]) if (f * p >= v) return f * p;
    return 10 * p;
  }

  // --- failed jobs ----------------------------------------------------------------------

  async function fetchFailed() {
    return api("GET", "/v1/jobs?state=failed&limit=200");
  }

  function renderFailed(data) {
    const jobs = data.jobs || [];
    replaceRows(
      $("failed-body"),
      jobs.map((j) =>
        el(
          "tr",
          { testid: `failed-job-${j.id}` },
          el("td", {}, el("a", { href: `#job/${j.id}`, testid: `failed-link-${j.id}` }, `#${j.id}`)),
          el("td", {}, j.task),
          el("td", {}, j.queue),
          el("td", {}, pill(j.state, `failed-state-${j.id}`)),
          el("td", { class: "num" }, `${j.attempts}/${j.max_attempts}`),
          el("td", { testid: `error-kind-${j.id}` }, j.error_kind || "–"),
          el("td", { class: "error-cell" }, errorDetails(j)),
          j.state === "pending"
            ? el("td", { class: "nowrap", title: j.run_at }, `retry at ${fmtTime(j.run_at)}`)
            : timeCell(j.finished_at),
          el("td", { class: "actions" }, jobButtons(j, "")),
        ),
      ),
      9,
      "No failed jobs.",
    );
  }

  function errorDetails(j) {
    if (!j.last_error) return el("span", { class: "muted" }, "–");
    const details = el(
      "details",
      { testid: `failed-error-${j.id}` },
      el("summary", { testid: `failed-error-summary-${j.id}` }, firstLine(j.last_error)),
      el("pre", { class: "error-text", testid: `failed-error-text-${j.id}` }, j.last_error),
    );
    details.open = expandedErrors.has(j.id);
    details.addEventListener("toggle", () => {
      if (details.open) expandedErrors.add(j.id);
      else expandedErrors.delete(j.id);
    });
    return details;
  }

  /** Retry (dead or cancelled) and Cancel (pending or running) buttons for a job. */
  function jobButtons(j, prefix) {
    const out = [];
    const make = (action, label) => {
      const button = el("button", { type: "button", testid: `${prefix}${action}-${j.id}` }, label);
      button.addEventListener("click", () =>
        act(button, async () => {
          await api("POST", `/v1/jobs/${j.id}/${action}`);
          showNotice(action === "retry" ? `Job #${j.id} queued again.` : `Job #${j.id} cancelled.`,
            { href: `#job/${j.id}`, text: "View job" });
          await refresh(true);
        }),
      );
      return button;
    };
    if (j.state === "dead" || j.state === "cancelled") out.push(make("retry", "Retry"));
    if (j.state === "pending" || j.state === "running") out.push(make("cancel", "Cancel"));
    return out;
  }

  // --- jobs -----------------------------------------------------------------------------

  const JOB_FILTERS = ["state", "queue", "task", "limit"];

  function enterJobs({ params }) {
    for (const name of JOB_FILTERS) {
      $(`jobs-filter-${name}`).value = params.get(name) || (name === "limit" ? "50" : "");
    }
  }

  async function fetchJobs({ params }) {
    const q = new URLSearchParams();
    for (const name of JOB_FILTERS) {
      const v = params.get(name);
      if (v) q.set(name, v);
    }
    if (!q.has("limit")) q.set("limit", "50");
    return api("GET", `/v1/jobs?${q}`);
  }

  function renderJobs(data) {
    replaceRows(
      $("jobs-body"),
      (data.jobs || []).map((j) =>
        el(
          "tr",
          { testid: `job-row-${j.id}` },
          el("td", {}, el("a", { href: `#job/${j.id}`, testid: `job-link-${j.id}` }, `#${j.id}`)),
          el("td", {}, j.task),
          el("td", {}, j.queue),
          el("td", {}, pill(j.state, `job-state-${j.id}`)),
          el("td", { class: "num" }, fmtNum(j.priority)),
          el("td", { class: "num" }, `${j.attempts}/${j.max_attempts}`),
          timeCell(j.enqueued_at),
          timeCell(j.finished_at),
          el("td", { class: "clip", title: j.last_error || null }, firstLine(j.last_error, 80)),
        ),
      ),
      9,
      "No jobs match.",
    );
  }

  function applyJobFilters(event) {
    event.preventDefault();
    const q = new URLSearchParams();
    for (const name of JOB_FILTERS) {
      const v = $(`jobs-filter-${name}`).value.trim();
      if (v && !(name === "limit" && v === "50")) q.set(name, v);
    }
    const hash = q.toString() ? `#jobs?${q}` : "#jobs";
    if (location.hash === hash) route();
    else location.hash = hash;
  }

  // --- job detail -----------------------------------------------------------------------

  function enterJob() {
    $("job-detail").replaceChildren(el("p", { class: "muted" }, "Loading…"));
    $("job-events-body").replaceChildren();
  }

  async function fetchJob({ arg }) {
    return api("GET", `/v1/jobs/${enc(arg)}`);
  }

  function renderJob(j) {
    const field = (label, value, testid) =>
      [el("dt", {}, label), el("dd", { testid }, value)];
    const block = (label, value, testid) =>
      value === null || value === undefined || value === ""
        ? null
        : el("div", { class: "block" }, el("h3", {}, label),
          el("pre", { testid }, typeof value === "string" ? value : JSON.stringify(value, null, 2)));
    fill($("job-detail"),
      el("div", { class: "job-head" },
        el("h2", {}, `Job #${j.id} `, el("span", { class: "muted" }, j.task)),
        pill(j.state, "job-detail-state"),
        el("span", { class: "spacer" }),
        jobButtons(j, "job-")),
      el("dl", { class: "fields" },
        field("Queue", j.queue),
        field("Priority", fmtNum(j.priority)),
        field("Attempts", `${j.attempts}/${j.max_attempts}`, "job-detail-attempts"),
        field("Error kind", j.error_kind || "–"),
        field("Enqueued", fmtTime(j.enqueued_at)),
        field("Run at", fmtTime(j.run_at)),
        field("Started", fmtTime(j.started_at)),
        field("Finished", fmtTime(j.finished_at))),
      block("Arguments", j.args, "job-detail-args"),
      block("Outcome", j.outcome, "job-detail-outcome"),
      block("Last error", j.last_error, "job-detail-error"),
    );
    replaceRows(
      $("job-events-body"),
      (j.events || []).map((e) =>
        el("tr", {},
          timeCell(e.at),
          el("td", {}, pill(e.event)),
          el("td", { class: "num" }, fmtNum(e.attempt)),
          el("td", {}, fmtValue(e.worker_id) || "–"),
          el("td", { class: "clip", title: fmtValue(e.detail) || null }, firstLine(fmtValue(e.detail), 160)))),
      5,
      "No events recorded.",
    );
  }

  // --- workers --------------------------------------------------------------------------

  function renderWorkers(data) {
    replaceRows(
      $("workers-body"),
      (data.workers || []).map((w) =>
        el("tr", { testid: `worker-row-${w.id}` },
          el("td", { testid: `worker-name-${w.id}` }, w.name),
          el("td", {}, w.host),
          el("td", { class: "num", testid: `worker-pid-${w.id}` }, fmtValue(w.pid)),
          el("td", {}, Array.isArray(w.queues) && w.queues.length ? w.queues.join(", ") : "all"),
          el("td", {}, pill(w.state, `worker-state-${w.id}`)),
          el("td", { class: `num${w.heartbeat_age_s > 30 ? " warn-text" : ""}` }, fmtSecs(w.heartbeat_age_s)),
          el("td", { class: "num" }, `${fmtNum(w.running)}${w.concurrency ? `/${w.concurrency}` : ""}`),
          el("td", { class: "num" }, fmtNum(w.processed)),
          el("td", { class: "num" }, fmtNum(w.failed)),
          timeCell(w.started_at))),
      10,
      "No workers.",
    );
  }

  // --- collections ----------------------------------------------------------------------

  function renderCollections(data) {
    replaceRows(
      $("collections-body"),
      (data.collections || []).map((c) => {
        const docs = c.documents || {};
        // `documents` is the total; without it, the statuses add up to it.
        const total = "documents" in docs
          ? Number(docs.documents)
          : ["pending", "embedded", "failed"].reduce((a, k) => a + Number(docs[k] || 0), 0);
        const done = Number(docs.embedded || 0);
        const pct = total ? Math.floor((done / total) * 100) : 100;
        const bar = el("div", { class: "bar-fill" });
        bar.style.width = `${pct}%`;
        const b = c.building;
        return el("tr", { testid: `collection-${c.name}` },
          el("td", {}, el("strong", {}, c.name),
            b ? el("div", { class: "small warn-text", testid: `building-${c.name}` },
              `switching to ${b.provider}/${b.model} (${b.dimensions} d)`) : null),
          el("td", {}, `${c.provider} / ${c.model}`),
          el("td", { class: "num" }, fmtNum(c.dimensions)),
          el("td", {}, c.distance || "–"),
          el("td", { class: "num" }, fmtNum(docs.pending || 0)),
          el("td", { class: "num" }, fmtNum(done)),
          el("td", { class: `num${docs.failed ? " bad-text" : ""}` }, fmtNum(docs.failed || 0)),
          el("td", { class: "wide" },
            el("div", { class: "progress", testid: `progress-${c.name}`, title: `${done} of ${total} embedded`,
              role: "progressbar", "aria-valuemin": 0, "aria-valuemax": total, "aria-valuenow": done },
            bar),
            el("span", { class: "small muted", testid: `progress-text-${c.name}` },
              `${fmtNum(done)} / ${fmtNum(total)} (${pct}%)`)));
      }),
      8,
      "No collections. Create one with `embedq collection create`.",
    );
  }

  // --- search ---------------------------------------------------------------------------

  async function enterSearch() {
    try {
      const data = await api("GET", "/v1/collections");
      const select = $("search-collection");
      const chosen = select.value;
      const names = (data.collections || []).map((c) => c.name);
      select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
      if (names.includes(chosen)) select.value = chosen;
    } catch (err) {
      showError(err);
    }
  }

  async function search(event) {
    event.preventDefault();
    const name = $("search-collection").value;
    const query = $("search-query").value;
    const body = { query, mode: $("search-mode").value, k: Number($("search-k").value) || 10 };
    const button = event.submitter || $("search-form").querySelector("button");
    await act(button, async () => {
      clearError();
      const started = performance.now();
      const data = await api("POST", `/v1/collections/${enc(name)}/search`, body);
      const ms = Math.round(data.took_ms ?? performance.now() - started);
      const hits = data.hits || [];
      $("search-summary").textContent =
        `${hits.length} hit${hits.length === 1 ? "" : "s"} for “${query}” in ${name} (${body.mode}, ${ms} ms)`;
      $("search-results").replaceChildren(
        ...hits.map((h, i) =>
          el("li", { class: "hit", testid: `hit-${i}` },
            el("div", { class: "hit-head" },
              el("code", { testid: `hit-key-${i}` }, h.key),
              h.title ? el("strong", {}, h.title) : null,
              el("span", { class: "spacer" }),
              el("span", { class: "muted small", testid: `hit-score-${i}` },
                `score ${typeof h.score === "number" ? h.score.toFixed(4) : fmtValue(h.score)}`)),
            el("p", { class: "snippet", testid: `hit-text-${i}` }, snippet(h)),
            h.metadata && Object.keys(h.metadata).length
              ? el("div", { class: "small muted" }, JSON.stringify(h.metadata)) : null)),
      );
    });
  }

  /** A hit's text: the keyword snippet with its matches marked, else the best chunk. */
  function snippet(h) {
    const best = Array.isArray(h.chunks) && h.chunks.length ? h.chunks[0].text : null;
    const text = String(h.snippet || h.text || best || "").replace(/\s+/g, " ").trim();
    const clipped = text.length > 600 ? `${text.slice(0, 599)}…` : text;
    if (!h.snippet) return clipped;
    // ts_headline wraps matches in <b>…</b>; everything else stays text.
    return clipped.split(/(<b>.*?<\/b>)/).map((part) =>
      part.startsWith("<b>") && part.endsWith("</b>") ? el("mark", {}, part.slice(3, -4)) : part);
  }

  // --- settings -------------------------------------------------------------------------

  function renderSettings(data) {
    replaceRows(
      $("settings-body"),
      (data.settings || []).map((s) => {
        const shown = s.secret
          ? (s.value === null || s.value === "" ? "not set" : "••••••••")
          : fmtValue(s.value);
        return el("tr", { testid: `setting-${s.name}` },
          el("td", {}, el("code", {}, s.name), s.env ? el("div", { class: "small muted" }, s.env) : null),
          el("td", { class: "value", testid: `setting-value-${s.name}` }, shown),
          el("td", {}, pill(s.source, `setting-source-${s.name}`)),
          el("td", { class: "small" }, s.description || ""),
          el("td", { class: "actions" }, s.editable ? settingEditor(s) : null));
      }),
      5,
      "No settings.",
    );
  }

  function settingEditor(s) {
    const input = el("input", {
      type: s.secret ? "password" : "text",
      value: s.secret ? "" : fmtValue(s.value),
      placeholder: s.secret ? "new value" : null,
      "aria-label": `value of ${s.name}`,
      spellcheck: "false",
      testid: `setting-input-${s.name}`,
    });
    const save = el("button", { type: "submit", testid: `setting-save-${s.name}` }, "Save");
    const form = el("form", { class: "inline" }, input, save);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      act(save, async () => {
        const row = await api("PUT", `/v1/settings/${enc(s.name)}`, { value: input.value });
        showNotice(row && row.note ? `Saved ${s.name}: ${row.note}.` : `Saved ${s.name}.`);
        await refresh(true);
      });
    });
    if (s.source === "database") {
      const reset = el("button", { type: "button", testid: `setting-reset-${s.name}`,
        title: "Remove the stored value" }, "Reset");
      reset.addEventListener("click", () =>
        act(reset, async () => {
          await api("DELETE", `/v1/settings/${enc(s.name)}`);
          showNotice(`Reset ${s.name}.`);
          await refresh(true);
        }));
      form.append(reset);
    }
    return form;
  }

  // --- wiring ---------------------------------------------------------------------------

  const VIEWS = {
    login: {},
    overview: { live: true, fetch: fetchOverview, render: renderOverview },
    failed: { live: true, fetch: fetchFailed, render: renderFailed },
    jobs: { live: true, enter: enterJobs, fetch: fetchJobs, render: renderJobs },
    job: { live: true, enter: enterJob, fetch: fetchJob, render: renderJob },
    workers: { live: true, fetch: () => api("GET", "/v1/workers"), render: renderWorkers },
    collections: { live: true, fetch: () => api("GET", "/v1/collections"), render: renderCollections },
    search: { enter: enterSearch },
    settings: { fetch: () => api("GET", "/v1/settings"), render: renderSettings },
  };

  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => {
    logout(null);
    location.hash = "#login";
  });
  $("error-close").addEventListener("click", clearError);
  $("jobs-filter").addEventListener("submit", applyJobFilters);
  $("search-form").addEventListener("submit", search);
  window.addEventListener("hashchange", route);
  setInterval(tick, REFRESH_MS);

  if (token) {
    api("GET", "/v1/whoami").then(
      (who) => {
        setSession(who);
        route();
      },
      (err) => {
        if (err.status === 401) {
          logout(err.message);
          return;
        }
        setSession(null);
        route();
        showError(err);
      },
    );
  } else {
    logout(null);
  }
})();
