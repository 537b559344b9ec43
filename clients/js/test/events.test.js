import assert from 'node:assert/strict';
import { afterEach, beforeEach, mock, test } from 'node:test';
import { reconnectOptions } from '../src/backoff.js';
import { createSseParser, eventsUrl, EventStream } from '../src/events.js';
import { connect } from '../src/index.js';
import { flush, makeEnv, makeFetch, makeTimers } from './fakes.js';

beforeEach(() => mock.timers.enable({ apis: ['setTimeout'] }));
afterEach(() => mock.timers.reset());

test('the events URL is on the WebSocket\'s gateway, over http(s)', () => {
    assert.equal(eventsUrl('wss://gw.example:8443/websockify?token=x'), 'https://gw.example:8443/vncgate/events');
    assert.equal(eventsUrl('ws://localhost:8080/ws', '/ev'), 'http://localhost:8080/ev');
});

test('SSE parser: events split across chunks, CRLF, comments, multi-line data', () => {
    const got = [];
    const feed = createSseParser((name, data) => got.push([name, data]));
    const text = ': keep-alive\r\nevent: viewers\r\ndata: {"count":2}\r\n\r\nevent: input_mode\ndata: a\ndata: b\n\ndata:plain\n\n';
    for (const ch of text) feed(ch); // one character at a time: every split point
    assert.deepEqual(got, [['viewers', '{"count":2}'], ['input_mode', 'a\nb'], ['message', 'plain']]);
});

function stream(overrides) {
    const timers = makeTimers();
    const events = [];
    const errors = [];
    let n = 0;
    const s = new EventStream({
        url: 'https://gw.example/vncgate/events',
        getToken: async () => `t${++n}`,
        delivery: 'protocol',
        reconnect: reconnectOptions({ jitter: 'none' }),
        timers,
        random: Math.random,
        onEvent: (name, data) => events.push([name, data]),
        onError: (e) => errors.push(e),
        ...overrides,
    });
    return { s, timers, events, errors };
}

test('the token goes in Authorization, not the URL; data is parsed as JSON', async () => {
    const f = makeFetch();
    const { s, events } = stream({ fetch: f.fetch });
    s.start();
    await flush();
    assert.equal(f.calls[0].url, 'https://gw.example/vncgate/events');
    assert.equal(f.calls[0].init.headers.Authorization, 'Bearer t1');
    f.calls[0].push('event: expiring\ndata: {"seconds":30}\n\n');
    await flush();
    assert.deepEqual(events, [['expiring', { seconds: 30 }]]);
    s.close();
    await flush();
    assert.equal(f.open.size, 0);
});

test('delivery "query" puts the token in the query string instead', async () => {
    const f = makeFetch();
    const { s } = stream({ fetch: f.fetch, delivery: 'query' });
    s.start();
    await flush();
    assert.equal(f.calls[0].url, 'https://gw.example/vncgate/events?token=t1');
    assert.equal(f.calls[0].init.headers.Authorization, undefined);
    s.close();
});

test('a stream that ends reconnects after a backoff with a fresh token', async () => {
    const f = makeFetch();
    const { s, timers } = stream({ fetch: f.fetch });
    s.start();
    await flush();
    f.calls[0].end();
    await flush();
    assert.equal(timers.pending.size, 1);
    mock.timers.tick(500);
    await flush();
    assert.equal(f.calls.length, 2);
    assert.equal(f.calls[1].init.headers.Authorization, 'Bearer t2');
    s.close();
    assert.equal(timers.pending.size, 0);
});

test('401 token_expired is retried; 403 is final and reported', async () => {
    const answers = [{ status: 401, error: 'token_expired' }, { status: 403, error: 'origin_denied' }];
    const f = makeFetch(() => answers.shift());
    const { s, timers, errors } = stream({ fetch: f.fetch });
    s.start();
    await flush();
    assert.deepEqual(errors.map((e) => [e.status, e.code, e.final]), [[401, 'token_expired', false]]);
    mock.timers.tick(500);
    await flush();
    assert.deepEqual(errors.map((e) => [e.status, e.code, e.final]),
        [[401, 'token_expired', false], [403, 'origin_denied', true]]);
    assert.equal(timers.pending.size, 0);
    assert.equal(f.calls.length, 2);
});

test('Session with events: true: input_mode becomes inputMode + an inputmode event; unknown names are dropped', async () => {
    const f = makeFetch();
    const env = makeEnv({ events: true, fetch: f.fetch });
    const s = connect(env.element, env.options);
    const seen = [];
    for (const type of ['inputmode', 'viewers', 'recording', 'close']) {
        s.addEventListener(type, (e) => seen.push([type, e.detail]));
    }
    await flush();
    assert.equal(f.calls.length, 0, 'the stream starts once the desktop is connected');
    env.WebSocket.all[0].serverOpen();
    env.RFB.all[0].serverConnect();
    await flush();
    assert.equal(f.calls[0].url, 'https://gw.example/vncgate/events');
    f.calls[0].push('event: input_mode\ndata: {"mode":"owner_only"}\n\n');
    f.calls[0].push('event: viewers\ndata: {"count":2}\n\nevent: close\ndata: {}\n\nevent: recording\ndata: {"state":"on"}\n\n');
    await flush();
    assert.equal(s.inputMode, 'owner_only');
    assert.deepEqual(seen, [
        ['inputmode', { mode: 'owner_only', data: { mode: 'owner_only' } }],
        ['viewers', { count: 2 }],
        ['recording', { state: 'on' }],
    ]);
    s.destroy();
    await flush();
    assert.equal(f.open.size, 0);
});
