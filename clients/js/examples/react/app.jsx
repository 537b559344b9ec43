// The React example: a page showing a live desktop with <VncgateViewer>, as a web app embeds it.
// Built like any React app (`npm run build:example`: esbuild bundles React, noVNC and the
// package into dist/app.js); serve this directory as vncgate's `web_root`
// (`vncgate demo --web-root clients/js/examples/react`).
//
// Parameters come from the fragment (never sent to a server, so a token stays out of logs):
//   token=JWT                  a fixed token (the demo prints one), or
//   token_url=/api/vnc-token   POSTed {sid, reason}, answers {token}: how a real app does it
//   events=1                   subscribe to the gateway's session events (viewers, input mode)
// window.vncgateExample records the state, every close and every event, for browser tests.

import { StrictMode, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { VncgateViewer } from '@vncgate/client/react';

const params = new URLSearchParams(location.hash.slice(1));
const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/websockify`;

async function getToken({ sid, reason }) {
    const tokenUrl = params.get('token_url');
    if (!tokenUrl) return params.get('token') || null;
    // The app's backend mints a token for the signed-in user with the `sid` claim set to `sid`
    // (so a reload of this tab returns to the same desktop); `reason: "expired"` after a 4001.
    const res = await fetch(tokenUrl, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ sid, reason }),
    });
    if (!res.ok) throw new Error(`token endpoint answered ${res.status}`);
    return (await res.json()).token;
}

const HINTS = {
    1000: 'session ended', 1001: 'gateway restarting', 1006: 'connection refused or lost',
    1008: 'policy violation', 1011: 'gateway internal error', 1013: 'backend connection lost',
    4001: 'token expired', 4003: 'session closed by an administrator or token revoked',
    4008: 'idle timeout',
};

const record = { state: 'connecting', attempt: 0, inputMode: null, viewers: null, closes: [], errors: [] };
window.vncgateExample = record;
// The surface vncgate's browser tests read on its own viewer page (state, canvas).
window.vncgate = {
    get state() { return record.state; },
    get closeCode() { return record.closes.at(-1)?.code ?? null; },
    get canvas() { return document.querySelector('.viewer canvas'); },
};

function Status({ status, viewers }) {
    const c = status.lastClose;
    if (c && record.closes.at(-1)?.detail !== c) {
        record.closes.push({ detail: c, code: c.code, willRetry: c.willRetry, refusal: c.refusal ?? null, at: performance.now() });
    }
    Object.assign(record, { state: status.state, attempt: status.attempt, inputMode: status.inputMode });
    const cause = c?.refusal ? `refused: ${c.refusal.error ?? c.refusal.status}` : c?.reason || HINTS[c?.code] || 'unknown';
    const why = c ? ` · last close ${c.code} (${cause})` : '';
    const stopped = status.state === 'disconnected' && c && !c.willRetry ? ' · stopped' : '';
    return (
        <div className="status" data-state={status.state} role="status">
            {status.state}{why}{stopped}
            {status.inputMode && ` · input: ${status.inputMode}`}
            {viewers !== null && ` · viewers: ${viewers}`}
        </div>
    );
}

function App() {
    const [viewers, setViewers] = useState(null);
    return (
        <VncgateViewer
            url={url}
            getToken={getToken}
            events={params.get('events') === '1'}
            className="viewer"
            fallback={(error) => <p className="fallback">The viewer failed: {error.message}</p>}
            onError={(error) => record.errors.push(String(error))}
        >
            {(status) => {
                // Session events arrive on the Session (an EventTarget); listen once per Session.
                const s = status.session;
                if (s && !s.__exampleListening) {
                    s.__exampleListening = true;
                    s.addEventListener('viewers', (e) => {
                        record.viewers = e.detail;
                        setViewers(e.detail.count);
                    });
                }
                return <Status status={status} viewers={viewers} />;
            }}
        </VncgateViewer>
    );
}

createRoot(document.getElementById('root')).render(
    <StrictMode>
        <App />
    </StrictMode>,
);
