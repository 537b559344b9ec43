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
//   reconnect=1          reconnect after a lost session (exponential backoff, see below)
//   reconnect_delay=MS   first reconnect delay (default 1000, doubled per failed attempt, max 30000)
//   logging=LEVEL        noVNC log level: none|error|warn (default)|info|debug
//
// For tests, window.vncgate = { rfb, state, closeCode, closeReason, desktopName, ... } (see `vg`).
//
// The token is never written to the console by this page. It never reaches noVNC's own
// logging either: noVNC logs the URL it is given ("connecting to <url>", level info), so this
// page opens the WebSocket itself and hands noVNC the socket object, never the URL.

import RFB from './novnc/core/rfb.js';
import { initLogging } from './novnc/core/util/logging.js';

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
const DISCONNECT_WAIT_MS = 3000; // same as noVNC's own DISCONNECT_TIMEOUT

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

// Codes after which reconnecting with the same token cannot help.
const NO_RECONNECT_CODES = new Set([1003, 1008, 1009, 4001, 4003]);

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

function websocketTarget() {
    const page = window.location;
    const secure = params.has('encrypt') ? truthy(params.get('encrypt')) : page.protocol === 'https:';
    const host = params.get('host') || page.host;
    // host[:port] only: no userinfo, no path, nothing a URL parser could reinterpret.
    if (!/^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$/.test(host)) {
        throw new Error('invalid host parameter');
    }
    const path = (params.get('path') ?? 'websockify').replace(/^\/+/, '');
    let url = `${secure ? 'wss' : 'ws'}://${host}/${path}`;
    let protocols = [];
    if (delivery === 'protocol') {
        // CONTRACT §3: a client offering subprotocols must offer `binary`; the gateway selects it.
        protocols = token ? ['binary', 'bearer.' + token] : ['binary'];
    } else if (delivery === 'query') {
        if (token) {
            url += (path.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(token);
        }
    } else {
        throw new Error('invalid delivery parameter (query or protocol)');
    }
    return { url, protocols, display: `${secure ? 'wss' : 'ws'}://${host}/${path.split('?')[0]}` };
}

// ---------------------------------------------------------------- connection

let generation = 0;        // events of an older connection are ignored
let everConnected = false;
let userClosed = false;
let failedAttempts = 0;    // consecutive attempts that never reached 'connected'
let reconnectTimer = null;

function connect() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (vg.rfb && vg.state !== 'disconnected') return;

    const gen = ++generation;
    userClosed = false;
    credsForm.hidden = true;
    Object.assign(vg, {
        rfb: null, closeCode: null, closeReason: null, clean: null,
        desktopName: null, securityFailure: null, connectedAt: null,
    });
    setState('connecting');

    let target;
    try {
        target = websocketTarget();
    } catch (e) {
        setState('disconnected');
        setStatus('disconnected', `Cannot connect: ${e.message}`);
        return;
    }
    setStatus('connecting', `Connecting to ${target.display}…`);

    // Close code capture. noVNC's 'disconnect' event only carries detail.clean, and its Websock
    // wrapper keeps the close event to itself (it logs the code, at error level, only when it fails).
    // RFB's constructor accepts a WebSocket object instead of a URL (documented in noVNC's
    // docs/API.md: "urlOrChannel ... can also be a WebSocket"), so the page creates the socket and
    // listens for 'close' with addEventListener. noVNC itself uses the `onclose` property, which
    // is a separate listener: neither replaces the other, no global WebSocket patching, no use of
    // noVNC internals. Our listener is added first, so the code is known before noVNC reacts.
    // A bonus: the token-bearing URL never passes through noVNC's logging.
    let ws;
    try {
        ws = new WebSocket(target.url, target.protocols);
    } catch {
        // The exception message would contain the URL (and the token): do not show it.
        setState('disconnected');
        setStatus('disconnected', 'Cannot connect: invalid WebSocket URL');
        return;
    }
    vg.attempts += 1;

    let socketClosed = false;
    let rfbDisconnected = false;
    let finishTimer = null;

    const finish = () => {
        if (gen !== generation || vg.state === 'disconnected') return;
        clearTimeout(finishTimer);
        credsForm.hidden = true;
        setState('disconnected');
        onDisconnected();
    };

    ws.addEventListener('close', (e) => {
        if (gen !== generation) return;
        socketClosed = true;
        vg.closeCode = e.code;
        vg.closeCodes.push(e.code);
        vg.closeReason = e.reason || '';
        if (rfbDisconnected) finish();
    });

    let rfb;
    try {
        rfb = new RFB(screenEl, ws, { shared: true });
    } catch (e) {
        ws.close();
        setState('disconnected');
        setStatus('disconnected', `Cannot connect: ${e.message}`);
        return;
    }
    vg.rfb = rfb;
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.clipViewport = false;
    rfb.viewOnly = viewOnly;
    rfb.focusOnClick = !viewOnly;

    rfb.addEventListener('connect', () => {
        if (gen !== generation) return;
        everConnected = true;
        failedAttempts = 0;
        vg.connectedAt = performance.now();
        setState('connected');
        showConnected();
        if (!viewOnly) rfb.focus({ preventScroll: true });
    });

    rfb.addEventListener('desktopname', (e) => {
        if (gen !== generation) return;
        vg.desktopName = e.detail.name;
        document.title = e.detail.name ? `${e.detail.name} · vncgate` : 'vncgate';
        if (vg.state === 'connected') showConnected();
    });

    rfb.addEventListener('securityfailure', (e) => {
        if (gen !== generation) return;
        vg.securityFailure = { status: e.detail.status, reason: e.detail.reason ?? null };
    });

    rfb.addEventListener('credentialsrequired', (e) => {
        if (gen !== generation) return;
        askCredentials(e.detail.types || ['password']);
    });

    rfb.addEventListener('disconnect', (e) => {
        if (gen !== generation) return;
        rfbDisconnected = true;
        vg.clean = !!e.detail.clean;
        // noVNC can give up (protocol or security failure) before the socket has closed;
        // wait for the close event so closeCode is set when state becomes 'disconnected'.
        if (socketClosed || ws.readyState === WebSocket.CLOSED) {
            finish();
        } else {
            finishTimer = setTimeout(finish, DISCONNECT_WAIT_MS);
        }
    });
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

function onDisconnected() {
    vg.rfb = null;
    if (vg.securityFailure) {
        const sf = vg.securityFailure;
        setStatus('disconnected', `Security failure${sf.reason ? `: ${sf.reason}` : ` (status ${sf.status})`}`);
        return; // a wrong password or refused security type will not get better by retrying
    }
    let text = userClosed ? 'Disconnected' : `Disconnected (${describeClose()})`;
    if (!userClosed && vg.connectedAt === null) failedAttempts += 1;

    const left = tokenSecondsLeft();
    const canRetry = reconnect && !userClosed && everConnected &&
        !NO_RECONNECT_CODES.has(vg.closeCode) && (left === null || left > 0);
    if (canRetry) {
        const delay = Math.min(RECONNECT_MAX_DELAY, reconnectDelay * 2 ** Math.min(failedAttempts, 16));
        text += ` · reconnecting in ${Math.max(1, Math.round(delay / 1000))} s`;
        reconnectTimer = setTimeout(connect, delay);
    } else if (reconnect && left !== null && left <= 0) {
        text += ' · token expired';
    }
    setStatus('disconnected', text);
}

function userDisconnect() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    userClosed = true;
    if (vg.rfb && vg.state !== 'disconnected') {
        vg.rfb.disconnect();
    } else {
        setStatus('disconnected', 'Disconnected');
    }
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
