import type { Component, CSSProperties, ErrorInfo, ReactNode, RefObject } from 'react';
import type { CloseDetail, ConnectOptions, Session, SessionState } from './index.js';

export interface VncgateStatus {
    state: SessionState;
    lastClose: CloseDetail | null;
    /** Retries since the last successful connection. */
    attempt: number;
    inputMode: unknown;
    /** null until the effect has run. */
    session: Session | null;
}

export function useVncgateSession(ref: RefObject<Element | null>, options: ConnectOptions): VncgateStatus;

export interface VncgateErrorBoundaryProps {
    fallback?: ReactNode | ((error: unknown, reset: () => void) => ReactNode);
    onError?: (error: unknown, info: ErrorInfo) => void;
    children?: ReactNode;
}

export class VncgateErrorBoundary extends Component<VncgateErrorBoundaryProps, { error: unknown }> {}

export interface VncgateViewerProps extends ConnectOptions {
    className?: string;
    style?: CSSProperties;
    fallback?: VncgateErrorBoundaryProps['fallback'];
    onError?: VncgateErrorBoundaryProps['onError'];
    children?: ReactNode | ((status: VncgateStatus) => ReactNode);
}

export function VncgateViewer(props: VncgateViewerProps): ReactNode;
