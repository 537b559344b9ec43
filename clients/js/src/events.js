// Client side of the gateway's session events: `GET /vncgate/events` (CONTRACT §14), a
// Server-Sent Events stream for the token's session.
//
// Read with fetch() and a small SSE parser instead of EventSource, because EventSource cannot
// send headers: the only token source it could use is the query string (CONTRACT §3 source 3),
// which puts the token in access logs and browser history, and its built-in auto-reconnect would
// replay the same URL, so the same (possibly expired) token, forever. With fetch the token goes
// in `Authorization: Bearer` (source 1) and every reconnect asks getToken() again.

import { backoffDelay } from './backoff.js';

export const DEFAULT_EVENTS_PATH = '/vncgate/events';

/** The events URL on the same gateway as the WebSocket URL: ws→http, wss→https. */
export function eventsUrl(wsUrl, path = DEFAULT_EVENTS_PATH) {
    const u = new URL(wsUrl);
    u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
    u.pathname = path;
    u.search = '';
    u.hash = '';
    return u.toString();
}

/**
 * An incremental parser of the text/event-stream format (WHATWG HTML §9.2): feed it decoded
 * text in arbitrary chunks; it calls onMessage(eventName, data) per complete event.
 * `id` and `retry` are ignored: reconnect timing is ours, and the gateway replays no history.
 */
export function createSseParser(onMessage) {
    let buffer = '';
    let name = '';
    let data = [];
    const line = (text) => {
        if (text === '') {
            if (data.length > 0) onMessage(name || 'message', data.join('\n'));
            name = '';
            data = [];
            return;
        }
        if (text.startsWith(':')) return; // comment, used as keep-alive
        const colon = text.indexOf(':');
        const field = colon < 0 ? text : text.slice(0, colon);
        let value = colon < 0 ? '' : text.slice(colon + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (field === 'event') name = value;
        else if (field === 'data') data.push(value);
    };
    return (chunk) => {
        buffer += chunk;
        let m;
        // A lone '\r' at the very end may be the first half of '\r\n': wait for the next chunk.
        while ((m = /\r\n|\n|\r(?!$)/.exec(buffer)) !== null) {
            line(buffer.slice(0, m.index));
            buffer = buffer.slice(m.index + m[0].length);
        }
    };
}

function parseData(text) {
    try {
        return JSON.parse(text);
    } catch {
        return text;
    }
}

// HTTP statuses after which reconnecting with a fresh token cannot help (CONTRACT §5).
const FINAL_STATUSES = new Set([400, 403, 404]);

/**
 * One events subscription, reconnecting with backoff until close(). Options:
 *   url, getToken() → token|null, delivery ('protocol' → Authorization header, 'query' → ?token=),
 *   onEvent(name, data), onError({status, code, error, final}), reconnect (backoff options),
 *   fetch, timers {setTimeout, clearTimeout}, random.
 */
export class EventStream {
    constructor(options) {
        this.o = options;
        this.closed = false;
        this.failures = 0;
        this.timer = null;
        this.abort = null;
    }

    start() {
        this.run();
    }

    close() {
        this.closed = true;
        if (this.timer !== null) this.o.timers.clearTimeout(this.timer);
        this.timer = null;
        this.abort?.abort();
        this.abort = null;
    }

    async run() {
        const abort = new AbortController();
        this.abort = abort;
        try {
            const token = await this.o.getToken();
            if (this.closed) return;
            const headers = { Accept: 'text/event-stream' };
            const url = new URL(this.o.url);
            if (token && this.o.delivery === 'query') url.searchParams.set('token', token);
            else if (token) headers.Authorization = `Bearer ${token}`;
            const res = await this.o.fetch(url.toString(), {
                headers, signal: abort.signal, cache: 'no-store', credentials: 'same-origin',
            });
            if (!res.ok) {
                const body = await res.json().catch(() => null);
                const code = body?.error ?? null;
                // An expired token is fixed by the next getToken(); other refusals are final.
                const final = FINAL_STATUSES.has(res.status) || (res.status === 401 && code !== 'token_expired');
                this.o.onError({ status: res.status, code, error: null, final });
                if (final) return;
            } else {
                this.failures = 0;
                await this.read(res.body);
            }
        } catch (error) {
            if (this.closed) return; // our own abort
            this.o.onError({ status: null, code: null, error, final: false });
        }
        if (this.closed) return;
        // The stream ended (token expired, gateway restart, network): reconnect after a backoff.
        const delay = backoffDelay(this.failures, this.o.reconnect, this.o.random);
        this.failures += 1;
        this.timer = this.o.timers.setTimeout(() => {
            this.timer = null;
            this.run();
        }, delay);
    }

    async read(body) {
        const reader = body.getReader();
        const decoder = new TextDecoder();
        const feed = createSseParser((name, data) => {
            if (!this.closed) this.o.onEvent(name, parseData(data));
        });
        for (;;) {
            const { value, done } = await reader.read();
            if (done || this.closed) break;
            feed(decoder.decode(value, { stream: true }));
        }
    }
}
