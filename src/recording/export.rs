//! `vncgate recording export FILE --at SECONDS --png OUT`: the framebuffer at one moment of a
//! recording, as a PNG for a ticket or a script.
//!
//! The recording is replayed from its start through [`Decoder`] up to the last block at or
//! before the moment (the `.fbs` has no key frames: each update paints over the previous ones).
//! Pixel format changes the client made after its first are read from the audit beside the
//! file (`pixel_format` lines, by stream offset); the first is already in the ServerInit.

use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use super::audit_format::PixelFormatLine;
use super::decode::{DecodeError, Decoder, Framebuffer};
use super::fbs::{self, Blocks, FbsError};
use crate::rfb::PixelFormat;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: FbsError },
    #[error("{path}: the file ends before the handshake is complete")]
    ShortHandshake { path: PathBuf },
    #[error("{path}: at {ms} ms: {source}")]
    Decode {
        path: PathBuf,
        ms: u32,
        source: DecodeError,
    },
    #[error("{path}: cannot write the PNG: {source}")]
    Png {
        path: PathBuf,
        source: png::EncodingError,
    },
}

/// What was exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The timestamp of the last block replayed: the moment the picture shows.
    pub shown_ms: u32,
    /// The recording ended before the moment asked for: the picture is its last frame.
    pub past_end: bool,
    pub width: u16,
    pub height: u16,
}

/// The framebuffer after every block up to `at_ms` (milliseconds since the start).
pub fn framebuffer_at(path: &Path, at_ms: u64) -> Result<(Framebuffer, Exported), ExportError> {
    let invalid = |source| ExportError::Invalid {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|source| ExportError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut blocks = Blocks::open(file).map_err(invalid)?;
    let mut buf = Vec::new();
    let mut prefix = Vec::new();
    let mut decoder: Option<Decoder> = None;
    let (mut shown_ms, mut past_end) = (0u32, true);
    while let Some((_, ms)) = blocks.next_into(&mut buf, usize::MAX).map_err(invalid)? {
        if u64::from(ms) > at_ms {
            past_end = false;
            break;
        }
        shown_ms = ms;
        let decode_err = |source| ExportError::Decode {
            path: path.to_path_buf(),
            ms,
            source,
        };
        match decoder.as_mut() {
            Some(d) => d.feed(&buf).map_err(decode_err)?,
            None => {
                prefix.extend_from_slice(&buf);
                if let Some((init, len)) = fbs::handshake(&prefix).map_err(invalid)? {
                    let mut d = Decoder::new(init.width, init.height, init.pixel_format)
                        .map_err(decode_err)?;
                    for (offset, pf) in audit_pixel_formats(&path.with_extension("jsonl")) {
                        d.pixel_format_at(offset, pf);
                    }
                    d.feed(&prefix[len..]).map_err(decode_err)?;
                    decoder = Some(d);
                }
            }
        }
    }
    let Some(decoder) = decoder else {
        return Err(ExportError::ShortHandshake {
            path: path.to_path_buf(),
        });
    };
    let fb = decoder.framebuffer().clone();
    let exported = Exported {
        shown_ms,
        past_end,
        width: fb.width,
        height: fb.height,
    };
    Ok((fb, exported))
}

/// Write the framebuffer at `at_ms` to `out` as an RGBA PNG.
pub fn export_png(path: &Path, at_ms: u64, out: &Path) -> Result<Exported, ExportError> {
    let (fb, exported) = framebuffer_at(path, at_ms)?;
    let png_err = |source| ExportError::Png {
        path: out.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(out).map_err(|e| png_err(png::EncodingError::IoError(e)))?;
    let mut encoder = png::Encoder::new(
        BufWriter::new(file),
        u32::from(fb.width),
        u32::from(fb.height),
    );
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(&fb.rgba).map_err(png_err)?;
    writer.finish().map_err(png_err)?;
    Ok(exported)
}

/// The client's pixel format changes from the audit beside a recording, by stream offset.
/// A missing or unreadable audit gives none: the ServerInit's format then holds throughout.
fn audit_pixel_formats(path: &Path) -> Vec<(u64, PixelFormat)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| l.contains("\"pixel_format\""))
        .filter_map(|l| serde_json::from_str::<PixelFormatLine>(l).ok())
        .filter(|l| l.event == "pixel_format")
        .map(|l| (l.offset, l.format.into()))
        .collect()
}
