import assert from 'node:assert/strict';
import { afterEach, beforeEach, mock, test } from 'node:test';
import { connect } from '../src/index.js';
import { flush, makeEnv, makeFetch } from './fakes.js';

beforeEach(() => mock.timers.enable({ apis: ['setTimeout'] }));
afterEach(() => mock.timers.reset());

// Each cycle ends a Session at a different point of its life, so every resource kind is live
// when destroy() or the end comes: a pending getToken, an open socket, the RFB listeners, a
// backoff timer, a close-guard timer, the events stream.
const ENDINGS = [
    async function destroyWhileFetchingToken(env, s) {
        s.destroy();
    },
    async function destroyWhileConnected(env, s) {
        await flush();
        env.WebSocket.all.at(-1).serverOpen();
        env.RFB.all.at(-1).serverConnect();
        await flush();
        s.destroy();
    },
    async function destroyDuringBackoff(env, s) {
        await flush();
        env.WebSocket.all.at(-1).serverClose(1006);
        await flush(); // the refusal probe's stream opened (no refusal) and was closed
        assert.equal(s.state, 'reconnecting');
        s.destroy();
    },
    async function destroyDuringTheRefusalProbe(env, s) {
        await flush();
        env.WebSocket.all.at(-1).serverClose(1006);
        s.destroy();
    },
    async function destroyDuringCloseGuard(env, s) {
        await flush();
        const ws = env.WebSocket.all.at(-1);
        ws.serverOpen();
        env.RFB.all.at(-1).fail(); // noVNC gave up; the close event is still on its way
        s.destroy();
    },
    async function closedByTheGateway(env, s) {
        await flush();
        env.WebSocket.all.at(-1).serverOpen();
        env.RFB.all.at(-1).serverConnect();
        await flush();
        env.WebSocket.all.at(-1).serverClose(4003);
        assert.equal(s.state, 'disconnected');
    },
    async function reconnectedThenClosedByTheUser(env, s) {
        await flush();
        env.WebSocket.all.at(-1).serverClose(1013);
        mock.timers.tick(s.lastClose.delayMs);
        await flush();
        env.WebSocket.all.at(-1).serverOpen();
        env.RFB.all.at(-1).serverConnect();
        await flush();
        s.close();
    },
];

test('100 connect/disconnect cycles leave zero listeners, timers, sockets and streams', async () => {
    const f = makeFetch();
    const env = makeEnv({ events: true, fetch: f.fetch });
    let appListenerCalls = 0;
    for (let i = 0; i < 100; i += 1) {
        const s = connect(env.element, env.options);
        const onState = () => { appListenerCalls += 1; };
        s.addEventListener('statechange', onState);
        await ENDINGS[i % ENDINGS.length](env, s);
        s.removeEventListener('statechange', onState);
        s.destroy(); // idempotent after close()
    }
    await flush(); // close events of sockets the client closed
    assert.ok(env.WebSocket.all.length >= 80, `only ${env.WebSocket.all.length} sockets were made`);
    assert.ok(f.calls.length >= 30, `only ${f.calls.length} event streams were opened`);
    assert.ok(appListenerCalls > 0);
    assert.equal(env.WebSocket.live(), 0, 'sockets left open');
    assert.equal(env.WebSocket.listenerCount(), 0, 'listeners left on sockets');
    assert.equal(env.RFB.listenerCount(), 0, 'listeners left on RFB objects');
    assert.ok(env.RFB.all.every((r) => r.state === 'disconnected' || r.state === 'disconnecting'),
        'an RFB was never told to disconnect');
    assert.equal(env.timers.pending.size, 0, 'timers left pending');
    assert.equal(f.open.size, 0, 'event streams left open');
    // Nothing scheduled by a dead Session may wake up later and open a socket.
    const made = env.WebSocket.all.length;
    mock.timers.tick(120000);
    await flush();
    assert.equal(env.WebSocket.all.length, made);
});
