// vncgate playback: a recording (contract §12) replayed by noVNC's RFB class (npm @novnc/novnc
// 1.7.0), fed from the recording's FBS blocks in place of a WebSocket.
//
// The page is served by the admin listener, next to the API it calls (same origin):
//   GET /admin/recordings?sid=...          the list
//   GET /admin/recordings/{id}             the .fbs
//   GET /admin/recordings/{id}/audit       the .jsonl audit
// each with `Authorization: Bearer <admin token>`. The token is typed into the page and kept in
// memory only: never read from or written to the URL, storage or the console.
//
// URL parameters (none of them secret): sid=... prefills the session filter; id=... plays that
// recording once the list is loaded; speed=1|2|4|8|16.
//
// A recording starts with an RFB 3.3 security-None handshake and the session's ServerInit, then
// the server->client stream; noVNC completes that handshake without a password. What noVNC sends
// (its version, ClientInit, SetEncodings, update requests) has no one to go to: discarded.
// Seeking replays from the start at full speed to the chosen time (RFB streams carry state:
// zlib dictionaries, the framebuffer itself), or on from the current point when seeking forward.
//
// For tests, window.vncgate = { rfb, state, desktopName, canvas, playback: { state, position,
// duration } } (the viewer's test surface, so the browser harness reads both alike).

import RFB from './novnc/core/rfb.js';
import { initLogging } from './novnc/core/util/logging.js';

initLogging('warn');

const FBS_HEADER = 'FBS 001.000\n';
/// A seek feeds this many bytes, then yields to the event loop (noVNC may be waiting on an
/// asynchronous decode; its receive queue must not grow unbounded meanwhile).
const SEEK_BATCH_BYTES = 2 * 1024 * 1024;
/// While playing, the clock is looked at least this often (seek bar and timeline progress).
const TICK_MAX_MS = 100;

// ---------------------------------------------------------------- FBS

/// The blocks of an FBS 001.000 file: [{ start, end, t }] (byte range of the data, ms). A last
/// block cut short (a recording still being written) is left out.
export function parseFbs(buffer) {
    const bytes = new Uint8Array(buffer);
    const header = new TextDecoder('latin1').decode(bytes.subarray(0, FBS_HEADER.length));
    if (header !== FBS_HEADER) throw new Error('not an FBS 001.000 file');
    const view = new DataView(buffer);
    const blocks = [];
    let at = FBS_HEADER.length;
    let truncated = false;
    while (at < bytes.length) {
        if (at + 4 > bytes.length) { truncated = true; break; }
        const len = view.getUint32(at);
        const padded = len + ((4 - (len % 4)) % 4);
        if (at + 4 + padded + 4 > bytes.length) { truncated = true; break; }
        const start = at + 4;
        blocks.push({ start, end: start + len, t: view.getUint32(start + padded) });
        at = start + padded + 4;
    }
    return { blocks, truncated };
}

/// noVNC's own pixel format (32 bits, depth 24, little-endian, true colour, red in the low
/// byte): the one it decodes a stream in, whatever the ServerInit says.
const NOVNC_FORMAT = [32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 0, 8, 16];

/// Why noVNC will show wrong colours, or null: the recorder writes the live client's pixel
/// format into the ServerInit (and later changes into the audit), so a session viewed with
/// another client (TigerVNC's viewer at low colour, say) cannot be painted by noVNC as is.
export function formatProblem(buffer, serverInit, audit) {
    const pf = new Uint8Array(buffer, serverInit.start + 4, Math.max(0, Math.min(16, serverInit.end - serverInit.start - 4)));
    const changed = audit.filter((e) => e.event === 'pixel_format' && e.offset > 0);
    if (pf.length < 13 || NOVNC_FORMAT.some((b, i) => pf[i] !== b)) {
        return `recorded in a ${pf[0]}-bit pixel format noVNC does not replay: colours are wrong here; ` +
            '`vncgate recording export` decodes it';
    }
    if (changed.length) return 'the client changed its pixel format mid-session: colours after that are wrong here';
    return null;
}

// ---------------------------------------------------------------- the replaying channel

/// What noVNC's Websock needs of a raw channel (WebSocket / RTCDataChannel-like): born open,
/// `push` delivers recorded server bytes, `send` drops the client's.
class ReplayChannel {
    constructor() {
        this.binaryType = 'arraybuffer';
        this.protocol = '';
        this.readyState = 'open';
        this.onopen = null;
        this.onmessage = null;
        this.onclose = null;
        this.onerror = null;
    }

