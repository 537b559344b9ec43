// The real noVNC 1.7.0 RFB (not a fake) driven by a Session in jsdom: it must accept the socket
// the Session made, and the Session must see the close code. Only the socket is fake: jsdom
// has no server to talk to. Canvas and ResizeObserver, which jsdom lacks, are stubbed.
import assert from 'node:assert/strict';
import { after, mock, test } from 'node:test';
import { JSDOM } from 'jsdom';
import { flush, makeEnv, makeWebSocketClass } from './fakes.js';

const dom = new JSDOM('<!doctype html><html><body><div id="screen"></div></body></html>', { pretendToBeVisual: true });
const { window } = dom;
// The globals noVNC's modules read when loaded or constructed.
for (const name of ['window', 'document', 'navigator', 'HTMLCanvasElement', 'Image', 'MutationObserver']) {
    globalThis[name] ??= name === 'window' ? window : window[name];
}
window.ResizeObserver = globalThis.ResizeObserver ??= class { observe() {} unobserve() {} disconnect() {} };
window.HTMLCanvasElement.prototype.getContext = function getContext() {
    return new Proxy({}, { get: (t, k) => (k in t ? t[k] : () => ({ data: new Uint8ClampedArray(4) })), set: (t, k, v) => { t[k] = v; return true; } });
};
Object.defineProperty(window, 'isSecureContext', { value: true }); // as on https or localhost
after(() => window.close());
// noVNC reads WebSocket.CONNECTING etc. when loaded; node 20 has no WebSocket.
const FakeWebSocket = makeWebSocketClass();
globalThis.WebSocket ??= FakeWebSocket;

// noVNC binds console.error/warn when it is loaded: capture them before that.
const logged = [];
mock.method(console, 'error', (...a) => logged.push(a.join(' ')));
mock.method(console, 'warn', (...a) => logged.push(a.join(' ')));
const { default: RFB } = await import('@novnc/novnc');
const { connect } = await import('../src/index.js');

test('real noVNC RFB: takes the Session\'s socket, the close code reaches the Session, no error logged', async () => {
    const env = makeEnv({ RFB, WebSocket: FakeWebSocket });
    const el = document.getElementById('screen');
    const s = connect(el, env.options);
    const errors = [];
    s.addEventListener('error', (e) => errors.push(e.detail.error));
    await flush();
    assert.deepEqual(errors, []);
    const ws = env.WebSocket.all[0];
    assert.equal(ws.binaryType, 'arraybuffer', 'noVNC attached itself to the socket');
    assert.ok(el.querySelector('canvas'), 'noVNC put its screen in the element');
    ws.serverOpen();
    ws.serverClose(1013, 'backend lost');
    assert.equal(s.lastClose.code, 1013);
    assert.equal(s.lastClose.reason, 'backend lost');
    assert.equal(s.lastClose.willRetry, true);
    assert.equal(el.querySelector('canvas'), null, 'noVNC removed its screen');
    s.destroy();
    assert.equal(env.timers.pending.size, 0);
    assert.deepEqual(logged, [], 'noVNC logged');
});
