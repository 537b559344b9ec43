#!/usr/bin/env node
// One headless Chromium (Debian's), driven over stdin/stdout by the Rust scenarios in
// tests/browser_scenarios.rs: a test process starts this once and shares the browser between its
// tests, each test in its own browser context(s).
//
// Protocol: one JSON object per line. Requests on stdin: {"id": N, "cmd": "...", "args": {...}};
// answers on stdout: {"id": N, "ok": true, "result": ...} or {"id": N, "ok": false, "error": "..."}.
// The first line on stdout is {"ready": true} once Chromium runs (or {"ready": false, "error"}).
// Requests run concurrently; answers come in completion order. stdin closing = close the browser
// and exit. Nothing else is written to stdout; diagnostics go to stderr. Tokens are redacted from
// everything this script prints. See tests/browser/README.md for the commands.

import { createHmac } from 'node:crypto';
import { createInterface } from 'node:readline';
import {
    launchChromium, redact, pageSnapshot, pageStateReached, pageFbToClient, pageColorAt,
    pageRegionHash, pageInked, measureKeyLatency, measureXChangeLatency, pageRecordRfbEvents,
    pageEventSeen,
} from './lib.mjs';

// Extra Chromium flags: `evil.test` resolves to loopback, so a scenario can load the viewer from
// an origin the gateway does not allow (same server, different Origin header); and, when
// VNCGATE_TRUST_SPKI is set (base64 SHA-256 of a SubjectPublicKeyInfo), certificates with that
// key are trusted: the test's self-signed gateway certificate is valid for the browser.
const EXTRA_ARGS = ['--host-resolver-rules=MAP evil.test 127.0.0.1'];
if (process.env.VNCGATE_TRUST_SPKI) {
    EXTRA_ARGS.push(`--ignore-certificate-errors-spki-list=${process.env.VNCGATE_TRUST_SPKI}`);
}

const contexts = new Map(); // id -> BrowserContext
const pages = new Map(); // id -> { page, name, log: [{type, text}] }
let nextId = 1;
let browser;
let closing = false;

function send(obj) {
    process.stdout.write(JSON.stringify(obj) + '\n');
}

function pageOf(args) {
    const p = pages.get(args.page);
    if (!p) throw new Error(`no page ${args.page}`);
    return p;
}

// Waits in the page, per animation frame, until `fn(arg)` returns a truthy value.
async function pollRaf(page, fn, arg, timeoutMs) {
    try {
        const handle = await page.waitForFunction(fn, arg, { polling: 'raf', timeout: timeoutMs });
        return await handle.jsonValue();
    } catch (e) {
        if (e.name === 'TimeoutError') {
            let snap = null;
            try { snap = await page.evaluate(pageSnapshot); } catch { /* page gone */ }
            let pixels = null;
            try { pixels = await page.evaluate(() => window.__vgLastPixels ?? null); } catch { /* gone */ }
            throw new Error(`timeout after ${timeoutMs} ms; page: ${JSON.stringify(snap)}; last pixels: ${JSON.stringify(pixels)}`);
        }
        throw e;
    }
}

