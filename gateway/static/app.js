/* Stratix gateway dashboard: a reference browser client for the gateway.
 *
 * - Authenticates with the session cookie only. A token handed over in the URL fragment
 *   (`/#token=...`, as `gateway demo` prints it) is moved into the cookie and the fragment is
 *   stripped at once; fragments never reach the server, so the token is in no request line or log.
 * - Streams `/api/v1/<kind>/<id>/stream` through the gateway's browser client library
 *   (`/client/gateway-client.js`, SSE read with fetch on the cookie). The library resumes by id
 *   with no duplicate, backs off with full jitter, follows the close catalogue, and polls after
 *   `inactivity_timeout`; this page turns what it reports into the view:
 *   `gateway.continuity_lost` -> clear and rebuild from the events that follow,
 *   `superseded` -> stop and offer to take over, other closes -> say why.
 * - Batches DOM updates: events and state changes are queued and applied once per animation frame.
 */
import { FINISHED_STATUSES, GatewayClient, TERMINAL_EVENTS } from "/client/gateway-client.js";

const COOKIE = (document.querySelector('meta[name="gateway-cookie"]') || {}).content || "";
const POLL_INTERVAL_MS = 3000;
const LIST_REFRESH_MS = 10000;
const LOG_LIMIT = 12;
const TERMINAL = new Set(TERMINAL_EVENTS);
const REST_FINISHED = new Set(FINISHED_STATUSES);
const KINDS = new Set(["evaluations", "trace-evaluations", "optimizations"]);
const TOKEN_CHARS = /^[A-Za-z0-9._~+/=-]+$/;
const SVG = "http://www.w3.org/2000/svg";

// No token provider: the session cookie authenticates every request (same origin).
const client = new GatewayClient({ pollIntervalMs: POLL_INTERVAL_MS });
const $ = (id) => document.getElementById(id);
let view = null; // the stream being watched (one at a time)

// --- session token ---------------------------------------------------------------------------

function readCookie() {
  if (!COOKIE) return null;
  for (const part of document.cookie.split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === COOKIE) return part.slice(eq + 1).trim() || null;
  }
  return null;
}

function writeCookie(token) {
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = `${COOKIE}=${token}; Path=/; SameSite=Strict${secure}`;
}

function clearCookie() {
  document.cookie = `${COOKIE}=; Path=/; SameSite=Strict; Max-Age=0`;
}

function adoptFragmentToken() {
  if (!location.hash) return;
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token === null) return;
  // Strip the fragment before anything else, so the token leaves the address bar and history.
  history.replaceState(null, "", location.pathname + location.search);
  if (COOKIE && TOKEN_CHARS.test(token)) writeCookie(token);
}

function renderSession(message) {
  const signedIn = readCookie() !== null;
  let text = message;
  if (!text) {
    if (!COOKIE) text = "Cookie sessions are disabled in this gateway's config (auth.cookie): the page cannot sign in.";
    else if (signedIn) text = "Signed in with a session token.";
    else text = "No session token yet: paste one below, or open the link `gateway demo` prints.";
  }
  $("session-state").textContent = text;
  $("sign-out").disabled = !signedIn;
}

// --- listings --------------------------------------------------------------------------------

async function loadLists() {
  await Promise.all([
    loadList("evaluations", $("evaluations"), $("evaluations-note")),
    loadList("optimizations", $("jobs"), $("jobs-note")),
  ]);
}

async function loadList(kind, list, note) {
  let response;
  try {
    response = await fetch(`/api/v1/${kind}`, {
      credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" },
    });
  } catch {
    note.textContent = "The gateway did not answer.";
    return;
  }
  if (response.status === 401) {
    list.replaceChildren();
    note.textContent = "Sign in to see them.";
    renderSession(readCookie() ? "The session token was refused (expired or invalid): paste a fresh one." : "");
    return;
  }
  if (!response.ok) {
    note.textContent = `The listing failed (HTTP ${response.status}).`;
    return;
  }
  const body = await response.json();
  const items = Array.isArray(body) ? body : (body[kind] || body.items || body.data || body.results || []);
  updatePicker(kind, list, items);
  note.textContent = items.length ? "" : "None you may watch.";
}

