//! TOTP codes (RFC 6238, SHA-1, 6 digits, 30 s) computed here with hmac + sha1,
//! apart from `twofold_core::otp`, so the benchmark checks the service instead of
//! agreeing with it.

use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

/// Seconds per step, the control plane's default.
pub const PERIOD: u64 = 30;
/// Digits per code, the control plane's default.
const MODULUS: u32 = 1_000_000;

/// The step a Unix time falls in.
pub fn step_at(unix_secs: u64) -> u64 {
    unix_secs / PERIOD
}

/// The 6-digit code of `secret` for `step`, as a number.
pub fn code(secret: &[u8], step: u64) -> u32 {
    // HMAC takes keys of any length, so this cannot fail.
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret) else {
        return 0;
    };
    mac.update(&step.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = usize::from(digest[digest.len() - 1] & 0x0f);
    let binary = u32::from_be_bytes([
        digest[offset] & 0x7f,
        digest[offset + 1],
        digest[offset + 2],
        digest[offset + 3],
    ]);
    binary % MODULUS
}

/// A code as the API takes it: six digits, zero-padded.
pub fn format(code: u32) -> String {
    format!("{code:06}")
}

/// A well-formed code that is none of `avoid` (the user's codes around now), so
/// the server does the full work of a wrong code and refuses it.
pub fn wrong_code(avoid: &[u32]) -> u32 {
    (0..10)
        .map(|d| d * 111_111)
        .find(|c| !avoid.contains(c))
        .unwrap_or(123_456)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 seed, truncated to 6 digits (the last six of
    /// the 8-digit values in the table).
    #[test]
    fn rfc6238_vectors() {
        let seed = b"12345678901234567890";
        let check = |time: u64, expected: &str| {
            assert_eq!(format(code(seed, step_at(time))), expected, "T = {time}");
        };
        check(59, "287082");
        check(1_111_111_109, "081804");
        check(1_111_111_111, "050471");
        check(1_234_567_890, "005924");
        check(2_000_000_000, "279037");
        check(20_000_000_000, "353130");
    }

    #[test]
    fn wrong_codes_avoid_the_window() {
        assert_eq!(wrong_code(&[5, 6, 7]), 0);
        assert_eq!(wrong_code(&[0, 111_111]), 222_222);
        assert_eq!(format(wrong_code(&[])), "000000");
    }
}
