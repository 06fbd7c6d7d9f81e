// Types of @stratix/gateway-client (gateway-client.js): a browser client for the Stratix streaming gateway.

export declare const VERSION: string;
/** Upstream events after which a stream is over: `final`, `error`, `job_complete`, `job_failed`, `job_cancelled`. */
export declare const TERMINAL_EVENTS: readonly string[];
/** REST statuses of a finished evaluation (polling): `success`, `failure`, `timeout`, `cancelled`. */
export declare const FINISHED_STATUSES: readonly string[];
/** The gateway's WebSocket close codes by name (4000 `shutting_down` ... 4105 `terminated`, 1009). */
export declare const CLOSE_CODES: Readonly<Record<number, string>>;

export type StreamKind = "evaluations" | "trace-evaluations" | "optimizations";
/** `<kind>/<id>`, e.g. `evaluations/e1` or `optimizations/job-42`. */
export type StreamName = `${StreamKind}/${string}`;
export type Transport = "sse" | "ws";
/**
 * - `connecting`: (re)opened by `subscribe()` or `reopen()`, not confirmed yet;
 * - `live`: the gateway accepted the stream (SSE 200, or WebSocket `subscribed`);
 * - `reconnecting`: waiting `info.delayMs` before resuming from `lastEventId` (40xx, network, 429/5xx...);
 * - `polling`: closed for inactivity; `GET info.poll` every `pollIntervalMs` (see `onPoll`);
 * - `ended`: the terminal event arrived, the stream had already ended (SSE 204), or a poll saw it finished;
 * - `closed`: stopped without its end: `info.code` says why (41xx codes, a refusal, `retries_exhausted`,
 *   or `client_closed` after `close()`). Nothing reconnects by itself; `reopen()` tries again.
 */
export type StreamState = "idle" | "connecting" | "live" | "reconnecting" | "polling" | "ended" | "closed";

/** A token, or a function asked for one on every (re)connect and before a WebSocket token's `exp`. */
export type TokenProvider = string | (() => string | null | undefined | Promise<string | null | undefined>);

/** Full jitter: a retry waits `random() * min(capMs, baseMs * 2^attempt)`, at least the server's hint. */
export interface BackoffPolicy {
  /** First retry window (default 500 ms). */
  baseMs?: number;
  /** Largest window (default 30 000 ms). */
  capMs?: number;
  /** Give up (`closed`, code `retries_exhausted`) after failing this long without a new event (default 300 000). */
  giveUpMs?: number;
}

export interface ClientOptions {
  /** The gateway's origin (and path prefix, if any). Default: the page's origin. */
  baseUrl?: string;
  /** Without one, the session cookie authenticates (same origin, or `credentials: "include"`). */
  token?: TokenProvider | null;
  /** fetch's credentials mode for SSE and polls (default `same-origin`). */
  credentials?: RequestCredentials;
  backoff?: BackoffPolicy;
  /** Between two polls after `inactivity_timeout` (default 3000); a `Retry-After` lengthens it. */
  pollIntervalMs?: number;
  /** WebSocket: refresh the token this long before `exp`, at most a fifth of its lifetime (default 30 000). */
  refreshLeadMs?: number;
  /** SSE: reconnect when nothing (not even a heartbeat) arrived for this long; 0 disables (default 60 000,
   *  four of the gateway's default 15 s heartbeats: keep it above 3 x `limits.heartbeat`). */
  idleTimeoutMs?: number;
  /** WebSocket: send a `ping` this often; nothing heard for two intervals reconnects (default 25 000). */
  pingIntervalMs?: number;
  /** What happens to the client's WebSocket (for indicators and diagnostics). */
  onSocket?: (event: SocketEvent) => void;
  /** Injected for tests or instrumentation. */
  fetch?: typeof fetch;
  WebSocket?: { new (url: string, protocols?: string | string[]): WebSocket };
  /** Returns a float in [0, 1): the backoff's random draw. */
  random?: () => number;
}

export type SocketEvent =
  | { type: "open" }
  /** `opened: false` with code 1006: the upgrade was refused or the gateway unreachable. */
  | { type: "close"; code: number; reason: string; opened: boolean }
  /** The gateway took a fresh token: the socket now expires at `exp` (unix seconds). */
  | { type: "refreshed"; exp: number }
  /** The fresh token was refused; the socket keeps its old expiry (a retry follows while time is left). */
  | { type: "refresh_refused"; message: string };

/** One upstream event, delivered once, in order. */
export interface GatewayEvent<T = any> {
  stream: StreamName;
  /** The upstream's id, as text (`null` if it had none). */
  id: string | null;
  /** The upstream event name (`eventType`): `status`, `progress`, `row_complete`, `final`, `job_started`... */
  type: string;
  /** Parsed JSON. Evaluations: the event's data. Jobs: the whole upstream event object
   *  `{id, eventType, iteration, timestamp, data}` (the same over SSE and WebSocket). */
  data: T;
}

