// @stratix/gateway-client: a dependency-free browser client for the Stratix streaming gateway.
// `client.subscribe("evaluations/e1", handlers)` watches a stream over SSE (read with fetch, so refusals keep
// their HTTP status) or over the client's one shared WebSocket. Either way: resume by id with no duplicate,
// full-jitter backoff following the gateway's close catalogue (40xx reconnect, 41xx stop), a continuity-lost
// callback, polling after `inactivity_timeout`, and WebSocket token refresh before `exp`. Types: the .d.ts.

export const VERSION = "0.1.0";

/** Upstream events after which a stream is over. */
export const TERMINAL_EVENTS = Object.freeze(["final", "error", "job_complete", "job_failed", "job_cancelled"]);
/** REST statuses (polling) of an evaluation that will not change any more. */
export const FINISHED_STATUSES = Object.freeze(["success", "failure", "timeout", "cancelled"]);
/** The gateway's WebSocket close codes by name: 40xx reconnect and resume, 41xx do not reconnect. */
export const CLOSE_CODES = Object.freeze({
  1009: "message_too_big", 4000: "shutting_down", 4001: "slow_consumer", 4002: "token_expired",
  4003: "upstream_unavailable", 4100: "superseded", 4101: "inactivity_timeout", 4102: "upstream_failed",
  4103: "policy_violation", 4104: "access_revoked", 4105: "terminated", 4401: "unauthorized", 4403: "forbidden",
});

const DEFAULTS = Object.freeze({
  credentials: "same-origin", // fetch's: sends the session cookie to the same origin
  backoff: Object.freeze({ baseMs: 500, capMs: 30000, giveUpMs: 300000 }),
  pollIntervalMs: 3000, // between two polls after inactivity_timeout
  refreshLeadMs: 30000, // refresh this long before exp (at most a fifth of the token's lifetime)
  idleTimeoutMs: 60000, // SSE: no byte for this long (4 of the gateway's 15 s heartbeats) means a dead connection
  pingIntervalMs: 25000, // WebSocket: a ping this often; nothing heard for two intervals means dead
});
const KINDS = ["evaluations", "trace-evaluations", "optimizations"];
const TERMINAL = new Set(TERMINAL_EVENTS);
const FINISHED = new Set(FINISHED_STATUSES);
const ACTIVE = new Set(["connecting", "live", "reconnecting"]);
/** WebSocket subscribe refusals that waiting may cure; other refusals stop the subscription. */
const RETRYABLE_REFUSALS = new Set(["over_capacity", "too_many_streams", "too_many_subscriptions", "rate_limited"]);
const DIGITS = /^(?:0|[1-9][0-9]*)$/;
const MAX_TIMER_MS = 2 ** 31 - 1; // setTimeout fires at once beyond this

/** Whether a WebSocket close code asks the client to reconnect (the gateway's catalogue, RFC 6455 otherwise). */
export function closeReconnects(code) {
  return !(code >= 4100 && code <= 4199) && code !== 1008 && code !== 1009 && code !== 4403;
}

/** The claims of a JWT, decoded without verification (only `exp` and `iat` are used), or null. */
export function jwtClaims(token) {
  const part = typeof token === "string" ? token.split(".")[1] : undefined;
  if (!part) return null;
  try {
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(base64 + "===".slice((base64.length + 3) % 4)), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" && !Array.isArray(claims) ? claims : null;
  } catch {
    return null;
  }
}

/** Full-jitter backoff: delay = random() * min(cap, base * 2^attempt), never below the server's floor. */
export class Backoff {
  constructor(policy = {}, random = Math.random) {
    this.policy = { ...DEFAULTS.backoff, ...policy };
    this.random = random;
    this.reset();
  }

  /** Milliseconds to wait before the next try, or null once `giveUpMs` passed without progress. */
  next(floorMs = 0, now = Date.now()) {
    const { baseMs, capMs, giveUpMs } = this.policy;
    if (this.since === null) this.since = now;
    else if (now - this.since >= giveUpMs) return null;
    const window = Math.min(capMs, baseMs * 2 ** Math.min(this.attempt, 40));
    this.attempt += 1;
    return Math.max(floorMs, this.random() * window);
  }

  /** Progress (an event arrived): the next failure starts from the smallest window again. */
  reset() { this.attempt = 0; this.since = null; }
}