/** Update the picker in place (keyed by id) so keyboard focus survives a refresh. */
function updatePicker(kind, list, items) {
  const existing = new Map([...list.querySelectorAll("button")].map((b) => [b.dataset.id, b]));
  const wanted = [];
  for (const item of items) {
    const id = String(item.id);
    let button = existing.get(id);
    if (!button) {
      button = document.createElement("button");
      button.type = "button";
      button.dataset.kind = kind;
      button.dataset.id = id;
      const label = document.createElement("span");
      label.className = "id";
      label.textContent = id;
      const badge = document.createElement("span");
      badge.className = "badge";
      button.append(label, badge);
      button.addEventListener("click", () => openStream(kind, id));
    }
    const badge = button.querySelector(".badge");
    badge.textContent = item.status || "";
    badge.dataset.status = item.status || "none";
    button.setAttribute("aria-pressed", String(Boolean(view && view.kind === kind && view.id === id)));
    wanted.push(button);
  }
  for (const button of existing.values()) {
    if (!wanted.includes(button)) button.parentElement.remove();
  }
  wanted.forEach((button, index) => {
    const li = button.parentElement || document.createElement("li");
    if (!button.parentElement) li.append(button);
    if (list.children[index] !== li) list.insertBefore(li, list.children[index] || null);
  });
}

const REST_STATUS = { queued: "pending", running: "in-progress", completed: "success", failed: "failure" };

/** Keep the picker's badge for the watched stream as current as the stream itself. */
function syncPicker(v, status) {
  const button = document.querySelector(`.picker button[data-kind="${v.kind}"][data-id="${CSS.escape(v.id)}"]`);
  if (!button || !v.status && !v.jobState) return;
  const shown = v.job ? status : (REST_STATUS[status] || status);
  const badge = button.querySelector(".badge");
  badge.textContent = shown;
  badge.dataset.status = shown;
}

function markSelected() {
  for (const button of document.querySelectorAll(".picker button")) {
    const on = Boolean(view && view.kind === button.dataset.kind && view.id === button.dataset.id);
    button.setAttribute("aria-pressed", String(on));
  }
}

// --- the connection indicator ----------------------------------------------------------------

function setConn(state, label) {
  const conn = $("conn");
  conn.dataset.state = state;
  $("conn-label").textContent = label;
}

// --- one watched stream ----------------------------------------------------------------------

function freshContent(v) {
  Object.assign(v, {
    lastId: null, finished: false, rebuild: true, chartDirty: true,
    status: null, rowsTotal: null, rowsComplete: 0, rows: new Map(), newRows: [], scoreSum: 0,
    finalAccuracy: null, meta: "", errorMessage: null,
    iterations: null, iterationsDone: 0, baseline: null, scores: [], bests: [], best: null,
    bestScore: null, jobState: null, stateDetail: "", log: [],
  });
}

function openStream(kind, id) {
  stopView();
  const v = {
    kind, id, job: kind === "optimizations", sub: null, queue: [], scheduled: false, notice: "",
    stats: { events: 0, reconnects: 0, continuity: 0 },
  };
  freshContent(v);
  view = v;
  history.replaceState(null, "", `${location.pathname}?watch=${encodeURIComponent(`${kind}/${id}`)}`);
  const noun = v.job ? "Optimization job" : (kind === "trace-evaluations" ? "Trace evaluation" : "Evaluation");
  $("empty").hidden = true;
  $("view").hidden = false;
  $("eval-panel").hidden = v.job;
  $("job-panel").hidden = !v.job;
  $("view-title").textContent = `${noun} ${id}`;
  $("progress-caption").textContent = v.job ? "Iterations" : "Rows";
  $("score-caption").textContent = v.job ? "Best score" : "Accuracy";
  $("reconnect").hidden = true;
  markSelected();
  render(v);
  // Everything the library reports is queued and applied in order, once per frame.
  const queue = (item) => {
    v.queue.push(item);
    schedule(v);
  };
  v.sub = client.subscribe(`${kind}/${id}`, {
    onEvent: (event) => queue({ kind: "event", type: event.type, id: event.id, data: event.data }),
    onContinuityLost: () => queue({ kind: "continuity" }),
    onState: (state, info) => queue({ kind: "state", state, info }),
    onPoll: (snapshot) => queue({ kind: "poll", snapshot }),
    onPollError: (error) => queue({ kind: "poll-error", error }),
  });
}

