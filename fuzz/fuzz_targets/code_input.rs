//! Fuzz code input as users type it: normalisation must never panic, must keep
//! exactly the typed digits, and verification must refuse malformed input before
//! any HMAC.

#![no_main]

use libfuzzer_sys::fuzz_target;
use twofold_core::otp::{self, Code, Digits, Skew, TotpParams, Verdict};
use twofold_core::secret::Secret;

/// RFC 6238's SHA-1 test key; any fixed key would do.
const SECRET: &[u8] = b"12345678901234567890";

/// 2009-02-13T23:31:30Z, a time from RFC 6238's test vectors.
const NOW: u64 = 1_234_567_890;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    for n in 6..=8 {
        let digits = Digits::try_new(n).expect("6 to 8 digits are valid");
        if let Some(code) = Code::parse(input, digits) {
            let text = code.as_str();
            assert_eq!(text.len(), usize::from(n));
            assert!(text.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
            let typed: String = input.chars().filter(|c| !c.is_whitespace()).collect();
            assert_eq!(text, typed, "normalisation kept exactly the typed digits");
        }
    }

    let secret = Secret::from_bytes(SECRET).expect("a 160-bit key is valid");
    let params = TotpParams::default();
    let verdict = otp::verify_totp(&secret, input, NOW, params, Skew::default(), None);
    if Code::parse(input, params.digits).is_none() {
        assert_eq!(verdict, Verdict::Malformed);
    } else {
        assert_ne!(verdict, Verdict::Malformed);
    }
});
