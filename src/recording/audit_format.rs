//! A pixel format as the audit writes it (`{"event": "pixel_format", ...}`) and the exporter
//! reads it back: the PIXEL_FORMAT fields by name, so a person reading the `.jsonl` can too.

use serde::{Deserialize, Serialize};

use crate::rfb::PixelFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PixelFormatFields {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl From<PixelFormat> for PixelFormatFields {
    fn from(pf: PixelFormat) -> Self {
        let b = pf.0;
        PixelFormatFields {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16::from_be_bytes([b[4], b[5]]),
            green_max: u16::from_be_bytes([b[6], b[7]]),
            blue_max: u16::from_be_bytes([b[8], b[9]]),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        }
    }
}

impl From<PixelFormatFields> for PixelFormat {
    fn from(f: PixelFormatFields) -> Self {
        let (r, g, b) = (
            f.red_max.to_be_bytes(),
            f.green_max.to_be_bytes(),
            f.blue_max.to_be_bytes(),
        );
        PixelFormat([
            f.bits_per_pixel,
            f.depth,
            u8::from(f.big_endian),
            u8::from(f.true_colour),
            r[0],
            r[1],
            g[0],
            g[1],
            b[0],
            b[1],
            f.red_shift,
            f.green_shift,
            f.blue_shift,
            0,
            0,
            0,
        ])
    }
}

/// One `pixel_format` audit line: from stream `offset` (server bytes after the handshake) on,
/// updates are in this format.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PixelFormatLine {
    pub event: String,
    pub t: u32,
    pub offset: u64,
    #[serde(flatten)]
    pub format: PixelFormatFields,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_through_json() {
        let pf = PixelFormat([16, 16, 1, 1, 0, 31, 0, 63, 0, 31, 11, 5, 0, 0, 0, 0]);
        let line = PixelFormatLine {
            event: "pixel_format".into(),
            t: 5,
            offset: 9,
            format: pf.into(),
        };
        let text = serde_json::to_string(&line).unwrap();
        let back: PixelFormatLine = serde_json::from_str(&text).unwrap();
        assert_eq!(PixelFormat::from(back.format), pf);
        assert_eq!(back.offset, 9);
    }
}
