//! The client socket as tungstenite reads it: frames cut to one read chunk, unfinished messages
//! charged to the [`MessageBudget`], broken frames refused at their header.
//!
//! What tungstenite 0.30 does with a client's bytes (`protocol/frame/mod.rs`,
//! `protocol/mod.rs`, `protocol/message.rs`):
//! - On a frame header it reserves the frame's declared length in its read buffer
//!   (`in_buffer.reserve(len)`, up to `max_frame_size`) and reads until the whole payload is
//!   there; only then does it check the mask, the reserved bits, the opcode and a control
//!   frame's size. A 4 MiB frame is buffered whole before it can be refused.
//! - The payload is split off that buffer without a copy, and the buffer keeps the rest of the
//!   allocation. Once the message is dropped the buffer is the allocation's only owner, and
//!   `BytesMut::reserve` takes the whole of it back: a session keeps, for the rest of its life,
//!   a read buffer the size of the largest frame it ever received, with every page touched.
//! - Fragments (FIN=0) are appended to a `Vec` until the final one, up to `max_message_size`.
//! - `read_buffer_size` is both the initial buffer and the most it asks of the socket per read.
//!
//! So a session's read side is bounded only by `max_message_bytes`, whatever the client
//! actually finishes, and none of it shows in `vncgate_relay_buffered_bytes`. This adapter sits
//! between the socket and tungstenite and parses each frame header as it passes:
//! - a frame longer than [`PIECE`] is handed to tungstenite as a chain of fragments of at most
//!   [`PIECE`] bytes (the mask key rotated to each fragment's offset, so the payload bytes pass
//!   unchanged), so tungstenite never reserves more than one piece and never keeps a large
//!   buffer. Large messages are assembled in tungstenite's fragment `Vec`, which is freed with
//!   the message; the price is one copy of clipboard-sized data;
//! - the payload bytes of a data message past [`FREE_BYTES`] are taken from the budget before
//!   tungstenite sees them; no budget: the session ends with 1009 ([`super::budget`] says why
//!   closing, not pausing);
//! - what tungstenite would refuse only after buffering the frame (reserved bits or opcodes, an
//!   unmasked frame, a large or fragmented control frame, a continuation out of place, a
//!   message above `max_message_bytes`) is refused at the header, before any payload is read.
//!
//! Messages of at most [`PIECE`] bytes (all RFB input but long clipboard text) pass as they
//! came, and never touch the budget. Writes (pongs, the close frame) pass straight through.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::Error as WsError;

use super::CloseCode;
use super::budget::MessageBudget;

/// The largest frame tungstenite is given, and its `read_buffer_size` and `max_frame_size`.
/// 4 KiB: an idle session's read buffer stays at this size (tungstenite's 128 KiB default
/// would be touched by the first read and cost 128 KiB per session), every RFB input message
/// fits in one piece, and a 4 MiB paste becomes 1024 fragments, which tungstenite appends at
/// memory speed.
pub const PIECE: usize = 4 * 1024;

/// Bytes of an unfinished message a session holds without budget: one read chunk. Past it, the
/// whole message is charged.
pub const FREE_BYTES: usize = PIECE;

/// The most read from the socket at once (on the stack, so an idle session holds no buffer of
/// its own).
const RAW_READ: usize = 4 * 1024;

/// Why the adapter refused the client's stream. Travels to the bridge inside tungstenite's
/// `Error::Io`; [`InboundError::from_ws`] finds it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    #[error("client frame with reserved bits set")]
    ReservedBits,
    #[error("client frame with reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("unmasked client frame")]
    Unmasked,
    #[error("fragmented control frame or one above 125 bytes")]
    BadControlFrame,
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    #[error("new data frame inside a fragmented message")]
    ExpectedContinuation,
    #[error("message of at least {size} bytes, above limits.max_message_bytes ({max})")]
    TooBig { size: u64, max: usize },
    #[error("message buffer budget exhausted")]
    BudgetExhausted,
}

impl InboundError {
    pub fn close_code(self) -> CloseCode {
        match self {
            InboundError::TooBig { .. } | InboundError::BudgetExhausted => CloseCode::TooBig,
            _ => CloseCode::ProtocolError,
        }
    }

    /// The refusal under a tungstenite read error, if the error is one.
    pub fn from_ws(e: &WsError) -> Option<InboundError> {
        match e {
            WsError::Io(io) => io.get_ref()?.downcast_ref::<InboundError>().copied(),
            _ => None,
        }
    }
}