function stopView() {
  if (!view) return;
  const { sub } = view;
  view = null;
  if (sub) sub.close();
}

function schedule(v) {
  if (v.scheduled) return;
  v.scheduled = true;
  const run = () => {
    v.scheduled = false;
    flush(v);
  };
  if (document.hidden) setTimeout(run, 250); // rAF does not run in background tabs
  else requestAnimationFrame(run);
}

/** Apply everything queued, then touch the DOM once. */
function flush(v) {
  if (v !== view) return;
  for (const item of v.queue.splice(0)) {
    if (item.kind === "state") {
      applyState(v, item.state, item.info);
    } else if (item.kind === "continuity") {
      freshContent(v);
      v.stats.continuity += 1;
      v.notice = "The gateway could not resume exactly where this view left off; rebuilt from its history.";
    } else if (item.kind === "poll") {
      applySnapshot(v, item.snapshot);
    } else if (item.kind === "poll-error") {
      const { status } = item.error;
      v.notice = status ? `A poll failed (HTTP ${status}); trying again.` : "A poll failed (network); trying again.";
    } else {
      if (item.id) v.lastId = item.id;
      v.stats.events += 1;
      const data = item.data && typeof item.data === "object" ? item.data : {};
      if (v.job) applyJob(v, item.type, data);
      else applyEvaluation(v, item.type, data);
      if (TERMINAL.has(item.type)) {
        v.finished = true;
        loadLists(); // the picker shows the new status
      }
    }
  }
  render(v);
}

function applyEvaluation(v, type, d) {
  if (type === "status") {
    v.status = d.status || v.status;
  } else if (type === "progress") {
    if (Number.isFinite(d.rows_complete)) v.rowsComplete = d.rows_complete;
    if (Number.isFinite(d.rows_total)) v.rowsTotal = d.rows_total;
  } else if (type === "row_complete") {
    const row = d.row;
    if (row && Number.isFinite(row.index) && !v.rows.has(row.index)) {
      v.rows.set(row.index, row);
      v.newRows.push(row);
      v.scoreSum += Number(row.score) || 0;
    }
  } else if (type === "final") {
    const result = d.result || {};
    if (typeof result.accuracy === "number") v.finalAccuracy = result.accuracy;
    if (Number.isFinite(result.rows_total)) v.rowsTotal = result.rows_total;
    if (Number.isFinite(result.rows_complete)) v.rowsComplete = result.rows_complete;
    setMeta(v, result);
    v.status = v.status === "failed" ? "failed" : "completed";
    v.notice = v.stats.continuity
      ? "Evaluation complete. Rows from before a lost resume point are not shown; the totals are final."
      : "Evaluation complete.";
  } else if (type === "error") {
    v.status = "failed";
    v.errorMessage = (d.error && d.error.message) || "the evaluation failed";
    v.notice = `Failed: ${v.errorMessage}`;
  }
}

/** One poll for what the stream does not carry (model and dataset names). */
async function describe(v) {
  if (v.job) return;
  try {
    const response = await fetch(`/api/v1/${v.kind}/${encodeURIComponent(v.id)}`, {
      credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" },
    });
    if (response.ok && v === view) {
      setMeta(v, await response.json());
      render(v);
    }
  } catch {
    // purely informational
  }
}

