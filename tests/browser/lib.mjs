// Shared helpers for the browser tests: launching Debian's Chromium, scrubbing tokens from
// anything printed, reading the viewer page's state, and in-page watchers that poll the noVNC
// canvas once per animation frame. Used by driver.mjs (the RPC server the Rust scenarios talk
// to), latency.mjs (the stand-alone latency probe) and canvas_color.mjs.
//
// Functions named page* run inside the page (Playwright serializes them): they must not use
// anything from this module's scope.

import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { performance } from 'node:perf_hooks';

export const DEFAULT_CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

export const LAUNCH_ARGS = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
];

// The URL (fragment or query) and browser messages may carry the JWT: scrub before printing.
export function redact(s, max = 500) {
    return String(s)
        .replace(/(token=)[^&#\s"']+/gi, '$1REDACTED')
        .replace(/(token%3D)[^&#\s"']+/gi, '$1REDACTED')
        .replace(/(bearer\.)[^\s,"']+/gi, '$1REDACTED')
        .replace(/eyJ[\w-]+\.[\w-]+\.[\w-]*/g, 'JWT-REDACTED')
        .slice(0, max);
}

export async function launchChromium({ executablePath = DEFAULT_CHROMIUM, extraArgs = [], timeout = 30000 } = {}) {
    return chromium.launch({
        executablePath,
        headless: true,
        args: [...LAUNCH_ARGS, ...extraArgs],
        timeout,
    });
}

/// Wall-clock milliseconds (sub-millisecond resolution) in this Node process; comparable with
/// `pageEpochMs` values taken in the page (both are time origin + monotonic offset).
export function nodeEpochMs() {
    return performance.timeOrigin + performance.now();
}

// ------------------------------------------------------------------ in-page functions

/// What the viewer page exposes (window.vncgate) plus the status line a user sees.
export function pageSnapshot() {
    const vg = window.vncgate;
    const statusEl = document.getElementById('status-text');
    if (!vg) return { loaded: false, statusText: statusEl ? statusEl.textContent : null };
    const canvas = vg.canvas;
    return {
        loaded: true,
        state: vg.state,
        closeCode: vg.closeCode,
        closeReason: vg.closeReason,
        closeCodes: Array.isArray(vg.closeCodes) ? vg.closeCodes.slice() : null,
        clean: vg.clean,
        desktopName: vg.desktopName,
        attempts: vg.attempts,
        connectedAt: vg.connectedAt,
        statusText: statusEl ? statusEl.textContent : null,
        canvas: canvas ? { width: canvas.width, height: canvas.height } : null,
        timeOrigin: performance.timeOrigin,
    };
}

/// Polled once per animation frame by waitForFunction: returns a truthy snapshot when the viewer
/// reached `spec.state` (and at least `spec.minAttempts` connections and, if given, the desktop
/// name), `{ unexpected: ... }` when it ended up disconnected for good while waiting for
/// 'connected', else false.
export function pageStateReached(spec) {
    const vg = window.vncgate;
    if (!vg) return false;
    const statusEl = document.getElementById('status-text');
    const snap = () => ({
        state: vg.state,
        closeCode: vg.closeCode,
        closeReason: vg.closeReason,
        closeCodes: Array.isArray(vg.closeCodes) ? vg.closeCodes.slice() : null,
        desktopName: vg.desktopName,
        attempts: vg.attempts,
        statusText: statusEl ? statusEl.textContent : null,
    });
    const enough = vg.attempts >= (spec.minAttempts || 0);
    if (spec.state === 'connected') {
        if (vg.state === 'connected' && vg.desktopName !== null && enough) {
            if (spec.desktopName && vg.desktopName !== spec.desktopName) {
                return { unexpected: 'wrong_desktop', ...snap() };
            }
            return snap();
        }
        // Disconnected with no reconnect scheduled: it will never connect.
        if (vg.state === 'disconnected' && !/reconnecting/.test(statusEl ? statusEl.textContent : '')
            && !spec.allowDisconnect) {
            return { unexpected: 'disconnected', ...snap() };
        }
        return false;
    }
    if (spec.state === 'disconnected') {
        return vg.state === 'disconnected' && enough ? snap() : false;
    }
    return { unexpected: `unknown state ${spec.state}` };
}

/// An init script (runs in every document before the page's own scripts): records the events of
/// every noVNC RFB object the viewer creates in `window.__vgEvents`, as
/// `{ type, at, text?, types?, status?, reason? }` (`at`: performance.now()). The viewer assigns
/// `window.vncgate` once and then `vncgate.rfb` right after constructing each RFB, before any
/// network event can fire, so accessors on those two properties attach the listeners in time:
/// an event such as `credentialsrequired` cannot be missed, nor happen unseen. Observes only.
export function pageRecordRfbEvents() {
    const TYPES = ['connect', 'disconnect', 'credentialsrequired', 'securityfailure', 'clipboard', 'desktopname'];
    window.__vgEvents = [];
    const attach = (rfb) => {
        for (const type of TYPES) {
            rfb.addEventListener(type, (e) => {
                const d = e.detail || {};
                const rec = { type, at: performance.now() };
                if (type === 'clipboard') rec.text = d.text;
                if (type === 'credentialsrequired') rec.types = d.types || null;
                if (type === 'securityfailure') { rec.status = d.status; rec.reason = d.reason ?? null; }
                if (type === 'disconnect') rec.clean = !!d.clean;
                if (type === 'desktopname') rec.name = d.name;
                window.__vgEvents.push(rec);
            });
        }
    };
    let vg;
    Object.defineProperty(window, 'vncgate', {
        configurable: true,
        enumerable: true,
        get() { return vg; },
        set(v) {
            vg = v;
            if (!v || typeof v !== 'object') return;
            let rfb = v.rfb ?? null;
            if (rfb) attach(rfb);
            Object.defineProperty(v, 'rfb', {
                configurable: true,
                enumerable: true,
                get() { return rfb; },
                set(r) {
                    rfb = r;
                    if (r) attach(r);
                },
            });
        },
    });
}

/// Polled per animation frame: the first recorded RFB event of `type` (with `text`, when given)
/// at or after index `from`, or false.
export function pageEventSeen({ type, text, from = 0 }) {
    const evs = window.__vgEvents || [];
    for (let i = from; i < evs.length; i++) {
        const e = evs[i];
        if (e.type === type && (text === undefined || text === null || e.text === text)) return { index: i, ...e };
    }
    return false;
}

/// Framebuffer coordinates -> CSS pixel coordinates of the page (the canvas backing store is
/// framebuffer-sized; scaleViewport scales it with CSS). Integer page coordinates, and the
/// framebuffer pixel noVNC will compute for them (its clientToElement + absX: truncation).
export function pageFbToClient({ x, y }) {
    const canvas = window.vncgate && window.vncgate.canvas;
    if (!canvas || canvas.width === 0) return null;
    const r = canvas.getBoundingClientRect();
    const sx = r.width / canvas.width;
    const sy = r.height / canvas.height;
    const cx = Math.round(r.left + (x + 0.5) * sx);
    const cy = Math.round(r.top + (y + 0.5) * sy);
    const fb = (c, lo, hi, s) => {
        const rel = c < lo ? 0 : c >= hi ? hi - lo - 1 : c - lo;
        return Math.trunc(rel / s);
    };
    return {
        clientX: cx,
        clientY: cy,
        fbX: fb(cx, r.left, r.right, sx),
        fbY: fb(cy, r.top, r.bottom, sy),
        scale: sx,
    };
}

/// Reads framebuffer points from the canvas; true when every point was painted (alpha 255) and
/// is within `tol` of `rgb`. Returns false to keep polling, `{ disconnected }` to stop.
export function pageColorAt({ rgb, points, tol }) {
    const vg = window.vncgate;
    if (!vg) return false;
    if (vg.state === 'disconnected') return { disconnected: true, closeCode: vg.closeCode };
    if (vg.state !== 'connected') return false;
    const canvas = vg.canvas;
    if (!canvas || canvas.width === 0) return false;
    const ctx = canvas.getContext('2d');
    const w = canvas.width;
    const h = canvas.height;
    const pts = points && points.length ? points
        : [[w / 2, h / 2], [w / 4, h / 4], [3 * w / 4, h / 4], [w / 4, 3 * h / 4], [3 * w / 4, 3 * h / 4]];
    const pixels = pts.map(([x, y]) => Array.from(ctx.getImageData(Math.floor(x), Math.floor(y), 1, 1).data));
    window.__vgLastPixels = pixels;
    // A pixel noVNC has not drawn yet reads as transparent black, which must not count as black.
    const ok = (p) => p[3] === 255 && rgb.every((c, i) => Math.abs(p[i] - c) <= tol);
    return pixels.every(ok) ? { at: performance.now(), pixels } : false;
}

/// An order-sensitive hash (FNV-1a, 32 bit) of a framebuffer rectangle's RGBA bytes, or null when
/// the canvas is not there yet. Equal hashes = identical pixels (the rectangles used hold
/// two-colour bitmap-font text, which the RFB encoders send losslessly). With `want`, returns
/// the hash only when it equals `want`, else false (a waitForFunction predicate).
export function pageRegionHash({ x, y, w, h, want }) {
    const vg = window.vncgate;
    const canvas = vg && vg.canvas;
    if (!canvas || canvas.width < x + w || canvas.height < y + h) return want === undefined ? null : false;
    const data = canvas.getContext('2d').getImageData(x, y, w, h).data;
    let hash = 0x811c9dc5;
    let painted = true;
    for (let i = 0; i < data.length; i++) {
        if ((i & 3) === 3 && data[i] !== 255) painted = false;
        hash ^= data[i];
        hash = Math.imul(hash, 0x01000193) >>> 0;
    }
    const hex = painted ? hash.toString(16).padStart(8, '0') : null;
    if (want === undefined) return hex;
    return hex === want ? hex : false;
}

/// True when every rectangle holds ink: painted, and at least two distinct colours (a character
/// cell with a glyph in it rather than a blank one). A waitForFunction predicate.
export function pageInked({ rects }) {
    const vg = window.vncgate;
    const canvas = vg && vg.canvas;
    if (!canvas || vg.state !== 'connected') return false;
    const ctx = canvas.getContext('2d');
    return rects.every(({ x, y, w, h }) => {
        const d = ctx.getImageData(x, y, w, h).data;
        for (let i = 4; i < d.length; i += 4) {
            if (d[i + 3] !== 255) return false;
            if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2]) return true;
        }
        return false;
    });
}

/// Arms a watcher (window.__vgWatch, a promise) that resolves on the first animation frame at
/// which `spec` holds:
///   { kind: 'change', cell: {x,y,w,h}, tol }  a pixel of the cell differs from the cell's
///        colour at arming time by more than tol (the cell must be uniform when armed);
///   { kind: 'color', points, rgb, tol }        every point shows rgb.
/// Also records the timestamp of the next keydown seen by the page (window.__vgKeyAt).
/// Resolves { at, keyAt } (page performance.now() ms) or { timeout: true } / { disconnected }.
export function pageArmWatch(spec) {
    const vg = window.vncgate;
    const canvas = vg && vg.canvas;
    if (!canvas) throw new Error('no canvas');
    const ctx = canvas.getContext('2d');
    window.__vgKeyAt = null;
    window.addEventListener('keydown', (e) => {
        if (window.__vgKeyAt === null) window.__vgKeyAt = e.timeStamp;
    }, { capture: true, once: true });
    let test;
    if (spec.kind === 'change') {
        const { x, y, w, h } = spec.cell;
        const base = ctx.getImageData(x, y, w, h).data;
        const ref = [base[0], base[1], base[2]];
        for (let i = 0; i < base.length; i += 4) {
            if (base[i + 3] !== 255 || Math.abs(base[i] - ref[0]) > spec.tol
                || Math.abs(base[i + 1] - ref[1]) > spec.tol || Math.abs(base[i + 2] - ref[2]) > spec.tol) {
                const px = (j) => `${base[j]},${base[j + 1]},${base[j + 2]},${base[j + 3]}`;
                throw new Error(`cell ${x},${y} ${w}x${h} is not uniform when armed: `
                    + `pixel ${i / 4} is ${px(i)}, pixel 0 is ${px(0)}`);
            }
        }
        test = () => {
            const d = ctx.getImageData(x, y, w, h).data;
            for (let i = 0; i < d.length; i += 4) {
                if (Math.abs(d[i] - ref[0]) > spec.tol || Math.abs(d[i + 1] - ref[1]) > spec.tol
                    || Math.abs(d[i + 2] - ref[2]) > spec.tol) return true;
            }
            return false;
        };
    } else if (spec.kind === 'color') {
        test = () => spec.points.every(([px, py]) => {
            const d = ctx.getImageData(px, py, 1, 1).data;
            return d[3] === 255 && spec.rgb.every((c, i) => Math.abs(d[i] - c) <= spec.tol);
        });
    } else {
        throw new Error(`unknown watch kind ${spec.kind}`);
    }
    const deadline = performance.now() + spec.timeoutMs;
    window.__vgWatch = new Promise((resolve) => {
        const frame = () => {
            const now = performance.now();
            if (vg.state === 'disconnected') return resolve({ disconnected: true, closeCode: vg.closeCode });
            if (test()) return resolve({ at: now, keyAt: window.__vgKeyAt });
            if (now > deadline) return resolve({ timeout: true });
            requestAnimationFrame(frame);
        };
        requestAnimationFrame(frame);
    });
    return true;
}

// ------------------------------------------------------------------ Node-side helpers

/// Runs a command; resolves when it exited 0, rejects with its stderr otherwise.
export function run(cmd, args, env = {}) {
    return new Promise((resolve, reject) => {
        const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
        let out = '';
        let err = '';
        child.stdout.on('data', (d) => { out += d; });
        child.stderr.on('data', (d) => { err += d; });
        child.on('error', reject);
        child.on('exit', (code) => {
            if (code === 0) resolve(out);
            else reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err.trim()}`));
        });
    });
}

async function awaitWatch(page) {
    const r = await page.evaluate(() => window.__vgWatch);
    if (r.disconnected) throw new Error(`viewer disconnected during measurement (code ${r.closeCode})`);
    if (r.timeout) throw new Error('no canvas change within the timeout');
    return r;
}

/// Key press -> pixel: for each key, arm a change watch on the xterm cell where its echo will be
/// drawn, press the key (a real keyboard event through Playwright), and measure from the page's
/// keydown timestamp to the first animation frame whose canvas shows the glyph. ms per sample.
export async function measureKeyLatency(page, { cells, keys, tol = 48, timeoutMs = 10000 }) {
    const samples = [];
    for (let i = 0; i < keys.length; i++) {
        await page.evaluate(pageArmWatch, { kind: 'change', cell: cells[i], tol, timeoutMs });
        await page.keyboard.press(keys[i]);
        const r = await awaitWatch(page);
        if (r.keyAt === null) throw new Error('the page saw no keydown');
        samples.push(r.at - r.keyAt);
    }
    return samples;
}

/// X change -> pixel: for each colour, arm a colour watch, run `xsetroot -solid` on the display
/// and measure from just before spawning xsetroot to the first animation frame whose canvas shows
/// the colour at every point. Includes xsetroot's process start (a few ms). ms per sample.
export async function measureXChangeLatency(page, { display, colors, points, tol = 8, timeoutMs = 10000 }) {
    const origin = await page.evaluate(() => performance.timeOrigin);
    const samples = [];
    for (const { hex, rgb } of colors) {
        await page.evaluate(pageArmWatch, { kind: 'color', points, rgb, tol, timeoutMs });
        const t0 = nodeEpochMs();
        await run('xsetroot', ['-display', display, '-solid', hex]);
        const r = await awaitWatch(page);
        samples.push(origin + r.at - t0);
    }
    return samples;
}

/// Median and 95th percentile (nearest rank) of a list of samples.
export function summarize(samples) {
    const s = [...samples].sort((a, b) => a - b);
    const rank = (p) => s[Math.min(s.length - 1, Math.max(0, Math.ceil(p * s.length) - 1))];
    return { n: s.length, median: rank(0.5), p95: rank(0.95), min: s[0], max: s[s.length - 1] };
}

/// The xterm cell grid from the X side: xterm's window (found by class) is
/// columns*cellWidth + 2*border wide. Returns { x, y, cellW, cellH, border } in root coordinates.
export async function xtermGeometry(display, { columns = 80, rows = 24, border = 2 } = {}) {
    const id = (await run('xdotool', ['search', '--onlyvisible', '--class', 'xterm'], { DISPLAY: display }))
        .trim().split('\n')[0];
    if (!id) throw new Error('no visible xterm');
    const out = await run('xdotool', ['getwindowgeometry', '--shell', id], { DISPLAY: display });
    const v = Object.fromEntries(out.trim().split('\n').map((l) => l.split('=')));
    const W = Number(v.WIDTH);
    const H = Number(v.HEIGHT);
    return {
        x: Number(v.X), y: Number(v.Y),
        cellW: (W - 2 * border) / columns, cellH: (H - 2 * border) / rows, border,
    };
}

/// The framebuffer rectangle of one character cell.
export function cellRect(g, row, col) {
    return {
        x: Math.round(g.x + g.border + col * g.cellW),
        y: Math.round(g.y + g.border + row * g.cellH),
        w: Math.round(g.cellW),
        h: Math.round(g.cellH),
    };
}