    send(_data) {
        // The recording's server cannot hear the replaying client: nothing to do.
    }

    close() {
        if (this.readyState === 'closed') return;
        this.readyState = 'closed';
        // Asynchronously, as a WebSocket reports its close: noVNC expects it after close().
        setTimeout(() => {
            if (this.onclose) this.onclose({ code: 1000, reason: '', wasClean: true });
        }, 0);
    }

    push(data) {
        if (this.readyState === 'open' && this.onmessage) this.onmessage({ data });
    }
}

// ---------------------------------------------------------------- DOM and test surface

const $ = (id) => document.getElementById(id);
const screenEl = $('screen');
const message = $('pb-message');
const stateEl = $('pb-state');
const playBtn = $('btn-play');
const speedSel = $('speed');
const seekBar = $('seek');
const timeEl = $('time');
const timelineEl = $('timeline');

let holder = null; // the current RFB's own container (a replaced one may still be closing)

const vg = {
    rfb: null,
    // The replay's connection, as in the viewer: 'connecting' while a recording is being
    // opened and its handshake replayed, 'connected' once noVNC has its ServerInit,
    // 'disconnected' when none is open (or opening it failed).
    state: 'disconnected',
    desktopName: null,
    attempts: 0,
    connectedAt: null,
    closeCode: null,
    closeReason: null,
    closeCodes: [],
    clean: null,
    playback: { state: 'idle', position: 0, duration: 0, id: null },
    get canvas() { return holder ? holder.querySelector('canvas') : null; },
};
window.vncgate = vg;

function say(text) { message.textContent = text; }

function fmt(ms) {
    const s = Math.max(0, ms) / 1000;
    const m = Math.floor(s / 60);
    return `${m}:${(s - m * 60).toFixed(1).padStart(4, '0')}`;
}

// ---------------------------------------------------------------- the player

class Player {
    constructor(buffer, audit) {
        const { blocks, truncated } = parseFbs(buffer);
        if (blocks.length < 3) throw new Error('the recording has no handshake');
        this.buffer = buffer;
        this.blocks = blocks;
        this.truncated = truncated;
        this.duration = blocks[blocks.length - 1].t;
        this.audit = audit;
        this.formatProblem = formatProblem(buffer, blocks[2], audit);
        this.speed = 1;
        this.playing = false;
        this.timer = null;
        this.generation = 0;
        this.restart();
    }

    /// A fresh RFB on a fresh channel, at position 0 with nothing fed.
    restart() {
        this.generation += 1;
        if (this.channel) this.channel.close();
        if (this.rfb) {
            try { this.rfb.disconnect(); } catch { /* already gone */ }
        }
        holder = document.createElement('div');
        holder.className = 'holder';
        screenEl.replaceChildren(holder);
        const channel = new ReplayChannel();
        const rfb = new RFB(holder, channel, { shared: true });
        rfb.viewOnly = true;
        rfb.scaleViewport = true;
        rfb.focusOnClick = false;
        rfb.addEventListener('connect', () => {
            if (vg.rfb !== rfb) return;
            vg.state = 'connected';
            vg.connectedAt = performance.now();
        });
        rfb.addEventListener('desktopname', (e) => {
            if (vg.rfb === rfb) vg.desktopName = e.detail.name;
        });
        rfb.addEventListener('disconnect', (e) => {
            if (vg.rfb !== rfb) return;
            vg.state = 'disconnected';
            vg.clean = !!e.detail.clean;
            if (this.rfb === rfb) say('the replay failed (the recording could not be decoded)');
        });
        this.channel = channel;
        this.rfb = rfb;
        vg.state = 'connecting';
        vg.attempts += 1;
        vg.rfb = rfb;
        this.next = 0;
        this.position = 0;
    }

    /// Feed every block up to time `t`; at most `budget` bytes (then returns false).
    feedUntil(t, budget = Infinity) {
        let fed = 0;
        while (this.next < this.blocks.length && this.blocks[this.next].t <= t) {
            const b = this.blocks[this.next];
            // A copy: Websock keeps no reference, but the file's buffer must stay intact.
            this.channel.push(this.buffer.slice(b.start, b.end));
            this.next += 1;
            fed += b.end - b.start;
            if (fed >= budget) return false;
        }
        return true;
    }