function setMeta(v, evaluation) {
  const parts = [evaluation.model_name, evaluation.dataset_name].filter(Boolean);
  if (parts.length) v.meta = parts.join(" · ");
}

function applyJob(v, type, envelope) {
  const d = envelope.data || {};
  const iteration = envelope.iteration ?? d.iteration ?? null;
  let summary = "";
  if (type === "job_started") {
    if (Number.isFinite(d.iterations)) v.iterations = d.iterations;
    if (typeof d.baselineScore === "number") v.baseline = d.baselineScore;
    v.jobState = "running";
  } else if (type === "iteration_start") {
    if (v.jobState !== "paused") v.jobState = "running";
  } else if (type === "mutation_generated") {
    summary = `${d.mutationType || "mutation"}: ${d.preview || ""}`;
  } else if (type === "evaluation_complete") {
    if (typeof d.score === "number") v.scores.push({ iteration, score: d.score });
    summary = `score ${fmt(d.score)}`;
  } else if (type === "new_best") {
    v.best = { score: d.score, prompt: d.prompt, improvement: d.improvement, iteration };
    if (typeof d.score === "number") {
      v.bests.push({ iteration, score: d.score });
      v.bestScore = d.score;
    }
    summary = `score ${fmt(d.score)} (+${fmt(d.improvement)})`;
  } else if (type === "iteration_complete") {
    if (Number.isFinite(iteration)) v.iterationsDone = Math.max(v.iterationsDone, iteration);
    if (typeof d.bestScore === "number") v.bestScore = d.bestScore;
  } else if (type === "job_paused") {
    v.jobState = "paused";
    v.stateDetail = d.reason || "";
    summary = d.reason || "";
  } else if (type === "job_resumed") {
    v.jobState = "running";
    v.stateDetail = Number.isFinite(iteration) ? `resumed at iteration ${iteration}` : "resumed";
  } else if (type === "job_complete") {
    const results = d.results || {};
    v.jobState = "completed";
    v.stateDetail = "";
    if (typeof results.bestScore === "number") v.bestScore = results.bestScore;
    if (results.bestPrompt && !v.best) v.best = { score: results.bestScore, prompt: results.bestPrompt };
    if (Number.isFinite(v.iterations)) v.iterationsDone = v.iterations;
    v.notice = "Optimization complete.";
  } else if (type === "job_failed") {
    v.jobState = "failed";
    v.stateDetail = (d.error && d.error.message) || "";
    v.notice = `Failed: ${v.stateDetail}`;
    summary = v.stateDetail;
  } else if (type === "job_cancelled") {
    v.jobState = "cancelled";
    v.stateDetail = d.reason || "";
    v.notice = `Cancelled: ${v.stateDetail}`;
    summary = v.stateDetail;
  }
  v.chartDirty = true;
  const where = Number.isFinite(iteration) ? ` · iteration ${iteration}` : "";
  v.log.push(`#${envelope.id ?? "?"} ${type}${where}${summary ? ` · ${summary}` : ""}`);
  if (v.log.length > LOG_LIMIT) v.log.splice(0, v.log.length - LOG_LIMIT);
}

// --- connection states, closes and polling --------------------------------------------------