/** WHATWG `text/event-stream` parsing without I/O: `push(text)` returns the events `text` completed. */
export class SSEParser {
  constructor() {
    Object.assign(this, { buffer: "", started: false, skipLF: false, lastEventId: "", retry: null });
    this.reset();
  }

  reset() { Object.assign(this, { data: [], type: "", id: null }); }

  push(text) {
    let buffer = this.buffer + text;
    if (!this.started && buffer) { // a byte order mark, once
      this.started = true;
      buffer = buffer.replace(/^\ufeff/, "");
    }
    if (this.skipLF && buffer) { // the CR that ended the last chunk may be followed by its LF
      this.skipLF = false;
      if (buffer[0] === "\n") buffer = buffer.slice(1);
    }
    this.skipLF ||= buffer.endsWith("\r");
    const lines = buffer.split(/\r\n|\r|\n/);
    this.buffer = lines.pop(); // an incomplete line
    const events = [];
    for (const line of lines) this.line(line, events);
    return events;
  }

  line(line, events) {
    if (line === "") {
      // `id` is this event's own id field (null without one); `lastEventId` persists, as the spec says.
      if (this.data.length) events.push({ type: this.type || "message", data: this.data.join("\n"), id: this.id });
      return this.reset();
    }
    if (line[0] === ":") return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.id = this.lastEventId = value;
    else if (field === "retry" && /^[0-9]+$/.test(value)) this.retry = Number(value);
  }
}

/** The resume point, and the memory that keeps a replayed event from being delivered twice. */
class Cursor {
  constructor(last) { this.last = last; this.recent = new Set(); } // opaque ids; integer ids compare as numbers

  accept(id) {
    if (id === null) return true;
    const last = this.last;
    if (last !== null && DIGITS.test(id) && DIGITS.test(last)) {
      if (id.length < last.length || (id.length === last.length && id <= last)) return false;
    } else if (this.recent.has(id)) {
      return false;
    }
    this.last = id;
    this.recent.add(id);
    if (this.recent.size > 1024) this.recent.delete(this.recent.values().next().value);
    return true;
  }

  restart() { this.last = null; this.recent.clear(); }
}

/** Calls a caller's handler; an exception in it is reported without breaking the stream. */
function call(handler, ...args) {
  try { if (typeof handler === "function") handler(...args); } catch (error) { setTimeout(() => { throw error; }); }
}

function parseJSON(text) { try { return JSON.parse(text); } catch { return text; } }
const asObject = (value) => (value && typeof value === "object" ? value : {});
const idText = (value) => (value === null || value === undefined || value === "" ? null : String(value));

async function errorBody(response) {
  const error = asObject(asObject(await response.json().catch(() => null)).error);
  return { code: String(error.code || `http_${response.status}`), message: String(error.message || "") };
}

function retryAfterMs(response) {
  const seconds = Number(response.headers.get("retry-after"));
  return Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : 0;
}

/** The gateway client: one per gateway, with one token provider and at most one WebSocket. */
export class GatewayClient {
  constructor(options = {}) {
    const origin = globalThis.location ? globalThis.location.origin : "";
    this.baseUrl = String(options.baseUrl ?? origin).replace(/\/+$/, "");
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...options.backoff } };
    this._fetch = options.fetch ?? ((...args) => globalThis.fetch(...args));
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._socket = null;
    this._subs = new Set();
  }

  /** Watch `stream` ("<kind>/<id>"); it starts at once. */
  subscribe(stream, options = {}) {
    const [kind, id, extra] = String(stream).split("/");
    if (!KINDS.includes(kind) || !id || extra !== undefined) throw new TypeError(`not a stream name: ${stream}`);
    let sub;
    if (options.transport === "ws") {
      this._socket ??= new Socket(this);
      if (this._socket.subs.has(stream)) throw new Error(`this client's socket already watches ${stream}`);
      sub = new SocketSubscription(this, stream, kind, options);
    } else {
      sub = new SSESubscription(this, stream, kind, options);
    }
    sub.reopen();
    return sub;
  }

  /** The token to send now (asking the provider), or null for cookie sessions. */
  async token() {
    const source = this.options.token;
    const value = typeof source === "function" ? await source() : source;
    return value ? String(value) : null;
  }

  /** Stop every subscription and close the WebSocket. */
  close() {
    for (const sub of [...this._subs]) sub.close();
    this._socket?.shut();
  }

  async _request(path, accept, signal) {
    const token = await this.token();
    const headers = token ? { Accept: accept, Authorization: `Bearer ${token}` } : { Accept: accept };
    const init = { headers, credentials: this.options.credentials, cache: "no-store", signal };
    return { url: this.baseUrl + path, headers, init };
  }
}

