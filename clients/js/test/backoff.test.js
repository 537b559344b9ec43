import assert from 'node:assert/strict';
import { test } from 'node:test';
import { backoffCap, backoffDelay, DEFAULT_RECONNECT, reconnectOptions } from '../src/backoff.js';

const opts = reconnectOptions();

test('defaults are those of CONTRACT §14', () => {
    assert.deepEqual({ ...DEFAULT_RECONNECT }, {
        initialMs: 500, maxMs: 30000, factor: 2, jitter: 'full', maxAttempts: Infinity,
    });
});

test('the cap doubles from initialMs and stops at maxMs', () => {
    const caps = Array.from({ length: 10 }, (_, i) => backoffCap(i, opts));
    assert.deepEqual(caps, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]);
    // factor^attempt overflows to Infinity long before this; the cap must still hold.
    assert.equal(backoffCap(5000, opts), 30000);
});

test('full jitter: the delay is random * cap, with the random source injected', () => {
    const draws = [0.5, 0.25, 0.999999, 0];
    const seq = draws.map((r, i) => backoffDelay(i, opts, () => r));
    assert.deepEqual(seq, [250, 250, 1999, 0]);
});

test('full jitter stays within [0, cap) for every attempt and draw', () => {
    for (let attempt = 0; attempt < 40; attempt += 1) {
        const cap = backoffCap(attempt, opts);
        for (const r of [0, 1e-9, 0.3, 0.5, 0.9999999999]) {
            const d = backoffDelay(attempt, opts, () => r);
            assert.ok(d >= 0 && d < cap, `attempt ${attempt} r ${r}: ${d} not in [0, ${cap})`);
        }
        // Math.random itself, many times.
        for (let i = 0; i < 200; i += 1) {
            const d = backoffDelay(attempt, opts);
            assert.ok(d >= 0 && d < cap);
        }
    }
});

test('jitter "none" gives the cap itself', () => {
    const o = reconnectOptions({ jitter: 'none', initialMs: 100, factor: 3, maxMs: 2000 });
    assert.deepEqual([0, 1, 2, 3, 4].map((a) => backoffDelay(a, o, () => 0)), [100, 300, 900, 2000, 2000]);
});

test('bad options are refused', () => {
    assert.throws(() => reconnectOptions({ initialMs: -1 }), TypeError);
    assert.throws(() => reconnectOptions({ factor: 'x' }), TypeError);
    assert.throws(() => reconnectOptions({ jitter: 'equal' }), TypeError);
});
