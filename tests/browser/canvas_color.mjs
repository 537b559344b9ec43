#!/usr/bin/env node
// Opens the vncgate viewer page in headless Chromium (Debian's, never a downloaded one), waits
// for the RFB session to connect, then waits until the noVNC canvas shows an expected colour.
// Prints exactly one JSON line on stdout; exit 0 = colour seen, 1 = failure, 2 = bad usage.
// See tests/browser/README.md.

import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { LAUNCH_ARGS, redact } from './lib.mjs';

const USAGE = `usage: node tests/browser/canvas_color.mjs --url URL --expect-rgb R,G,B
       [--timeout-ms N] [--screenshot PATH] [--ignore-https-errors]
       [--tolerance N] [--match all|any] [--chromium PATH]
       [--after-cmd 'SHELL COMMAND' --after-rgb R,G,B]`;

let printed = false;
function emit(obj) {
    if (printed) return;
    printed = true;
    process.stdout.write(JSON.stringify(obj) + '\n');
}

function usageError(msg) {
    emit({ ok: false, reason: 'bad_usage', detail: msg });
    process.stderr.write(USAGE + '\n');
    process.exit(2);
}

function parseRgb(flag, v) {
    const parts = (v ?? '').split(',').map((x) => Number(x.trim()));
    if (parts.length !== 3 || parts.some((n) => !Number.isInteger(n) || n < 0 || n > 255)) {
        usageError(`${flag} wants R,G,B with 0..255 each`);
    }
    return parts;
}

function parseArgs(argv) {
    const o = {
        url: null, rgb: null, timeoutMs: 20000, screenshot: null, ignoreHttpsErrors: false,
        tolerance: 8, match: 'all', chromium: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
        afterCmd: null, afterRgb: null,
    };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        const val = () => {
            if (i + 1 >= argv.length) usageError(`${a} needs a value`);
            return argv[++i];
        };
        switch (a) {
            case '--url': o.url = val(); break;
            case '--expect-rgb': o.rgb = parseRgb(a, val()); break;
            case '--timeout-ms': o.timeoutMs = Number(val()); break;
            case '--screenshot': o.screenshot = val(); break;
            case '--ignore-https-errors': o.ignoreHttpsErrors = true; break;
            case '--tolerance': o.tolerance = Number(val()); break;
            case '--match': o.match = val(); break;
            case '--chromium': o.chromium = val(); break;
            case '--after-cmd': o.afterCmd = val(); break;
            case '--after-rgb': o.afterRgb = parseRgb(a, val()); break;
            case '-h': case '--help':
                process.stdout.write(USAGE + '\n');
                process.exit(0);
                break;
            default: usageError(`unknown argument ${redact(a)}`);
        }
    }
    if (!o.url) usageError('--url is required');
    if (!o.rgb) usageError('--expect-rgb is required');
    if (!Number.isFinite(o.timeoutMs) || o.timeoutMs <= 0) usageError('--timeout-ms wants a positive number');
    if (!Number.isInteger(o.tolerance) || o.tolerance < 0 || o.tolerance > 255) usageError('--tolerance wants 0..255');
    if (o.match !== 'all' && o.match !== 'any') usageError('--match wants all or any');
    if (!!o.afterCmd !== !!o.afterRgb) usageError('--after-cmd and --after-rgb go together');
    return o;
}

// Runs inside the page, once per animation frame. Returns false to keep polling.
// Samples the centre and four points at the quarter positions of the framebuffer canvas
// (the canvas backing store is framebuffer-sized; scaleViewport only scales it with CSS).
function pagePoll({ want, rgb, tol, match }) {
    const vg = window.vncgate;
    if (!vg) return false;
    if (vg.state === 'disconnected') {
        return { disconnected: true, at: performance.now() };
    }
    if (vg.state !== 'connected') return false;
    if (want === 'connected') return { at: vg.connectedAt ?? performance.now() };

    const canvas = vg.canvas;
    if (!canvas || canvas.width === 0 || canvas.height === 0) return false;
    const ctx = canvas.getContext('2d');
    const w = canvas.width;
    const h = canvas.height;
    const points = [[w / 2, h / 2], [w / 4, h / 4], [3 * w / 4, h / 4], [w / 4, 3 * h / 4], [3 * w / 4, 3 * h / 4]];
    const pixels = points.map(([x, y]) => {
        const d = ctx.getImageData(Math.floor(x), Math.floor(y), 1, 1).data;
        return [d[0], d[1], d[2], d[3]];
    });
    window.__canvasColorLast = { width: w, height: h, pixels };
    // Alpha 255 = painted by a framebuffer update. A canvas pixel noVNC has not drawn yet reads
    // as transparent black (0,0,0,0), which must not count as "black".
    const ok = (p) => p[3] === 255 && rgb.every((c, i) => Math.abs(p[i] - c) <= tol);
    const hit = match === 'all' ? pixels.every(ok) : pixels.some(ok);
    return hit ? { at: performance.now(), pixels } : false;
}