function applyState(v, state, info) {
  if (state === "connecting") {
    setConn(v.lastId ? "reconnecting" : "connecting", v.lastId ? "Reconnecting…" : "Connecting…");
  } else if (state === "live") {
    setConn("live", "Live");
    $("reconnect").hidden = true;
    if (!v.described) {
      v.described = true;
      describe(v);
    }
  } else if (state === "reconnecting") {
    // The library waits a full-jitter delay (never less than the gateway's `retry:`), then resumes by id.
    v.stats.reconnects += 1;
    setConn("reconnecting", "Reconnecting…");
    const why = info.status ? `HTTP ${info.status} ${info.code}` : `${info.code}: ${info.message || "reconnecting"}`;
    v.notice = `${why} (retrying in ${(info.delayMs / 1000).toFixed(1)} s from event ${v.lastId || "start"}).`;
  } else if (state === "polling") {
    setConn("polling", "Closed for inactivity → polling");
    v.notice = `No events for a while, so the gateway closed the stream. Polling every ${POLL_INTERVAL_MS / 1000} s.`;
    showReconnect("Stream live again");
  } else if (state === "ended") {
    v.finished = true;
    setConn("ended", info.snapshot ? "Ended (seen by polling)" : "Stream ended");
  } else if (state === "closed") {
    handleClose(v, info);
  }
}

function handleClose(v, close) {
  const code = close.code || "unknown";
  if (code === "client_closed") return;
  if (code === "inactivity_timeout") { // optimization jobs: nothing to poll
    setConn("closed", "Closed for inactivity");
    v.notice = "The gateway closed the idle stream. Stream it again when you want live updates.";
    showReconnect("Stream live again");
  } else if (code === "superseded") {
    setConn("superseded", "Superseded: opened elsewhere");
    v.notice = "This stream was opened again in another tab or window for the same user, so this view stopped.";
    showReconnect("Take over here");
  } else if (close.status === 401) {
    setConn("closed", "Closed: not signed in");
    v.notice = "The gateway refused the session token (missing, invalid or expired). Paste a fresh one.";
    renderSession("The session token was refused: paste a fresh one.");
    showReconnect("Try again");
  } else {
    setConn("closed", `Closed: ${code}`);
    v.notice = close.message || "The gateway ended the stream.";
    showReconnect("Try again");
  }
}

function showReconnect(label) {
  $("reconnect").textContent = label;
  $("reconnect").hidden = false;
}

function applySnapshot(v, evaluation) {
  v.status = evaluation.status || v.status;
  if (Number.isFinite(evaluation.rows_complete)) v.rowsComplete = evaluation.rows_complete;
  if (Number.isFinite(evaluation.rows_total)) v.rowsTotal = evaluation.rows_total;
  setMeta(v, evaluation);
  if (REST_FINISHED.has(evaluation.status)) {
    v.finished = true;
    if (typeof evaluation.accuracy === "number") v.finalAccuracy = evaluation.accuracy;
  }
  v.notice = `Polled at ${new Date().toLocaleTimeString()}: ${evaluation.status_description || evaluation.status}.`;
}

// --- rendering -------------------------------------------------------------------------------

function fmt(value, digits = 3) {
  return typeof value === "number" ? value.toFixed(digits) : "—";
}

function pct(value) {
  return typeof value === "number" ? `${(value * 100).toFixed(1)}%` : "—";
}

function render(v) {
  if (v !== view) return;
  const status = (v.job ? v.jobState : v.status) || "waiting";
  const badge = $("status");
  badge.textContent = status;
  badge.dataset.status = status;
  badge.title = v.stateDetail || "";
  $("view-meta").textContent = v.job ? (v.stateDetail ? `State: ${v.jobState} (${v.stateDetail})` : " ")
    : (v.meta || " ");

  const progress = $("progress");
  let total;
  let done;
  if (v.job) {
    total = v.iterations;
    done = v.iterationsDone;
    $("progress-text").textContent = Number.isFinite(total) ? `${done} of ${total}` : "—";
    $("score-text").textContent = typeof v.bestScore === "number"
      ? `${fmt(v.bestScore)}${typeof v.baseline === "number" ? ` (baseline ${fmt(v.baseline)})` : ""}` : "—";
  } else {
    total = v.rowsTotal;
    done = Math.max(v.rowsComplete, v.rows.size);
    $("progress-text").textContent = Number.isFinite(total) ? `${done} of ${total}` : `${v.rows.size}`;
    const running = v.rows.size ? v.scoreSum / v.rows.size : null;
    $("score-text").textContent = typeof v.finalAccuracy === "number"
      ? `${pct(v.finalAccuracy)} final` : (running === null ? "—" : `${pct(running)} so far`);
  }
  progress.max = Number.isFinite(total) && total > 0 ? total : 1;
  progress.value = Number.isFinite(total) && total > 0 ? Math.min(done, total) : 0;
  progress.setAttribute("aria-valuetext", $("progress-text").textContent);
  $("notice").textContent = v.notice || " ";

  if (!v.job) renderRows(v);
  else renderJob(v);

  syncPicker(v, status);
  $("d-events").textContent = String(v.stats.events);
  $("d-duplicates").textContent = String(v.sub ? v.sub.duplicates : 0);
  $("d-reconnects").textContent = String(v.stats.reconnects);
  $("d-continuity").textContent = String(v.stats.continuity);
  $("d-last-id").textContent = v.lastId || "—";
}

