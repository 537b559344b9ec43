import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { JSDOM } from 'jsdom';
import { flush, makeEnv } from './fakes.js';

// A DOM for react-dom, installed before React is loaded.
const dom = new JSDOM('<!doctype html><html><body></body></html>');
globalThis.window = dom.window;
globalThis.document = dom.window.document;
globalThis.navigator ??= dom.window.navigator; // node 20 has none; react-dom reads it
globalThis.IS_REACT_ACT_ENVIRONMENT = true;
after(() => dom.window.close());

const React = await import('react');
const { createRoot } = await import('react-dom/client');
const { useVncgateSession, VncgateViewer } = await import('../src/react.js');
const h = React.createElement;

function mount(element) {
    const container = document.createElement('div');
    document.body.appendChild(container);
    const caught = [];
    // React reports errors caught by a boundary on the console by default; keep the output clean.
    const root = createRoot(container, { onCaughtError: (error) => caught.push(error) });
    React.act(() => root.render(element));
    return { container, root, caught };
}

async function settle() {
    await React.act(async () => {
        await flush();
    });
}

test('StrictMode double mount/unmount → exactly one connection', async () => {
    const env = makeEnv();
    const statuses = [];
    function Probe() {
        const ref = React.useRef(null);
        const status = useVncgateSession(ref, { ...env.options, getToken: env.options.getToken });
        statuses.push(status.state);
        return h('div', { ref });
    }
    const { root } = mount(h(React.StrictMode, null, h(Probe)));
    await settle();
    // StrictMode ran the effect twice; the first Session died before it asked for a token.
    assert.equal(env.storage.writes, 2, 'Sessions made');
    assert.equal(env.tokenCalls.length, 1, 'tokens asked for');
    assert.equal(env.WebSocket.all.length, 1, 'sockets created');
    assert.equal(env.WebSocket.live(), 1, 'live sockets');
    React.act(() => {
        env.WebSocket.all[0].serverOpen();
        env.RFB.all[0].serverConnect();
    });
    assert.equal(statuses.at(-1), 'connected');
    React.act(() => root.unmount());
    await flush();
    assert.equal(env.WebSocket.live(), 0, 'unmount leaves no socket');
    assert.equal(env.WebSocket.listenerCount() + env.RFB.listenerCount(), 0);
});

test('a re-render with a new inline getToken does not reconnect, and uses the latest getToken', async () => {
    const env = makeEnv({ reconnect: { initialMs: 0 } });
    const seen = [];
    const view = (label) => h(VncgateViewer, {
        ...env.options,
        getToken: async (req) => { seen.push([label, req.reason]); return `tok-${label}`; },
    });
    const { root } = mount(view('a'));
    await settle();
    React.act(() => root.render(view('b')));
    await settle();
    assert.equal(env.WebSocket.all.length, 1);
    React.act(() => env.WebSocket.all[0].serverClose(1006));
    await new Promise((r) => setTimeout(r, 5));
    await settle();
    assert.deepEqual(seen, [['a', 'initial'], ['b', 'retry']]);
    assert.deepEqual(env.WebSocket.all[1].protocols, ['binary', 'bearer.tok-b']);
    React.act(() => root.unmount());
});

test('an error thrown inside the viewer → fallback rendered, onError called, page still works', async () => {
    const env = makeEnv();
    const errors = [];
    function Page({ n }) {
        return h('main', null,
            h('p', { id: 'other' }, `other content ${n}`),
            h(VncgateViewer, {
                ...env.options,
                onError: (error, info) => errors.push({ error, info }),
                fallback: (error) => h('p', { id: 'fallback' }, `viewer failed: ${error.message}`),
                // An overlay that breaks once the desktop is connected.
                children: (status) => {
                    if (status.state === 'connected') throw new Error('overlay broke');
                    return h('span', { id: 'overlay' }, status.state);
                },
            }));
    }
    const { container, root, caught } = mount(h(Page, { n: 1 }));
    await settle();
    assert.equal(container.querySelector('#overlay').textContent, 'connecting');
    React.act(() => {
        env.WebSocket.all[0].serverOpen();
        env.RFB.all[0].serverConnect();
    });
    assert.equal(container.querySelector('#fallback')?.textContent, 'viewer failed: overlay broke');
    assert.equal(errors.length, 1);
    assert.equal(errors[0].error.message, 'overlay broke');
    assert.ok(typeof errors[0].info.componentStack === 'string');
    assert.equal(caught.length, 1);
    // The failed viewer was unmounted: its session is gone with it.
    await flush();
    assert.equal(env.WebSocket.live(), 0);
    // The rest of the page keeps rendering.
    React.act(() => root.render(h(Page, { n: 2 })));
    assert.equal(container.querySelector('#other').textContent, 'other content 2');
    React.act(() => root.unmount());
});
