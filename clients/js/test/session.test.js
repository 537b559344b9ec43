import assert from 'node:assert/strict';
import { beforeEach, afterEach, mock, test } from 'node:test';
import { connect } from '../src/index.js';
import { fakeJwt, flush, makeEnv, makeFetch } from './fakes.js';

beforeEach(() => mock.timers.enable({ apis: ['setTimeout'] }));
afterEach(() => mock.timers.reset());

/** Opens the current socket and completes the RFB handshake. */
function establish(env, i = env.WebSocket.all.length - 1) {
    env.WebSocket.all[i].serverOpen();
    env.RFB.all[i].serverConnect();
}

test('the first attempt starts after connect() returns, so every event is observable', async () => {
    const env = makeEnv();
    const s = connect(env.element, env.options);
    const states = [];
    s.addEventListener('statechange', (e) => states.push(e.detail.state));
    assert.equal(s.state, 'connecting');
    assert.equal(env.WebSocket.all.length, 0);
    await flush();
    assert.equal(env.WebSocket.all.length, 1);
    establish(env);
    assert.deepEqual(states, ['connected']);
    assert.equal(s.rfb, env.RFB.all[0]);
    s.destroy();
});

test('default delivery: token in a bearer. subprotocol next to binary, never in the URL', async () => {
    const env = makeEnv();
    const s = connect(env.element, env.options);
    await flush();
    const ws = env.WebSocket.all[0];
    assert.equal(ws.url, 'wss://gw.example/websockify');
    assert.deepEqual(ws.protocols, ['binary', 'bearer.token-1']);
    // noVNC gets the socket, not the URL (so it can neither log the URL nor hide the close code).
    assert.equal(env.RFB.all[0].ws, ws);
    s.destroy();
});

test('delivery "query": token in the query string (CONTRACT §3 source 3)', async () => {
    const env = makeEnv({ delivery: 'query', url: 'wss://gw.example/websockify?x=1' });
    const s = connect(env.element, env.options);
    await flush();
    const ws = env.WebSocket.all[0];
    assert.equal(ws.url, 'wss://gw.example/websockify?x=1&token=token-1');
    assert.deepEqual(ws.protocols, ['binary']);
    s.destroy();
});

test('4001 → getToken called again (reason "expired") and the new socket carries the new token', async () => {
    const env = makeEnv();
    const s = connect(env.element, env.options);
    await flush();
    establish(env);
    env.WebSocket.all[0].serverClose(4001, 'token expired');
    assert.equal(s.state, 'reconnecting');
    mock.timers.tick(s.lastClose.delayMs);
    await flush();
    assert.equal(env.tokenCalls.length, 2);
    assert.equal(env.tokenCalls[1].reason, 'expired');
    assert.deepEqual(env.WebSocket.all[1].protocols, ['binary', 'bearer.token-2']);
    establish(env);
    assert.equal(s.state, 'connected');
    assert.equal(s.attempt, 0);
    s.destroy();
});

test('getToken is called right before each socket, not before the backoff wait', async () => {
    const env = makeEnv({ reconnect: { jitter: 'none' } });
    const s = connect(env.element, env.options);
    await flush();
    env.WebSocket.all[0].serverClose(1006);          // refused or unreachable: never opened
    await flush();                                   // the refusal probe finds no gateway
    assert.equal(s.lastClose.opened, false);
    assert.equal(s.lastClose.delayMs, 500);
    mock.timers.tick(499);
    await flush();
    assert.equal(env.tokenCalls.length, 1, 'no token fetched during the wait');
    mock.timers.tick(1);
    await flush();
    assert.equal(env.tokenCalls.length, 2);
    assert.equal(env.WebSocket.all.length, 2);
    assert.deepEqual(env.WebSocket.all[1].protocols, ['binary', 'bearer.token-2']);
    s.destroy();
});