const OP_CONTINUE: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The largest client frame header: 2 bytes, a 64-bit length, the mask key.
const MAX_HEADER: usize = 14;

enum Parse {
    /// Collecting a frame header.
    Header { buf: [u8; MAX_HEADER], have: usize },
    /// Passing a frame's payload on, piece by piece.
    Payload(Frame),
}

struct Frame {
    opcode: u8,
    fin: bool,
    mask: [u8; 4],
    len: u64,
    /// Payload bytes passed on.
    done: u64,
    /// Where the current piece ends.
    piece_end: u64,
}

impl Frame {
    fn is_data(&self) -> bool {
        self.opcode & 0x8 == 0
    }
}

/// The client's socket under tungstenite.
pub struct Inbound<S> {
    inner: S,
    budget: Arc<MessageBudget>,
    max_message: usize,
    parse: Parse,
    /// Bytes read (or sent along with the upgrade request) and not yet parsed: at most one
    /// read whose output did not fit tungstenite's buffer.
    carry: Vec<u8>,
    carry_pos: usize,
    /// A piece header made here and not yet handed over.
    header: [u8; MAX_HEADER],
    header_pos: usize,
    header_len: usize,
    /// A fragmented data message is under way (its first frame had FIN=0).
    in_message: bool,
    /// Payload bytes of the data message under way, handed to tungstenite.
    message_len: usize,
    /// Budget taken for the message under way.
    charged: usize,
    /// Budget of messages completed since the last read: held until tungstenite asks for more,
    /// which the bridge makes it do only after the message was written to the backend.
    delivered: usize,
    failed: Option<InboundError>,
}

impl<S> Inbound<S> {
    /// `early`: bytes the client sent with its upgrade request; they are parsed first.
    pub fn new(
        inner: S,
        early: Vec<u8>,
        budget: Arc<MessageBudget>,
        max_message: usize,
    ) -> Inbound<S> {
        Inbound {
            inner,
            budget,
            max_message,
            parse: Parse::Header {
                buf: [0; MAX_HEADER],
                have: 0,
            },
            carry: early,
            carry_pos: 0,
            header: [0; MAX_HEADER],
            header_pos: 0,
            header_len: 0,
            in_message: false,
            message_len: 0,
            charged: 0,
            delivered: 0,
            failed: None,
        }
    }

    /// Parse `input`, putting what tungstenite should see into `out`, until either runs out.
    /// Returns how many input bytes were used.
    fn process(&mut self, input: &[u8], out: &mut ReadBuf<'_>) -> Result<usize, InboundError> {
        let mut used = 0;
        loop {
            if self.header_pos < self.header_len {
                let n = (self.header_len - self.header_pos).min(out.remaining());
                out.put_slice(&self.header[self.header_pos..self.header_pos + n]);
                self.header_pos += n;
                if self.header_pos < self.header_len {
                    return Ok(used);
                }
            }
            match &mut self.parse {
                Parse::Header { buf, have } => {
                    if used == input.len() {
                        return Ok(used);
                    }
                    let need = if *have < 2 { 2 } else { header_len(buf[1]) };
                    let n = (need - *have).min(input.len() - used);
                    buf[*have..*have + n].copy_from_slice(&input[used..used + n]);
                    *have += n;
                    used += n;
                    if *have == 2 {
                        check_start(buf[0], buf[1], self.in_message)?;
                    }
                    if *have >= 2 && *have == header_len(buf[1]) {
                        let frame = parse_header(buf, *have);
                        self.begin_frame(frame)?;
                    }
                }
                Parse::Payload(frame) => {
                    if used == input.len() || out.remaining() == 0 {
                        return Ok(used);
                    }
                    let left = usize::try_from(frame.piece_end - frame.done).unwrap_or(PIECE);
                    let n = left.min(input.len() - used).min(out.remaining());
                    if frame.is_data() {
                        self.message_len += n;
                        // Taken before tungstenite sees the bytes: without budget, they are
                        // never held.
                        if self.message_len > FREE_BYTES {
                            let more = self.message_len - self.charged;
                            if !self.budget.try_take(more) {
                                return Err(InboundError::BudgetExhausted);
                            }
                            self.charged += more;
                        }
                    }
                    out.put_slice(&input[used..used + n]);
                    used += n;
                    frame.done += n as u64;
                    let (piece_done, frame_done) =
                        (frame.done == frame.piece_end, frame.done == frame.len);
                    match (piece_done, frame_done) {
                        (true, true) => self.end_frame(),
                        (true, false) => self.begin_piece(),
                        _ => {}
                    }
                }
            }
        }
    }

