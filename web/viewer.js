// vncgate viewer: a small page around noVNC's RFB class (npm @novnc/novnc 1.7.0).
//
// Parameters are read from the query string and then the fragment (the fragment wins; it is
// never sent to a server, so prefer it for the token):
//   token=JWT            the access token (optional: the gateway also accepts a vncgate_token cookie)
//   delivery=query       (default) ws(s)://HOST/PATH?token=<urlencoded JWT>
//   delivery=protocol    Sec-WebSocket-Protocol: binary, bearer.<JWT>
//   path=websockify      WebSocket path on the gateway (default "websockify"; may carry its own query)
//   host=HOST:PORT       WebSocket endpoint override (default: the page's own host)
//   encrypt=0|1          ws:// or wss:// override (default: wss:// when the page is https)
//   view_only=1          send no keyboard/pointer input
//   reconnect=1          reconnect after a lost session (the client package's close-code rules
//                        and full-jitter backoff; a 4001 or a spent token stops: this page has
//                        no way to get a fresh token)
//   reconnect_delay=MS   backoff base (default 1000, doubled per failed attempt, max 30000)
//   logging=LEVEL        noVNC log level: none|error|warn (default)|info|debug
//
// For tests, window.vncgate = { rfb, state, closeCode, closeReason, desktopName, ... } (see `vg`).
//
// The token is never written to the console by this page. It never reaches noVNC's own
// logging either: the client package (./client/, clients/js) opens the WebSocket itself and
// hands noVNC the socket object, never the URL.

import RFB from './novnc/core/rfb.js';
import { initLogging } from './novnc/core/util/logging.js';
import { connect as connectSession } from './client/index.js';

// ---------------------------------------------------------------- parameters

function readParams(loc) {
    const params = new URLSearchParams(loc.search);
    const fragment = loc.hash.startsWith('#') ? loc.hash.slice(1) : loc.hash;
    for (const [k, v] of new URLSearchParams(fragment)) {
        params.set(k, v);
    }
    return params;
}

function truthy(v) {
    return v !== null && /^(1|true|yes|on)$/i.test(v.trim());
}

const params = readParams(window.location);
const token = params.get('token') || '';
const delivery = (params.get('delivery') || 'query').toLowerCase();
const viewOnly = truthy(params.get('view_only'));
const reconnect = truthy(params.get('reconnect'));
const reconnectDelay = clampInt(params.get('reconnect_delay'), 1000, 100, 600000);
const RECONNECT_MAX_DELAY = 30000;

const logLevel = (params.get('logging') || 'warn').toLowerCase();
initLogging(['none', 'error', 'warn', 'info', 'debug'].includes(logLevel) ? logLevel : 'warn');

function clampInt(v, dflt, min, max) {
    const n = Number.parseInt(v ?? '', 10);
    return Number.isFinite(n) ? Math.min(max, Math.max(min, n)) : dflt;
}

// ---------------------------------------------------------------- DOM

const $ = (id) => document.getElementById(id);
const screenEl = $('screen');
const statusEl = $('status');
const statusText = $('status-text');
const credsForm = $('creds');
const btnCad = $('btn-cad');
const btnFullscreen = $('btn-fullscreen');
const btnConnect = $('btn-connect');

// ---------------------------------------------------------------- state for tests

const vg = {
    rfb: null,
    state: 'connecting',        // 'connecting' | 'connected' | 'disconnected'
    closeCode: null,            // WebSocket close code of the last connection (number) or null
    closeReason: null,          // its close reason (string) or null
    closeCodes: [],             // close codes of every connection this page opened, in order
    clean: null,                // noVNC's disconnect detail.clean
    desktopName: null,
    securityFailure: null,      // { status, reason } from noVNC's securityfailure event
    connectedAt: null,          // performance.now() at the last 'connect' event
    attempts: 0,                // WebSocket connections opened by this page
    delivery,
    viewOnly,
    reconnect,
    get canvas() { return screenEl.querySelector('canvas'); },
    connect: () => connect(),
    disconnect: () => userDisconnect(),
};
window.vncgate = vg;

// ---------------------------------------------------------------- helpers

// Meaning of the close codes vncgate sends (CONTRACT §6), plus the browser's own 1006.
const CLOSE_HINTS = {
    1000: 'session ended',
    1001: 'gateway restarting',
    1003: 'unsupported data',
    1005: 'no close code',
    1006: 'connection refused or lost (check the token and the gateway)',
    1008: 'policy violation',
    1009: 'message too big',
    1011: 'gateway internal error',
    1013: 'backend connection lost, try again',
    4001: 'token expired',
    4003: 'session closed by an administrator or token revoked',
    4008: 'idle timeout',
};

