// @vncgate/client: noVNC wrapped for vncgate (CONTRACT §14). See README.md.

import { Session } from './session.js';

/**
 * Connects `element` (a block element that will hold noVNC's screen) to a vncgate desktop and
 * returns the Session; the first attempt starts on the next microtask, so listeners added right
 * after this call see every event.
 */
export function connect(element, options) {
    return new Session(element, options);
}

export { Session };
export { decide as closeDecision, RETRY, REFRESH, STOP } from './close_policy.js';
export { backoffDelay, DEFAULT_RECONNECT } from './backoff.js';