/** One watched stream; what differs between SSE and WebSocket is in the two subclasses. */
class Subscription {
  constructor(client, stream, kind, options, transport) {
    Object.assign(this, { client, stream, kind, transport, handlers: options, state: "idle", reconnects: 0,
      duplicates: 0, _timer: 0, _pollTimer: 0, _pollTick: null });
    this._cursor = new Cursor(idText(options.afterEventId));
    this._backoff = new Backoff(client.options.backoff, client.options.random);
  }

  get lastEventId() { return this._cursor.last; }

  /** Stream again from `lastEventId` (after polling, a close, or to force a new connection). */
  reopen() {
    this._halt();
    this._backoff.reset();
    this.client._subs.add(this);
    this._set("connecting");
    this._connect();
  }

  /** Stop for good; only `onState("closed")` follows. */
  close() {
    this._halt();
    this.client._subs.delete(this);
    this._set("closed", { code: "client_closed", reconnect: false, message: "closed by the caller",
      lastEventId: this.lastEventId });
  }

  _halt() {
    clearTimeout(this._timer);
    clearTimeout(this._pollTimer);
    this._pollTick = null;
    this._drop();
  }

  _set(state, info = {}) { this.state = state; call(this.handlers.onState, state, info); }
  _floor() { return 0; } // the least reconnect delay the server asked for

  _event(id, type, data) {
    if (!this._cursor.accept(id)) { this.duplicates += 1; return; }
    this._backoff.reset();
    call(this.handlers.onEvent, { stream: this.stream, id, type, data });
    if (TERMINAL.has(type) && ACTIVE.has(this.state)) this._finish("ended", { code: "ended", event: type });
  }

  _continuity(body) {
    this._cursor.restart(); // what follows is the retained history: ids start over
    call(this.handlers.onContinuityLost, { stream: this.stream, reason: String(body.reason || "unknown"),
      oldestRetainedId: idText(body.oldestRetainedId) });
  }

  _finish(state, info) {
    this._halt();
    this._set(state, info);
    if (state === "closed") call(this.handlers.onClose, info);
  }

  /** The gateway (or the network) ended this stream: reconnect, poll, or stop, as `raw` says. */
  _ended(raw) {
    const close = { code: String(raw.code || "unknown"), reconnect: raw.reconnect === true,
      message: String(raw.message || ""), lastEventId: idText(raw.lastEventId) ?? this.lastEventId };
    for (const key of ["detail", "poll", "status", "wsCode"]) if (raw[key] !== undefined) close[key] = raw[key];
    if (close.reconnect) this._retry(close, raw.retryAfterMs || 0);
    else if (close.code === "inactivity_timeout" && typeof close.poll === "string" && this.handlers.poll !== false) {
      this._poll(close);
    } else this._finish("closed", close);
  }

  _retry(why, floorMs) {
    const delay = this._backoff.next(Math.max(floorMs, this._floor()));
    if (delay === null) {
      const message = `gave up reconnecting (last: ${why.code})`;
      return this._finish("closed", { ...why, code: "retries_exhausted", reconnect: false, message });
    }
    this._waiting({ ...why, delayMs: Math.round(delay), attempt: this._backoff.attempt });
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._connect(), delay);
  }

  _waiting(info) { this.reconnects += 1; this._set("reconnecting", info); }

  /** After `inactivity_timeout`: GET `close.poll` every `pollIntervalMs` until finished or reopened. */
  _poll(close) {
    this._halt();
    this._set("polling", close);
    const tick = async () => {
      let delay = this.client.options.pollIntervalMs;
      try {
        const { url, init } = await this.client._request(close.poll, "application/json");
        const response = await this.client._fetch(url, init);
        const { status } = response;
        const body = response.ok ? await response.json() : { ...(await errorBody(response)), status };
        if (this._pollTick !== tick) return;
        if (response.ok) {
          call(this.handlers.onPoll, body);
          if (FINISHED.has(asObject(body).status)) return this._finish("ended", { code: "ended", snapshot: body });
        } else if (status < 500 && status !== 408 && status !== 429) {
          return this._finish("closed", { ...body, reconnect: false, lastEventId: this.lastEventId });
        } else {
          delay = Math.max(delay, retryAfterMs(response));
          call(this.handlers.onPollError, body);
        }
      } catch (error) {
        if (this._pollTick !== tick) return;
        call(this.handlers.onPollError, { status: 0, code: "network_error", message: String(error) });
      }
      if (this._pollTick === tick) this._pollTimer = setTimeout(tick, delay);
    };
    this._pollTick = tick;
    tick();
  }
}