    /// A whole header arrived: check the message size and start the first piece.
    fn begin_frame(&mut self, frame: Frame) -> Result<(), InboundError> {
        if frame.is_data() {
            let size = (self.message_len as u64).saturating_add(frame.len);
            if size > self.max_message as u64 {
                return Err(InboundError::TooBig {
                    size,
                    max: self.max_message,
                });
            }
        }
        self.parse = Parse::Payload(frame);
        self.begin_piece();
        Ok(())
    }

    /// Make the header of the next piece of the current frame.
    fn begin_piece(&mut self) {
        let Parse::Payload(frame) = &mut self.parse else {
            return;
        };
        let piece = (frame.len - frame.done).min(PIECE as u64);
        let last = frame.done + piece == frame.len;
        let opcode = if frame.done == 0 {
            frame.opcode
        } else {
            OP_CONTINUE
        };
        // The client masked byte i of the frame with key[i % 4]; the piece starting at `done`
        // gets the key rotated so that its byte j is masked with the same key byte.
        let shift = (frame.done % 4) as usize;
        let mask: [u8; 4] = std::array::from_fn(|j| frame.mask[(shift + j) % 4]);
        self.header_len = encode_header(
            &mut self.header,
            last && frame.fin,
            opcode,
            piece as usize,
            mask,
        );
        self.header_pos = 0;
        frame.piece_end = frame.done + piece;
        if piece == 0 {
            self.end_frame();
        }
    }

    /// The last byte of a frame was handed over.
    fn end_frame(&mut self) {
        let Parse::Payload(frame) = &self.parse else {
            return;
        };
        if frame.is_data() {
            if frame.fin {
                self.in_message = false;
                self.message_len = 0;
                self.delivered += std::mem::take(&mut self.charged);
            } else {
                self.in_message = true;
            }
        }
        self.parse = Parse::Header {
            buf: [0; MAX_HEADER],
            have: 0,
        };
    }

    fn fail(&mut self, e: InboundError) -> io::Error {
        self.failed = Some(e);
        io::Error::other(e)
    }
}

impl<S> Drop for Inbound<S> {
    fn drop(&mut self) {
        self.budget.give_back(self.charged + self.delivered);
    }
}

/// The header length announced by a header's second byte (masked frames only; an unmasked
/// one was refused by then).
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + 4
}

/// Checks that need only the first two bytes of a header.
fn check_start(b0: u8, b1: u8, in_message: bool) -> Result<(), InboundError> {
    let (fin, opcode, len7) = (b0 & 0x80 != 0, b0 & 0x0F, b1 & 0x7F);
    if b0 & 0x70 != 0 {
        return Err(InboundError::ReservedBits);
    }
    match opcode {
        OP_CONTINUE if !in_message => return Err(InboundError::UnexpectedContinuation),
        OP_TEXT | OP_BINARY if in_message => return Err(InboundError::ExpectedContinuation),
        OP_CONTINUE | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG if !fin || len7 > 125 => {
            return Err(InboundError::BadControlFrame);
        }
        OP_CLOSE | OP_PING | OP_PONG => {}
        other => return Err(InboundError::ReservedOpcode(other)),
    }
    if b1 & 0x80 == 0 {
        return Err(InboundError::Unmasked);
    }
    Ok(())
}

fn parse_header(buf: &[u8; MAX_HEADER], len: usize) -> Frame {
    let payload = match buf[1] & 0x7F {
        126 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        127 => u64::from_be_bytes([
            buf[2], buf[3], buf[4], buf[5], buf[6], buf[7], buf[8], buf[9],
        ]),
        n => u64::from(n),
    };
    Frame {
        opcode: buf[0] & 0x0F,
        fin: buf[0] & 0x80 != 0,
        mask: [buf[len - 4], buf[len - 3], buf[len - 2], buf[len - 1]],
        len: payload,
        done: 0,
        piece_end: 0,
    }
}