function renderRows(v) {
  const tbody = $("rows").tBodies[0];
  if (v.rebuild) {
    tbody.replaceChildren();
    v.newRows = [...v.rows.values()];
    v.rebuild = false;
  }
  if (!v.newRows.length) return;
  const wrap = tbody.closest(".table-wrap");
  const follow = wrap.scrollTop + wrap.clientHeight >= wrap.scrollHeight - 4;
  v.newRows.sort((a, b) => a.index - b.index);
  const last = tbody.lastElementChild;
  if (!last || Number(last.dataset.index) < v.newRows[0].index) {
    const fragment = document.createDocumentFragment();
    for (const row of v.newRows) fragment.append(rowElement(row));
    tbody.append(fragment);
  } else {
    for (const row of v.newRows) { // out of order (rare): insert in index order
      const after = [...tbody.rows].find((tr) => Number(tr.dataset.index) > row.index) || null;
      tbody.insertBefore(rowElement(row), after);
    }
  }
  v.newRows = [];
  if (follow) wrap.scrollTop = wrap.scrollHeight;
}

function rowElement(row) {
  const tr = document.createElement("tr");
  tr.dataset.index = String(row.index);
  const correct = Number(row.score) > 0;
  const cells = [row.index, row.subset, row.prompt, row.result, row.truth, fmt(Number(row.score), 2)];
  cells.forEach((value, i) => {
    const td = document.createElement("td");
    td.textContent = value === undefined || value === null ? "" : String(value);
    td.title = td.textContent;
    if (i === 5) {
      td.className = "score";
      td.dataset.correct = String(correct);
    }
    tr.append(td);
  });
  return tr;
}

function renderJob(v) {
  $("best-prompt").textContent = v.best && v.best.prompt
    ? `${v.best.prompt}  (score ${fmt(v.best.score)}${Number.isFinite(v.best.iteration) ? `, iteration ${v.best.iteration}` : ""})`
    : "—";
  const log = $("job-log");
  log.replaceChildren(...v.log.map((line) => {
    const li = document.createElement("li");
    li.textContent = line;
    return li;
  }));
  log.scrollTop = log.scrollHeight;
  if (v.chartDirty) {
    drawChart(v);
    v.chartDirty = false;
  }
}