/** A stream read over `GET /api/v1/<kind>/<id>/stream` with fetch and a streaming body. */
class SSESubscription extends Subscription {
  constructor(client, stream, kind, options) {
    super(client, stream, kind, options, "sse");
    // `_hint`: the server's latest `retry:`, the floor of every reconnect delay.
    Object.assign(this, { _controller: null, _hint: 0, _authRetried: false });
  }

  _floor() { return this._hint; }
  _drop() {
    const controller = this._controller;
    this._controller = null;
    controller?.abort();
  }

  async _connect() {
    const controller = new AbortController();
    this._controller = controller;
    const outcome = await this._read(controller).catch((error) => (
      { code: "network_error", reconnect: true, message: String(error?.message || error) }));
    if (this._controller !== controller) return; // ended meanwhile (terminal event, close(), reopen())
    this._controller = null;
    if (outcome) this._ended(outcome);
  }

  async _read(controller) {
    const path = `/api/v1/${this.stream}/stream`;
    const { url, headers, init } = await this.client._request(path, "text/event-stream", controller.signal);
    if (this.lastEventId !== null) headers["Last-Event-ID"] = this.lastEventId;
    const response = await this.client._fetch(url, init);
    if (this._controller !== controller) return null;
    if (response.status === 204) return this._finish("ended", { code: "ended", status: 204 }); // after its end
    if (response.status !== 200) return this._refusal(response);
    if (!/^text\/event-stream/i.test(response.headers.get("content-type") || "")) {
      return { code: "protocol_error", reconnect: false, status: 200, message: "the answer is not an event stream" };
    }
    this._authRetried = false;
    this._set("live");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SSEParser();
    const { idleTimeoutMs } = this.client.options;
    let idle = 0;
    let idled = false;
    try {
      for (;;) {
        clearTimeout(idle);
        if (idleTimeoutMs > 0) idle = setTimeout(() => { idled = true; controller.abort(); }, idleTimeoutMs);
        const { value, done } = await reader.read();
        if (done) break;
        const frames = parser.push(value);
        if (parser.retry !== null) this._hint = parser.retry;
        for (const frame of frames) {
          const close = this._frame(frame);
          if (this._controller !== controller) return null; // the frame ended the subscription
          if (close) return close;
        }
      }
    } catch (error) {
      if (!idled) throw error;
      return { code: "idle_timeout", reconnect: true, message: `no data for ${idleTimeoutMs} ms` };
    } finally {
      clearTimeout(idle);
      controller.abort();
    }
    return { code: "cut", reconnect: true, message: "the stream ended without its terminal event or a close" };
  }

  /** One SSE event: the gateway's close (returned) or continuity notice, or an upstream event. */
  _frame({ type, data, id }) {
    if (type === "gateway.close") return { code: "unknown", ...asObject(parseJSON(data)) };
    if (type === "gateway.continuity_lost") this._continuity(asObject(parseJSON(data)));
    else this._event(idText(id), type, parseJSON(data));
    return null;
  }

  /** A refused stream: 429 and 5xx are retried; so is a 401 once with a fresh token (it may have expired in
   *  between), and a 409 while resuming (our own previous connection, not yet seen gone: `reject` policy). */
  async _refusal(response) {
    const { status } = response;
    const close = { ...(await errorBody(response)), status, retryAfterMs: retryAfterMs(response) };
    const fresh = status === 401 && typeof this.client.options.token === "function" && !this._authRetried;
    this._authRetried = fresh;
    close.reconnect = fresh || status === 429 || status >= 500
      || (status === 409 && close.code === "stream_already_open" && this.lastEventId !== null);
    return close;
  }
}