const commands = {
    async newContext({ ignoreHTTPSErrors = false, viewport = { width: 1024, height: 768 } }) {
        const ctx = await browser.newContext({ ignoreHTTPSErrors, viewport });
        const id = nextId++;
        contexts.set(id, ctx);
        return { ctx: id };
    },

    async closeContext({ ctx }) {
        const c = contexts.get(ctx);
        if (!c) return null;
        contexts.delete(ctx);
        for (const [id, p] of pages) if (p.ctx === ctx) pages.delete(id);
        await c.close();
        return null;
    },

    async newPage({ ctx, name }) {
        const c = contexts.get(ctx);
        if (!c) throw new Error(`no context ${ctx}`);
        const page = await c.newPage();
        await page.addInitScript(pageRecordRfbEvents);
        const id = nextId++;
        const entry = { page, name, ctx, log: [] };
        page.on('console', (msg) => {
            entry.log.push({ type: msg.type(), text: redact(msg.text(), 1000) });
        });
        page.on('pageerror', (err) => {
            entry.log.push({ type: 'pageerror', text: redact(err.message, 1000) });
        });
        page.on('crash', () => entry.log.push({ type: 'crash', text: 'page crashed' }));
        pages.set(id, entry);
        return { page: id };
    },

    async goto(args) {
        const { page } = pageOf(args);
        const resp = await page.goto(args.url, { waitUntil: 'load', timeout: args.timeoutMs });
        return { status: resp ? resp.status() : null };
    },

    async reload(args) {
        const { page } = pageOf(args);
        const resp = await page.reload({ waitUntil: 'load', timeout: args.timeoutMs });
        return { status: resp ? resp.status() : null };
    },

    async snapshot(args) {
        return pageOf(args).page.evaluate(pageSnapshot);
    },

    // args: { state: 'connected'|'disconnected', minAttempts?, desktopName?, allowDisconnect?, timeoutMs }
    async waitState(args) {
        const { page } = pageOf(args);
        const r = await pollRaf(page, pageStateReached, args, args.timeoutMs);
        if (r.unexpected) throw new Error(`waiting for ${args.state}: ${r.unexpected}: ${JSON.stringify(r)}`);
        return r;
    },

    // args: { rgb: [r,g,b], points?: [[x,y],...] (framebuffer), tol?, timeoutMs }
    async waitColor(args) {
        const { page } = pageOf(args);
        const r = await pollRaf(page, pageColorAt, { rgb: args.rgb, points: args.points, tol: args.tol ?? 8 }, args.timeoutMs);
        if (r.disconnected) throw new Error(`disconnected (code ${r.closeCode}) while waiting for colour ${args.rgb}`);
        return r;
    },

    // Framebuffer coordinates in, the framebuffer pixel noVNC computes for the page point out.
    async mouseMove(args) {
        const { page } = pageOf(args);
        const m = await page.evaluate(pageFbToClient, { x: args.x, y: args.y });
        if (!m) throw new Error('no canvas to point at');
        await page.mouse.move(m.clientX, m.clientY);
        return m;
    },

    // args: { x, y, button: 'left'|'middle'|'right', clickCount }
    async click(args) {
        const { page } = pageOf(args);
        const m = await page.evaluate(pageFbToClient, { x: args.x, y: args.y });
        if (!m) throw new Error('no canvas to click on');
        await page.mouse.click(m.clientX, m.clientY, { button: args.button ?? 'left', clickCount: args.clickCount ?? 1 });
        return m;
    },

    async type(args) {
        // delayMs paces the keystrokes like a person typing (a session of some length).
        await pageOf(args).page.keyboard.type(args.text, { delay: args.delayMs ?? 0 });
        return null;
    },

    async press(args) {
        await pageOf(args).page.keyboard.press(args.key);
        return null;
    },

    async regionHash(args) {
        return pageOf(args).page.evaluate(pageRegionHash, args.rect);
    },

    // Waits until the rectangle's hash equals args.hash (e.g. the same text after a reload).
    async waitRegionHash(args) {
        const { page } = pageOf(args);
        await pollRaf(page, pageRegionHash, { ...args.rect, want: args.hash }, args.timeoutMs);
        return null;
    },

    // Waits until every rectangle shows a glyph (args.rects).
    async waitInk(args) {
        await pollRaf(pageOf(args).page, pageInked, { rects: args.rects }, args.timeoutMs);
        return null;
    },

    async screenshot(args) {
        await pageOf(args).page.screenshot({ path: args.path, timeout: 10000 });
        return null;
    },

    // The RFB events recorded in the page (pageRecordRfbEvents), in order.
    async events(args) {
        return pageOf(args).page.evaluate(() => window.__vgEvents || []);
    },

    // args: { type, text?, from?, timeoutMs }: waits until such an event was recorded.
    async waitEvent(args) {
        const { page } = pageOf(args);
        return pollRaf(page, pageEventSeen, { type: args.type, text: args.text, from: args.from ?? 0 }, args.timeoutMs);
    },

    // What the viewer does with text for the remote clipboard: RFB.clipboardPasteFrom.
    async clipboardPaste(args) {
        await pageOf(args).page.evaluate((text) => {
            const vg = window.vncgate;
            if (!vg || !vg.rfb || vg.state !== 'connected') throw new Error('viewer not connected');
            vg.rfb.clipboardPasteFrom(text);
        }, args.text);
        return null;
    },

    // The page's document (serialized DOM, as it is now), URL and title.
    async content(args) {
        const { page } = pageOf(args);
        return { html: await page.content(), url: page.url(), title: await page.title() };
    },

    // The viewer's credentials form: waits until it is shown, types args.password into it (a
    // real keyboard, as a user would) and submits it with its button.
    async submitPassword(args) {
        const { page } = pageOf(args);
        const field = page.locator('#cred-password');
        await field.waitFor({ state: 'visible', timeout: args.timeoutMs });
        await field.click();
        await page.keyboard.type(args.password);
        await page.locator('#creds button[type=submit]').click();
        return null;
    },

    async consoleLog(args) {
        return pageOf(args).log;
    },

    // args: { cells: [{x,y,w,h}], keys: [...], timeoutMs }
    async keyLatency(args) {
        return measureKeyLatency(pageOf(args).page, args);
    },

    // args: { display, colors: [{hex, rgb}], points: [[x,y]], timeoutMs }
    async xLatency(args) {
        return measureXChangeLatency(pageOf(args).page, args);
    },

    // The app backend's token endpoint, played by the driver: POSTs to args.path on the page's
    // origin are answered {token} with an HS256 JWT for {sub, sid (from the request), exp, iat}
    // plus args.claims. args.ttls: lifetimes in seconds of the 1st, 2nd... token (the last one
    // repeats). Every request is recorded (see tokenCalls).
    async routeTokens(args) {
        const p = pageOf(args);
        p.tokenCalls = [];
        await p.page.route((url) => url.pathname === args.path, async (route) => {
            let body = {};
            try { body = JSON.parse(route.request().postData() || '{}'); } catch { /* empty */ }
            const ttl = args.ttls[Math.min(p.tokenCalls.length, args.ttls.length - 1)];
            const now = Math.floor(Date.now() / 1000);
            const claims = { sub: args.sub, sid: body.sid, iat: now, exp: now + ttl, ...args.claims };
            p.tokenCalls.push({ sid: body.sid ?? null, reason: body.reason ?? null, ttl, at: Date.now() });
            await route.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify({ token: hs256(claims, args.secret) }) });
        });
        return null;
    },

    async tokenCalls(args) {
        return pageOf(args).tokenCalls ?? [];
    },

    // The value of a JSON-serializable expression evaluated in the page.
    async evaluate(args) {
        return pageOf(args).page.evaluate((expr) => JSON.parse(JSON.stringify((0, eval)(expr) ?? null)), args.expr);
    },

    // Waits (per animation frame) until the expression is truthy in the page; returns its value.
    async waitFor(args) {
        const { page } = pageOf(args);
        return pollRaf(page, (expr) => { const v = (0, eval)(expr); return v ? JSON.parse(JSON.stringify(v)) : false; }, args.expr, args.timeoutMs);
    },
};

