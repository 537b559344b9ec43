// Session: one logical connection to a vncgate desktop, made of successive WebSocket + RFB
// attempts. State machine (CONTRACT §14):
//
//   connecting ──rfb connect──▶ connected ──close, policy retry/refresh──▶ reconnecting
//        │                         ▲                                          │
//        │                         └──────────────rfb connect─────────────────┤
//        └──close, policy retry/refresh──▶ reconnecting ◀──failed attempt──────┘
//   any ──policy stop / maxAttempts / close() / destroy()──▶ disconnected (final)
//
// `reconnecting` covers both the backoff wait and the attempt that follows it, so the state
// only says "connected" once noVNC finished the RFB handshake.

import { reconnectOptions, backoffDelay } from './backoff.js';
import { decide, REFRESH, STOP } from './close_policy.js';
import { EventStream, eventsUrl } from './events.js';
import { SidStore, sidKey } from './sid.js';

// noVNC gives a closing socket 3 s (its DISCONNECT_TIMEOUT) before declaring it gone; a socket
// whose close event never arrives within that time is treated as an abnormal closure.
const CLOSE_GUARD_MS = 3000;

// Events of the gateway's stream re-dispatched on the Session under the same name.
const GATEWAY_EVENTS = new Set(['viewers', 'backend', 'expiring', 'recording']);

// The real noVNC module reads `document` when it is evaluated, so it is loaded only when a
// Session actually needs it: this module stays importable in node and in server-side rendering.
let novnc = null;
function loadRFB() {
    novnc ??= import('@novnc/novnc').then((m) => m.default);
    return novnc;
}

// Timer functions are looked up at call time so that fake timers installed after import apply.
const globalTimers = {
    setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
    clearTimeout: (id) => globalThis.clearTimeout(id),
};

