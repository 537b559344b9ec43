use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::rfb::policy::{Clipboard, Policy, is_delimitable_encoding};

const BLOCKED: Policy = Policy {
    view_only: false,
    clipboard: Clipboard::ToServer,
};
const PERMISSIVE: Policy = Policy {
    view_only: false,
    clipboard: Clipboard::Both,
};

fn pixel_format(bytes_per_pixel: u8) -> PixelFormat {
    PixelFormat([
        bytes_per_pixel * 8,
        24,
        0,
        1,
        0,
        255,
        0,
        255,
        0,
        255,
        16,
        8,
        0,
        0,
        0,
        0,
    ])
}

// ---- message builders -------------------------------------------------------------------

fn filler(n: usize, seed: u8) -> Vec<u8> {
    // Bytes that look like message types (3 above all) so a misframed stream shows.
    (0..n).map(|i| seed.wrapping_add(i as u8) % 8).collect()
}

fn update(rects: &[Vec<u8>]) -> Vec<u8> {
    let mut m = vec![FRAMEBUFFER_UPDATE, 0];
    m.extend_from_slice(&(rects.len() as u16).to_be_bytes());
    m.extend(rects.concat());
    m
}

/// An update announcing 0xFFFF rectangles and ended by LastRect.
fn update_with_last_rect(rects: &[Vec<u8>]) -> Vec<u8> {
    let mut m = vec![FRAMEBUFFER_UPDATE, 0, 0xff, 0xff];
    m.extend(rects.concat());
    m.extend(rect_header(0, 0, encoding::LAST_RECT));
    m
}

fn rect_header(w: u16, h: u16, enc: i32) -> Vec<u8> {
    let mut m = vec![0, 1, 0, 2];
    m.extend_from_slice(&w.to_be_bytes());
    m.extend_from_slice(&h.to_be_bytes());
    m.extend_from_slice(&enc.to_be_bytes());
    m
}

fn rect(w: u16, h: u16, enc: i32, data: &[u8]) -> Vec<u8> {
    let mut m = rect_header(w, h, enc);
    m.extend_from_slice(data);
    m
}

fn raw(w: u16, h: u16, bpp: usize) -> Vec<u8> {
    rect(
        w,
        h,
        encoding::RAW,
        &filler(usize::from(w) * usize::from(h) * bpp, 1),
    )
}

fn rre(subrects: u32, bpp: usize) -> Vec<u8> {
    let mut data = subrects.to_be_bytes().to_vec();
    data.extend(filler(bpp + subrects as usize * (bpp + 8), 2));
    rect(30, 30, encoding::RRE, &data)
}