/** A stream watched through the client's shared WebSocket. */
class SocketSubscription extends Subscription {
  constructor(client, stream, kind, options) {
    super(client, stream, kind, options, "ws");
    this._subscribed = false; // the gateway confirmed it and has not ended it since
  }

  _connect() { this.client._socket.attach(this); }
  _drop() { this.client._socket.detach(this); }
}

/** The one WebSocket of a client: subscriptions, reconnects with resume, pings and token refresh. */
class Socket {
  constructor(client) {
    Object.assign(this, { client, options: client.options, subs: new Map(), ws: null, open: false, dialing: false,
      timer: 0, pingTimer: 0, refreshTimer: 0, exp: 0, pending: null, heardAt: 0 });
    this.backoff = new Backoff(client.options.backoff, client.options.random);
  }

  attach(sub) {
    const holder = this.subs.get(sub.stream); // the gateway allows one subscription per stream per socket
    if (holder && holder !== sub) {
      const message = `this client's socket already watches ${sub.stream}`;
      return sub._finish("closed", { code: "already_subscribed", reconnect: false, message,
        lastEventId: sub.lastEventId });
    }
    this.subs.set(sub.stream, sub);
    if (this.open) this.subscribe(sub);
    else if (!this.ws && !this.timer && !this.dialing) this.dial();
  }

  detach(sub) {
    if (this.subs.get(sub.stream) !== sub) return;
    this.subs.delete(sub.stream);
    if (this.open && sub._subscribed) this.send({ type: "unsubscribe", stream: sub.stream });
    sub._subscribed = false;
    queueMicrotask(() => this.subs.size || this.shut()); // later, so that reopen() keeps the socket
  }

  subscribe(sub) {
    clearTimeout(sub._timer);
    const message = { type: "subscribe", stream: sub.stream };
    if (sub.lastEventId !== null) message.afterEventId = sub.lastEventId;
    this.send(message);
  }

  send(message) { this.ws.send(JSON.stringify(message)); }