function setStatus(state, text) {
    statusEl.dataset.state = state;
    statusText.textContent = text; // textContent: server-provided strings are never parsed as HTML
    statusEl.title = text;
}

function setState(state) {
    vg.state = state;
    btnCad.disabled = state !== 'connected' || viewOnly;
    btnConnect.textContent = state === 'disconnected' ? 'Connect' : 'Disconnect';
}

// Seconds until the token's `exp`, read without verifying anything (the gateway verifies).
// Used only to stop reconnecting with a token that can no longer work. null if unknown.
function tokenSecondsLeft() {
    if (!token) return null;
    try {
        const part = token.split('.')[1];
        const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
        const claims = JSON.parse(atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4)));
        return typeof claims.exp === 'number' ? claims.exp - Date.now() / 1000 : null;
    } catch {
        return null;
    }
}

/// The gateway's WebSocket URL, without the token (the Session adds it per `delivery`).
function websocketUrl() {
    const page = window.location;
    const secure = params.has('encrypt') ? truthy(params.get('encrypt')) : page.protocol === 'https:';
    const host = params.get('host') || page.host;
    // host[:port] only: no userinfo, no path, nothing a URL parser could reinterpret.
    if (!/^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$/.test(host)) {
        throw new Error('invalid host parameter');
    }
    if (delivery !== 'protocol' && delivery !== 'query') {
        throw new Error('invalid delivery parameter (query or protocol)');
    }
    const path = (params.get('path') ?? 'websockify').replace(/^\/+/, '');
    return `${secure ? 'wss' : 'ws'}://${host}/${path}`;
}

// ---------------------------------------------------------------- connection
//
// The connection is the browser client package's Session (clients/js, served as ./client/):
// close-code-aware reconnect with full-jitter backoff, the token asked for before every attempt,
// the socket opened by the Session and handed to noVNC (so the close code is known, and the
// token-bearing URL never reaches noVNC's logging). This page adds its status line, the
// credentials form and `window.vncgate`.

let session = null;
let userClosed = false;

// Counts the sockets this page opens (vg.attempts) and marks each attempt `connecting`. A
// factory, not a subclass: noVNC checks that the socket's own prototype has WebSocket's methods.
function CountedWebSocket(url, protocols) {
    const ws = new WebSocket(url, protocols);
    vg.attempts += 1;
    Object.assign(vg, { closeCode: null, closeReason: null, desktopName: null, connectedAt: null });
    credsForm.hidden = true;
    setState('connecting');
    return ws;
}

// Publishes each RFB as soon as it exists (before any network event can reach it), for the
// credentials form and the tests' event recorder.
class PublishedRFB extends RFB {
    constructor(...args) {
        super(...args);
        vg.rfb = this;
    }
}

function connect() {
    if (session && session.state !== 'disconnected') return;
    session?.destroy();
    userClosed = false;
    Object.assign(vg, { securityFailure: null, clean: null });
    let url;
    try {
        url = websocketUrl();
    } catch (e) {
        setState('disconnected');
        setStatus('disconnected', `Cannot connect: ${e.message}`);
        return;
    }
    setStatus('connecting', `Connecting to ${url.split('?')[0]}…`);
    session = connectSession(screenEl, {
        url,
        // A page given one token has nothing fresher to offer: a 4001 stops (see 'close').
        getToken: async () => token || null,
        delivery: delivery === 'protocol' ? 'protocol' : 'query',
        viewOnly,
        reconnect: reconnect
            ? { initialMs: reconnectDelay, maxMs: RECONNECT_MAX_DELAY }
            : { maxAttempts: 0 },
        RFB: PublishedRFB,
        WebSocket: CountedWebSocket,
        rfbProperties: { scaleViewport: true, resizeSession: false, clipViewport: false, focusOnClick: !viewOnly },
    });
    session.addEventListener('statechange', (e) => onState(e.detail.state));
    session.addEventListener('close', (e) => onClose(e.detail));
    session.addEventListener('desktopname', (e) => {
        vg.desktopName = e.detail.name;
        document.title = e.detail.name ? `${e.detail.name} · vncgate` : 'vncgate';
        if (vg.state === 'connected') showConnected();
    });
    session.addEventListener('credentialsrequired', (e) => askCredentials(e.detail.types || ['password']));
    session.addEventListener('error', (e) => {
        // Never e.detail.error.message: for a bad URL it contains the URL, so the token.
        if (e.detail.source === 'rfb') setStatus('disconnected', 'Cannot connect: the browser refused the WebSocket URL');
    });
}