test('retries back off, counting attempts, and reset once connected', async () => {
    const env = makeEnv({ reconnect: { jitter: 'none', maxMs: 4000 } });
    const s = connect(env.element, env.options);
    const delays = [];
    s.addEventListener('close', (e) => delays.push(e.detail.delayMs));
    await flush();
    for (let i = 0; i < 5; i += 1) {
        env.WebSocket.all[i].serverClose(1006);
        await flush();
        mock.timers.tick(s.lastClose.delayMs);
        await flush();
    }
    assert.deepEqual(delays, [500, 1000, 2000, 4000, 4000]);
    assert.equal(s.attempt, 5);
    assert.deepEqual(env.tokenCalls.map((c) => c.attempt), [0, 1, 2, 3, 4, 5]);
    establish(env);
    assert.equal(s.attempt, 0);
    env.WebSocket.all[5].serverClose(1013);
    assert.equal(s.lastClose.delayMs, 500);
    s.destroy();
});

test('maxAttempts: gives up after that many retries in a row', async () => {
    const env = makeEnv({ reconnect: { maxAttempts: 2 } });
    const s = connect(env.element, env.options);
    await flush();
    const willRetry = [];
    s.addEventListener('close', (e) => willRetry.push(e.detail.willRetry));
    for (let i = 0; i < 3; i += 1) {
        env.WebSocket.all[i].serverClose(1006);
        await flush();
        mock.timers.tick(s.lastClose.delayMs);
        await flush();
    }
    assert.deepEqual(willRetry, [true, true, false]);
    assert.equal(s.state, 'disconnected');
    assert.equal(env.WebSocket.all.length, 3);
    assert.equal(env.timers.pending.size, 0);
});

test('a VNC security failure is not retried, whatever the close code', async () => {
    const env = makeEnv();
    const s = connect(env.element, env.options);
    await flush();
    env.WebSocket.all[0].serverOpen();
    env.RFB.all[0].fail({ status: 1, reason: 'Authentication failed' });
    await flush(); // the socket's close event (1005: closed by noVNC) follows
    assert.equal(s.state, 'disconnected');
    assert.equal(s.lastClose.willRetry, false);
    assert.deepEqual(s.lastClose.securityFailure, { status: 1, reason: 'Authentication failed' });
});

test('noVNC gave up but the socket never closes: the guard ends the attempt as 1006', async () => {
    const env = makeEnv();
    const s = connect(env.element, env.options);
    await flush();
    const ws = env.WebSocket.all[0];
    ws.serverOpen();
    ws.close = () => {}; // a socket whose close never completes
    env.RFB.all[0].fail();
    assert.equal(s.state, 'connecting');
    mock.timers.tick(3000);
    assert.equal(s.lastClose.code, 1006);
    assert.equal(s.state, 'reconnecting');
    s.destroy();
});

test('close() while getToken is pending: no socket is ever opened', async () => {
    let release;
    const env = makeEnv({ getToken: () => new Promise((r) => { release = r; }) });
    const s = connect(env.element, env.options);
    await flush();
    s.close();
    assert.equal(s.state, 'disconnected');
    release('late-token');
    await flush();
    assert.equal(env.WebSocket.all.length, 0);
});

test('close() during the backoff wait cancels the retry', async () => {
    const env = makeEnv();
    const s = connect(env.element, env.options);
    await flush();
    env.WebSocket.all[0].serverClose(1001);
    assert.equal(env.timers.pending.size, 1);
    s.close();
    assert.equal(env.timers.pending.size, 0);
    mock.timers.tick(60000);
    await flush();
    assert.equal(env.WebSocket.all.length, 1);
});

test('close() from a close listener ends the session: no retry is scheduled', async () => {
    const env = makeEnv();
    const s = connect(env.element, env.options);
    await flush();
    establish(env);
    // An app that cannot refresh its token stops on 4001 from its own listener.
    s.addEventListener('close', (e) => { if (e.detail.code === 4001) s.close(); });
    env.WebSocket.all[0].serverClose(4001);
    assert.equal(s.state, 'disconnected');
    assert.equal(env.timers.pending.size, 0);
    mock.timers.tick(60000);
    await flush();
    assert.equal(env.WebSocket.all.length, 1);
});

