use flate2::{Compress, Compression, FlushCompress};

use super::*;

/// noVNC's format: 32 bits, depth 24, little-endian, red in the lowest byte.
const NOVNC: PixelFormat = PixelFormat([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 0, 8, 16, 0, 0, 0]);
/// 16-bit 5-6-5, big-endian.
const RGB565_BE: PixelFormat = PixelFormat([16, 16, 1, 1, 0, 31, 0, 63, 0, 31, 11, 5, 0, 0, 0, 0]);
/// 8-bit colour map.
const MAPPED: PixelFormat = PixelFormat([8, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);

const RED: [u8; 3] = [255, 0, 0];
const GREEN: [u8; 3] = [0, 255, 0];
const BLUE: [u8; 3] = [0, 0, 255];
const WHITE: [u8; 3] = [255, 255, 255];

/// A pixel in noVNC's format.
fn px(rgb: [u8; 3]) -> Vec<u8> {
    vec![rgb[0], rgb[1], rgb[2], 0]
}

/// A ZRLE CPIXEL in noVNC's format (its colour bits fit in the low three bytes).
fn cpx(rgb: [u8; 3]) -> Vec<u8> {
    rgb.to_vec()
}

fn update(rects: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![0, 0];
    out.extend_from_slice(&(rects.len() as u16).to_be_bytes());
    rects.iter().for_each(|r| out.extend_from_slice(r));
    out
}

fn rect(x: u16, y: u16, w: u16, h: u16, enc: i32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [x, y, w, h] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&enc.to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn decoded(w: u16, h: u16, pf: PixelFormat, stream: &[u8]) -> Decoder {
    let mut d = Decoder::new(w, h, pf).unwrap();
    d.feed(stream).unwrap();
    d
}

fn at(d: &Decoder, x: usize, y: usize) -> [u8; 3] {
    d.framebuffer().get(x, y).unwrap()
}

/// Every pixel of the framebuffer, row by row.
fn pixels(d: &Decoder) -> Vec<[u8; 3]> {
    let fb = d.framebuffer();
    (0..usize::from(fb.height))
        .flat_map(|y| (0..usize::from(fb.width)).map(move |x| (x, y)))
        .map(|(x, y)| fb.get(x, y).unwrap())
        .collect()
}

/// A zlib stream that outlives one rectangle, as a server keeps it.
struct Deflater(Compress);

impl Deflater {
    fn new() -> Self {
        Deflater(Compress::new(Compression::default(), true))
    }

    fn chunk(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 1024);
        self.0
            .compress_vec(data, &mut out, FlushCompress::Sync)
            .unwrap();
        let mut framed = (out.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&out);
        framed
    }
}

#[test]
fn raw_in_the_clients_format() {
    let body: Vec<u8> = [RED, GREEN, BLUE, WHITE].into_iter().flat_map(px).collect();
    let d = decoded(2, 2, NOVNC, &update(&[rect(0, 0, 2, 2, 0, &body)]));
    assert_eq!(pixels(&d), [RED, GREEN, BLUE, WHITE]);

    // 5-6-5 big-endian: channel maxima scale to 255.
    let body: Vec<u8> = [0xf800u16, 0x07e0, 0x001f, 0xffff]
        .into_iter()
        .flat_map(u16::to_be_bytes)
        .collect();
    let d = decoded(2, 2, RGB565_BE, &update(&[rect(0, 0, 2, 2, 0, &body)]));
    assert_eq!(pixels(&d), [RED, GREEN, BLUE, WHITE]);
}

#[test]
fn a_colour_map_paints_mapped_pixels() {
    // SetColourMapEntries: first colour 7, two colours (16-bit intensities).
    let mut stream = vec![1, 0, 0, 7, 0, 2];
    stream.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    stream.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff]);
    stream.extend(update(&[rect(0, 0, 2, 1, 0, &[7, 8])]));
    let d = decoded(2, 1, MAPPED, &stream);
    assert_eq!(pixels(&d), [RED, BLUE]);
}

#[test]
fn copy_rect_copies_overlapping_regions_as_they_were() {
    let body: Vec<u8> = [RED, GREEN, BLUE, WHITE].into_iter().flat_map(px).collect();
    let stream = update(&[
        rect(0, 0, 4, 1, 0, &body),
        // Source 0..3 onto 1..4: the copy reads the pixels before any is overwritten.
        rect(1, 0, 3, 1, 1, &[0, 0, 0, 0]),
    ]);
    let d = decoded(4, 1, NOVNC, &stream);
    assert_eq!(pixels(&d), [RED, RED, GREEN, BLUE]);
}

