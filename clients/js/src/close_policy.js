// What to do after a connection ends, decided by its WebSocket close code (CONTRACT §6, §14).
//
//   'retry'   - transient: reconnect after a backoff delay, same token source.
//   'refresh' - the token expired (4001): ask getToken() for a fresh one, then reconnect.
//   'stop'    - retrying cannot help (the session ended, was kicked, or the client is wrong).

export const RETRY = 'retry';
export const REFRESH = 'refresh';
export const STOP = 'stop';

const TABLE = new Map([
    [1000, STOP],    // the backend closed the session
    [1001, RETRY],   // gateway draining or shutting down: another replica (or the restarted one) will serve
    [1003, STOP],    // text frames sent: a client bug, not transient
    [1006, RETRY],   // abnormal closure: network loss, gateway killed, or refused before the upgrade (see below)
    [1008, STOP],    // RFB message refused by the gateway
    [1009, STOP],    // message too big
    [1011, RETRY],   // gateway internal error
    [1013, RETRY],   // backend connection lost, try again
    [4001, REFRESH], // token expired
    [4003, STOP],    // session kicked or token revoked
    [4008, STOP],    // idle timeout: reconnecting would defeat the policy
]);

/**
 * Decision for a close code. Codes not listed (1002, 1005, 1007, other 4xxx...) stop: an
 * unknown close is more likely a bug than a transient fault, and a silent retry loop hides it.
 *
 * A refusal before the upgrade (401/403/429/503 answered to the HTTP request) is invisible to
 * page JavaScript: the browser reports it as a close with 1006 and no reason, exactly like a
 * network failure. The Session then asks the gateway's events path, which is authorized exactly
 * like an upgrade, with the same token: a 401/403 there is the refusal (no retry; an expired
 * token is refreshed), anything else means no gateway or a transient refusal (retry with
 * backoff). The `close` event carries `opened: false` and, when found, `refusal`.
 */
export function decide(code) {
    return TABLE.get(code) ?? STOP;
}

/** Every code the table knows, for documentation and tests. */
export const KNOWN_CODES = Object.freeze([...TABLE.keys()]);
