// The session id (`sid`, CONTRACT §3/§4) picks the desktop: the gateway pins a sid to a backend.
// The sid travels inside the token (a claim), which the application's own backend mints, so this
// client cannot put it on the wire itself. What it does: remember the sid in sessionStorage and
// hand it to getToken({sid}) on every attempt, so a tab reload asks for a token for the same
// desktop. sessionStorage is per tab: two tabs get two desktops unless the app passes `sid`.

const SID_PATTERN = /^[A-Za-z0-9._:-]{1,128}$/; // the gateway's rule for the claim

const KEY_PREFIX = 'vncgate.sid:';

export function isValidSid(sid) {
    return typeof sid === 'string' && SID_PATTERN.test(sid);
}

/** The storage key: one sid per endpoint (the URL without its query, which may hold a token). */
export function sidKey(url, sessionKey) {
    return KEY_PREFIX + (sessionKey ?? String(url).split(/[?#]/)[0]);
}

function defaultStorage() {
    try {
        // Reading sessionStorage throws in sandboxed iframes and with storage disabled.
        return globalThis.sessionStorage ?? null;
    } catch {
        return null;
    }
}

function newSid() {
    return globalThis.crypto.randomUUID();
}

/**
 * The sid store of one Session. `storage` is a Storage-like object (getItem/setItem); without
 * one the sid lives only as long as the Session.
 */
export class SidStore {
    constructor({ key, sid, storage = defaultStorage() }) {
        this.key = key;
        this.storage = storage;
        if (sid !== undefined && !isValidSid(sid)) throw new TypeError('sid must match [A-Za-z0-9._:-]{1,128}');
        this.value = sid ?? this.read() ?? newSid();
        this.write(this.value);
    }

    read() {
        try {
            const v = this.storage?.getItem(this.key);
            return isValidSid(v) ? v : null;
        } catch {
            return null;
        }
    }

    write(v) {
        try {
            this.storage?.setItem(this.key, v);
        } catch {
            // Quota or privacy mode: the sid still holds for this page's lifetime.
        }
    }

    /** The token is the authority: if the app's backend chose another sid, remember that one. */
    adoptFromToken(token) {
        const sid = tokenClaim(token, 'sid');
        if (isValidSid(sid) && sid !== this.value) {
            this.value = sid;
            this.write(sid);
        }
    }
}

/** A claim of a JWT's payload, read without verification (the gateway verifies). */
export function tokenClaim(token, name) {
    try {
        const part = String(token).split('.')[1];
        const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
        const json = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
        return JSON.parse(json)[name];
    } catch {
        return undefined;
    }
}