test('a failing getToken is reported and retried with backoff', async () => {
    let fail = true;
    const env = makeEnv({
        getToken: async () => {
            if (fail) throw new Error('broker down');
            return 'ok';
        },
    });
    const s = connect(env.element, env.options);
    const errors = [];
    s.addEventListener('error', (e) => errors.push(e.detail));
    await flush();
    assert.equal(errors.length, 1);
    assert.equal(errors[0].source, 'token');
    assert.equal(s.state, 'reconnecting');
    fail = false;
    mock.timers.tick(250);
    await flush();
    assert.deepEqual(env.WebSocket.all[0].protocols, ['binary', 'bearer.ok']);
    s.destroy();
});

test('sid: kept in storage so a reload (a new Session, same storage) asks for the same desktop', async () => {
    const env = makeEnv();
    const a = connect(env.element, env.options);
    await flush();
    const sid = env.tokenCalls[0].sid;
    assert.match(sid, /^[A-Za-z0-9._:-]{1,128}$/);
    a.destroy();
    const b = connect(env.element, env.options); // same storage: the reloaded tab
    await flush();
    assert.equal(env.tokenCalls[1].sid, sid);
    assert.equal(b.sid, sid);
    b.destroy();
    const other = connect(env.element, { ...env.options, storage: makeEnv().storage });
    await flush();
    assert.notEqual(env.tokenCalls[2].sid, sid, 'another tab gets another desktop');
    other.destroy();
});

test('sid: the token\'s sid claim wins and is remembered', async () => {
    const env = makeEnv({ getToken: async () => fakeJwt({ sub: 'u', sid: 'desk-42' }) });
    const s = connect(env.element, env.options);
    await flush();
    assert.equal(s.sid, 'desk-42');
    assert.ok([...env.storage.map.values()].includes('desk-42'));
    s.destroy();
});

test('viewOnly reaches every RFB and can be switched live', async () => {
    const env = makeEnv({ viewOnly: true });
    const s = connect(env.element, env.options);
    await flush();
    assert.equal(env.RFB.all[0].viewOnly, true);
    assert.equal(env.RFB.all[0].scaleViewport, true);
    s.viewOnly = false;
    assert.equal(env.RFB.all[0].viewOnly, false);
    s.destroy();
});

test('options are validated', () => {
    const env = makeEnv();
    assert.throws(() => connect(env.element, { ...env.options, delivery: 'header' }), TypeError);
    assert.throws(() => connect(env.element, { ...env.options, url: undefined }), TypeError);
    assert.throws(() => connect(null, env.options), TypeError);
    assert.throws(() => connect(env.element, { ...env.options, sid: 'bad sid!' }), TypeError);
});

test('a socket refused before the upgrade: the events path says why, and a refusal stops', async () => {
    for (const [status, error, want] of [
        [403, 'session_owned_by_other_user', { willRetry: false, state: 'disconnected' }],
        [401, 'token_revoked', { willRetry: false, state: 'disconnected' }],
        [401, 'token_expired', { willRetry: true, state: 'reconnecting' }],
    ]) {
        const f = makeFetch(() => ({ status, error }));
        const env = makeEnv({ fetch: f.fetch });
        const s = connect(env.element, env.options);
        await flush();
        env.WebSocket.all[0].serverClose(1006);
        await flush();
        // The probe asked with the attempt's own token, in the header, never in the URL.
        assert.equal(f.calls.length, 1);
        assert.equal(f.calls[0].url, 'https://gw.example/vncgate/events');
        assert.equal(f.calls[0].init.headers.authorization, 'Bearer token-1');
        assert.deepEqual(s.lastClose.refusal, { status, error }, error);
        assert.equal(s.lastClose.willRetry, want.willRetry, error);
        assert.equal(s.state, want.state, error);
        if (want.willRetry) {
            mock.timers.tick(s.lastClose.delayMs);
            await flush();
            assert.equal(env.tokenCalls.at(-1).reason, 'expired', 'an expired token is refreshed');
        }
        s.destroy();
    }
});

test('no refusal behind a 1006 (no gateway, or the probe is let in): retried with backoff', async () => {
    const f = makeFetch();
    const env = makeEnv({ fetch: f.fetch });
    const s = connect(env.element, env.options);
    await flush();
    env.WebSocket.all[0].serverClose(1006);
    await flush();
    assert.equal(s.lastClose.refusal, undefined);
    assert.equal(s.state, 'reconnecting');
    assert.equal(f.open.size, 0, "the probe's stream was closed at once");
    s.destroy();
});