fn with_length(w: u16, h: u16, enc: i32, payload: &[u8]) -> Vec<u8> {
    let mut data = (payload.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(payload);
    rect(w, h, enc, &data)
}

fn cursor(w: u16, h: u16, bpp: usize) -> Vec<u8> {
    let (w, h) = (usize::from(w), usize::from(h));
    let len = w * h * bpp + w.div_ceil(8) * h;
    rect(w as u16, h as u16, encoding::CURSOR, &filler(len, 3))
}

fn extended_desktop_size(screens: u8) -> Vec<u8> {
    let mut data = vec![screens, 0, 0, 0];
    data.extend(filler(16 * usize::from(screens), 4));
    rect(800, 600, encoding::EXTENDED_DESKTOP_SIZE, &data)
}

/// One Hextile tile: a subencoding, a subrect count (used when AnySubrects is set).
#[derive(Debug, Clone, Copy)]
struct Tile {
    subencoding: u8,
    subrects: u8,
}

fn tile_bytes(t: Tile, tw: usize, th: usize, bpp: usize) -> Vec<u8> {
    let s = t.subencoding;
    let mut m = vec![s];
    if s & HEXTILE_RAW != 0 {
        m.extend(filler(tw * th * bpp, 5));
        return m;
    }
    if s & HEXTILE_BACKGROUND != 0 {
        m.extend(filler(bpp, 6));
    }
    if s & HEXTILE_FOREGROUND != 0 {
        m.extend(filler(bpp, 7));
    }
    if s & HEXTILE_ANY_SUBRECTS != 0 {
        m.push(t.subrects);
        let each = if s & HEXTILE_SUBRECTS_COLOURED != 0 {
            bpp + 2
        } else {
            2
        };
        m.extend(filler(usize::from(t.subrects) * each, 8));
    }
    m
}

/// A Hextile rectangle; `tiles` is cycled over the rectangle's tiles.
fn hextile(w: u16, h: u16, bpp: usize, tiles: &[Tile]) -> Vec<u8> {
    let mut m = rect_header(w, h, encoding::HEXTILE);
    let (w, h) = (usize::from(w), usize::from(h));
    let mut i = 0;
    for ty in (0..h).step_by(16) {
        for tx in (0..w).step_by(16) {
            let t = tiles[i % tiles.len()];
            i += 1;
            m.extend(tile_bytes(t, (w - tx).min(16), (h - ty).min(16), bpp));
        }
    }
    m
}

fn colour_map(colours: u16) -> Vec<u8> {
    let mut m = vec![SET_COLOUR_MAP_ENTRIES, 0, 0, 16];
    m.extend_from_slice(&colours.to_be_bytes());
    m.extend(filler(6 * usize::from(colours), 9));
    m
}

fn cut_text(text: &[u8]) -> Vec<u8> {
    let mut m = vec![SERVER_CUT_TEXT, 0, 0, 0];
    m.extend_from_slice(&(text.len() as i32).to_be_bytes());
    m.extend_from_slice(text);
    m
}

fn extended_cut_text(data: &[u8]) -> Vec<u8> {
    let mut m = vec![SERVER_CUT_TEXT, 0, 0, 0];
    m.extend_from_slice(&(-(4 + data.len() as i32)).to_be_bytes());
    m.extend_from_slice(&0x0800_0001u32.to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn fence(payload: &[u8]) -> Vec<u8> {
    let mut m = vec![FENCE, 0, 0, 0, 0x80, 0, 0, 3, payload.len() as u8];
    m.extend_from_slice(payload);
    m
}

fn xvp(code: u8) -> Vec<u8> {
    vec![XVP, 0, 1, code]
}

const BELL_MSG: [u8; 1] = [BELL];
const END_OF_CU: [u8; 1] = [END_OF_CONTINUOUS_UPDATES];

// ---- running the filter -------------------------------------------------------------------

fn feed(
    f: &mut ServerFilter,
    chunk: &[u8],
    policy: &Policy,
    forwarded: &mut Vec<u8>,
) -> Result<(Kept, ServerReport), ServerError> {
    let mut out = BytesMut::new();
    let (kept, report) = f.filter(chunk, policy, &mut out)?;
    match kept {
        Kept::All => {
            assert!(out.is_empty(), "Kept::All must leave out untouched");
            forwarded.extend_from_slice(chunk);
        }
        Kept::Some => forwarded.extend_from_slice(&out),
    }
    assert!(f.held() <= MAX_HELD);
    Ok((kept, report))
}

fn run_chunks(chunks: &[&[u8]], bpp: u8, policy: &Policy) -> Result<(Vec<u8>, u32), ServerError> {
    let mut f = ServerFilter::new(pixel_format(bpp));
    let mut forwarded = Vec::new();
    let mut blocked = 0;
    for chunk in chunks {
        blocked += feed(&mut f, chunk, policy, &mut forwarded)?
            .1
            .clipboard_blocked;
    }
    Ok((forwarded, blocked))
}

fn run_once(input: &[u8], bpp: u8, policy: &Policy) -> Result<(Vec<u8>, u32), ServerError> {
    run_chunks(&[input], bpp, policy)
}

/// `msg` is delimited exactly: a ServerCutText right after it is found and dropped, a Bell
/// after that passes, in one call and byte by byte.
fn assert_delimits(msg: &[u8], bpp: u8) {
    let input = [msg, &cut_text(b"clip"), &BELL_MSG].concat();
    let expected = [msg, &BELL_MSG].concat();
    assert_eq!(run_once(&input, bpp, &BLOCKED), Ok((expected.clone(), 1)));
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(run_chunks(&bytes, bpp, &BLOCKED), Ok((expected, 1)));
}

fn split_at_cuts<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for c in cuts {
        chunks.push(&input[start..c]);
        start = c;
    }
    chunks.push(&input[start..]);
    chunks
}

// ---- unit tests: messages ---------------------------------------------------------------

#[test]
fn simple_messages_are_delimited() {
    assert_delimits(&BELL_MSG, 4);
    assert_delimits(&END_OF_CU, 4);
    assert_delimits(&xvp(1), 4);
    assert_delimits(&fence(&[]), 4);
    assert_delimits(&fence(&[3; 64]), 4);
    assert_delimits(&colour_map(0), 1);
    assert_delimits(&colour_map(3), 1);
    assert_delimits(&update(&[]), 4);
}

#[test]
fn server_cut_text_is_dropped_and_counted_only_when_blocked() {
    let input = [
        &cut_text(b"plain")[..],
        &BELL_MSG,
        &extended_cut_text(b"zlib data"),
        &extended_cut_text(b""),
        &xvp(1),
    ]
    .concat();
    let expected = [&BELL_MSG[..], &xvp(1)].concat();
    for clipboard in [Clipboard::ToServer, Clipboard::None] {
        let p = Policy {
            view_only: true,
            clipboard,
        };
        assert_eq!(run_once(&input, 4, &p), Ok((expected.clone(), 3)));
    }
    for clipboard in [Clipboard::Both, Clipboard::ToClient] {
        let p = Policy {
            view_only: false,
            clipboard,
        };
        assert_eq!(run_once(&input, 4, &p), Ok((input.clone(), 0)));
    }
}

#[test]
fn extended_server_cut_text_needs_its_flags() {
    for bad in [-1i32, -3] {
        let mut m = vec![SERVER_CUT_TEXT, 0, 0, 0];
        m.extend_from_slice(&bad.to_be_bytes());
        assert_eq!(
            run_once(&m, 4, &BLOCKED),
            Err(ServerError::Malformed("extended ServerCutText"))
        );
    }
}

#[test]
fn cut_text_spanning_calls_is_dropped_whole() {
    let text = filler(300, 0);
    let update_msg = update(&[raw(2, 2, 4)]);
    let input = [&update_msg[..], &cut_text(&text), &BELL_MSG].concat();
    let expected = [&update_msg[..], &BELL_MSG].concat();
    for size in [1, 2, 5, 13, 64, 1000] {
        let chunks: Vec<&[u8]> = input.chunks(size).collect();
        assert_eq!(run_chunks(&chunks, 4, &BLOCKED), Ok((expected.clone(), 1)));
    }
    // Calls wholly inside the dropped body forward nothing; the count comes with the type byte.
    let start = update_msg.len();
    let mut f = ServerFilter::new(pixel_format(4));
    let mut fwd = Vec::new();
    let (kept, r) = feed(&mut f, &input[..start + 1], &BLOCKED, &mut fwd).unwrap();
    assert_eq!((kept, r.clipboard_blocked), (Kept::Some, 1));
    let (kept, r) = feed(&mut f, &input[start + 1..start + 100], &BLOCKED, &mut fwd).unwrap();
    assert_eq!((kept, r.clipboard_blocked), (Kept::Some, 0));
    assert_eq!(fwd, update_msg);
}

#[test]
fn unknown_message_types_are_errors() {
    for t in [4u8, 5, 127, 149, 151, 249, 251, 255] {
        assert_eq!(
            run_once(&[BELL, t], 4, &BLOCKED),
            Err(ServerError::UnknownType(t))
        );
    }
}

// ---- unit tests: encodings --------------------------------------------------------------

#[test]
fn raw_copyrect_and_length_prefixed_encodings() {
    for bpp in [1u8, 2, 4] {
        let b = usize::from(bpp);
        assert_delimits(&update(&[raw(7, 3, b)]), bpp);
        assert_delimits(&update(&[raw(0, 9, b), raw(9, 0, b)]), bpp);
        assert_delimits(
            &update(&[rect(5, 5, encoding::COPY_RECT, &[0, 1, 0, 2])]),
            bpp,
        );
        for enc in [encoding::ZLIB, encoding::ZRLE, encoding::DESKTOP_NAME] {
            assert_delimits(&update(&[with_length(64, 64, enc, &filler(33, 0))]), bpp);
            assert_delimits(&update(&[with_length(64, 64, enc, &[])]), bpp);
        }
    }
}

#[test]
fn rre_counts_background_and_subrects_in_pixels() {
    for bpp in [1u8, 2, 4] {
        for n in [0, 1, 5] {
            assert_delimits(&update(&[rre(n, usize::from(bpp))]), bpp);
        }
    }
}

#[test]
fn pseudo_encoding_rectangles() {
    let empty = |enc| rect(640, 480, enc, &[]);
    let rects = [
        empty(encoding::DESKTOP_SIZE),
        empty(encoding::QEMU_EXTENDED_KEY_EVENT),
        empty(encoding::EXTENDED_MOUSE_BUTTONS),
        rect(0, 0, encoding::QEMU_LED_STATE, &[0b110]),
        with_length(0, 0, encoding::DESKTOP_NAME, b"desk-a"),
        extended_desktop_size(0),
        extended_desktop_size(2),
        cursor(9, 3, 4),
        cursor(0, 0, 4),
    ];
    for r in rects {
        assert_delimits(&update(std::slice::from_ref(&r)), 4);
    }
    assert_delimits(&update(&[cursor(17, 5, 2)]), 2);
}

#[test]
fn last_rect_ends_an_update_of_0xffff_rectangles() {
    assert_delimits(&update_with_last_rect(&[]), 4);
    assert_delimits(&update_with_last_rect(&[raw(3, 3, 4), rre(2, 4)]), 4);
    // LastRect also ends an update that announced a count.
    let mut m = update(&[raw(1, 1, 4), raw(1, 1, 4), raw(1, 1, 4)]);
    m.truncate(4 + 2 * (12 + 4));
    m[3] = 3;
    m.extend(rect_header(0, 0, encoding::LAST_RECT));
    assert_delimits(&m, 4);
}

#[test]
fn hextile_with_mixed_tile_flags_and_edge_tiles() {
    let tiles = [
        Tile {
            subencoding: HEXTILE_RAW,
            subrects: 0,
        },
        Tile {
            subencoding: 0,
            subrects: 0,
        },
        Tile {
            subencoding: HEXTILE_BACKGROUND,
            subrects: 0,
        },
        Tile {
            subencoding: HEXTILE_BACKGROUND | HEXTILE_FOREGROUND,
            subrects: 0,
        },
        Tile {
            subencoding: HEXTILE_BACKGROUND | HEXTILE_ANY_SUBRECTS,
            subrects: 2,
        },
        Tile {
            subencoding: HEXTILE_ANY_SUBRECTS | HEXTILE_SUBRECTS_COLOURED,
            subrects: 3,
        },
        Tile {
            subencoding: 0x1e,
            subrects: 1,
        },
        Tile {
            subencoding: HEXTILE_FOREGROUND | HEXTILE_ANY_SUBRECTS,
            subrects: 0,
        },
        // Raw makes the other bits meaningless (RFC 6143), known or not.
        Tile {
            subencoding: 0xff,
            subrects: 0,
        },
    ];
    for bpp in [1u8, 2, 4] {
        let b = usize::from(bpp);
        // 40x20: 3x2 tiles, the last column 8 wide, the last row 4 high.
        assert_delimits(&update(&[hextile(40, 20, b, &tiles)]), bpp);
        // Exact multiples, a single partial tile, and no tile at all.
        assert_delimits(&update(&[hextile(32, 48, b, &tiles)]), bpp);
        assert_delimits(&update(&[hextile(5, 3, b, &tiles[5..])]), bpp);
        assert_delimits(
            &update(&[hextile(0, 20, b, &tiles), hextile(20, 0, b, &tiles)]),
            bpp,
        );
        // Two Hextile rectangles in a row, then another encoding.
        assert_delimits(
            &update(&[
                hextile(17, 17, b, &tiles),
                hextile(16, 1, b, &tiles),
                raw(2, 2, b),
            ]),
            bpp,
        );
    }
}

#[test]
fn hextile_edge_tile_size_decides_raw_tile_length() {
    // 17x17 in Raw tiles: 16x16, 1x16, 16x1, 1x1 pixels.
    let tiles = [Tile {
        subencoding: HEXTILE_RAW,
        subrects: 0,
    }];
    let m = hextile(17, 17, 4, &tiles);
    assert_eq!(m.len(), 12 + 4 + 4 * (256 + 16 + 16 + 1));
    assert_delimits(&update(&[m]), 4);
}

#[test]
fn hextile_unknown_subencoding_bits_are_malformed() {
    let mut m = update(&[rect_header(16, 16, encoding::HEXTILE)]);
    m.push(0x20);
    assert_eq!(
        run_once(&m, 4, &BLOCKED),
        Err(ServerError::Malformed("Hextile subencoding"))
    );
}

#[test]
fn encodings_without_a_length_rule_are_errors() {
    let undelimitable = [
        7,
        15,
        21,
        50,
        -260,
        -314,
        0x574d_5664,
        3,
        // Never a rectangle, though allowed in SetEncodings.
        encoding::FENCE,
        encoding::CONTINUOUS_UPDATES,
        encoding::XVP,
        encoding::EXTENDED_CLIPBOARD,
        encoding::QUALITY_LEVEL_0,
        encoding::COMPRESS_LEVEL_9,
    ];
    for enc in undelimitable {
        let m = update(&[rect_header(4, 4, enc)]);
        assert_eq!(
            run_once(&m, 4, &BLOCKED),
            Err(ServerError::UnknownEncoding(enc))
        );
        assert!(!delimits_rect(enc));
    }
}

#[test]
fn every_rect_encoding_is_allowed_in_set_encodings() {
    for enc in (-400..=400).chain([encoding::EXTENDED_CLIPBOARD, 0x574d_5664]) {
        if delimits_rect(enc) {
            assert!(is_delimitable_encoding(enc), "{enc}");
        }
    }
}

#[test]
fn largest_rectangles_do_not_overflow() {
    for enc in [encoding::RAW, encoding::CURSOR] {
        let m = update(&[rect_header(u16::MAX, u16::MAX, enc)]);
        let mut f = ServerFilter::new(pixel_format(4));
        let mut fwd = Vec::new();
        let (kept, _) = feed(&mut f, &m, &BLOCKED, &mut fwd).unwrap();
        assert_eq!(kept, Kept::All);
        let (kept, _) = feed(&mut f, &[3; 4096], &BLOCKED, &mut fwd).unwrap();
        assert_eq!(kept, Kept::All, "pixel data, not a message");
    }
    // RRE with u32::MAX subrects, bits-per-pixel 255 (32 bytes): still a plain count.
    let mut f = ServerFilter::new(PixelFormat([255; 16]));
    let mut m = update(&[rect_header(1, 1, encoding::RRE)]);
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut out = BytesMut::new();
    assert!(f.filter(&m, &BLOCKED, &mut out).is_ok());
}

// ---- unit tests: streaming ------------------------------------------------------------

#[test]
fn a_split_header_costs_no_copy() {
    let input = [&update(&[raw(4, 4, 4), rre(3, 4)])[..], &BELL_MSG].concat();
    for cut in 0..=input.len() {
        let mut f = ServerFilter::new(pixel_format(4));
        let mut fwd = Vec::new();
        let (k1, _) = feed(&mut f, &input[..cut], &BLOCKED, &mut fwd).unwrap();
        let (k2, _) = feed(&mut f, &input[cut..], &BLOCKED, &mut fwd).unwrap();
        assert_eq!((k1, k2), (Kept::All, Kept::All), "cut at {cut}");
        assert_eq!(fwd, input);
    }
}

#[test]
fn held_header_is_bounded_by_a_rectangle_header() {
    let m = update(&[raw(1, 1, 4)]);
    let mut f = ServerFilter::new(pixel_format(4));
    let mut out = BytesMut::new();
    f.filter(&m[..4 + 11], &BLOCKED, &mut out).unwrap();
    assert_eq!(f.held(), 11);
    f.filter(&m[4 + 11..], &BLOCKED, &mut out).unwrap();
    assert_eq!(f.held(), 0);
}

#[test]
fn a_new_pixel_format_applies_from_the_next_message() {
    // Set mid-update: the rest of the update is still in the old format.
    let input = [
        update(&[raw(2, 2, 4), raw(2, 2, 4)]),
        update(&[raw(2, 2, 1)]),
    ]
    .concat();
    let first = update(&[raw(2, 2, 4), raw(2, 2, 4)]).len();
    let mut f = ServerFilter::new(pixel_format(4));
    let mut fwd = Vec::new();
    feed(&mut f, &input[..20], &BLOCKED, &mut fwd).unwrap();
    f.set_pixel_format(pixel_format(1));
    feed(&mut f, &input[20..first], &BLOCKED, &mut fwd).unwrap();
    let tail = [&input[first..], &cut_text(b"x")[..], &BELL_MSG].concat();
    let (_, r) = feed(&mut f, &tail, &BLOCKED, &mut fwd).unwrap();
    assert_eq!(r.clipboard_blocked, 1);
    assert_eq!(fwd, [&input[..], &BELL_MSG].concat());
    // Set between messages: at once.
    let mut f = ServerFilter::new(pixel_format(4));
    f.set_pixel_format(pixel_format(2));
    let mut fwd = Vec::new();
    let m = [update(&[raw(3, 3, 2)]), cut_text(b"y")].concat();
    feed(&mut f, &m, &BLOCKED, &mut fwd).unwrap();
    assert_eq!(fwd, update(&[raw(3, 3, 2)]));
}

#[test]
fn a_cut_text_keeps_the_verdict_of_its_type_byte() {
    let input = [cut_text(b"hello"), BELL_MSG.to_vec(), cut_text(b"world")].concat();
    let mut f = ServerFilter::new(pixel_format(4));
    let mut fwd = Vec::new();
    feed(&mut f, &input[..3], &PERMISSIVE, &mut fwd).unwrap();
    let (_, r) = feed(&mut f, &input[3..], &BLOCKED, &mut fwd).unwrap();
    assert_eq!(fwd, [cut_text(b"hello"), BELL_MSG.to_vec()].concat());
    assert_eq!(r.clipboard_blocked, 1);
}

#[test]
fn kept_all_leaves_out_untouched_and_kept_some_appends() {
    let mut f = ServerFilter::new(pixel_format(4));
    let mut out = BytesMut::from(&b"prior"[..]);
    let (kept, _) = f
        .filter(&update(&[raw(2, 2, 4)]), &BLOCKED, &mut out)
        .unwrap();
    assert_eq!((kept, &out[..]), (Kept::All, &b"prior"[..]));
    let input = [cut_text(b"a"), BELL_MSG.to_vec()].concat();
    let (kept, _) = f.filter(&input, &BLOCKED, &mut out).unwrap();
    assert_eq!((kept, &out[..]), (Kept::Some, &b"prior\x02"[..]));
}

// ---- properties -------------------------------------------------------------------------

/// A generated server message, and whether it is a ServerCutText.
type Msg = (Vec<u8>, bool);

fn any_tile() -> impl Strategy<Value = Tile> {
    (
        prop_oneof![Just(HEXTILE_RAW), Just(0xff), 0u8..0x20,],
        0u8..6,
    )
        .prop_map(|(subencoding, subrects)| Tile {
            subencoding,
            subrects,
        })
}

fn any_rect(bpp: usize) -> impl Strategy<Value = Vec<u8>> {
    let size = || (0u16..40, 0u16..40);
    prop_oneof![
        size().prop_map(move |(w, h)| raw(w, h, bpp)),
        Just(rect(9, 9, encoding::COPY_RECT, &[0, 0, 0, 0])),
        (0u32..6).prop_map(move |n| rre(n, bpp)),
        (size(), proptest::collection::vec(any_tile(), 1..10))
            .prop_map(move |((w, h), tiles)| hextile(w, h, bpp, &tiles)),
        (
            proptest::sample::select(vec![encoding::ZLIB, encoding::ZRLE, encoding::DESKTOP_NAME]),
            proptest::collection::vec(any::<u8>(), 0..80)
        )
            .prop_map(|(enc, data)| with_length(10, 10, enc, &data)),
        proptest::sample::select(vec![
            encoding::DESKTOP_SIZE,
            encoding::QEMU_EXTENDED_KEY_EVENT,
            encoding::EXTENDED_MOUSE_BUTTONS,
        ])
        .prop_map(|enc| rect(100, 100, enc, &[])),
        (0u16..20, 0u16..20).prop_map(move |(w, h)| cursor(w, h, bpp)),
        any::<u8>().prop_map(|led| rect(0, 0, encoding::QEMU_LED_STATE, &[led])),
        (0u8..4).prop_map(extended_desktop_size),
    ]
}

fn any_message(bpp: usize) -> impl Strategy<Value = Msg> {
    let rects = || proptest::collection::vec(any_rect(bpp), 0..5);
    prop_oneof![
        4 => rects().prop_map(|r: Vec<Vec<u8>>| (update(&r), false)),
        2 => rects().prop_map(|r: Vec<Vec<u8>>| (update_with_last_rect(&r), false)),
        1 => (0u16..8).prop_map(|n| (colour_map(n), false)),
        1 => Just((BELL_MSG.to_vec(), false)),
        1 => Just((END_OF_CU.to_vec(), false)),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(|t| (cut_text(&t), true)),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(|d| (extended_cut_text(&d), true)),
        1 => proptest::collection::vec(any::<u8>(), 0..=64).prop_map(|p| (fence(&p), false)),
        1 => any::<u8>().prop_map(|c| (xvp(c), false)),
    ]
}

/// A pixel format and a stream valid in it.
fn any_stream() -> impl Strategy<Value = (u8, Vec<Msg>)> {
    proptest::sample::select(vec![1u8, 2, 4]).prop_flat_map(|bpp| {
        (
            Just(bpp),
            proptest::collection::vec(any_message(usize::from(bpp)), 0..12),
        )
    })
}

fn any_policy() -> impl Strategy<Value = Policy> {
    (
        any::<bool>(),
        proptest::sample::select(vec![
            Clipboard::Both,
            Clipboard::ToClient,
            Clipboard::ToServer,
            Clipboard::None,
        ]),
    )
        .prop_map(|(view_only, clipboard)| Policy {
            view_only,
            clipboard,
        })
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(any::<usize>(), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (a) Any split of a valid stream gives the output and count of one call: the stream
    /// without its ServerCutText messages when the clipboard policy blocks them.
    #[test]
    fn valid_streams_split_anywhere_match_the_rules(
        (bpp, msgs) in any_stream(),
        p in any_policy(),
        cuts in cuts(),
    ) {
        let input: Vec<u8> = msgs.iter().flat_map(|(b, _)| b.clone()).collect();
        let blocked = !p.clipboard.to_client();
        let expected: Vec<u8> = msgs
            .iter()
            .filter(|(_, cut)| !(blocked && *cut))
            .flat_map(|(b, _)| b.clone())
            .collect();
        let dropped = if blocked { msgs.iter().filter(|(_, cut)| *cut).count() as u32 } else { 0 };
        let whole = run_once(&input, bpp, &p).unwrap();
        prop_assert_eq!(&whole, &(expected, dropped));
        let split = run_chunks(&split_at_cuts(&input, &cuts), bpp, &p).unwrap();
        prop_assert_eq!(split, whole);
    }

    /// (b) Arbitrary bytes never panic and the held header stays bounded, even when calls go
    /// on after an error.
    #[test]
    fn arbitrary_bytes_never_panic(
        input in proptest::collection::vec(any::<u8>(), 0..3000),
        pf in any::<[u8; 16]>(),
        p in any_policy(),
        cuts in cuts(),
    ) {
        let mut f = ServerFilter::new(PixelFormat(pf));
        for chunk in split_at_cuts(&input, &cuts) {
            let mut out = BytesMut::new();
            let _ = f.filter(chunk, &p, &mut out);
            prop_assert!(f.held() <= MAX_HELD);
        }
    }

    /// (b) Valid streams with a few corrupted bytes reach deeper states than random bytes.
    #[test]
    fn corrupted_streams_never_panic(
        (bpp, msgs) in any_stream(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        p in any_policy(),
        cuts in cuts(),
    ) {
        let mut input: Vec<u8> = msgs.iter().flat_map(|(b, _)| b.clone()).collect();
        for (at, byte) in flips {
            if !input.is_empty() {
                let at = at % input.len();
                input[at] = byte;
            }
        }
        let mut f = ServerFilter::new(pixel_format(bpp));
        for chunk in split_at_cuts(&input, &cuts) {
            let mut out = BytesMut::new();
            let result = f.filter(chunk, &p, &mut out);
            prop_assert!(f.held() <= MAX_HELD);
            if result.is_err() {
                break;
            }
        }
    }

    /// (c) When ServerCutText may reach the client, every call forwards its input as is.
    #[test]
    fn permissive_policy_forwards_the_input_without_copying(
        (bpp, msgs) in any_stream(),
        cuts in cuts(),
    ) {
        let input: Vec<u8> = msgs.iter().flat_map(|(b, _)| b.clone()).collect();
        let mut f = ServerFilter::new(pixel_format(bpp));
        for chunk in split_at_cuts(&input, &cuts) {
            let mut out = BytesMut::new();
            let (kept, _) = f.filter(chunk, &PERMISSIVE, &mut out).unwrap();
            prop_assert_eq!(kept, Kept::All);
        }
    }
}
