//! VNC Authentication (RFC 6143 §7.2.2): the response to a 16-byte challenge is the challenge
//! DES-encrypted (ECB, two blocks) with the password as the key.
//!
//! The key quirk every VNC implementation shares: the password is truncated or zero-padded to 8
//! bytes and *each byte's bits are reversed* before it is used as the DES key (a legacy of the
//! original d3des code). Without the reversal every server answers "authentication failed".

use des::Des;
use des::cipher::{Array, BlockCipherEncrypt, KeyInit};

pub const CHALLENGE_LEN: usize = 16;

pub fn response(password: &[u8], challenge: &[u8; CHALLENGE_LEN]) -> [u8; CHALLENGE_LEN] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = Des::new(&Array::from(key));
    let mut out = *challenge;
    for half in out.chunks_exact_mut(8) {
        let mut block = Array::from([0u8; 8]);
        block.copy_from_slice(half);
        cipher.encrypt_block(&mut block);
        half.copy_from_slice(&block);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answer computed independently with `openssl enc -des-ecb -nopad`: key = bit-reversed "password"
    /// (0e 86 ce ce ee f6 4e 26), DES-ECB of two blocks of 00..0f.
    #[test]
    fn matches_the_reference_response() {
        let challenge: [u8; 16] = core::array::from_fn(|i| i as u8);
        let expected = [
            0xb8, 0x66, 0x92, 0x41, 0x25, 0xc8, 0xee, 0xbb, 0x9d, 0xeb, 0xc1, 0xdb, 0x61, 0xc5,
            0x38, 0xe2,
        ];
        assert_eq!(response(b"password", &challenge), expected);
    }

    #[test]
    fn only_the_first_eight_bytes_count() {
        let challenge = [7u8; 16];
        assert_eq!(
            response(b"password-and-more", &challenge),
            response(b"password", &challenge)
        );
        assert_ne!(
            response(b"passwore", &challenge),
            response(b"password", &challenge)
        );
    }
}