async function main() {
    const opt = parseArgs(process.argv.slice(2));
    const deadline = Date.now() + opt.timeoutMs;
    const remaining = () => Math.max(1, deadline - Date.now());
    const result = { ok: false };

    // Any of these ends the run as a failure, whatever we are waiting for at the time.
    let failWith;
    const failure = new Promise((_, reject) => { failWith = reject; });
    failure.catch(() => {});
    const fail = (reason, detail) => {
        const e = new Error(reason);
        e.reason = reason;
        e.detail = detail === undefined ? undefined : redact(detail);
        failWith(e);
        return e;
    };

    let browser;
    try {
        browser = await chromium.launch({
            executablePath: opt.chromium,
            headless: true,
            args: LAUNCH_ARGS,
            timeout: Math.min(remaining(), 30000),
        });
    } catch (e) {
        emit({ ok: false, reason: 'launch_failed', detail: redact(e.message.split('\n')[0]) });
        return 1;
    }

    let page;
    try {
        const context = await browser.newContext({
            ignoreHTTPSErrors: opt.ignoreHttpsErrors,
            viewport: { width: 1024, height: 768 },
        });
        page = await context.newPage();
        page.on('pageerror', (err) => fail('pageerror', err.message));
        page.on('console', (msg) => {
            if (msg.type() === 'error') fail('console_error', msg.text());
        });
        page.on('crash', () => fail('page_crashed'));

        const race = (p) => Promise.race([p, failure]);
        const pageEpochMs = async () => race(page.evaluate(() => performance.timeOrigin));

        const t0 = Date.now();
        let resp;
        try {
            resp = await race(page.goto(opt.url, { waitUntil: 'commit', timeout: remaining() }));
        } catch (e) {
            if (e.reason || e.name === 'TimeoutError') throw e;
            throw fail('navigation_failed', e.message.split('\n')[0]);
        }
        if (resp && !resp.ok()) throw fail('http_status', `viewer page answered HTTP ${resp.status()}`);
        const origin = await pageEpochMs();

        const waitFor = async (arg) => {
            const handle = await race(page.waitForFunction(pagePoll, arg, { polling: 'raf', timeout: remaining() }));
            const v = await handle.jsonValue();
            if (v.disconnected) throw fail('disconnected');
            return v;
        };

        const connected = await waitFor({ want: 'connected' });
        result.ms_to_connected = Math.round(origin + connected.at - t0);

        const color = await waitFor({ want: 'color', rgb: opt.rgb, tol: opt.tolerance, match: opt.match });
        result.ms_to_color = Math.round(origin + color.at - t0);

        if (opt.afterCmd) {
            const tCmd = Date.now();
            const child = spawn('/bin/sh', ['-c', opt.afterCmd], { stdio: ['ignore', 'ignore', 'pipe'] });
            let stderr = '';
            child.stderr.on('data', (d) => { stderr += d; });
            child.on('error', (e) => fail('after_cmd_failed', e.message));
            child.on('exit', (code) => {
                if (code !== 0) fail('after_cmd_failed', `exit ${code}: ${stderr.trim()}`);
            });
            const after = await waitFor({ want: 'color', rgb: opt.afterRgb, tol: opt.tolerance, match: opt.match });
            result.ms_cmd_to_color = Math.round(origin + after.at - tCmd);
        }

        result.ok = true;
    } catch (e) {
        result.ok = false;
        if (e.reason) {
            result.reason = e.reason;
            if (e.detail !== undefined) result.detail = e.detail;
        } else if (e.name === 'TimeoutError') {
            result.reason = 'timeout';
        } else {
            result.reason = 'error';
            result.detail = redact(e.message.split('\n')[0]);
        }
    }

    // Diagnostics from the page (best effort; the page may be gone).
    if (page) {
        try {
            const info = await Promise.race([
                page.evaluate(() => {
                    const vg = window.vncgate;
                    return {
                        state: vg ? vg.state : null,
                        close_code: vg ? vg.closeCode : null,
                        close_reason: vg ? vg.closeReason : null,
                        desktop_name: vg ? vg.desktopName : null,
                        last: window.__canvasColorLast ?? null,
                    };
                }),
                new Promise((resolve) => setTimeout(() => resolve(null), 2000)),
            ]);
            if (info) {
                result.close_code = info.close_code;
                if (!result.ok) {
                    result.state = info.state;
                    if (info.close_reason) result.close_reason = redact(info.close_reason);
                    if (info.last) result.last_pixels = info.last.pixels;
                }
            }
        } catch { /* page closed or crashed */ }
        if (opt.screenshot) {
            try {
                await page.screenshot({ path: opt.screenshot, timeout: 5000 });
            } catch { /* best effort */ }
        }
    }
    if (!('close_code' in result)) result.close_code = null;

    const ordered = result.ok
        ? { ok: true, ms_to_connected: result.ms_to_connected, ms_to_color: result.ms_to_color, ...result }
        : result;
    emit(ordered);

    await Promise.race([browser.close().catch(() => {}), new Promise((r) => setTimeout(r, 5000))]);
    return result.ok ? 0 : 1;
}

main().then(
    (code) => process.exit(code),
    (e) => {
        emit({ ok: false, reason: 'error', detail: redact(e && e.message ? e.message : e) });
        process.exit(1);
    },
);