#[test]
fn rre_fills_the_background_then_the_subrectangles() {
    let mut body = 2u32.to_be_bytes().to_vec();
    body.extend(px(WHITE));
    body.extend(px(RED));
    body.extend([0, 0, 0, 0, 0, 1, 0, 1]);
    body.extend(px(BLUE));
    // Reaches past the rectangle: clipped.
    body.extend([0, 2, 0, 1, 0, 9, 0, 9]);
    let d = decoded(3, 2, NOVNC, &update(&[rect(0, 0, 3, 2, 2, &body)]));
    assert_eq!(pixels(&d), [RED, WHITE, WHITE, WHITE, WHITE, BLUE]);
}

#[test]
fn hextile_tiles_with_background_foreground_and_raw_tiles() {
    // A 20x2 rectangle: a 16x2 tile and a 4x2 tile.
    let mut body = vec![2 | 4 | 8];
    body.extend(px(WHITE));
    body.extend(px(BLUE));
    // One foreground subrect at (1, 0), 2x1: x<<4|y, (w-1)<<4|(h-1).
    body.extend([1, 0x10, 0x10]);
    // The second tile: raw.
    body.push(1);
    for i in 0..8 {
        body.extend(px(if i % 2 == 0 { RED } else { GREEN }));
    }
    let d = decoded(20, 2, NOVNC, &update(&[rect(0, 0, 20, 2, 5, &body)]));
    assert_eq!(at(&d, 0, 0), WHITE);
    assert_eq!((at(&d, 1, 0), at(&d, 2, 0)), (BLUE, BLUE));
    assert_eq!((at(&d, 3, 0), at(&d, 1, 1)), (WHITE, WHITE));
    assert_eq!(
        (at(&d, 16, 0), at(&d, 17, 0), at(&d, 19, 1)),
        (RED, GREEN, GREEN)
    );
}

#[test]
fn hextile_keeps_the_background_from_tile_to_tile_and_colours_subrects() {
    // Two 16x1 tiles: the first sets the background, the second only has a coloured subrect.
    let mut body = vec![2];
    body.extend(px(GREEN));
    body.extend([8 | 16, 1]);
    body.extend(px(RED));
    body.extend([3 << 4, 0]);
    let d = decoded(32, 1, NOVNC, &update(&[rect(0, 0, 32, 1, 5, &body)]));
    assert_eq!((at(&d, 0, 0), at(&d, 16, 0)), (GREEN, GREEN));
    assert_eq!(at(&d, 19, 0), RED);
}

#[test]
fn zlib_rectangles_share_one_stream() {
    let mut z = Deflater::new();
    let first: Vec<u8> = [RED, GREEN].into_iter().flat_map(px).collect();
    let second: Vec<u8> = [BLUE, BLUE].into_iter().flat_map(px).collect();
    let stream = update(&[
        rect(0, 0, 2, 1, 6, &z.chunk(&first)),
        rect(0, 1, 2, 1, 6, &z.chunk(&second)),
    ]);
    let d = decoded(2, 2, NOVNC, &stream);
    assert_eq!(pixels(&d), [RED, GREEN, BLUE, BLUE]);
}

#[test]
fn zrle_subencodings() {
    // A 70x3 rectangle: a 64x3 tile and a 6x3 tile.
    let mut tiles = Vec::new();
    // Tile 1: palette RLE with two colours: 100 of white, then the other 92 blue (a run
    // byte is the run's length minus one).
    tiles.push(128 + 2);
    tiles.extend(cpx(WHITE));
    tiles.extend(cpx(BLUE));
    tiles.extend([0x80, 99, 0x81, 91]);
    // Tile 2: packed palette of two colours, 1 bit per pixel, rows padded to a byte.
    tiles.push(2);
    tiles.extend(cpx(RED));
    tiles.extend(cpx(GREEN));
    tiles.extend([0b1010_1000, 0b0000_0000, 0b1111_1100]);
    let mut z = Deflater::new();
    let stream = update(&[rect(0, 0, 70, 3, 16, &z.chunk(&tiles))]);
    let d = decoded(70, 3, NOVNC, &stream);
    assert_eq!(
        (at(&d, 0, 0), at(&d, 63, 0), at(&d, 35, 1)),
        (WHITE, WHITE, WHITE)
    );
    assert_eq!((at(&d, 36, 1), at(&d, 63, 2)), (BLUE, BLUE));
    assert_eq!(
        (at(&d, 64, 0), at(&d, 65, 0), at(&d, 66, 0)),
        (GREEN, RED, GREEN)
    );
    assert_eq!((at(&d, 64, 1), at(&d, 69, 2)), (RED, GREEN));

    // Raw and plain RLE tiles; solid ones are in `every_split_of_the_stream_decodes_the_same`.
    let mut d2 = Decoder::new(66, 1, NOVNC).unwrap();
    let mut z = Deflater::new();
    let mut raw = vec![0];
    raw.extend((0..64).flat_map(|i| cpx(if i == 0 { RED } else { GREEN })));
    raw.push(128);
    raw.extend(cpx(BLUE));
    raw.push(0);
    raw.extend(cpx(WHITE));
    raw.push(0);
    d2.feed(&update(&[rect(0, 0, 66, 1, 16, &z.chunk(&raw))]))
        .unwrap();
    assert_eq!((at(&d2, 0, 0), at(&d2, 63, 0)), (RED, GREEN));
    assert_eq!((at(&d2, 64, 0), at(&d2, 65, 0)), (BLUE, WHITE));
}