function svg(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawChart(v) {
  const chart = $("chart");
  const W = 640;
  const H = 260;
  const L = 46;
  const R = 14;
  const T = 12;
  const B = 30;
  const seen = [...v.scores, ...v.bests].map((p) => p.iteration).filter(Number.isFinite);
  const span = Math.max(1, v.iterations || 0, ...seen);
  const band = (W - L - R) / span;
  const x = (i) => L + (i - 0.5) * band;
  const y = (s) => T + (1 - Math.max(0, Math.min(1, s))) * (H - T - B);
  const parts = [];
  const desc = svg("desc", { id: "chart-desc" });
  parts.push(desc);
  for (const s of [0, 0.25, 0.5, 0.75, 1]) {
    parts.push(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(s), y2: y(s) }));
    parts.push(svg("text", { class: "axis-label", x: L - 6, y: y(s) + 4, "text-anchor": "end" }, s.toFixed(2)));
  }
  const step = Math.ceil(span / 12);
  for (let i = 1; i <= span; i += step) {
    parts.push(svg("text", { class: "axis-label", x: x(i), y: H - 10, "text-anchor": "middle" }, String(i)));
  }
  if (typeof v.baseline === "number") {
    parts.push(svg("line", { class: "baseline", x1: L, x2: W - R, y1: y(v.baseline), y2: y(v.baseline) }));
  }
  const scores = v.scores.filter((p) => Number.isFinite(p.iteration)).sort((a, b) => a.iteration - b.iteration);
  if (scores.length > 1) {
    parts.push(svg("polyline", { class: "score-line", points: scores.map((p) => `${x(p.iteration)},${y(p.score)}`).join(" ") }));
  }
  for (const p of scores) {
    const dot = svg("circle", { class: "point", cx: x(p.iteration), cy: y(p.score), r: 4.5 });
    dot.append(svg("title", {}, `Iteration ${p.iteration}: score ${fmt(p.score)}`));
    parts.push(dot);
  }
  // Best so far, as a step line from the baseline through every new_best.
  const lastIteration = Math.max(0, v.iterationsDone, ...seen);
  if (lastIteration > 0 && (typeof v.baseline === "number" || v.bests.length)) {
    let best = typeof v.baseline === "number" ? v.baseline : v.bests[0].score;
    const points = [];
    for (let i = 1; i <= lastIteration; i += 1) {
      for (const b of v.bests) if (b.iteration === i) best = Math.max(best, b.score);
      points.push(`${x(i) - band / 2},${y(best)}`, `${x(i) + band / 2},${y(best)}`);
    }
    parts.push(svg("polyline", { class: "best-line", points: points.join(" ") }));
  }
  for (const b of v.bests.filter((p) => Number.isFinite(p.iteration))) {
    const mark = svg("circle", { class: "best-point", cx: x(b.iteration), cy: y(b.score), r: 6 });
    mark.append(svg("title", {}, `New best at iteration ${b.iteration}: ${fmt(b.score)}`));
    parts.push(mark);
  }
  desc.textContent = scores.length
    ? `${scores.length} variant scores over ${span} iterations; best ${fmt(v.bestScore)}`
      + `${typeof v.baseline === "number" ? `, baseline ${fmt(v.baseline)}` : ""}.`
    : "No scores yet.";
  chart.replaceChildren(...parts);
}

// --- wiring ----------------------------------------------------------------------------------

function init() {
  adoptFragmentToken();
  renderSession();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("token-input");
    const token = input.value.trim();
    input.value = "";
    if (!COOKIE) return;
    if (!TOKEN_CHARS.test(token)) {
      renderSession("That does not look like a token (expected a JWT).");
      return;
    }
    writeCookie(token);
    renderSession("Token saved in the session cookie.");
    loadLists();
    if (view && view.sub.state === "closed" && !view.finished) view.sub.reopen();
  });
  $("sign-out").addEventListener("click", () => {
    clearCookie();
    renderSession();
    loadLists();
  });
  $("open-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("open-id").value.trim();
    if (id) openStream($("open-kind").value, id);
  });
  $("reconnect").addEventListener("click", () => {
    if (view) view.sub.reopen(); // from the last event seen
  });
  loadLists();
  setInterval(() => {
    if (readCookie() !== null && !document.hidden) loadLists();
  }, LIST_REFRESH_MS);
  const watch = new URLSearchParams(location.search).get("watch");
  if (watch) {
    const slash = watch.indexOf("/");
    const kind = watch.slice(0, slash);
    const id = watch.slice(slash + 1);
    if (slash > 0 && KINDS.has(kind) && id && !id.includes("/")) openStream(kind, id);
  }
}

init();