    get ended() { return this.next >= this.blocks.length; }

    now() {
        return this.playing
            ? this.baseAt + (performance.now() - this.wallAt) * this.speed
            : this.position;
    }

    play() {
        if (this.ended) {
            // Again from the start (unless everything is at time 0: then there is nothing to play).
            this.seek(0).then(() => { if (!this.ended) this.play(); });
            return;
        }
        this.playing = true;
        this.wallAt = performance.now();
        this.baseAt = this.position;
        this.tick();
    }

    pause() {
        if (!this.playing) return;
        this.position = Math.min(this.now(), this.duration);
        this.playing = false;
        clearTimeout(this.timer);
        this.timer = null;
        progress(this);
    }

    setSpeed(speed) {
        const was = this.playing;
        if (was) this.pause();
        this.speed = speed;
        if (was) this.play();
    }

    tick() {
        this.timer = null;
        if (!this.playing) return;
        const t = this.now();
        this.feedUntil(t);
        this.position = Math.min(t, this.duration);
        if (this.ended) {
            this.position = this.duration;
            this.playing = false;
            progress(this);
            return;
        }
        progress(this);
        const wait = (this.blocks[this.next].t - t) / this.speed;
        this.timer = setTimeout(() => this.tick(), Math.max(0, Math.min(wait, TICK_MAX_MS)));
    }

    /// Replay to `t` at full speed (from the start when going back), then go on as before.
    async seek(t) {
        t = Math.max(0, Math.min(t, this.duration));
        const was = this.playing;
        this.pause();
        if (t < this.position || vg.state === 'disconnected') this.restart();
        const gen = this.generation;
        vg.playback.state = 'seeking';
        stateEl.textContent = 'seeking';
        while (!this.feedUntil(t, SEEK_BATCH_BYTES)) {
            await new Promise((resolve) => setTimeout(resolve, 0));
            if (gen !== this.generation) return; // a later seek took over
        }
        this.position = t;
        if (was && !this.ended) this.play();
        else progress(this);
    }

    stop() {
        this.pause();
        this.generation += 1;
        if (this.channel) this.channel.close();
        if (this.rfb) {
            try { this.rfb.disconnect(); } catch { /* already gone */ }
        }
    }
}

let player = null;
let timelineItems = [];

function progress(p) {
    const state = p.playing ? 'playing' : (p.ended ? 'ended' : 'paused');
    vg.playback.state = state;
    vg.playback.position = p.position;
    vg.playback.duration = p.duration;
    stateEl.textContent = state;
    playBtn.textContent = p.playing ? 'Pause' : 'Play';
    if (document.activeElement !== seekBar) seekBar.value = String(Math.round(p.position));
    timeEl.textContent = `${fmt(p.position)} / ${fmt(p.duration)}`;
    for (const item of timelineItems) item.li.classList.toggle('past', item.t <= p.position);
}

// ---------------------------------------------------------------- the admin API

function token() { return $('token').value.trim(); }

async function api(path, as) {
    const resp = await fetch(path, {
        headers: { Authorization: `Bearer ${token()}` },
        cache: 'no-store',
        credentials: 'omit',
    });
    if (!resp.ok) {
        let code = String(resp.status);
        try { code = (await resp.json()).error || code; } catch { /* not JSON */ }
        throw new Error(resp.status === 401 ? 'the admin token was refused' : `${path}: ${code}`);
    }
    return as === 'json' ? resp.json() : as === 'text' ? resp.text() : resp.arrayBuffer();
}

/// `opening` failed: say why; when no replay is running, the state says so too.
function failed(text) {
    say(text);
    if (!player) vg.state = 'disconnected';
}