#[test]
fn every_split_of_the_stream_decodes_the_same() {
    let mut z = Deflater::new();
    let raw: Vec<u8> = [RED, GREEN, BLUE, WHITE].into_iter().flat_map(px).collect();
    let mut hextile = vec![2];
    hextile.extend(px(BLUE));
    let mut zrle = vec![1];
    zrle.extend(cpx(RED));
    let mut stream = update(&[
        rect(0, 0, 2, 2, 0, &raw),
        rect(2, 0, 2, 2, 5, &hextile),
        rect(0, 2, 4, 1, 16, &z.chunk(&zrle)),
    ]);
    stream.extend([2, 150]); // Bell, EndOfContinuousUpdates.
    stream.extend([3, 0, 0, 0, 0, 0, 0, 2, b'h', b'i']); // ServerCutText.
    stream.extend([248, 0, 0, 0, 0, 0, 0, 0, 1, 9]); // Fence with one payload byte.
    stream.extend(update(&[rect(1, 0, 1, 1, 1, &[0, 0, 0, 0])]));
    let whole = pixels(&decoded(4, 3, NOVNC, &stream));
    assert_eq!(&whole[..4], &[RED, RED, BLUE, BLUE]);
    assert_eq!(&whole[8..], &[RED; 4]);
    for cut in 1..stream.len() {
        let mut d = Decoder::new(4, 3, NOVNC).unwrap();
        d.feed(&stream[..cut]).unwrap();
        d.feed(&stream[cut..]).unwrap();
        assert_eq!(pixels(&d), whole, "cut at {cut}");
    }
}

#[test]
fn desktop_size_changes_resize_the_framebuffer() {
    let stream = update(&[rect(0, 0, 5, 4, -223, &[])]);
    let d = decoded(2, 2, NOVNC, &stream);
    assert_eq!((d.framebuffer().width, d.framebuffer().height), (5, 4));
    // ExtendedDesktopSize with a non-zero status answers a refused request: no change.
    let mut body = vec![1, 0, 0, 0];
    body.extend([0u8; 16]);
    let stream = update(&[rect(0, 3, 9, 9, -308, &body)]);
    let d = decoded(2, 2, NOVNC, &stream);
    assert_eq!((d.framebuffer().width, d.framebuffer().height), (2, 2));
    let stream = update(&[rect(0, 0, 9, 7, -308, &body)]);
    let d = decoded(2, 2, NOVNC, &stream);
    assert_eq!((d.framebuffer().width, d.framebuffer().height), (9, 7));
}

#[test]
fn a_pixel_format_change_applies_from_its_offset() {
    let first = update(&[rect(0, 0, 1, 1, 0, &px(RED))]);
    let second = update(&[rect(0, 0, 1, 1, 0, &0x001fu16.to_be_bytes())]);
    let mut d = Decoder::new(1, 1, NOVNC).unwrap();
    d.pixel_format_at(first.len() as u64, RGB565_BE);
    d.feed(&first).unwrap();
    assert_eq!(at(&d, 0, 0), RED);
    d.feed(&second).unwrap();
    assert_eq!(at(&d, 0, 0), BLUE);
}

#[test]
fn what_cannot_be_decoded_is_named() {
    let mut d = Decoder::new(1, 1, NOVNC).unwrap();
    assert_eq!(
        d.feed(&update(&[rect(0, 0, 1, 1, 7, &[])])),
        Err(DecodeError::UnknownEncoding(7))
    );
    let mut d = Decoder::new(1, 1, NOVNC).unwrap();
    assert_eq!(d.feed(&[99]), Err(DecodeError::UnknownMessage(99)));
    assert!(matches!(
        Decoder::new(1, 1, PixelFormat([24; 16])),
        Err(DecodeError::PixelFormat(24))
    ));
    assert!(matches!(
        Decoder::new(u16::MAX, u16::MAX, NOVNC),
        Err(DecodeError::TooLarge(..))
    ));
    // A zlib stream that inflates to more than its rectangle holds.
    let mut z = Deflater::new();
    let mut d = Decoder::new(1, 1, NOVNC).unwrap();
    let bomb = z.chunk(&[0u8; 100_000]);
    assert!(matches!(
        d.feed(&update(&[rect(0, 0, 1, 1, 6, &bomb)])),
        Err(DecodeError::Inflate(_))
    ));
}
