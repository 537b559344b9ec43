#!/usr/bin/env node
// Stand-alone latency probe, the same measurement as the `latency_*` scenario of
// tests/browser_scenarios.rs, for any RFB-over-WebSocket endpoint that serves the viewer page
// (vncgate with web_root, or `websockify --web web/` for comparison). Not part of the tests.
//
// The desktop must run an 80x24 xterm at +0+0 without window border (-bw 0) and with the default
// internal border (2), whose text cursor is hidden, e.g.
//   DISPLAY=:N xterm -geometry 80x24+0+0 -bw 0 -b 2 -e sh -c 'printf "\033[?25l"; exec cat > /dev/null'
// usage: node tests/browser/latency.mjs --url URL --display :N [--samples 20] [--row 0]
//        [--ignore-https-errors]
// Prints one JSON line: { key_to_pixel_ms: {n, median, p95, min, max, samples}, x_change_to_pixel_ms: ... }
// Typing goes into row --row from column 0 (use a fresh row per run), then Enter.

import {
    launchChromium, redact, pageStateReached, pageColorAt, measureKeyLatency, measureXChangeLatency,
    summarize, xtermGeometry, cellRect, run,
} from './lib.mjs';

function parseArgs(argv) {
    const o = { url: null, display: null, samples: 20, row: 0, ignoreHttpsErrors: false };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        const val = () => argv[++i];
        switch (a) {
            case '--url': o.url = val(); break;
            case '--display': o.display = val(); break;
            case '--samples': o.samples = Number(val()); break;
            case '--row': o.row = Number(val()); break;
            case '--ignore-https-errors': o.ignoreHttpsErrors = true; break;
            default: throw new Error(`unknown argument ${redact(a)}`);
        }
    }
    if (!o.url || !o.display) throw new Error('--url and --display are required');
    return o;
}

const ROOT_POINTS = [[600, 400], [700, 500], [550, 560], [760, 100]];
const PALETTE = [[0xc0, 0x40, 0x40], [0x40, 0xc0, 0x40], [0x40, 0x40, 0xc0], [0xc0, 0xc0, 0x40]];
const hex = (rgb) => '#' + rgb.map((c) => c.toString(16).padStart(2, '0')).join('');

async function main() {
    const o = parseArgs(process.argv.slice(2));
    const browser = await launchChromium();
    try {
        const ctx = await browser.newContext({ ignoreHTTPSErrors: o.ignoreHttpsErrors, viewport: { width: 1024, height: 768 } });
        const page = await ctx.newPage();
        const errors = [];
        page.on('console', (m) => { if (m.type() === 'error') errors.push(redact(m.text())); });
        page.on('pageerror', (e) => errors.push(redact(e.message)));
        await page.goto(o.url, { waitUntil: 'load' });
        const state = await (await page.waitForFunction(pageStateReached, { state: 'connected' }, { polling: 'raf', timeout: 30000 })).jsonValue();
        if (state.unexpected) throw new Error(`not connected: ${JSON.stringify(state)}`);

        const g = await xtermGeometry(o.display);
        const wid = (await run('xdotool', ['search', '--onlyvisible', '--class', 'xterm'], { DISPLAY: o.display })).trim().split('\n')[0];
        await run('xdotool', ['windowfocus', '--sync', wid], { DISPLAY: o.display });
        await run('xsetroot', ['-display', o.display, '-solid', '#202020']);
        await page.waitForFunction(pageColorAt, { rgb: [0x20, 0x20, 0x20], points: ROOT_POINTS, tol: 8 }, { polling: 'raf', timeout: 30000 });

        const keys = Array.from({ length: o.samples }, (_, i) => String.fromCharCode(97 + (i % 26)));
        const cells = keys.map((_, i) => cellRect(g, o.row, i));
        const key = await measureKeyLatency(page, { cells, keys });
        await page.keyboard.press('Enter');
        const colors = Array.from({ length: o.samples }, (_, i) => PALETTE[i % PALETTE.length])
            .map((rgb) => ({ rgb, hex: hex(rgb) }));
        const x = await measureXChangeLatency(page, { display: o.display, colors, points: ROOT_POINTS });
        const round = (s) => Object.fromEntries(Object.entries(s).map(([k, v]) => [k, Math.round(v * 10) / 10]));
        process.stdout.write(JSON.stringify({
            key_to_pixel_ms: { ...round(summarize(key)), samples: key.map((v) => Math.round(v * 10) / 10) },
            x_change_to_pixel_ms: { ...round(summarize(x)), samples: x.map((v) => Math.round(v * 10) / 10) },
            console_errors: errors,
        }) + '\n');
    } finally {
        await browser.close();
    }
}

main().catch((e) => {
    process.stderr.write(`latency: ${redact(e && e.message ? e.message : e)}\n`);
    process.exit(1);
});
