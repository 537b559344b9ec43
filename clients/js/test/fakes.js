// Fakes of the platform pieces a Session uses, each counting what is still alive so the tests
// can assert that nothing leaks: listeners, sockets, timers.

/** An EventTarget that counts the listeners currently registered on it. */
class CountingTarget extends EventTarget {
    constructor() {
        super();
        this.listeners = 0;
    }

    addEventListener(type, fn, opts) {
        this.listeners += 1;
        super.addEventListener(type, fn, opts);
    }

    removeEventListener(type, fn, opts) {
        this.listeners -= 1;
        super.removeEventListener(type, fn, opts);
    }
}

export function makeWebSocketClass() {
    const all = [];
    class FakeWebSocket extends CountingTarget {
        static CONNECTING = 0;
        static OPEN = 1;
        static CLOSING = 2;
        static CLOSED = 3;
        static all = all;
        /** Sockets nobody closed yet: neither the client (close()) nor the server. */
        static live() {
            return all.filter((ws) => ws.readyState < 2).length;
        }
        /** Listeners still registered on any socket ever created. */
        static listenerCount() {
            return all.reduce((n, ws) => n + ws.listeners, 0);
        }

        constructor(url, protocols) {
            super();
            this.url = url;
            this.protocols = protocols;
            this.readyState = 0;
            this.binaryType = 'blob';
            this.protocol = '';
            this.onopen = null;
            this.onclose = null;
            this.onmessage = null;
            this.onerror = null;
            all.push(this);
        }

        send() {}

        close() {
            if (this.readyState >= 2) return;
            this.readyState = 2;
            // Like a browser: the close event comes later, from the event loop.
            queueMicrotask(() => this._closed(1005, ''));
        }

        /** Test helper: the server accepted the upgrade. */
        serverOpen() {
            this.readyState = 1;
            this.protocol = 'binary';
            this.dispatchEvent(new Event('open'));
            this.onopen?.();
        }

        /** Test helper: the connection ended with this close code. */
        serverClose(code, reason = '') {
            this._closed(code, reason);
        }

        _closed(code, reason) {
            if (this.readyState === 3) return;
            this.readyState = 3;
            const e = new Event('close');
            Object.assign(e, { code, reason, wasClean: code !== 1006 });
            // Listeners first, then the onclose property, as in a browser when the listener
            // was added before the property was set (the Session adds its own before noVNC).
            this.dispatchEvent(e);
            this.onclose?.(e);
        }
    }
    return FakeWebSocket;
}

export function makeRFBClass() {
    const all = [];
    class FakeRFB extends CountingTarget {
        static all = all;
        static listenerCount() {
            return all.reduce((n, r) => n + r.listeners, 0);
        }

        constructor(target, ws, options) {
            super();
            if (typeof ws === 'string') throw new Error('the Session must hand RFB a socket, not a URL');
            this.target = target;
            this.ws = ws;
            this.options = options;
            this.state = 'connecting';
            this.viewOnly = false;
            // noVNC uses the on* properties of the channel, never addEventListener.
            ws.onclose = () => {
                if (this.state !== 'disconnected') this._disconnected(this.state === 'disconnecting');
            };
            all.push(this);
        }

        disconnect() {
            if (this.state === 'disconnected') throw new Error('disconnect() on a disconnected RFB (noVNC logs an error)');
            this.state = 'disconnecting';
            this.ws.close();
        }

        /** Test helper: the RFB handshake completed. */
        serverConnect() {
            this.state = 'connected';
            this.dispatchEvent(new Event('connect'));
        }

        /** Test helper: noVNC gives up on its own (e.g. a security failure) and closes the socket. */
        fail(securityFailure) {
            if (securityFailure) {
                const e = new Event('securityfailure');
                e.detail = securityFailure;
                this.dispatchEvent(e);
            }
            this.ws.close();
            this._disconnected(false);
        }

        _disconnected(clean) {
            this.state = 'disconnected';
            const e = new Event('disconnect');
            e.detail = { clean };
            this.dispatchEvent(e);
        }
    }
    return FakeRFB;
}

/**
 * Timers for `options.timers` that run on node's mock timers (so the test controls time with
 * mock.timers.tick) and count the ones still pending.
 */
export function makeTimers() {
    const pending = new Set();
    return {
        pending,
        setTimeout(fn, ms) {
            const id = setTimeout(() => {
                pending.delete(id);
                fn();
            }, ms);
            pending.add(id);
            return id;
        },
        clearTimeout(id) {
            pending.delete(id);
            clearTimeout(id);
        },
    };
}

/** A Storage-like object. */
export function makeStorage() {
    const map = new Map();
    const storage = {
        map,
        writes: 0, // a Session writes its sid once when it is made: this counts Sessions
        getItem: (k) => (map.has(k) ? map.get(k) : null),
        setItem: (k, v) => {
            storage.writes += 1;
            map.set(k, String(v));
        },
    };
    return storage;
}

/** Lets pending promise callbacks (getToken, dynamic imports) run. */
export function flush() {
    return new Promise((resolve) => setImmediate(resolve));
}

/** A JWT-shaped string with the given payload (unsigned: the client never verifies). */
export function fakeJwt(payload) {
    const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
    return `${b64({ alg: 'none' })}.${b64(payload)}.sig`;
}

/** A Session environment: fakes plus a getToken that records its calls. */
export function makeEnv(overrides = {}) {
    const WebSocket = overrides.WebSocket ?? makeWebSocketClass();
    const RFB = overrides.RFB ?? makeRFBClass();
    const timers = makeTimers();
    const storage = makeStorage();
    const tokenCalls = [];
    let n = 0;
    const getToken = async (req) => {
        tokenCalls.push(req);
        n += 1;
        return `token-${n}`;
    };
    const element = { nodeType: 1 };
    const options = {
        url: 'wss://gw.example/websockify',
        getToken,
        WebSocket,
        RFB,
        timers,
        storage,
        random: () => 0.5,
        // No gateway answers HTTP: a refusal probe finds nothing (tests that need one inject it).
        fetch: async () => { throw new TypeError('fetch failed'); },
        ...overrides,
    };
    return { WebSocket, RFB, timers, storage, tokenCalls, element, options };
}

/**
 * A fetch for the events stream. `answer(call)` may return { status, error } to refuse; otherwise
 * the response is a stream the test feeds with call.push(text) and ends with call.end(). `open`
 * holds the streams neither ended nor aborted.
 */
export function makeFetch(answer = () => null) {
    const calls = [];
    const open = new Set();
    const fetch = async (url, init) => {
        const call = { url, init };
        calls.push(call);
        const refusal = answer(call);
        if (refusal) {
            return new Response(JSON.stringify({ error: refusal.error, message: 'x' }), { status: refusal.status });
        }
        let controller;
        const body = new ReadableStream({ start(c) { controller = c; } });
        open.add(call);
        init.signal.addEventListener('abort', () => {
            if (open.delete(call)) controller.error(new DOMException('aborted', 'AbortError'));
        });
        call.push = (text) => controller.enqueue(new TextEncoder().encode(text));
        call.end = () => {
            open.delete(call);
            controller.close();
        };
        return new Response(body, { status: 200, headers: { 'content-type': 'text/event-stream' } });
    };
    return { fetch, calls, open };
}
