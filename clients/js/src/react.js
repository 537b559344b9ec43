// React bindings for @vncgate/client. Plain ES modules without JSX (React.createElement), so a
// page can use them without a build step.

import { Component, createElement, useEffect, useRef, useState } from 'react';
import { connect } from './index.js';

const TRACKED = ['statechange', 'close', 'inputmode'];

function snapshot(session) {
    return {
        state: session.state,
        lastClose: session.lastClose,
        attempt: session.attempt,
        inputMode: session.inputMode,
        session,
    };
}

const IDLE = { state: 'connecting', lastClose: null, attempt: 0, inputMode: null, session: null };

/**
 * Runs a Session on ref.current while the component is mounted. A new Session is made only when
 * an option that defines the connection changes (url, delivery, sid, sessionKey, events,
 * reconnect); getToken and the rest are read at their latest value, so an inline arrow
 * function does not reconnect on every render. viewOnly applies to the live connection.
 *
 * StrictMode mounts, unmounts and mounts again: the first Session is destroyed before its
 * getToken() resolves, so it never opens a socket; exactly one connection stays.
 */
export function useVncgateSession(ref, options) {
    const latest = useRef(options);
    latest.current = options;
    const [status, setStatus] = useState(IDLE);
    const { url, delivery, sid, sessionKey } = options;
    const eventsKey = JSON.stringify(options.events ?? false);
    const reconnectKey = JSON.stringify(options.reconnect ?? {});

    useEffect(() => {
        const element = ref.current;
        if (!element) return undefined;
        const session = connect(element, {
            ...latest.current,
            getToken: (request) => (latest.current.getToken ? latest.current.getToken(request) : null),
        });
        const sync = () => setStatus(snapshot(session));
        for (const type of TRACKED) session.addEventListener(type, sync);
        sync();
        return () => {
            for (const type of TRACKED) session.removeEventListener(type, sync);
            session.destroy();
        };
        // eventsKey/reconnectKey stand for the objects: a new literal each render must not reconnect.
        // eslint-disable-next-line react-hooks/exhaustive-deps
    }, [ref, url, delivery, sid, sessionKey, eventsKey, reconnectKey]);

    const session = status.session;
    const viewOnly = !!options.viewOnly;
    useEffect(() => {
        if (session) session.viewOnly = viewOnly;
    }, [session, viewOnly]);

    return status;
}

/**
 * Catches errors thrown while rendering, in effects or in lifecycle methods below it, renders
 * `fallback` instead and reports through `onError`, so the rest of the page keeps working.
 */
export class VncgateErrorBoundary extends Component {
    constructor(props) {
        super(props);
        this.state = { error: null };
        this.reset = () => this.setState({ error: null });
    }

    static getDerivedStateFromError(error) {
        return { error };
    }

    componentDidCatch(error, info) {
        this.props.onError?.(error, info);
    }

    render() {
        const { error } = this.state;
        if (error === null) return this.props.children;
        const { fallback } = this.props;
        if (typeof fallback === 'function') return fallback(error, this.reset);
        if (fallback !== undefined) return fallback;
        return createElement('div', { role: 'alert', className: 'vncgate-error' }, 'The remote desktop view failed.');
    }
}

function Viewer({ className, style, children, ...options }) {
    const screen = useRef(null);
    const status = useVncgateSession(screen, options);
    return createElement(
        'div',
        { className, style, 'data-vncgate-state': status.state },
        // noVNC adds its own nodes under this element: React renders nothing else into it.
        createElement('div', { ref: screen, style: { width: '100%', height: '100%' } }),
        typeof children === 'function' ? children(status) : children,
    );
}

/**
 * A live view. Props: every connect() option, plus className, style, fallback (node or
 * (error, reset) => node), onError(error, info), and children (nodes, or (status) => nodes for
 * an overlay showing state/lastClose).
 */
export function VncgateViewer({ fallback, onError, ...props }) {
    return createElement(VncgateErrorBoundary, { fallback, onError }, createElement(Viewer, props));
}
