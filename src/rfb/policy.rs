//! The input and clipboard policy of one connection, as plain values: what the client->server
//! filter ([`super::client_msg`]) and the server->client filter ([`super::server_msg`]) enforce.
//! A pure description; the filters apply it message by message.

use super::server_msg::{self, encoding};

/// A clipboard policy (contract §11): which directions cut text may travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clipboard {
    Both,
    /// Server -> client only (ServerCutText).
    ToClient,
    /// Client -> server only (ClientCutText).
    ToServer,
    None,
}

impl Clipboard {
    pub fn parse(s: &str) -> Option<Clipboard> {
        match s {
            "both" => Some(Clipboard::Both),
            "to_client" => Some(Clipboard::ToClient),
            "to_server" => Some(Clipboard::ToServer),
            "none" => Some(Clipboard::None),
            _ => Option::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Clipboard::Both => "both",
            Clipboard::ToClient => "to_client",
            Clipboard::ToServer => "to_server",
            Clipboard::None => "none",
        }
    }

    /// The intersection of two policies: a token's claim narrows the pool's ceiling, never
    /// widens it.
    pub fn narrow(self, other: Clipboard) -> Clipboard {
        Clipboard::from_directions(
            self.to_server() && other.to_server(),
            self.to_client() && other.to_client(),
        )
    }

    pub fn to_server(self) -> bool {
        matches!(self, Clipboard::Both | Clipboard::ToServer)
    }

    pub fn to_client(self) -> bool {
        matches!(self, Clipboard::Both | Clipboard::ToClient)
    }

    fn from_directions(to_server: bool, to_client: bool) -> Clipboard {
        match (to_server, to_client) {
            (true, true) => Clipboard::Both,
            (true, false) => Clipboard::ToServer,
            (false, true) => Clipboard::ToClient,
            (false, false) => Clipboard::None,
        }
    }
}

/// What one connection may do; `view_only` can change while the session runs (the admin
/// switch), so the filters take the policy on every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub view_only: bool,
    pub clipboard: Clipboard,
}

impl Policy {
    /// Whether the server stream must be delimited (to find and drop ServerCutText).
    pub fn delimits_server_stream(&self) -> bool {
        !self.clipboard.to_client()
    }
}

/// The kinds of `vncgate_input_dropped_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Key,
    Pointer,
    Clipboard,
    DesktopSize,
    Other,
}

impl InputKind {
    pub const ALL: [InputKind; 5] = [
        InputKind::Key,
        InputKind::Pointer,
        InputKind::Clipboard,
        InputKind::DesktopSize,
        InputKind::Other,
    ];
    /// The label value, one of `crate::metrics::INPUT_KINDS`.
    pub fn as_str(self) -> &'static str {
        match self {
            InputKind::Key => "key",
            InputKind::Pointer => "pointer",
            InputKind::Clipboard => "clipboard",
            InputKind::DesktopSize => "desktop_size",
            InputKind::Other => "other",
        }
    }
}

/// Whether a server stream in which the client asked for `enc` can still be delimited: the
/// encodings [`server_msg::ServerFilter`] knows the length rule of, plus the pseudo-encodings
/// that only announce a capability and never arrive as a rectangle. SetEncodings keeps only
/// these when the server stream is delimited, so the server never picks one it could not send
/// through.
pub fn is_delimitable_encoding(enc: i32) -> bool {
    server_msg::delimits_rect(enc) || is_rectless_pseudo_encoding(enc)
}

/// Pseudo-encodings a server acknowledges with messages of their own (Fence, xvp,
/// EndOfContinuousUpdates, extended ServerCutText) or that only tune the encoder: none of them
/// is ever a rectangle's encoding.
fn is_rectless_pseudo_encoding(enc: i32) -> bool {
    matches!(
        enc,
        encoding::QUALITY_LEVEL_0..=encoding::QUALITY_LEVEL_9
            | encoding::COMPRESS_LEVEL_0..=encoding::COMPRESS_LEVEL_9
            | encoding::FENCE
            | encoding::CONTINUOUS_UPDATES
            | encoding::XVP
            | encoding::EXTENDED_CLIPBOARD
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_CLIPBOARDS: [Clipboard; 4] = [
        Clipboard::Both,
        Clipboard::ToClient,
        Clipboard::ToServer,
        Clipboard::None,
    ];

    #[test]
    fn clipboard_parse_round_trips_and_rejects_other_spellings() {
        for c in ALL_CLIPBOARDS {
            assert_eq!(Clipboard::parse(c.as_str()), Some(c));
        }
        for bad in ["", "Both", "BOTH", "to-client", "toserver", "none ", "all"] {
            assert_eq!(Clipboard::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn clipboard_directions() {
        let dirs = |c: Clipboard| (c.to_server(), c.to_client());
        assert_eq!(dirs(Clipboard::Both), (true, true));
        assert_eq!(dirs(Clipboard::ToClient), (false, true));
        assert_eq!(dirs(Clipboard::ToServer), (true, false));
        assert_eq!(dirs(Clipboard::None), (false, false));
    }

    #[test]
    fn narrow_is_the_intersection_of_directions() {
        for a in ALL_CLIPBOARDS {
            for b in ALL_CLIPBOARDS {
                let n = a.narrow(b);
                assert_eq!(n.to_server(), a.to_server() && b.to_server(), "{a:?} {b:?}");
                assert_eq!(n.to_client(), a.to_client() && b.to_client(), "{a:?} {b:?}");
                assert_eq!(n, b.narrow(a), "commutative");
            }
            assert_eq!(a.narrow(Clipboard::Both), a, "both is the identity");
            assert_eq!(a.narrow(Clipboard::None), Clipboard::None);
        }
        assert_eq!(
            Clipboard::ToClient.narrow(Clipboard::ToServer),
            Clipboard::None
        );
    }

    #[test]
    fn server_stream_is_delimited_exactly_when_server_cut_text_is_blocked() {
        for clipboard in ALL_CLIPBOARDS {
            for view_only in [false, true] {
                let p = Policy {
                    view_only,
                    clipboard,
                };
                assert_eq!(p.delimits_server_stream(), !clipboard.to_client());
            }
        }
    }

    #[test]
    fn input_kind_labels_follow_the_metric_labels_in_index_order() {
        let labels: Vec<&str> = InputKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(labels, crate::metrics::INPUT_KINDS);
        for (i, k) in InputKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }

    #[test]
    fn delimitable_encodings() {
        let rects = [0, 1, 2, 5, 6, 16]; // Raw, CopyRect, RRE, Hextile, Zlib, ZRLE
        let rect_pseudo = [-223, -224, -239, -258, -261, -307, -308, -316];
        let rectless = [-312, -313, -309, 0xC0A1_E5CE_u32 as i32]; // Fence, CU, xvp, clipboard
        let levels = [-32, -27, -23, -256, -250, -247]; // quality, compression
        for enc in [&rects[..], &rect_pseudo, &rectless, &levels].concat() {
            assert!(is_delimitable_encoding(enc), "{enc}");
        }
        // Tight, TRLE, JPEG, H.264, TightPNG, cursor with alpha, VMware cursor.
        let known_undelimitable = [7, 15, 21, 50, -260, -314, 0x574d_5664];
        let unassigned = [
            3, 4, 8, -1, -22, -33, -246, -257, -240, -310, -311, -315, -317,
        ];
        let extremes = [i32::MIN, i32::MAX];
        let no = [&known_undelimitable[..], &unassigned, &extremes].concat();
        for enc in no {
            assert!(!is_delimitable_encoding(enc), "{enc}");
        }
    }
}
