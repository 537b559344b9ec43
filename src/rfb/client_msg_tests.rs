use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::rfb::policy::{Clipboard, InputKind, Policy};

const PERMISSIVE: Policy = Policy {
    view_only: false,
    clipboard: Clipboard::Both,
};
const VIEW_ONLY: Policy = Policy {
    view_only: true,
    clipboard: Clipboard::Both,
};
const MAX_CUT: usize = 1000;

fn policy(view_only: bool, clipboard: Clipboard) -> Policy {
    Policy {
        view_only,
        clipboard,
    }
}

// ---- message builders -------------------------------------------------------------------

fn pixel_format_bytes(bits: u8) -> [u8; 16] {
    [bits, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]
}

fn set_pixel_format(bits: u8) -> Vec<u8> {
    let mut m = vec![SET_PIXEL_FORMAT, 0, 0, 0];
    m.extend_from_slice(&pixel_format_bytes(bits));
    m
}

fn set_encodings(encs: &[i32]) -> Vec<u8> {
    let mut m = vec![SET_ENCODINGS, 0];
    m.extend_from_slice(&(encs.len() as u16).to_be_bytes());
    for e in encs {
        m.extend_from_slice(&e.to_be_bytes());
    }
    m
}

fn update_request() -> Vec<u8> {
    vec![FRAMEBUFFER_UPDATE_REQUEST, 1, 0, 0, 0, 0, 4, 0, 3, 0]
}

fn key_event(keysym: u32) -> Vec<u8> {
    let mut m = vec![KEY_EVENT, 1, 0, 0];
    m.extend_from_slice(&keysym.to_be_bytes());
    m
}

fn pointer_event(mask: u8) -> Vec<u8> {
    let mut m = vec![POINTER_EVENT, mask, 0, 10, 0, 20];
    if mask & EXTENDED_BUTTONS_BIT != 0 {
        m.push(0x03);
    }
    m
}

fn cut_text(text: &[u8]) -> Vec<u8> {
    let mut m = vec![CLIENT_CUT_TEXT, 0, 0, 0];
    m.extend_from_slice(&(text.len() as i32).to_be_bytes());
    m.extend_from_slice(text);
    m
}