function hs256(claims, secret) {
    const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
    const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
    return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

async function handle(line) {
    let req;
    try {
        req = JSON.parse(line);
    } catch {
        process.stderr.write(`driver: not JSON: ${redact(line, 200)}\n`);
        return;
    }
    const fn = commands[req.cmd];
    if (!fn) {
        send({ id: req.id, ok: false, error: `unknown command ${req.cmd}` });
        return;
    }
    try {
        const result = await fn(req.args || {});
        send({ id: req.id, ok: true, result: result ?? null });
    } catch (e) {
        send({ id: req.id, ok: false, error: redact(e && e.message ? e.message : e, 2000) });
    }
}

async function shutdown(code) {
    closing = true;
    try {
        await Promise.race([browser?.close(), new Promise((r) => setTimeout(r, 5000))]);
    } finally {
        process.exit(code);
    }
}

async function main() {
    try {
        browser = await launchChromium({ extraArgs: EXTRA_ARGS });
    } catch (e) {
        send({ ready: false, error: redact(e.message.split('\n')[0]) });
        process.exit(1);
    }
    browser.on('disconnected', () => {
        if (closing) return;
        process.stderr.write('driver: Chromium went away\n');
        process.exit(1);
    });
    send({ ready: true, version: browser.version() });
    const rl = createInterface({ input: process.stdin });
    rl.on('line', (line) => { if (line.trim()) handle(line); });
    rl.on('close', () => shutdown(0));
}

process.on('SIGTERM', () => shutdown(0));
main();