/** The resume point is gone: discard state built from earlier events; the retained history follows. */
export interface ContinuityLost {
  stream: StreamName;
  reason: "trimmed" | "unknown" | "truncated" | string;
  oldestRetainedId: string | null;
}

/** Why a stream stopped, reconnects, or polls: the gateway's `gateway.close` fields, or the client's own. */
export interface CloseInfo {
  /** A catalogue code (`superseded`, `inactivity_timeout`, `token_expired`...), a refusal's error code
   *  (`unauthorized`, `forbidden`...), or the client's: `network_error`, `cut`, `idle_timeout`,
   *  `retries_exhausted`, `protocol_error`, `client_closed`, `close_<n>`. */
  code: string;
  reconnect: boolean;
  message: string;
  /** Where a resume would start (`null`: from the beginning). */
  lastEventId: string | null;
  detail?: string;
  /** After `inactivity_timeout` on evaluations: the path being polled. */
  poll?: string;
  /** The HTTP status of a refused SSE stream or poll. */
  status?: number;
  /** The WebSocket close code, when the socket closed. */
  wsCode?: number;
}

export interface StateInfo extends Partial<CloseInfo> {
  /** `reconnecting`: the wait before the next try, and how many tries failed in a row. */
  delayMs?: number;
  attempt?: number;
  /** `ended`: the terminal event's name, or the finished snapshot a poll saw. */
  event?: string;
  snapshot?: unknown;
}

export interface PollError {
  /** 0 for a network error. */
  status: number;
  code: string;
  message: string;
}

export interface SubscribeOptions<T = any> {
  /** `sse` (default: one HTTP stream per subscription) or `ws` (all of a client's `ws` streams share one socket). */
  transport?: Transport;
  /** Resume after this id (e.g. kept from an earlier page). */
  afterEventId?: string | number | null;
  /** `false`: stop (`closed`, `inactivity_timeout`) instead of polling after inactivity. */
  poll?: boolean;
  onEvent?: (event: GatewayEvent<T>) => void;
  onContinuityLost?: (info: ContinuityLost) => void;
  onState?: (state: StreamState, info: StateInfo) => void;
  /** The stream stopped without its end and will not come back by itself (state `closed`, not after `close()`). */
  onClose?: (info: CloseInfo) => void;
  /** Each polled snapshot (the upstream's Evaluation object) while `polling`. */
  onPoll?: (snapshot: any) => void;
  /** A poll failed but polling goes on (5xx, 429, network). */
  onPollError?: (error: PollError) => void;
}

export declare class Subscription {
  readonly stream: StreamName;
  readonly kind: StreamKind;
  readonly transport: Transport;
  readonly state: StreamState;
  /** The id of the last event delivered: where a reconnect resumes. */
  readonly lastEventId: string | null;
  /** Automatic reconnects so far. */
  readonly reconnects: number;
  /** Replayed events dropped because they had been delivered already. */
  readonly duplicates: number;
  /** Stream again from `lastEventId` (after polling, a close, or to force a new connection). */
  reopen(): void;
  /** Stop for good (unsubscribe or abort); `onState("closed", {code: "client_closed"})` follows. */
  close(): void;
}

export declare class GatewayClient {
  constructor(options?: ClientOptions);
  readonly baseUrl: string;
  /** Start watching `stream`; throws a TypeError for a malformed name, and an Error for a second `ws`
   *  subscription to the same stream on one client (the gateway allows one per socket). */
  subscribe<T = any>(stream: StreamName, options?: SubscribeOptions<T>): Subscription;
  /** The token the provider gives now (`null`: cookie session). */
  token(): Promise<string | null>;
  /** Close every subscription and the WebSocket. */
  close(): void;
}

/** Whether a WebSocket close code asks for a reconnect: not 41xx, 1008, 1009 or 4403; everything else does. */
export declare function closeReconnects(code: number): boolean;
/** A JWT's claims, decoded without verification; `null` if it is not a JWT. */
export declare function jwtClaims(token: string | null | undefined): Record<string, unknown> | null;

export declare class Backoff {
  constructor(policy?: BackoffPolicy, random?: () => number);
  attempt: number;
  /** Milliseconds before the next try (at least `floorMs`), or `null` to give up. */
  next(floorMs?: number, now?: number): number | null;
  reset(): void;
}

export interface SSEMessage {
  type: string;
  data: string;
  /** This event's own `id:` field (`null` without one). */
  id: string | null;
}

/** The WHATWG event-stream parser the SSE transport uses, without I/O. */
export declare class SSEParser {
  /** The last `id:` seen (it persists across events). */
  lastEventId: string;
  /** The last `retry:` seen, in milliseconds. */
  retry: number | null;
  /** Feed decoded text; returns the events it completed. */
  push(text: string): SSEMessage[];
}