/// Extended clipboard: flags then (here fake) zlib data, the length negated.
fn extended_cut_text(flags: u32, data: &[u8]) -> Vec<u8> {
    let mut m = vec![CLIENT_CUT_TEXT, 0, 0, 0];
    m.extend_from_slice(&(-(4 + data.len() as i32)).to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn enable_continuous_updates() -> Vec<u8> {
    vec![ENABLE_CONTINUOUS_UPDATES, 1, 0, 0, 0, 0, 4, 0, 3, 0]
}

fn fence(payload: &[u8]) -> Vec<u8> {
    let mut m = vec![FENCE, 0, 0, 0, 0x80, 0, 0, 3, payload.len() as u8];
    m.extend_from_slice(payload);
    m
}

fn xvp(code: u8) -> Vec<u8> {
    vec![XVP, 0, 1, code]
}

fn set_desktop_size(screens: u8) -> Vec<u8> {
    let mut m = vec![SET_DESKTOP_SIZE, 0, 4, 0, 3, 0, screens, 0];
    for s in 0..screens {
        m.extend_from_slice(&[0, 0, 0, s, 0, 0, 0, 0, 4, 0, 3, 0, 0, 0, 0, 0]);
    }
    m
}

fn qemu_key_event() -> Vec<u8> {
    vec![QEMU, 0, 0, 1, 0, 0, 0, 0x61, 0, 0, 0, 0x1e]
}

fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

// ---- running the filter -------------------------------------------------------------------

/// Reports of several calls, summed the way the caller would.
#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    dropped: [u32; 5],
    clipboard_blocked: u32,
    pixel_format: Option<PixelFormat>,
}

impl Totals {
    fn add(&mut self, r: &ClientReport) {
        for (t, d) in self.dropped.iter_mut().zip(r.dropped) {
            *t += d;
        }
        self.clipboard_blocked += r.clipboard_blocked;
        if r.pixel_format.is_some() {
            self.pixel_format = r.pixel_format;
        }
    }
}

/// One call, the way the relay uses it: `Kept::All` forwards the input itself.
fn feed(
    f: &mut ClientFilter,
    chunk: &[u8],
    policy: &Policy,
    forwarded: &mut Vec<u8>,
) -> Result<(Kept, ClientReport), ClientError> {
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

fn run_chunks(
    chunks: &[&[u8]],
    policy: &Policy,
    max_cut: usize,
) -> Result<(Vec<u8>, Totals), ClientError> {
    let mut f = ClientFilter::new(max_cut);
    let mut forwarded = Vec::new();
    let mut totals = Totals::default();
    for chunk in chunks {
        let (_, report) = feed(&mut f, chunk, policy, &mut forwarded)?;
        totals.add(&report);
    }
    Ok((forwarded, totals))
}

fn run_once(input: &[u8], policy: &Policy) -> Result<(Vec<u8>, Totals), ClientError> {
    run_chunks(&[input], policy, MAX_CUT)
}

fn one_call(input: &[u8], policy: &Policy) -> Result<(Kept, Vec<u8>, ClientReport), ClientError> {
    let mut f = ClientFilter::new(MAX_CUT);
    let mut out = BytesMut::new();
    let (kept, report) = f.filter(input, policy, &mut out)?;
    Ok((kept, out.to_vec(), report))
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

fn every_message() -> Vec<Vec<u8>> {
    vec![
        set_pixel_format(32),
        set_encodings(&[0, 1, -223]),
        update_request(),
        key_event(0x61),
        pointer_event(0x01),
        pointer_event(0x81),
        cut_text(b"hello"),
        extended_cut_text(0x0100_0001, b"zlib"),
        enable_continuous_updates(),
        fence(b"sync"),
        xvp(2),
        set_desktop_size(2),
        qemu_key_event(),
    ]
}

// ---- unit tests -------------------------------------------------------------------------

#[test]
fn every_message_passes_whole_and_untouched_with_a_permissive_policy() {
    for msg in every_message() {
        let mut f = ClientFilter::new(MAX_CUT);
        let mut out = BytesMut::from(&b"prior"[..]);
        let (kept, _) = f.filter(&msg, &PERMISSIVE, &mut out).unwrap();
        assert_eq!(kept, Kept::All, "{msg:?}");
        assert_eq!(&out[..], b"prior", "out untouched");
        assert_eq!(f.held(), 0, "{msg:?} framed exactly");
    }
    let all = concat(&every_message());
    let (kept, out, _) = one_call(&all, &PERMISSIVE).unwrap();
    assert_eq!((kept, out.len()), (Kept::All, 0));
}

#[test]
fn message_lengths_are_exact() {
    // Each message followed by a KeyEvent, all view-only: only the non-input part survives,
    // so a wrong length would misframe the KeyEvent after it.
    let cases = [
        (set_pixel_format(16), 20),
        (set_encodings(&[5, 16]), 12),
        (update_request(), 10),
        (enable_continuous_updates(), 10),
        (fence(&[7; 64]), 73),
        (fence(&[]), 9),
    ];
    for (msg, len) in cases {
        assert_eq!(msg.len(), len);
        let input = concat(&[msg.clone(), key_event(1)]);
        let (out, totals) = run_once(&input, &VIEW_ONLY).unwrap();
        assert_eq!(out, msg);
        assert_eq!(totals.dropped[InputKind::Key as usize], 1);
    }
}

#[test]
fn pointer_event_with_extended_buttons_is_one_byte_longer() {
    for (mask, len) in [(0x00, 6), (0x7f, 6), (0x80, 7), (0xff, 7)] {
        let msg = pointer_event(mask);
        assert_eq!(msg.len(), len);
        let input = concat(&[msg, update_request()]);
        let (out, totals) = run_once(&input, &VIEW_ONLY).unwrap();
        assert_eq!(out, update_request(), "mask {mask:#x}");
        assert_eq!(totals.dropped[InputKind::Pointer as usize], 1);
    }
}

#[test]
fn view_only_drops_input_and_counts_each_kind() {
    let input = concat(&every_message());
    let (out, totals) = run_once(&input, &VIEW_ONLY).unwrap();
    let expected = concat(&[
        set_pixel_format(32),
        set_encodings(&[0, 1, -223]),
        update_request(),
        enable_continuous_updates(),
        fence(b"sync"),
    ]);
    assert_eq!(out, expected);
    let d = |k: InputKind| totals.dropped[k as usize];
    assert_eq!(d(InputKind::Key), 2, "KeyEvent and QEMU extended key event");
    assert_eq!(d(InputKind::Pointer), 2);
    assert_eq!(d(InputKind::Clipboard), 2, "plain and extended cut text");
    assert_eq!(d(InputKind::DesktopSize), 1);
    assert_eq!(d(InputKind::Other), 1, "xvp");
    assert_eq!(totals.clipboard_blocked, 0);
    assert_eq!(
        totals.pixel_format,
        Some(PixelFormat(pixel_format_bytes(32)))
    );
}

#[test]
fn report_dropped_accessor_indexes_like_all() {
    let (_, _, report) = one_call(&xvp(1), &VIEW_ONLY).unwrap();
    assert_eq!(report.dropped(InputKind::Other), 1);
    assert_eq!(report.dropped(InputKind::Key), 0);
}

#[test]
fn clipboard_policy_drops_client_cut_text_only() {
    let input = concat(&[
        cut_text(b"secret"),
        key_event(1),
        extended_cut_text(1, b"data"),
    ]);
    for clipboard in [Clipboard::ToClient, Clipboard::None] {
        let (out, totals) = run_once(&input, &policy(false, clipboard)).unwrap();
        assert_eq!(out, key_event(1));
        assert_eq!(totals.clipboard_blocked, 2);
        assert_eq!(totals.dropped, [0; 5]);
    }
    let (out, totals) = run_once(&input, &policy(false, Clipboard::ToServer)).unwrap();
    assert_eq!((out, totals.clipboard_blocked), (input.clone(), 0));
}

#[test]
fn view_only_and_clipboard_blocked_count_a_cut_text_once_as_view_only() {
    let (out, totals) = run_once(&cut_text(b"x"), &policy(true, Clipboard::None)).unwrap();
    assert!(out.is_empty());
    assert_eq!(totals.dropped[InputKind::Clipboard as usize], 1);
    assert_eq!(totals.clipboard_blocked, 0);
}

#[test]
fn cut_text_streams_across_calls_without_being_held() {
    let text: Vec<u8> = (0..200u8).collect();
    let input = concat(&[cut_text(&text), key_event(9)]);
    let mut f = ClientFilter::new(MAX_CUT);
    let mut forwarded = Vec::new();
    // The header split 3 + 5, then the body in pieces.
    let (kept, _) = feed(&mut f, &input[..3], &PERMISSIVE, &mut forwarded).unwrap();
    assert_eq!((kept, f.held()), (Kept::Some, 3));
    let (kept, _) = feed(&mut f, &input[3..50], &PERMISSIVE, &mut forwarded).unwrap();
    assert_eq!(
        kept,
        Kept::Some,
        "held header bytes are released in this call"
    );
    assert_eq!(f.held(), 0, "the body is not held");
    let (kept, _) = feed(&mut f, &input[50..150], &PERMISSIVE, &mut forwarded).unwrap();
    assert_eq!(kept, Kept::All, "a body run passes by count");
    let (kept, _) = feed(&mut f, &input[150..], &PERMISSIVE, &mut forwarded).unwrap();
    assert_eq!(kept, Kept::All);
    assert_eq!(forwarded, input);

    let blocked = policy(false, Clipboard::ToClient);
    let chunks: Vec<&[u8]> = input.chunks(7).collect();
    let (out, totals) = run_chunks(&chunks, &blocked, MAX_CUT).unwrap();
    assert_eq!(out, key_event(9));
    assert_eq!(totals.clipboard_blocked, 1);
}

#[test]
fn extended_cut_text_lengths() {
    let ext = extended_cut_text(0x1000_0000, &[]);
    assert_eq!(ext.len(), 12, "flags only: length -4");
    let (out, _) = run_once(&ext, &PERMISSIVE).unwrap();
    assert_eq!(out, ext);
    for bad in [-1i32, -3] {
        let mut m = vec![CLIENT_CUT_TEXT, 0, 0, 0];
        m.extend_from_slice(&bad.to_be_bytes());
        m.extend_from_slice(&[0; 4]);
        assert_eq!(
            run_once(&m, &PERMISSIVE).unwrap_err(),
            ClientError::Malformed("extended ClientCutText")
        );
    }
}

#[test]
fn cut_text_above_the_limit_is_refused_in_both_forms() {
    let max = 10;
    assert!(run_chunks(&[&cut_text(&[b'a'; 10])], &PERMISSIVE, max).is_ok());
    assert!(run_chunks(&[&extended_cut_text(1, &[0; 6])], &PERMISSIVE, max).is_ok());
    let err = run_chunks(&[&cut_text(&[b'a'; 11])], &PERMISSIVE, max).unwrap_err();
    assert_eq!(err, ClientError::TooBig(11));
    let err = run_chunks(&[&extended_cut_text(1, &[0; 7])], &PERMISSIVE, max).unwrap_err();
    assert_eq!(err, ClientError::TooBig(11));
    // Judged on the header alone: no body needs to arrive.
    let mut header = vec![CLIENT_CUT_TEXT, 0, 0, 0];
    header.extend_from_slice(&i32::MIN.to_be_bytes());
    let err = run_chunks(&[&header], &PERMISSIVE, max).unwrap_err();
    assert_eq!(err, ClientError::TooBig(1 << 31));
    header[4..8].copy_from_slice(&i32::MAX.to_be_bytes());
    let err = run_chunks(&[&header], &PERMISSIVE, max).unwrap_err();
    assert_eq!(err, ClientError::TooBig(i32::MAX as usize));
}

/// noVNC 1.7's SetEncodings at depth 24 with H.264.
const NOVNC: [i32; 29] = [
    1,
    50,
    7,
    -260,
    16,
    21,
    5,
    2,
    6,
    0,
    -26,
    -254,
    -223,
    -224,
    -258,
    -261,
    -308,
    -309,
    -312,
    -313,
    -307,
    EXTENDED_CLIPBOARD,
    -316,
    0x574d_5664,
    -239,
    -32,
    -247,
    -23,
    -256,
];

fn rewritten(policy: &Policy) -> Vec<u8> {
    run_once(&set_encodings(&NOVNC), policy).unwrap().0
}

#[test]
fn set_encodings_passes_unchanged_when_clipboard_is_both() {
    let (kept, out, _) = one_call(&set_encodings(&NOVNC), &PERMISSIVE).unwrap();
    assert_eq!((kept, out.len()), (Kept::All, 0));
    let (kept, _, _) = one_call(&set_encodings(&NOVNC), &VIEW_ONLY).unwrap();
    assert_eq!(kept, Kept::All, "view-only does not touch encodings");
}

#[test]
fn set_encodings_loses_extended_clipboard_when_the_clipboard_is_restricted() {
    let without: Vec<i32> = NOVNC
        .iter()
        .copied()
        .filter(|&e| e != EXTENDED_CLIPBOARD)
        .collect();
    assert_eq!(
        rewritten(&policy(false, Clipboard::ToClient)),
        set_encodings(&without)
    );
}

#[test]
fn set_encodings_keeps_only_delimitable_encodings_in_order_when_the_server_stream_is_delimited() {
    let expected = set_encodings(&[
        1, 16, 5, 2, 6, 0, -26, -254, -223, -224, -258, -261, -308, -309, -312, -313, -307, -316,
        -239, -32, -247, -23, -256,
    ]);
    assert_eq!(rewritten(&policy(false, Clipboard::ToServer)), expected);
    assert_eq!(rewritten(&policy(true, Clipboard::None)), expected);
}

#[test]
fn a_recorded_session_asks_only_for_encodings_the_exporter_decodes_whatever_the_clipboard() {
    let expected = set_encodings(&[
        1,
        16,
        5,
        2,
        6,
        0,
        -26,
        -254,
        -223,
        -224,
        -258,
        -261,
        -308,
        -309,
        -312,
        -313,
        -307,
        EXTENDED_CLIPBOARD,
        -316,
        -239,
        -32,
        -247,
        -23,
        -256,
    ]);
    let mut filter = ClientFilter::new(MAX_CUT).for_recording();
    let mut out = BytesMut::new();
    let (kept, _) = filter
        .filter(&set_encodings(&NOVNC), &PERMISSIVE, &mut out)
        .unwrap();
    assert_eq!((kept, &out[..]), (Kept::Some, &expected[..]));
}

#[test]
fn set_encodings_rewrite_edge_cases() {
    let strict = policy(false, Clipboard::None);
    // Nothing to remove: untouched, no copy.
    let (kept, _, _) = one_call(&set_encodings(&[0, 1, 16, -224]), &strict).unwrap();
    assert_eq!(kept, Kept::All);
    // Everything removed: an empty list, count 0.
    let (out, _) = run_once(&set_encodings(&[7, 50, EXTENDED_CLIPBOARD]), &strict).unwrap();
    assert_eq!(out, set_encodings(&[]));
    // Empty list passes.
    let (kept, _, _) = one_call(&set_encodings(&[]), &strict).unwrap();
    assert_eq!(kept, Kept::All);
    // The rewrite lands in place among other messages, whatever the split.
    let input = concat(&[key_event(1), set_encodings(&[7, 0]), key_event(2)]);
    let expected = concat(&[key_event(1), set_encodings(&[0]), key_event(2)]);
    for cut in 0..=input.len() {
        let (out, _) = run_chunks(&[&input[..cut], &input[cut..]], &strict, MAX_CUT).unwrap();
        assert_eq!(out, expected, "cut at {cut}");
    }
}

#[test]
fn set_encodings_is_bounded() {
    let big: Vec<i32> = vec![0; MAX_ENCODINGS];
    let msg = set_encodings(&big);
    assert_eq!(msg.len(), MAX_HELD);
    let mut f = ClientFilter::new(MAX_CUT);
    let mut fwd = Vec::new();
    feed(&mut f, &msg[..msg.len() - 1], &PERMISSIVE, &mut fwd).unwrap();
    assert_eq!(f.held(), MAX_HELD - 1);
    feed(&mut f, &msg[msg.len() - 1..], &PERMISSIVE, &mut fwd).unwrap();
    assert_eq!((fwd, f.held()), (msg, 0));
    let too_many = [SET_ENCODINGS, 0, 0x04, 0x01];
    assert_eq!(
        run_once(&too_many, &PERMISSIVE).unwrap_err(),
        ClientError::Malformed("SetEncodings")
    );
}

#[test]
fn fence_payload_is_capped_at_64() {
    assert!(run_once(&fence(&[1; 64]), &PERMISSIVE).is_ok());
    let mut m = fence(&[1; 65]);
    m.truncate(9);
    assert_eq!(
        run_once(&m, &PERMISSIVE).unwrap_err(),
        ClientError::Malformed("Fence")
    );
}

#[test]
fn set_desktop_size_length_follows_the_screen_count() {
    for screens in [0, 1, 3, 255] {
        let msg = set_desktop_size(screens);
        assert_eq!(msg.len(), 8 + 16 * usize::from(screens));
        let input = concat(&[msg, update_request()]);
        let (out, totals) = run_once(&input, &VIEW_ONLY).unwrap();
        assert_eq!(out, update_request());
        assert_eq!(totals.dropped[InputKind::DesktopSize as usize], 1);
    }
}

#[test]
fn unknown_types_and_qemu_subtypes_are_errors() {
    for t in [1u8, 7, 8, 149, 151, 247, 249, 252, 253, 254] {
        assert_eq!(
            run_once(&[t, 0, 0, 0], &PERMISSIVE).unwrap_err(),
            ClientError::UnknownType(t)
        );
    }
    let mut qemu_audio = qemu_key_event();
    qemu_audio[1] = 1;
    assert_eq!(
        run_once(&qemu_audio, &PERMISSIVE).unwrap_err(),
        ClientError::Malformed("QEMU")
    );
    // An error after good messages in the same call still reports the error.
    let input = concat(&[key_event(1), vec![9]]);
    assert_eq!(
        run_once(&input, &PERMISSIVE).unwrap_err(),
        ClientError::UnknownType(9)
    );
}

#[test]
fn a_header_held_across_calls_is_released_in_order() {
    let input = concat(&[key_event(1), key_event(2), key_event(3)]);
    let mut f = ClientFilter::new(MAX_CUT);
    let mut fwd = Vec::new();
    // Call 1 ends inside the second KeyEvent: its first 3 bytes are held back.
    let (kept, _) = feed(&mut f, &input[..11], &PERMISSIVE, &mut fwd).unwrap();
    assert_eq!((kept, f.held()), (Kept::Some, 3));
    assert_eq!(fwd, key_event(1));
    // Call 2 completes it: the held bytes come first, then the rest of the input.
    let (kept, _) = feed(&mut f, &input[11..], &PERMISSIVE, &mut fwd).unwrap();
    assert_eq!((kept, f.held()), (Kept::Some, 0));
    assert_eq!(fwd, input);
}

#[test]
fn byte_by_byte_equals_one_call() {
    let input = concat(&every_message());
    for p in [PERMISSIVE, VIEW_ONLY, policy(false, Clipboard::None)] {
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            run_chunks(&chunks, &p, MAX_CUT).unwrap(),
            run_once(&input, &p).unwrap()
        );
    }
}

#[test]
fn pixel_format_reports_the_last_one_of_the_call() {
    let input = concat(&[set_pixel_format(8), key_event(1), set_pixel_format(16)]);
    let (_, _, report) = one_call(&input, &VIEW_ONLY).unwrap();
    assert_eq!(
        report.pixel_format,
        Some(PixelFormat(pixel_format_bytes(16)))
    );
    let (_, _, report) = one_call(&key_event(1), &PERMISSIVE).unwrap();
    assert_eq!(report.pixel_format, None);
    // Split: reported by the call that completes it.
    let msg = set_pixel_format(32);
    let mut f = ClientFilter::new(MAX_CUT);
    let mut fwd = Vec::new();
    let (_, r1) = feed(&mut f, &msg[..10], &PERMISSIVE, &mut fwd).unwrap();
    let (_, r2) = feed(&mut f, &msg[10..], &PERMISSIVE, &mut fwd).unwrap();
    assert_eq!(r1.pixel_format, None);
    assert_eq!(r2.pixel_format, Some(PixelFormat(pixel_format_bytes(32))));
    assert_eq!(fwd, msg);
}

#[test]
fn kept_some_appends_after_existing_out_content() {
    let mut f = ClientFilter::new(MAX_CUT);
    let mut out = BytesMut::from(&b"prior"[..]);
    let input = concat(&[key_event(1), update_request()]);
    let (kept, _) = f.filter(&input, &VIEW_ONLY, &mut out).unwrap();
    assert_eq!(kept, Kept::Some);
    assert_eq!(
        &out[..],
        &concat(&[b"prior".to_vec(), update_request()])[..]
    );
}

#[test]
fn a_judged_message_keeps_its_verdict_when_the_policy_changes() {
    let text = [b'z'; 40];
    let input = concat(&[cut_text(&text), key_event(5)]);
    // Header judged under the permissive policy: the body keeps passing under view-only;
    // the KeyEvent after it is judged under view-only.
    let mut f = ClientFilter::new(MAX_CUT);
    let mut fwd = Vec::new();
    feed(&mut f, &input[..20], &PERMISSIVE, &mut fwd).unwrap();
    let (_, report) = feed(&mut f, &input[20..], &VIEW_ONLY, &mut fwd).unwrap();
    assert_eq!(fwd, cut_text(&text));
    assert_eq!(report.dropped(InputKind::Key), 1);
    assert_eq!(report.dropped(InputKind::Clipboard), 0);

    // The reverse: dropped under view-only, still dropped after view-only is lifted.
    let mut f = ClientFilter::new(MAX_CUT);
    let mut fwd = Vec::new();
    let (_, r1) = feed(&mut f, &input[..20], &VIEW_ONLY, &mut fwd).unwrap();
    feed(&mut f, &input[20..], &PERMISSIVE, &mut fwd).unwrap();
    assert_eq!(fwd, key_event(5));
    assert_eq!(r1.dropped(InputKind::Clipboard), 1);
}

#[test]
fn an_unfinished_header_is_judged_by_the_policy_at_completion() {
    let input = key_event(7);
    let mut f = ClientFilter::new(MAX_CUT);
    let mut fwd = Vec::new();
    feed(&mut f, &input[..4], &PERMISSIVE, &mut fwd).unwrap();
    let (_, report) = feed(&mut f, &input[4..], &VIEW_ONLY, &mut fwd).unwrap();
    assert!(fwd.is_empty());
    assert_eq!(report.dropped(InputKind::Key), 1);
}

// ---- properties -------------------------------------------------------------------------

/// A generated message and what the policy should do with it.
#[derive(Debug, Clone)]
enum Model {
    Plain,
    PixelFormat([u8; 16]),
    Input(InputKind),
    CutText,
    Encodings(Vec<i32>),
}

fn any_encoding() -> impl Strategy<Value = i32> {
    prop_oneof![
        proptest::sample::select(NOVNC.to_vec()),
        proptest::sample::select(vec![15, -314, 3, 8]),
        any::<i32>(),
    ]
}

fn any_message() -> impl Strategy<Value = (Vec<u8>, Model)> {
    prop_oneof![
        any::<[u8; 16]>().prop_map(|pf| {
            let mut m = vec![SET_PIXEL_FORMAT, 0, 0, 0];
            m.extend_from_slice(&pf);
            (m, Model::PixelFormat(pf))
        }),
        proptest::collection::vec(any_encoding(), 0..40)
            .prop_map(|e| (set_encodings(&e), Model::Encodings(e))),
        Just((update_request(), Model::Plain)),
        Just((enable_continuous_updates(), Model::Plain)),
        any::<u32>().prop_map(|k| (key_event(k), Model::Input(InputKind::Key))),
        Just((qemu_key_event(), Model::Input(InputKind::Key))),
        any::<u8>().prop_map(|m| (pointer_event(m), Model::Input(InputKind::Pointer))),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|t| (cut_text(&t), Model::CutText)),
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(f, d)| (extended_cut_text(f, &d), Model::CutText)),
        proptest::collection::vec(any::<u8>(), 0..=64).prop_map(|p| (fence(&p), Model::Plain)),
        any::<u8>().prop_map(|c| (xvp(c), Model::Input(InputKind::Other))),
        (0u8..6).prop_map(|s| (set_desktop_size(s), Model::Input(InputKind::DesktopSize))),
    ]
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
        .prop_map(|(v, c)| policy(v, c))
}