async function list(autoplay) {
    const sid = $('sid').value.trim();
    say('listing…');
    if (autoplay && !player) vg.state = 'connecting';
    let answer;
    try {
        answer = await api(`/admin/recordings${sid ? `?sid=${encodeURIComponent(sid)}` : ''}`, 'json');
    } catch (e) {
        failed(e.message);
        return;
    }
    const rows = $('rows');
    rows.replaceChildren();
    for (const rec of answer.recordings) {
        const tr = document.createElement('tr');
        tr.dataset.id = rec.id;
        const cells = [
            new Date(rec.started_at_ms).toISOString().replace('T', ' ').replace('Z', ''),
            rec.session_id,
            String(rec.conn_id),
            rec.bytes === null ? '?' : String(rec.bytes),
            rec.incomplete === null ? 'recording' : rec.incomplete ? 'incomplete' : 'yes',
        ];
        for (const text of cells) {
            const td = document.createElement('td');
            td.textContent = text;
            tr.append(td);
        }
        const td = document.createElement('td');
        const btn = document.createElement('button');
        btn.type = 'button';
        btn.textContent = 'Open';
        btn.addEventListener('click', () => load(rec));
        td.append(btn);
        tr.append(td);
        rows.append(tr);
    }
    $('list').hidden = false;
    say(`${answer.recordings.length} recording(s)`);
    if (autoplay) {
        const rec = answer.recordings.find((r) => r.id === autoplay);
        if (rec) await load(rec, true);
        else failed(`no recording ${autoplay} in the list`);
    }
}

async function load(rec, play = false) {
    say(`loading ${rec.id}…`);
    if (!player) vg.state = 'connecting';
    let fbs;
    let audit;
    try {
        [fbs, audit] = await Promise.all([api(rec.fbs, 'bytes'), api(rec.audit, 'text').catch(() => '')]);
    } catch (e) {
        failed(e.message);
        return;
    }
    if (player) player.stop();
    player = null;
    try {
        player = new Player(fbs, parseAudit(audit));
    } catch (e) {
        failed(`${rec.id}: ${e.message}`);
        return;
    }
    player.speed = Number(speedSel.value) || 1;
    vg.playback.id = rec.id;
    for (const tr of $('rows').children) tr.classList.toggle('current', tr.dataset.id === rec.id);
    seekBar.max = String(player.duration);
    for (const el of [playBtn, speedSel, seekBar]) el.disabled = false;
    showTimeline(player.audit);
    const notes = [];
    if (rec.incomplete === true) notes.push('incomplete: part of the session was not recorded');
    if (rec.incomplete === null) notes.push('still recording (or ended without its last audit line)');
    if (player.truncated) notes.push('the last block is cut short');
    if (player.formatProblem) notes.push(player.formatProblem);
    say(`${rec.session_id} · conn ${rec.conn_id}${notes.length ? ` · ${notes.join('; ')}` : ''}`);
    progress(player);
    if (play) player.play();
}

function parseAudit(text) {
    const events = [];
    for (const line of text.split('\n')) {
        if (!line.trim()) continue;
        try {
            const e = JSON.parse(line);
            if (e && typeof e.t === 'number') events.push(e);
        } catch { /* a line cut short while recording */ }
    }
    return events;
}

function showTimeline(events) {
    timelineEl.replaceChildren();
    timelineItems = [];
    for (const e of events) {
        const { t, event, unix_ms: _u, session_id: _s, ...rest } = e;
        const details = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === 'object' ? JSON.stringify(v) : v}`).join(' ');
        const li = document.createElement('li');
        const btn = document.createElement('button');
        btn.type = 'button';
        btn.textContent = `${fmt(t)} ${event ?? '?'} ${details}`;
        btn.title = btn.textContent;
        btn.addEventListener('click', () => { if (player) player.seek(t); });
        li.append(btn);
        timelineEl.append(li);
        timelineItems.push({ li, t });
    }
}

// ---------------------------------------------------------------- controls

const params = new URLSearchParams(window.location.search);
if (params.get('sid')) $('sid').value = params.get('sid');
if (['1', '2', '4', '8', '16'].includes(params.get('speed'))) speedSel.value = params.get('speed');
const autoplay = params.get('id');

$('auth').addEventListener('submit', (e) => {
    e.preventDefault();
    list(autoplay);
});
playBtn.addEventListener('click', () => {
    if (!player) return;
    if (player.playing) player.pause();
    else player.play();
});
speedSel.addEventListener('change', () => { if (player) player.setSpeed(Number(speedSel.value) || 1); });
seekBar.addEventListener('change', () => { if (player) player.seek(Number(seekBar.value)); });

// Ready: the form can be used now (see the note in playback.html).
for (const id of ['token', 'sid', 'btn-list']) $(id).disabled = false;
$('token').focus();
