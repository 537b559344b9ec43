export type SessionState = 'connecting' | 'connected' | 'reconnecting' | 'disconnected';

export type TokenReason =
    /** the first attempt of the Session */
    | 'initial'
    /** a retry after a transient close (1001, 1006, 1011, 1013) or a failed getToken() */
    | 'retry'
    /** a retry after 4001: the previous token expired, return a fresh one */
    | 'expired'
    /** the events stream (re)connects */
    | 'events';

export interface TokenRequest {
    /** The session id to put in the token's `sid` claim: kept across tab reloads. */
    sid: string;
    reason: TokenReason;
    /** Retries since the last successful connection. */
    attempt: number;
}

export interface ReconnectOptions {
    /** Cap of the first retry's delay. Default 500. */
    initialMs?: number;
    /** Largest cap. Default 30000. */
    maxMs?: number;
    /** Growth of the cap per retry. Default 2. */
    factor?: number;
    /** "full": delay = random(0, cap) (default); "none": delay = cap. */
    jitter?: 'full' | 'none';
    /** Retries in a row without reaching `connected` before giving up. Default Infinity. */
    maxAttempts?: number;
}

export interface ConnectOptions {
    /** ws:// or wss:// URL of the gateway's WebSocket path, or a path on the page's host. */
    url: string;
    /** Called right before every attempt, and again after 4001. null: rely on the vncgate_token cookie. */
    getToken?: (request: TokenRequest) => Promise<string | null> | string | null;
    /** "protocol" (default): `bearer.<token>` subprotocol; "query": `?token=` (ends up in logs). */
    delivery?: 'protocol' | 'query';
    viewOnly?: boolean;
    reconnect?: ReconnectOptions;
    /** Fixed session id; default: one per tab and URL, kept in sessionStorage. */
    sid?: string;
    /** sessionStorage key suffix; default: the URL without its query. */
    sessionKey?: string;
    /** Subscribe to GET /vncgate/events (true, or where it lives). Default false. */
    events?: boolean | { path?: string; url?: string };
    /** Third argument of noVNC's RFB constructor; `shared` defaults to true. */
    rfbOptions?: Record<string, unknown>;
    /** Properties set on every RFB; default { scaleViewport: true }. */
    rfbProperties?: Record<string, unknown>;
    /** After a socket that never opened, ask the events path whether the upgrade was refused. Default true. */
    probeRefusals?: boolean;

    /** Advanced / tests: replacements for the platform. */
    RFB?: new (target: Element, channel: WebSocket, options?: object) => any;
    WebSocket?: typeof WebSocket;
    fetch?: typeof fetch;
    storage?: Pick<Storage, 'getItem' | 'setItem'> | null;
    timers?: { setTimeout(fn: () => void, ms: number): unknown; clearTimeout(id: unknown): void };
    random?: () => number;
}

export interface CloseDetail {
    code: number;
    reason: string;
    willRetry: boolean;
    /** Delay before the retry (0 when willRetry is false). */
    delayMs: number;
    /** false: the WebSocket never opened (network failure or refused before the upgrade). */
    opened: boolean;
    /** true: noVNC had finished the RFB handshake on this connection. */
    wasConnected: boolean;
    /** Present when noVNC reported a VNC security failure (never retried). */
    securityFailure?: { status?: number; reason?: string };
    /** The gateway's refusal of the upgrade, found by the refusal probe (never retried, but token_expired). */
    refusal?: { status: 401 | 403; error: string | null };
}

export interface StateChangeDetail {
    state: SessionState;
    previous: SessionState;
    attempt: number;
}

export interface ErrorDetail {
    source: 'token' | 'rfb' | 'events';
    error: unknown;
    /** events only: HTTP status and vncgate error code of a refused subscription. */
    status?: number | null;
    code?: string | null;
    final?: boolean;
}

export interface InputModeDetail {
    mode: unknown;
    data: unknown;
}

export interface SessionEventMap {
    statechange: CustomEvent<StateChangeDetail>;
    close: CustomEvent<CloseDetail>;
    inputmode: CustomEvent<InputModeDetail>;
    error: CustomEvent<ErrorDetail>;
    credentialsrequired: CustomEvent<{ types: string[] }>;
    desktopname: CustomEvent<{ name: string }>;
    viewers: CustomEvent<unknown>;
    backend: CustomEvent<unknown>;
    expiring: CustomEvent<unknown>;
    recording: CustomEvent<unknown>;
}

export class Session extends EventTarget {
    constructor(element: Element, options: ConnectOptions);
    readonly state: SessionState;
    /** Retries since the last successful connection. */
    readonly attempt: number;
    readonly lastClose: CloseDetail | null;
    readonly inputMode: unknown;
    readonly sid: string;
    /** The live noVNC RFB object (null between attempts). */
    readonly rfb: any;
    viewOnly: boolean;
    /** Ends the session (no reconnect); state becomes `disconnected`. */
    close(): void;
    /** close() and dispatch nothing more; frees every socket, timer and listener it made. */
    destroy(): void;
    addEventListener<K extends keyof SessionEventMap>(
        type: K, listener: (ev: SessionEventMap[K]) => void, options?: boolean | AddEventListenerOptions): void;
    addEventListener(type: string, listener: EventListenerOrEventListenerObject | null,
        options?: boolean | AddEventListenerOptions): void;
    removeEventListener<K extends keyof SessionEventMap>(
        type: K, listener: (ev: SessionEventMap[K]) => void, options?: boolean | EventListenerOptions): void;
    removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null,
        options?: boolean | EventListenerOptions): void;
}

export function connect(element: Element, options: ConnectOptions): Session;

export const RETRY: 'retry';
export const REFRESH: 'refresh';
export const STOP: 'stop';
/** What the client does after a close code: retry, refresh the token then retry, or stop. */
export function closeDecision(code: number): 'retry' | 'refresh' | 'stop';
export function backoffDelay(attempt: number, options: Required<ReconnectOptions>, random?: () => number): number;
export const DEFAULT_RECONNECT: Readonly<Required<ReconnectOptions>>;