/// What the filter should forward and count, written from the rules rather than the code.
fn expected(msgs: &[(Vec<u8>, Model)], p: &Policy) -> (Vec<u8>, Totals) {
    let mut out = Vec::new();
    let mut t = Totals::default();
    for (bytes, model) in msgs {
        match model {
            Model::Plain => out.extend_from_slice(bytes),
            Model::PixelFormat(pf) => {
                out.extend_from_slice(bytes);
                t.pixel_format = Some(PixelFormat(*pf));
            }
            Model::Input(kind) if p.view_only => t.dropped[*kind as usize] += 1,
            Model::Input(_) => out.extend_from_slice(bytes),
            Model::CutText if p.view_only => t.dropped[InputKind::Clipboard as usize] += 1,
            Model::CutText if !p.clipboard.to_server() => t.clipboard_blocked += 1,
            Model::CutText => out.extend_from_slice(bytes),
            Model::Encodings(encs) => {
                let kept: Vec<i32> = encs
                    .iter()
                    .copied()
                    .filter(|&e| p.clipboard == Clipboard::Both || e != EXTENDED_CLIPBOARD)
                    .filter(|&e| p.clipboard.to_client() || is_delimitable_encoding(e))
                    .collect();
                out.extend_from_slice(&set_encodings(&kept));
            }
        }
    }
    (out, t)
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(any::<usize>(), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (a) Any split of a valid stream gives the output and counts of one call, which are
    /// those the rules prescribe.
    #[test]
    fn valid_streams_split_anywhere_match_the_rules(
        msgs in proptest::collection::vec(any_message(), 0..24),
        p in any_policy(),
        cuts in cuts(),
    ) {
        let input: Vec<u8> = msgs.iter().flat_map(|(b, _)| b.clone()).collect();
        let whole = run_once(&input, &p).unwrap();
        prop_assert_eq!(&whole, &expected(&msgs, &p));
        let split = run_chunks(&split_at_cuts(&input, &cuts), &p, MAX_CUT).unwrap();
        prop_assert_eq!(split, whole);
    }

    /// (b) Arbitrary bytes never panic, and what is held stays bounded, even when calls go on
    /// after an error.
    #[test]
    fn arbitrary_bytes_never_panic(
        input in proptest::collection::vec(any::<u8>(), 0..3000),
        p in any_policy(),
        max_cut in 0usize..5000,
        cuts in cuts(),
    ) {
        let mut f = ClientFilter::new(max_cut);
        for chunk in split_at_cuts(&input, &cuts) {
            let mut out = BytesMut::new();
            let _ = f.filter(chunk, &p, &mut out);
            prop_assert!(f.held() <= MAX_HELD);
        }
    }

    /// (b) Valid streams with a few bytes corrupted reach deeper states than random bytes.
    #[test]
    fn corrupted_streams_never_panic(
        msgs in proptest::collection::vec(any_message(), 1..12),
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
        let mut f = ClientFilter::new(MAX_CUT);
        for chunk in split_at_cuts(&input, &cuts) {
            let mut out = BytesMut::new();
            let result = f.filter(chunk, &p, &mut out);
            prop_assert!(f.held() <= MAX_HELD);
            if result.is_err() {
                break;
            }
        }
    }

    /// (c) With nothing to enforce, the output is the input, whatever the split.
    #[test]
    fn permissive_policy_forwards_the_input(
        msgs in proptest::collection::vec(any_message(), 0..24),
        cuts in cuts(),
    ) {
        let input: Vec<u8> = msgs.iter().flat_map(|(b, _)| b.clone()).collect();
        let (out, _) = run_chunks(&split_at_cuts(&input, &cuts), &PERMISSIVE, MAX_CUT).unwrap();
        prop_assert_eq!(out, input.clone());
        let (kept, _, _) = one_call(&input, &PERMISSIVE).unwrap();
        prop_assert_eq!(kept, Kept::All);
    }
}