function onState(state) {
    // vg.rfb is set once per RFB, by PublishedRFB (an observer of that property attaches once).
    if (state === 'connected') {
        vg.connectedAt = performance.now();
        setState('connected');
        showConnected();
        if (!viewOnly) session.rfb?.focus({ preventScroll: true });
    } else if (state === 'disconnected') {
        vg.rfb = null;
        setState('disconnected');
    }
}

function onClose(close) {
    vg.closeCode = close.code;
    vg.closeCodes.push(close.code);
    vg.closeReason = close.reason || '';
    vg.clean = close.code === 1000;
    credsForm.hidden = true;
    if (close.securityFailure) {
        const sf = close.securityFailure;
        vg.securityFailure = { status: sf.status, reason: sf.reason ?? null };
        setStatus('disconnected', `Security failure${sf.reason ? `: ${sf.reason}` : ` (status ${sf.status})`}`);
        return;
    }
    let text = userClosed ? 'Disconnected' : `Disconnected (${describeClose()})`;
    const left = tokenSecondsLeft();
    if (close.willRetry && !userClosed && (close.code === 4001 || (left !== null && left <= 0))) {
        // The token is spent and this page cannot get another: stop rather than retry in vain.
        session.close();
        text += ' · token expired';
    } else if (close.willRetry && !userClosed) {
        text += ` · reconnecting in ${Math.max(1, Math.round(close.delayMs / 1000))} s`;
    }
    // Between attempts the page shows 'disconnected' (with the reconnect note), as before.
    setState('disconnected');
    setStatus('disconnected', text);
}

function showConnected() {
    const name = vg.desktopName ? vg.desktopName : 'desktop';
    setStatus('connected', `Connected to ${name}`);
}

function describeClose() {
    if (vg.closeCode === null) return 'connection closed';
    const hint = CLOSE_HINTS[vg.closeCode];
    let text = `code ${vg.closeCode}`;
    if (vg.closeReason) text += `: ${vg.closeReason}`;
    else if (hint) text += `: ${hint}`;
    return text;
}

function userDisconnect() {
    userClosed = true;
    if (session && session.state !== 'disconnected') {
        session.close();
    }
    setStatus('disconnected', 'Disconnected');
}

// ---------------------------------------------------------------- credentials (VNC password)

function askCredentials(types) {
    for (const name of ['username', 'password', 'target']) {
        $(`cred-${name}`).hidden = !types.includes(name);
        $(`cred-${name}`).value = '';
    }
    credsForm.hidden = false;
    setStatus('connecting', 'The VNC server asks for credentials');
    const first = types.map((t) => $(`cred-${t}`)).find((el) => el);
    if (first) first.focus();
}

credsForm.addEventListener('submit', (e) => {
    e.preventDefault();
    if (!vg.rfb) return;
    const creds = {};
    for (const name of ['username', 'password', 'target']) {
        const el = $(`cred-${name}`);
        if (!el.hidden) creds[name] = el.value;
        el.value = '';
    }
    credsForm.hidden = true;
    setStatus('connecting', 'Authenticating…');
    vg.rfb.sendCredentials(creds);
});

// ---------------------------------------------------------------- buttons

btnCad.addEventListener('click', () => {
    if (vg.rfb && vg.state === 'connected' && !viewOnly) {
        vg.rfb.sendCtrlAltDel();
        vg.rfb.focus({ preventScroll: true });
    }
});

btnFullscreen.addEventListener('click', () => {
    const done = document.fullscreenElement
        ? document.exitFullscreen?.()
        : document.documentElement.requestFullscreen?.();
    // A refused fullscreen request must not become an unhandled rejection.
    done?.catch?.(() => {});
});

btnConnect.addEventListener('click', () => {
    if (vg.state === 'disconnected') connect();
    else userDisconnect();
});

$('view-only').hidden = !viewOnly;
if (!window.isSecureContext) {
    // noVNC also reports this on the console; some auth types need crypto.subtle.
    statusEl.title = 'Not a secure context: serve the page over https (or from localhost).';
}

connect();