function resolveWsUrl(url) {
    if (/^wss?:\/\//i.test(url)) return new URL(url).toString();
    // A path such as "/websockify": same host as the page, wss when the page is https.
    const page = globalThis.location;
    if (!page) throw new TypeError('options.url must be an absolute ws:// or wss:// URL');
    const u = new URL(url, page.href);
    u.protocol = page.protocol === 'https:' ? 'wss:' : 'ws:';
    return u.toString();
}

export class Session extends EventTarget {
    constructor(element, options = {}) {
        super();
        if (!element) throw new TypeError('connect() needs the element that will hold the screen');
        if (!options.url) throw new TypeError('options.url is required');
        const delivery = options.delivery ?? 'protocol';
        if (delivery !== 'protocol' && delivery !== 'query') {
            throw new TypeError('options.delivery must be "protocol" or "query"');
        }
        this.element = element;
        this.url = resolveWsUrl(options.url);
        this.delivery = delivery;
        this.reconnect = reconnectOptions(options.reconnect);
        this.getToken = options.getToken ?? (async () => null); // null: cookie auth (CONTRACT §3 source 4)
        this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
        this.RFB = options.RFB ?? null;
        this.fetch = options.fetch ?? ((...a) => globalThis.fetch(...a));
        this.timers = options.timers ?? globalTimers;
        this.random = options.random ?? Math.random;
        this.rfbOptions = { shared: true, ...options.rfbOptions };
        this.rfbProperties = { scaleViewport: true, ...options.rfbProperties };
        this.events = options.events ?? false;
        // After a socket that never opened (1006), ask the events path why (see _probeRefusal).
        this.probeRefusals = options.probeRefusals ?? true;
        this.sidStore = new SidStore({
            key: sidKey(this.url, options.sessionKey),
            sid: options.sid,
            storage: options.storage,
        });

        this.state = 'connecting';
        this.attempt = 0;          // retries since the last successful connection
        this.lastClose = null;     // detail of the last `close` event
        this.inputMode = null;     // from the events stream's `input_mode`
        this.rfb = null;           // the live noVNC RFB object, for advanced use (sendCtrlAltDel...)
        this._viewOnly = !!options.viewOnly;
        this._conn = null;         // the current attempt: { ws, rfb, opened, connected, ... }
        this._seq = 0;             // bumped to invalidate an attempt still awaiting getToken()
        this._timer = null;        // the pending reconnect timer
        this._stream = null;       // the events subscription
        this._destroyed = false;

        this._open('initial');
    }

    get sid() {
        return this.sidStore.value;
    }

    get viewOnly() {
        return this._viewOnly;
    }

    set viewOnly(v) {
        this._viewOnly = !!v;
        if (this.rfb) this.rfb.viewOnly = this._viewOnly;
    }

    /** Ends the session: no reconnect, state becomes `disconnected`. Idempotent. */
    close() {
        if (this.state === 'disconnected') return;
        this._seq += 1;
        this._clearRetry();
        if (this._conn) this._teardown(this._conn);
        this._end();
    }

    /** close(), and silence: no event is dispatched afterwards, nothing of ours stays alive. */
    destroy() {
        this._destroyed = true;
        this.close();
    }

    // ------------------------------------------------------------------ attempts

    async _open(reason) {
        const seq = ++this._seq;
        let RFB;
        try {
            // Awaited even when injected: connect() returns before anything is dispatched, and
            // a Session destroyed at once (React StrictMode) never asks for a token.
            RFB = await (this.RFB ?? loadRFB());
        } catch (error) {
            if (seq !== this._seq) return;
            this._emit('error', { source: 'rfb', error });
            this._end();
            return;
        }
        if (seq !== this._seq) return; // closed or destroyed meanwhile
        let token;
        try {
            // Right before the socket, after any wait: a token that expired during the backoff
            // is never reused; the app's getToken() decides whether its cached one is fresh.
            token = await this.getToken({ sid: this.sid, reason, attempt: this.attempt });
            if (token !== null && token !== undefined && (typeof token !== 'string' || token === '')) {
                throw new TypeError('getToken() must resolve to a non-empty string or null');
            }
        } catch (error) {
            if (seq !== this._seq) return;
            this._emit('error', { source: 'token', error });
            this._retryOrEnd(reason);
            return;
        }
        if (seq !== this._seq) return;
        if (token) this.sidStore.adoptFromToken(token);
        this._attach(RFB, token, reason);
    }

    _attach(RFB, token, reason) {
        const conn = { ws: null, rfb: null, token, reason, opened: false, connected: false, securityFailure: null, rfbDone: false, guard: null, off: [] };
        const on = (target, type, fn) => {
            target.addEventListener(type, fn);
            conn.off.push(() => target.removeEventListener(type, fn));
        };
        let url = this.url;
        // The gateway selects `binary` when subprotocols are offered (CONTRACT §3).
        const protocols = ['binary'];
        if (token && this.delivery === 'protocol') protocols.push(`bearer.${token}`);
        if (token && this.delivery === 'query') {
            const u = new URL(url);
            u.searchParams.set('token', token);
            url = u.toString();
        }
        this._conn = conn;
        try {
            // The page opens the socket itself and hands it to noVNC (RFB accepts a WebSocket for
            // its URL argument): the close event, with its code, reaches us directly; noVNC's
            // `disconnect` event only says {clean}. noVNC also never sees, so never logs, the URL.
            conn.ws = new this.WebSocket(url, protocols);
            on(conn.ws, 'open', () => { conn.opened = true; });
            on(conn.ws, 'close', (e) => this._finish(conn, e.code, e.reason ?? ''));
            conn.rfb = new RFB(this.element, conn.ws, this.rfbOptions);
        } catch (error) {
            // A bad URL or a missing browser feature: retrying cannot fix it. The message may
            // contain the URL, so the token: it is reported as an event, never logged here.
            this._teardown(conn);
            this._emit('error', { source: 'rfb', error });
            this._end();
            return;
        }
        const rfb = conn.rfb;
        Object.assign(rfb, this.rfbProperties);
        rfb.viewOnly = this._viewOnly;
        this.rfb = rfb;
        on(rfb, 'connect', () => {
            conn.connected = true;
            this.attempt = 0;
            this._setState('connected');
            this._startEvents();
        });
        on(rfb, 'securityfailure', (e) => { conn.securityFailure = e.detail ?? {}; });
        on(rfb, 'credentialsrequired', (e) => this._emit('credentialsrequired', e.detail));
        on(rfb, 'desktopname', (e) => this._emit('desktopname', e.detail));
        on(rfb, 'disconnect', () => {
            conn.rfbDone = true;
            // noVNC gives up before the socket closed (protocol or security failure): it has
            // called close() on the socket; wait for the close event to learn the code.
            if (conn.guard === null && this._conn === conn) {
                conn.guard = this.timers.setTimeout(() => this._finish(conn, 1006, ''), CLOSE_GUARD_MS);
            }
        });
    }

    _finish(conn, code, reason) {
        if (this._conn !== conn) return;
        this._teardown(conn);
        const wouldRetry = !conn.securityFailure && decide(code) !== STOP
            && this.attempt < this.reconnect.maxAttempts;
        if (code === 1006 && !conn.opened && wouldRetry && this.probeRefusals) {
            // Refused before the upgrade, or no gateway at all: the browser cannot tell us which,
            // and only a refusal changes the decision (a session that stops anyway is not probed).
            const seq = this._seq;
            this._probeRefusal(conn.token).then((refusal) => {
                if (seq === this._seq && !this._destroyed && this.state !== 'disconnected') {
                    this._closed(conn, code, reason, refusal);
                }
            });
            return;
        }
        this._closed(conn, code, reason, null);
    }

    /**
     * Why the gateway refused the upgrade, if it did: the events path is authorized exactly
     * like an upgrade (same token, Origin and owner rules), and a plain HTTP request shows its
     * answer. `{status, error}` for a 401/403, else null (no answer, or a stream that opened:
     * the refusal, if any, was transient). The probe's own stream, if any, is closed at once.
     */
    async _probeRefusal(token) {
        const abort = new AbortController();
        const headers = {};
        let url = eventsUrl(this.url, typeof this.events === 'object' ? this.events.path : undefined);
        if (token && this.delivery === 'protocol') headers.authorization = `Bearer ${token}`;
        if (token && this.delivery === 'query') {
            const u = new URL(url);
            u.searchParams.set('token', token);
            url = u.toString();
        }
        try {
            const res = await this.fetch(url, { headers, credentials: 'include', signal: abort.signal, cache: 'no-store' });
            if (res.status !== 401 && res.status !== 403) return null;
            const body = await res.json().catch(() => ({}));
            return { status: res.status, error: typeof body.error === 'string' ? body.error : null };
        } catch {
            return null;
        } finally {
            abort.abort();
        }
    }

    _closed(conn, code, reason, refusal) {
        // A VNC security failure (wrong VNC password) will not get better by retrying, nor a
        // refusal before the upgrade (CONTRACT §14), but for an expired token: refresh it.
        let decision = conn.securityFailure ? STOP : decide(code);
        if (refusal) decision = refusal.status === 401 && refusal.error === 'token_expired' ? REFRESH : STOP;
        if (decision !== STOP && this.attempt >= this.reconnect.maxAttempts) decision = STOP;
        const willRetry = decision !== STOP;
        const delayMs = willRetry ? backoffDelay(this.attempt, this.reconnect, this.random) : 0;
        this.lastClose = {
            code, reason, willRetry, delayMs, opened: conn.opened, wasConnected: conn.connected,
            ...(conn.securityFailure ? { securityFailure: conn.securityFailure } : {}),
            ...(refusal ? { refusal } : {}),
        };
        this._emit('close', this.lastClose);
        // A `close` listener may have ended the session (close(), destroy()): no retry then.
        if (this.state === 'disconnected' || this._destroyed) return;
        if (willRetry) this._scheduleRetry(delayMs, decision === REFRESH ? 'expired' : 'retry');
        else this._end();
    }

    /** After an attempt that failed without a socket (getToken threw): retry or give up. */
    _retryOrEnd(reason) {
        if (this.attempt >= this.reconnect.maxAttempts) {
            this._end();
            return;
        }
        this._scheduleRetry(backoffDelay(this.attempt, this.reconnect, this.random), reason);
    }

    _scheduleRetry(delayMs, reason) {
        this.attempt += 1;
        this._setState('reconnecting');
        this._timer = this.timers.setTimeout(() => {
            this._timer = null;
            this._open(reason);
        }, delayMs);
    }

    _clearRetry() {
        if (this._timer !== null) this.timers.clearTimeout(this._timer);
        this._timer = null;
    }

    /** Frees everything one attempt made: our listeners, its guard timer, the RFB and socket. */
    _teardown(conn) {
        for (const off of conn.off) off();
        conn.off = [];
        if (conn.guard !== null) this.timers.clearTimeout(conn.guard);
        conn.guard = null;
        // RFB.disconnect() closes the socket it was given. Called before noVNC sees the socket's
        // close event, it also makes noVNC take its normal path instead of logging a failure. An
        // RFB that already gave up must not be told again (noVNC logs that as an error).
        if (conn.rfb && !conn.rfbDone) conn.rfb.disconnect();
        else if (conn.ws) conn.ws.close();
        if (this._conn === conn) this._conn = null;
        if (this.rfb === conn.rfb) this.rfb = null;
    }

    _end() {
        this._stream?.close();
        this._stream = null;
        this._setState('disconnected');
    }

    // ------------------------------------------------------------------ events stream

    _startEvents() {
        if (!this.events || this._stream) return;
        const path = typeof this.events === 'object' ? this.events.path : undefined;
        this._stream = new EventStream({
            url: (typeof this.events === 'object' && this.events.url) || eventsUrl(this.url, path),
            getToken: () => this.getToken({ sid: this.sid, reason: 'events', attempt: 0 }),
            delivery: this.delivery,
            reconnect: this.reconnect,
            fetch: this.fetch,
            timers: this.timers,
            random: this.random,
            onEvent: (name, data) => this._onGatewayEvent(name, data),
            onError: (detail) => this._emit('error', { source: 'events', ...detail }),
        });
        this._stream.start();
    }

    _onGatewayEvent(name, data) {
        if (name === 'input_mode') {
            this.inputMode = typeof data === 'object' && data !== null ? data.mode ?? null : data;
            this._emit('inputmode', { mode: this.inputMode, data });
            return;
        }
        // Only the names of CONTRACT §14: a gateway event must not pose as `close` or `error`.
        if (GATEWAY_EVENTS.has(name)) this._emit(name, data);
    }

    // ------------------------------------------------------------------ plumbing

    _setState(state) {
        if (this.state === state) return;
        const previous = this.state;
        this.state = state;
        this._emit('statechange', { state, previous, attempt: this.attempt });
    }

    _emit(type, detail) {
        if (!this._destroyed) this.dispatchEvent(new CustomEvent(type, { detail }));
    }
}
