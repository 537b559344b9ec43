#!/usr/bin/env node
// Issue 16 "no stale code after an upgrade", in real headless Chromium: load the viewer page,
// change one of its ES modules on disk (keeping the file's mtime, as a reproducible release
// build does), reload, and report which code ran and how each file was answered.
//
// Usage: node tests/browser/cache_reload.mjs '{"url": URL, "file": PATH, "from": S, "to": S,
//   "marker": NAME, "timeoutMs": N}'
// The module at PATH sets globalThis[NAME]; the script replaces S `from` by `to` in it between
// the two loads. Prints one JSON line: {"ok": true, "before", "after", "first": [...],
// "reload": [{path, status}], "documentStatus"} or {"ok": false, "error"}; exit 0 / 1.

import { readFileSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { launchChromium, redact } from './lib.mjs';

const spec = JSON.parse(process.argv[2] ?? '{}');
const timeout = spec.timeoutMs ?? 30000;

async function markerSet(page) {
    const handle = await page.waitForFunction((name) => globalThis[name] ?? null, spec.marker, { timeout });
    return handle.jsonValue();
}

async function main() {
    const browser = await launchChromium();
    try {
        const page = await (await browser.newContext()).newPage();
        let seen = [];
        page.on('response', (r) => seen.push({ path: new URL(r.url()).pathname, status: r.status() }));
        await page.goto(spec.url, { waitUntil: 'load', timeout });
        const before = await markerSet(page);
        const first = seen;
        seen = [];
        const st = statSync(spec.file);
        writeFileSync(spec.file, readFileSync(spec.file, 'utf8').replace(spec.from, spec.to));
        utimesSync(spec.file, st.atime, st.mtime);
        const doc = await page.reload({ waitUntil: 'load', timeout });
        const after = await markerSet(page);
        return { ok: true, before, after, first, reload: seen, documentStatus: doc ? doc.status() : null };
    } finally {
        await browser.close();
    }
}

main().then(
    (r) => { process.stdout.write(JSON.stringify(r) + '\n'); },
    (e) => {
        process.stdout.write(JSON.stringify({ ok: false, error: redact(String(e && e.message ? e.message : e), 2000) }) + '\n');
        process.exitCode = 1;
    },
);
