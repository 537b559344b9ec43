import assert from 'node:assert/strict';
import { mock, test } from 'node:test';
import { decide, KNOWN_CODES, REFRESH, RETRY, STOP } from '../src/close_policy.js';
import { Session } from '../src/session.js';
import { flush, makeEnv } from './fakes.js';

// CONTRACT §14, code by code.
const TABLE = [
    [1000, STOP, 'backend closed the session'],
    [1001, RETRY, 'gateway draining or shutting down'],
    [1003, STOP, 'text frame'],
    [1006, RETRY, 'abnormal closure (network, or refused before the upgrade)'],
    [1008, STOP, 'RFB message refused'],
    [1009, STOP, 'message too big'],
    [1011, RETRY, 'gateway internal error'],
    [1013, RETRY, 'backend connection lost'],
    [4001, REFRESH, 'token expired'],
    [4003, STOP, 'kicked or revoked'],
    [4008, STOP, 'idle timeout'],
];

test('the policy table is exactly the codes of CONTRACT §14', () => {
    assert.deepEqual([...KNOWN_CODES].sort(), TABLE.map(([c]) => c).sort());
});

for (const [code, expected, why] of TABLE) {
    test(`close ${code} (${why}) → ${expected}`, () => {
        assert.equal(decide(code), expected);
    });
}

test('codes outside the contract stop', () => {
    for (const code of [1002, 1005, 1007, 1010, 1012, 1014, 1015, 4000, 4002, 4999, 3000]) {
        assert.equal(decide(code), STOP, String(code));
    }
});

// The same table through a live Session: the close event, the state, and what happens next.
for (const [code, expected] of TABLE) {
    test(`a Session closed with ${code}: willRetry, state and the next getToken reason`, async (t) => {
        mock.timers.enable({ apis: ['setTimeout'] });
        t.after(() => mock.timers.reset());
        const env = makeEnv();
        const s = new Session(env.element, env.options);
        const closes = [];
        s.addEventListener('close', (e) => closes.push(e.detail));
        await flush();
        const ws = env.WebSocket.all[0];
        ws.serverOpen();
        env.RFB.all[0].serverConnect();
        assert.equal(s.state, 'connected');

        ws.serverClose(code, 'why');
        assert.equal(closes.length, 1);
        assert.equal(closes[0].code, code);
        assert.equal(closes[0].reason, 'why');
        const retries = expected !== STOP;
        assert.equal(closes[0].willRetry, retries);
        assert.equal(s.state, retries ? 'reconnecting' : 'disconnected');
        if (retries) {
            assert.equal(closes[0].delayMs, 250); // random 0.5 × initialMs 500
            mock.timers.tick(250);
            await flush();
            assert.equal(env.tokenCalls.length, 2);
            assert.equal(env.tokenCalls[1].reason, expected === REFRESH ? 'expired' : 'retry');
            assert.equal(env.WebSocket.all.length, 2);
        } else {
            assert.equal(closes[0].delayMs, 0);
            assert.equal(env.timers.pending.size, 0);
            assert.equal(env.tokenCalls.length, 1);
        }
        s.destroy();
    });
}