  async dial() {
    this.dialing = true;
    let token;
    let ws;
    try {
      token = await this.client.token(); // a fresh one for every connection
      if (!this.subs.size || this.ws) return;
      const url = `${this.client.baseUrl.replace(/^http/, "ws")}/ws`;
      ws = new this.client._WebSocket(url, token ? ["gateway.v1", `bearer.${token}`] : ["gateway.v1"]);
    } catch (error) {
      return this.lost(1006, `could not connect: ${error}`, false);
    } finally {
      this.dialing = false;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => { opened = true; this.opened(ws, token); };
    ws.onmessage = (message) => this.ws === ws && this.message(message.data);
    // A refused upgrade (bad token, origin, caps) is a close 1006 before open: retried with a fresh token.
    ws.onclose = (event) => this.ws === ws && this.lost(event.code, event.reason, opened);
  }

  opened(ws, token) {
    this.open = true;
    this.heardAt = Date.now();
    call(this.options.onSocket, { type: "open" });
    this.armRefresh(token);
    this.pingTimer = setInterval(() => this.ping(ws), this.options.pingIntervalMs);
    for (const sub of this.subs.values()) this.subscribe(sub);
  }

  ping(ws) {
    if (Date.now() - this.heardAt <= 2 * this.options.pingIntervalMs) return this.send({ type: "ping" });
    this.teardown();
    ws.close();
    this.lost(1006, "no answer to pings", true);
  }

  teardown() {
    if (this.ws) this.ws.onopen = this.ws.onmessage = this.ws.onclose = null;
    Object.assign(this, { ws: null, open: false, pending: null });
    clearInterval(this.pingTimer);
    clearTimeout(this.refreshTimer);
  }

  /** No subscription left (or the client closed): close the socket normally. */
  shut() {
    const { ws } = this;
    clearTimeout(this.timer);
    this.teardown();
    this.timer = 0;
    ws?.close(1000, "done");
  }

  lost(code, reason, opened) {
    this.teardown();
    call(this.options.onSocket, { type: "close", code, reason, opened });
    const reconnect = closeReconnects(code);
    const info = { code: CLOSE_CODES[code] || reason || `close_${code}`, wsCode: code, reconnect,
      message: reason || (opened ? "the connection closed" : "the connection failed") };
    const delay = reconnect && this.subs.size ? this.backoff.next(0) : null;
    const stop = { ...info, code: reconnect ? "retries_exhausted" : info.code, reconnect: false };
    const wait = { ...info, delayMs: Math.round(delay), attempt: this.backoff.attempt };
    for (const sub of [...this.subs.values()]) {
      sub._subscribed = false;
      clearTimeout(sub._timer);
      if (delay === null) sub._finish("closed", { ...stop, lastEventId: sub.lastEventId });
      else sub._waiting({ ...wait, lastEventId: sub.lastEventId });
    }
    if (delay !== null) this.timer = setTimeout(() => { this.timer = 0; if (this.subs.size) this.dial(); }, delay);
  }

  message(text) {
    this.heardAt = Date.now();
    const msg = asObject(parseJSON(text));
    const sub = typeof msg.stream === "string" ? this.subs.get(msg.stream) : undefined;
    if (msg.type === "event" && sub?._subscribed) {
      const event = asObject(msg.event);
      const type = String(event.eventType);
      this.backoff.reset();
      if (TERMINAL.has(type)) sub._subscribed = false; // the gateway unsubscribes by itself
      // Jobs: the whole upstream event object, as SSE carries it; evaluations: its data.
      sub._event(idText(event.id), type, sub.kind === "optimizations" ? event : event.data);
    } else if (msg.type === "subscribed" && sub) {
      sub._subscribed = true;
      sub._set("live");
    } else if (msg.type === "unsubscribed" && sub?._subscribed) {
      sub._finish("ended", { code: "ended" }); // resumed after its end: no event to see
    } else if (msg.type === "error") {
      this.error(sub, asObject(msg.error));
    } else if (msg.type === "refreshed") {
      call(this.options.onSocket, { type: "refreshed", exp: msg.exp });
      this.armRefresh(this.pending); // the token the gateway took
      this.pending = null;
    }
  }

  error(sub, error) {
    if (error.code === "refresh_refused") {
      this.pending = null;
      call(this.options.onSocket, { type: "refresh_refused", message: String(error.message || "") });
      return this.retryRefresh();
    }
    if (!sub || error.code === "already_subscribed") return;
    if (error.code === "continuity_lost") return sub._continuity(error);
    // Anything else ended (or refused) the subscription: retried if it says so, or if waiting may cure it.
    sub._subscribed = false;
    const retry = error.reconnect === true || RETRYABLE_REFUSALS.has(error.code)
      || (error.code === "stream_already_open" && sub.lastEventId !== null);
    sub._ended({ ...error, reconnect: retry });
  }

  // -- token refresh: one socket outlives many short-lived tokens ------------------------------

  armRefresh(token) {
    clearTimeout(this.refreshTimer);
    const claims = jwtClaims(token);
    if (typeof this.options.token !== "function" || typeof claims?.exp !== "number") return;
    this.exp = claims.exp;
    const lifetime = claims.exp * 1000 - (typeof claims.iat === "number" ? claims.iat * 1000 : Date.now());
    this.refreshAt(claims.exp * 1000 - Math.min(this.options.refreshLeadMs, Math.max(0, lifetime) / 5));
  }

  refreshAt(when) {
    clearTimeout(this.refreshTimer);
    const wait = Math.min(MAX_TIMER_MS, Math.max(0, when - Date.now()));
    this.refreshTimer = setTimeout(() => (Date.now() < when ? this.refreshAt(when) : this.refresh()), wait);
  }

  async refresh() {
    const { ws } = this;
    const token = await this.client.token().catch(() => null);
    if (this.ws !== ws || !this.open) return;
    if (!(jwtClaims(token)?.exp > this.exp)) return this.retryRefresh(); // no fresher token (yet)
    this.pending = token;
    this.send({ type: "refresh", token });
  }

  /** Try again halfway to `exp`; past it the gateway closes with 4002 and the socket reconnects. */
  retryRefresh() {
    const left = this.exp * 1000 - Date.now();
    if (left > 1000) this.refreshAt(Date.now() + left / 2);
  }
}
