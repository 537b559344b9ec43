// The React example: a page embedding a live desktop with <VncgateViewer>, plus a status line.
// Parameters come from the fragment (never sent to a server, so the token stays out of logs):
//   url=wss://HOST/websockify   the gateway (default: this page's host, path /websockify)
//   token=JWT                   a fixed token, or
//   token_url=/api/vnc-token    POSTed {sid, reason}, answers {token}: how a real app does it
//   delivery=query              token in the query string instead of the bearer. subprotocol
//   events=1                    subscribe to GET /vncgate/events (shows the input mode)
//   view_only=1
// window.vncgateExample exposes the state and every close for browser tests.

import { createElement as h, StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { VncgateViewer } from '@vncgate/client/react';

const params = new URLSearchParams(location.hash.slice(1));
const url = params.get('url') || `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/websockify`;

async function getToken({ sid, reason }) {
    const tokenUrl = params.get('token_url');
    if (!tokenUrl) return params.get('token') || null;
    // The app's backend mints a token for this user with the `sid` claim set to `sid`, so a
    // reload of this tab returns to the same desktop; `reason: "expired"` asks for a fresh one.
    const res = await fetch(tokenUrl, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ sid, reason }),
    });
    if (!res.ok) throw new Error(`token endpoint answered ${res.status}`);
    return (await res.json()).token;
}

const HINTS = {
    1000: 'session ended', 1001: 'gateway restarting', 1003: 'unsupported data',
    1006: 'connection refused or lost', 1008: 'policy violation', 1009: 'message too big',
    1011: 'gateway internal error', 1013: 'backend connection lost', 4001: 'token expired',
    4003: 'session closed by an administrator or token revoked', 4008: 'idle timeout',
};

const record = { state: 'connecting', attempt: 0, inputMode: null, closes: [] };
window.vncgateExample = record;

function describe(status) {
    const c = status.lastClose;
    const why = c ? ` · last close ${c.code} (${c.reason || HINTS[c.code] || 'unknown'})` : '';
    const retry = c?.willRetry && status.state === 'reconnecting' ? ` · retry ${status.attempt} in ${c.delayMs} ms` : '';
    const mode = status.inputMode ? ` · input: ${status.inputMode}` : '';
    return `${status.state}${why}${retry}${mode}`;
}

function StatusLine({ status }) {
    if (status.lastClose && record.closes.at(-1) !== status.lastClose) {
        record.closes.push(status.lastClose);
    }
    Object.assign(record, { state: status.state, attempt: status.attempt, inputMode: status.inputMode });
    return h('div', { className: 'status', 'data-state': status.state, role: 'status' }, describe(status));
}

function App() {
    return h(VncgateViewer, {
        url,
        getToken,
        delivery: params.get('delivery') === 'query' ? 'query' : 'protocol',
        events: params.get('events') === '1',
        viewOnly: params.get('view_only') === '1',
        className: 'viewer',
        fallback: (error) => h('p', { className: 'fallback' }, `The viewer failed: ${error.message}`),
        onError: (error) => { record.error = String(error); },
    }, (status) => h(StatusLine, { status }));
}

createRoot(document.getElementById('root')).render(h(StrictMode, null, h(App)));
