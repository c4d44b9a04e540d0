//! OTP shared secrets: generation from the OS CSPRNG, base32 import and export.
//!
//! A [`Secret`] never shows its bytes in `Debug` or `Display` and is wiped from
//! memory when dropped.

use std::fmt;

use data_encoding::BASE32_NOPAD;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::otp::Algorithm;

/// Secrets shorter than this are refused on import (RFC 4226 §4 asks for at least
/// 128 bits).
pub const MIN_SECRET_LEN: usize = 16;

/// Longest secret accepted on import. Longer keys are hashed down by HMAC anyway,
/// and a bound keeps hostile input small.
pub const MAX_SECRET_LEN: usize = 128;

/// Why a secret could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("secret is not valid base32")]
    Base32,
    #[error("secret is {0} bits long; at least 128 bits are required")]
    TooShort(usize),
    #[error("secret is longer than {MAX_SECRET_LEN} bytes")]
    TooLong,
    #[error("the operating system's random number generator failed")]
    Rng,
}

/// The shared key of an OTP factor.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A fresh secret from the OS CSPRNG, as long as the algorithm's output
    /// (20, 32 or 64 bytes), as RFC 4226 §4 recommends.
    pub fn generate(algorithm: Algorithm) -> Result<Secret, SecretError> {
        let mut bytes = vec![0u8; algorithm.output_len()];
        fill_random(&mut bytes)?;
        Ok(Secret(bytes))
    }

    /// Import raw key bytes, refusing keys under 128 bits.
    pub fn from_bytes(bytes: &[u8]) -> Result<Secret, SecretError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(bytes.len() * 8));
        }
        if bytes.len() > MAX_SECRET_LEN {
            return Err(SecretError::TooLong);
        }
        Ok(Secret(bytes.to_vec()))
    }

    /// Import a base32 secret as people and apps write it: either case, with or
    /// without `=` padding, with spaces anywhere.
    pub fn from_base32(text: &str) -> Result<Secret, SecretError> {
        let mut cleaned: Vec<u8> = text
            .bytes()
            .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
            .map(|b| b.to_ascii_uppercase())
            .collect();
        if cleaned.len() > MAX_SECRET_LEN * 8 / 5 + 1 {
            cleaned.zeroize();
            return Err(SecretError::TooLong);
        }
        let decoded = BASE32_NOPAD
            .decode(&cleaned)
            .map_err(|_| SecretError::Base32);
        cleaned.zeroize();
        let mut bytes = decoded?;
        let secret = Secret::from_bytes(&bytes);
        bytes.zeroize();
        secret
    }

    /// The canonical base32 form: upper case, no padding, as authenticator apps
    /// expect in an `otpauth://` URI.
    pub fn to_base32(&self) -> String {
        BASE32_NOPAD.encode(&self.0)
    }

    /// The raw key bytes. Callers must not log or persist them unsealed.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A bearer token: `prefix` followed by 256 random bits in lowercase base32. It
/// is shown once to its owner and stored only as a keyed hash.
pub fn random_token(prefix: &str) -> Result<Zeroizing<String>, SecretError> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    fill_random(bytes.as_mut())?;
    let body = Zeroizing::new(BASE32_NOPAD.encode(bytes.as_ref()).to_ascii_lowercase());
    Ok(Zeroizing::new(format!("{prefix}{}", body.as_str())))
}

/// Fill `buf` from the OS CSPRNG. This is the only system call core makes.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), SecretError> {
    getrandom::fill(buf).map_err(|_| SecretError::Rng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_length_follows_the_algorithm() {
        for (alg, len) in [
            (Algorithm::Sha1, 20),
            (Algorithm::Sha256, 32),
            (Algorithm::Sha512, 64),
        ] {
            assert_eq!(Secret::generate(alg).unwrap().expose().len(), len);
        }
        assert_ne!(
            Secret::generate(Algorithm::Sha1).unwrap(),
            Secret::generate(Algorithm::Sha1).unwrap()
        );
    }

    #[test]
    fn base32_accepts_case_padding_and_spaces() {
        let canonical = Secret::from_base32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ").unwrap();
        for variant in [
            "gezdgnbvgy3tqojqgezdgnbvgy3tqojq",
            "GEZD GNBV GY3T QOJQ GEZD GNBV GY3T QOJQ",
            " gezdgnbvgy3tqojqGEZDGNBVGY3TQOJQ ",
        ] {
            assert_eq!(Secret::from_base32(variant).unwrap(), canonical);
        }
        let padded = Secret::from_base32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZA====").unwrap();
        assert_eq!(padded.expose(), b"1234567890123456789012");
        assert_eq!(padded.to_base32(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZA");
    }

    #[test]
    fn short_and_malformed_secrets_are_refused() {
        assert_eq!(
            Secret::from_base32("GEZDGNBVGY3TQOJQ"),
            Err(SecretError::TooShort(80))
        );
        assert_eq!(
            Secret::from_base32("GEZDGNBVGY3TQOJ1GEZDGNBVGY3TQOJQ"),
            Err(SecretError::Base32)
        );
        assert_eq!(Secret::from_base32(""), Err(SecretError::TooShort(0)));
        assert_eq!(
            Secret::from_base32(&"A".repeat(1000)),
            Err(SecretError::TooLong)
        );
    }

    #[test]
    fn tokens_are_prefixed_and_random() {
        let a = random_token("tfk_").unwrap();
        let b = random_token("tfk_").unwrap();
        assert!(a.starts_with("tfk_"));
        assert_eq!(a.len(), 4 + 52);
        assert_ne!(a, b);
    }

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::from_base32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ").unwrap();
        let shown = format!("{s:?} {s}");
        assert!(!shown.contains("GEZD"), "{shown}");
        assert!(!shown.contains("49"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
