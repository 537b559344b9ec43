// Reconnect delays: exponential growth with "full jitter" (AWS architecture blog, "Exponential
// Backoff And Jitter"): delay = random(0, min(maxMs, initialMs * factor^attempt)). Full jitter
// spreads the reconnects of many tabs over the whole window, so a gateway restart is not
// followed by a synchronized stampede.

export const DEFAULT_RECONNECT = Object.freeze({
    initialMs: 500,
    maxMs: 30000,
    factor: 2,
    jitter: 'full',
    maxAttempts: Infinity,
});

/** Merges the caller's reconnect options over the defaults and rejects nonsense early. */
export function reconnectOptions(given = {}) {
    const o = { ...DEFAULT_RECONNECT, ...given };
    for (const k of ['initialMs', 'maxMs', 'factor', 'maxAttempts']) {
        if (typeof o[k] !== 'number' || Number.isNaN(o[k]) || o[k] < 0) {
            throw new TypeError(`reconnect.${k} must be a non-negative number`);
        }
    }
    if (o.jitter !== 'full' && o.jitter !== 'none') {
        throw new TypeError('reconnect.jitter must be "full" or "none"');
    }
    return o;
}

/** The upper bound of the delay before retry number `attempt` (0-based). */
export function backoffCap(attempt, { initialMs, maxMs, factor }) {
    // factor^attempt overflows to Infinity for large attempts; min() keeps it at maxMs.
    return Math.min(maxMs, initialMs * factor ** attempt);
}

/**
 * The delay in ms before retry number `attempt` (0-based). `random` returns [0, 1) and is
 * injectable so the sequence can be tested exactly.
 */
export function backoffDelay(attempt, options, random = Math.random) {
    const cap = backoffCap(attempt, options);
    if (options.jitter === 'none') return cap;
    return Math.floor(random() * cap);
}