/// A masked client frame header in its shortest form.
fn encode_header(
    out: &mut [u8; MAX_HEADER],
    fin: bool,
    opcode: u8,
    len: usize,
    mask: [u8; 4],
) -> usize {
    out[0] = if fin { 0x80 } else { 0 } | opcode;
    let n = if len < 126 {
        out[1] = 0x80 | len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        out[1] = 0x80 | 126;
        out[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        out[1] = 0x80 | 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    out[n..n + 4].copy_from_slice(&mask);
    n + 4
}

impl<S: AsyncRead + Unpin> AsyncRead for Inbound<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.failed {
            return Poll::Ready(Err(io::Error::other(e)));
        }
        // tungstenite reads again: the messages completed before were taken (and, in the
        // bridge, written to the backend); their budget goes back.
        this.budget.give_back(std::mem::take(&mut this.delivered));
        let start = out.filled().len();
        loop {
            let carry = std::mem::take(&mut this.carry);
            let result = this.process(&carry[this.carry_pos..], out);
            match result {
                Ok(used) if this.carry_pos + used < carry.len() => {
                    this.carry_pos += used;
                    this.carry = carry;
                }
                // Drained: an idle session keeps no buffer here.
                Ok(_) => this.carry_pos = 0,
                Err(e) => return Poll::Ready(Err(this.fail(e))),
            }
            if out.filled().len() > start || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; RAW_READ];
            let mut read = ReadBuf::new(&mut raw[..out.remaining().min(RAW_READ)]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                // End of stream; a frame cut short here is tungstenite's to report.
                return Poll::Ready(Ok(()));
            }
            match this.process(&raw[..n], out) {
                Ok(used) if used < n => {
                    this.carry = raw[used..n].to_vec();
                    this.carry_pos = 0;
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(this.fail(e))),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inbound<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use proptest::prelude::*;
    use tokio::io::{AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

    const MAX: usize = 4 * 1024 * 1024;

    /// A client frame as the wire carries it (masked), with any header bits the test wants.
    fn raw_frame(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![b0];
        let flag = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(flag | n as u8),
            n if n <= 0xFFFF => {
                out.push(flag | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(flag | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    fn masked(fin: bool, opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        raw_frame(if fin { 0x80 } else { 0 } | opcode, payload, Some(key))
    }

    async fn server(
        early: Vec<u8>,
        budget: &Arc<MessageBudget>,
    ) -> (DuplexStream, WebSocketStream<Inbound<DuplexStream>>) {
        let (client, server) = tokio::io::duplex(16 << 20);
        let config = WebSocketConfig::default()
            .read_buffer_size(PIECE)
            // As in the gateway: a frame above one piece would be an error of this adapter.
            .max_frame_size(Some(PIECE))
            .max_message_size(Some(MAX));
        let inbound = Inbound::new(server, early, Arc::clone(budget), MAX);
        let ws = WebSocketStream::from_raw_socket(inbound, Role::Server, Some(config)).await;
        (client, ws)
    }

    fn budget(limit: usize) -> Arc<MessageBudget> {
        Arc::new(super::super::budget::for_tests(limit))
    }

    /// Deterministic bytes and choices from a seed (xorshift).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
        fn key(&mut self) -> [u8; 4] {
            (self.next() as u32).to_be_bytes()
        }
    }

    /// The wire bytes of `messages` (lengths), each cut into up to `max_fragments` frames with
    /// pings between some of them, and what tungstenite must deliver for them.
    fn scenario(
        messages: &[usize],
        max_fragments: usize,
        rng: &mut Rng,
    ) -> (Vec<u8>, Vec<Message>) {
        let (mut wire, mut expected) = (Vec::new(), Vec::new());
        for (i, &len) in messages.iter().enumerate() {
            let payload = rng.bytes(len);
            let mut cuts: Vec<usize> = (0..rng.below(max_fragments))
                .map(|_| rng.below(len + 1))
                .collect();
            cuts.push(0);
            cuts.push(len);
            cuts.sort_unstable();
            cuts.dedup();
            if cuts.len() == 1 {
                cuts.push(len); // an empty message: one empty frame
            }
            for (k, w) in cuts.windows(2).enumerate() {
                let last = k + 2 == cuts.len();
                let opcode = if k == 0 { OP_BINARY } else { OP_CONTINUE };
                wire.extend(masked(last, opcode, &payload[w[0]..w[1]], rng.key()));
                if !last && rng.below(3) == 0 {
                    let ping = format!("p{i}.{k}").into_bytes();
                    wire.extend(masked(true, OP_PING, &ping, rng.key()));
                    expected.push(Message::Ping(ping.into()));
                }
            }
            expected.push(Message::Binary(payload.into()));
        }
        (wire, expected)
    }

    async fn deliver(wire: &[u8], early: usize, chunk_seed: u64, expected: &[Message]) {
        let budget = budget(MAX);
        let early = early.min(wire.len());
        let (mut client, mut ws) = server(wire[..early].to_vec(), &budget).await;
        let mut rng = Rng(chunk_seed | 1);
        let mut at = early;
        while at < wire.len() {
            let n = (1 + rng.below(9000)).min(wire.len() - at);
            client.write_all(&wire[at..at + n]).await.expect("write");
            at += n;
        }
        for want in expected {
            let got = ws.next().await.expect("open").expect("valid");
            assert_eq!(&got, want);
        }
        drop(client);
        // The last message's budget is given back by the next read (here: the end of stream).
        assert!(ws.next().await.is_none_or(|r| r.is_err()));
        assert_eq!(budget.held(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the frame sizes, fragments, pings in between, and however the bytes are
        /// split into reads (some sent with the upgrade request), tungstenite delivers the
        /// client's messages unchanged, and no frame it sees is above one piece.
        #[test]
        fn messages_arrive_unchanged_however_framed_and_read(
            lens in prop::collection::vec(
                prop_oneof![0usize..200, 3000usize..9000, 60_000usize..70_000], 1..6),
            max_fragments in 1usize..5,
            seed in any::<u64>(),
            early in 0usize..64,
        ) {
            let mut rng = Rng(seed | 1);
            let (wire, expected) = scenario(&lens, max_fragments, &mut rng);
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            rt.block_on(deliver(&wire, early, seed.rotate_left(17), &expected));
        }
    }

    #[tokio::test]
    async fn a_message_of_the_maximum_size_in_one_frame_arrives() {
        let mut rng = Rng(7);
        let (wire, expected) = scenario(&[MAX], 1, &mut rng);
        deliver(&wire, 0, 3, &expected).await;
    }

    /// Small messages never touch the budget; a larger one is charged as it arrives and given
    /// back once it was taken and tungstenite reads again.
    #[tokio::test]
    async fn unfinished_messages_are_charged_and_given_back() {
        let budget = budget(1 << 20);
        let (mut client, mut ws) = server(Vec::new(), &budget).await;
        client
            .write_all(&masked(true, OP_BINARY, &[1; FREE_BYTES], [1, 2, 3, 4]))
            .await
            .expect("write");
        assert_eq!(
            ws.next().await.expect("open").expect("ok").len(),
            FREE_BYTES
        );
        assert_eq!(budget.held(), 0, "a message of one read chunk is free");

        // 100 000 bytes declared, 10 000 sent: what arrived is charged, not what was declared.
        let big = masked(true, OP_BINARY, &[2; 100_000], [5, 6, 7, 8]);
        let header = 2 + 8 + 4;
        client
            .write_all(&big[..header + 10_000])
            .await
            .expect("write");
        let next = tokio::spawn(async move {
            let got = ws.next().await;
            (ws, got)
        });
        while budget.held() < 10_000 {
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.held(), 10_000);
        client
            .write_all(&big[header + 10_000..])
            .await
            .expect("write");
        let (mut ws, got) = next.await.expect("task");
        assert_eq!(got.expect("open").expect("ok").len(), 100_000);
        assert_eq!(budget.held(), 100_000, "held until tungstenite reads again");
        client
            .write_all(&masked(true, OP_BINARY, b"x", [0; 4]))
            .await
            .expect("write");
        assert_eq!(ws.next().await.expect("open").expect("ok").len(), 1);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_session_that_cannot_get_budget_is_refused_and_gives_back_what_it_held() {
        let budget = budget(64 * 1024);
        let (mut client, mut ws) = server(Vec::new(), &budget).await;
        // Fragments that never finish: the message outgrows the budget.
        for i in 0..40 {
            let opcode = if i == 0 { OP_BINARY } else { OP_CONTINUE };
            let frame = masked(false, opcode, &[3; 2000], [9; 4]);
            client.write_all(&frame).await.expect("write");
        }
        let err = ws.next().await.expect("open").expect_err("refused");
        assert_eq!(
            InboundError::from_ws(&err),
            Some(InboundError::BudgetExhausted)
        );
        assert_eq!(
            super::super::classify_read_error(&err).code(),
            CloseCode::TooBig
        );
        assert_eq!(budget.exhausted(), 1);
        assert!(budget.held() > 60_000, "held {}", budget.held());
        drop(ws);
        assert_eq!(budget.held(), 0);
    }

    /// What tungstenite would refuse only after buffering the whole frame is refused at the
    /// header: the test sends the header and nothing of the 4 MiB payload it declares.
    #[tokio::test]
    async fn broken_frames_are_refused_at_their_header() {
        let key = Some([1, 2, 3, 4]);
        let declared = |b0: u8, masked: bool, len: usize| {
            let mut h = vec![b0, if masked { 0x80 } else { 0 } | 127];
            h.extend_from_slice(&(len as u64).to_be_bytes());
            if masked {
                h.extend_from_slice(&[1, 2, 3, 4]);
            }
            h
        };
        let cases: Vec<(Vec<u8>, InboundError)> = vec![
            (declared(0x82, false, MAX), InboundError::Unmasked),
            (declared(0xC2, true, MAX), InboundError::ReservedBits),
            (declared(0x92, true, MAX), InboundError::ReservedBits),
            (declared(0x83, true, MAX), InboundError::ReservedOpcode(3)),
            (declared(0x8B, true, MAX), InboundError::ReservedOpcode(0xB)),
            (declared(0x89, true, MAX), InboundError::BadControlFrame),
            (raw_frame(0x09, b"ping", key), InboundError::BadControlFrame),
            (
                declared(0x80, true, MAX),
                InboundError::UnexpectedContinuation,
            ),
            (
                [
                    masked(false, OP_BINARY, b"a", [0; 4]),
                    declared(0x82, true, 10),
                ]
                .concat(),
                InboundError::ExpectedContinuation,
            ),
            (
                declared(0x82, true, MAX + 1),
                InboundError::TooBig {
                    size: MAX as u64 + 1,
                    max: MAX,
                },
            ),
            (
                [
                    masked(false, OP_BINARY, &[0; 100], [0; 4]),
                    declared(0x80, true, MAX - 99),
                ]
                .concat(),
                InboundError::TooBig {
                    size: MAX as u64 + 1,
                    max: MAX,
                },
            ),
        ];
        for (bytes, want) in cases {
            let budget = budget(MAX);
            let (mut client, mut ws) = server(Vec::new(), &budget).await;
            client.write_all(&bytes).await.expect("write");
            let err = ws.next().await.expect("open").expect_err("refused");
            assert_eq!(InboundError::from_ws(&err), Some(want), "{bytes:02x?}");
            let code = super::super::classify_read_error(&err).code();
            assert_eq!(code, want.close_code());
            // Refused for good: the stream ends.
            assert!(ws.next().await.is_none());
        }
    }

    #[test]
    fn piece_headers_rotate_the_mask_key_to_their_offset() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let frame = masked(true, OP_BINARY, &payload, [0xA1, 0xB2, 0xC3, 0xD4]);
        let mut inbound = Inbound::new(tokio::io::empty(), Vec::new(), budget(MAX), MAX);
        let mut out = vec![0u8; 20_000];
        let mut buf = ReadBuf::new(&mut out);
        let used = inbound.process(&frame, &mut buf).expect("valid");
        assert_eq!(used, frame.len());
        // Unmask each piece with its own key: the payload comes back whole.
        let (mut wire, mut got, mut pieces) = (buf.filled(), Vec::new(), Vec::new());
        while !wire.is_empty() {
            let (b0, b1) = (wire[0], wire[1]);
            let (len, at) = match b1 & 0x7F {
                126 => (usize::from(u16::from_be_bytes([wire[2], wire[3]])), 4),
                n => (usize::from(n), 2),
            };
            let key = [wire[at], wire[at + 1], wire[at + 2], wire[at + 3]];
            let body = &wire[at + 4..at + 4 + len];
            got.extend(body.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            pieces.push((b0, len));
            wire = &wire[at + 4 + len..];
        }
        assert_eq!(got, payload);
        assert_eq!(
            pieces,
            vec![(0x02, PIECE), (0x00, PIECE), (0x80, 10_000 - 2 * PIECE)]
        );
    }
}
