//! HOTP (RFC 4226) and TOTP (RFC 6238): code generation and verification.
//!
//! Parameters are validated when they are built, so an invalid algorithm, digit
//! count, period or window cannot reach the maths. Verification takes the code and
//! the time as arguments and returns the matched counter or time step, which the
//! planes keep for replay protection (RFC 6238 §5.2).

use std::fmt;
use std::str::FromStr;

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// The HMAC hash behind an OTP factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// The default: the only algorithm every authenticator app supports.
    #[default]
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    /// Length in bytes of the hash output, and so of a generated secret.
    pub fn output_len(self) -> usize {
        match self {
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }

    /// The name used in `otpauth://` URIs and the API: `SHA1`, `SHA256`, `SHA512`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
            Algorithm::Sha512 => "SHA512",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = ParamError;

    /// Accepts `SHA1`, `sha1`, `SHA-1` and the like.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().replace('-', "").as_str() {
            "SHA1" => Ok(Algorithm::Sha1),
            "SHA256" => Ok(Algorithm::Sha256),
            "SHA512" => Ok(Algorithm::Sha512),
            _ => Err(ParamError::Algorithm),
        }
    }
}

/// Why OTP parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("algorithm must be SHA1, SHA256 or SHA512")]
    Algorithm,
    #[error("digits must be 6, 7 or 8")]
    Digits,
    #[error("period must be between {MIN_PERIOD} and {MAX_PERIOD} seconds")]
    Period,
    #[error("skew must be at most {MAX_SKEW} steps each way")]
    Skew,
}

/// Number of digits in a code: 6, 7 or 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digits(u8);

impl Digits {
    pub const SIX: Digits = Digits(6);

    pub fn try_new(digits: u8) -> Result<Digits, ParamError> {
        if (6..=8).contains(&digits) {
            Ok(Digits(digits))
        } else {
            Err(ParamError::Digits)
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }

    fn modulus(self) -> u32 {
        10u32.pow(u32::from(self.0))
    }
}

impl Default for Digits {
    fn default() -> Self {
        Digits::SIX
    }
}

pub const MIN_PERIOD: u32 = 15;
pub const MAX_PERIOD: u32 = 300;

/// Length of a TOTP time step in seconds: 15 to 300.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Period(u32);

impl Period {
    pub const THIRTY: Period = Period(30);

    pub fn try_new(seconds: u32) -> Result<Period, ParamError> {
        if (MIN_PERIOD..=MAX_PERIOD).contains(&seconds) {
            Ok(Period(seconds))
        } else {
            Err(ParamError::Period)
        }
    }

    pub fn seconds(self) -> u32 {
        self.0
    }
}

impl Default for Period {
    fn default() -> Self {
        Period::THIRTY
    }
}

/// Most steps a verifier may look behind or ahead. Wider windows make guessing
/// easier, so the bound is deliberately small.
pub const MAX_SKEW: u8 = 10;

/// How many steps (or counters) around the expected one a code may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skew {
    behind: u8,
    ahead: u8,
}

impl Skew {
    pub fn try_new(behind: u8, ahead: u8) -> Result<Skew, ParamError> {
        if behind > MAX_SKEW || ahead > MAX_SKEW {
            return Err(ParamError::Skew);
        }
        Ok(Skew { behind, ahead })
    }

    pub fn behind(self) -> u8 {
        self.behind
    }

    pub fn ahead(self) -> u8 {
        self.ahead
    }
}

impl Default for Skew {
    /// ±1 step, as RFC 6238 §5.2 recommends.
    fn default() -> Self {
        Skew {
            behind: 1,
            ahead: 1,
        }
    }
}

/// Parameters of an HOTP factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HotpParams {
    pub algorithm: Algorithm,
    pub digits: Digits,
}

/// Parameters of a TOTP factor. Defaults are SHA-1, 6 digits, 30 s: the ones every
/// authenticator app supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TotpParams {
    pub algorithm: Algorithm,
    pub digits: Digits,
    pub period: Period,
}

impl TotpParams {
    /// The time step that `unix_time` falls in (T0 = 0).
    pub fn step_at(&self, unix_time: u64) -> u64 {
        unix_time / u64::from(self.period.0)
    }

    fn hotp(&self) -> HotpParams {
        HotpParams {
            algorithm: self.algorithm,
            digits: self.digits,
        }
    }
}

/// The outcome of a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The code matched this time step (TOTP) or counter (HOTP).
    Valid { step: u64 },
    /// Well-formed, but no eligible step or counter matched.
    Invalid,
    /// Not a code of the expected shape; no HMAC was computed.
    Malformed,
}

impl Verdict {
    pub fn is_valid(self) -> bool {
        matches!(self, Verdict::Valid { .. })
    }
}

/// The longest input considered at all; anything longer is malformed. Generous
/// enough for codes typed with spaces.
const MAX_CODE_INPUT: usize = 64;

/// A code as typed, reduced to its digits: surrounding and inner whitespace
/// removed, exactly `digits` ASCII digits left.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Code {
    bytes: [u8; 8],
    len: u8,
}

impl Code {
    /// Normalise user input. `None` if what remains is not exactly `digits` digits.
    pub fn parse(input: &str, digits: Digits) -> Option<Code> {
        if input.len() > MAX_CODE_INPUT {
            return None;
        }
        let mut bytes = [0u8; 8];
        let mut len = 0usize;
        for c in input.chars().filter(|c| !c.is_whitespace()) {
            if !c.is_ascii_digit() || len == usize::from(digits.get()) {
                return None;
            }
            // The digit check above makes this a single byte.
            bytes[len] = c as u8;
            len += 1;
        }
        if len != usize::from(digits.get()) {
            return None;
        }
        Some(Code {
            bytes,
            len: digits.get(),
        })
    }

    /// The normalised digits, for example `"123456"`.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever stored.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Code(<{} digits redacted>)", self.len)
    }
}

/// The HOTP value for `counter`, as a zero-padded string of `params.digits`.
pub fn hotp(secret: &Secret, counter: u64, params: HotpParams) -> String {
    format_code(
        Keyed::new(params.algorithm, secret).value(counter, params.digits),
        params.digits,
    )
}

/// The TOTP code for the step containing `unix_time`.
pub fn totp(secret: &Secret, unix_time: u64, params: TotpParams) -> String {
    hotp(secret, params.step_at(unix_time), params.hotp())
}

/// Verify a TOTP code typed by a user at `unix_time`.
///
/// Steps within `skew` of the current one are tried. A step at or before
/// `last_step` (the last one accepted for this factor) is never accepted again. On
/// a match the step is returned, preferring the one nearest to now.
pub fn verify_totp(
    secret: &Secret,
    code: &str,
    unix_time: u64,
    params: TotpParams,
    skew: Skew,
    last_step: Option<u64>,
) -> Verdict {
    let now = params.step_at(unix_time);
    let lowest = now.saturating_sub(u64::from(skew.behind));
    let highest = now.saturating_add(u64::from(skew.ahead));
    verify_range(
        secret,
        code,
        params.hotp(),
        now,
        lowest..=highest,
        last_step,
    )
}

/// Verify an HOTP code against counters `counter ..= counter + look_ahead`.
/// Returns the matched counter; the next expected one is that plus one.
pub fn verify_hotp(
    secret: &Secret,
    code: &str,
    counter: u64,
    look_ahead: u8,
    params: HotpParams,
) -> Verdict {
    let highest = counter.saturating_add(u64::from(look_ahead));
    verify_range(secret, code, params, counter, counter..=highest, None)
}

fn verify_range(
    secret: &Secret,
    code: &str,
    params: HotpParams,
    preferred: u64,
    range: std::ops::RangeInclusive<u64>,
    last_used: Option<u64>,
) -> Verdict {
    let Some(code) = Code::parse(code, params.digits) else {
        return Verdict::Malformed;
    };
    let keyed = Keyed::new(params.algorithm, secret);
    let mut best: Option<u64> = None;
    // Every candidate is computed and compared in constant time, so the work does
    // not depend on which step (if any) matched or on replay state.
    for step in range {
        let candidate = format_digits(keyed.value(step, params.digits), params.digits);
        let matched: bool = candidate[..usize::from(code.len)]
            .ct_eq(code.as_str().as_bytes())
            .into();
        let eligible = last_used.is_none_or(|last| step > last);
        if matched
            && eligible
            && best.is_none_or(|b| step.abs_diff(preferred) < b.abs_diff(preferred))
        {
            best = Some(step);
        }
    }
    match best {
        Some(step) => Verdict::Valid { step },
        None => Verdict::Invalid,
    }
}

/// An HMAC already keyed with the secret, cloned per counter so the key schedule
/// is computed once per verification rather than once per candidate.
enum Keyed {
    Sha1(Hmac<sha1::Sha1>),
    Sha256(Hmac<sha2::Sha256>),
    Sha512(Hmac<sha2::Sha512>),
}

impl Keyed {
    fn new(algorithm: Algorithm, secret: &Secret) -> Keyed {
        let key = secret.expose();
        match algorithm {
            Algorithm::Sha1 => Keyed::Sha1(keyed_mac(key)),
            Algorithm::Sha256 => Keyed::Sha256(keyed_mac(key)),
            Algorithm::Sha512 => Keyed::Sha512(keyed_mac(key)),
        }
    }

    /// RFC 4226 §5.3: HMAC of the big-endian counter, dynamic truncation, modulus.
    fn value(&self, counter: u64, digits: Digits) -> u32 {
        let message = counter.to_be_bytes();
        let truncated = match self {
            Keyed::Sha1(mac) => mac_truncated(mac, &message),
            Keyed::Sha256(mac) => mac_truncated(mac, &message),
            Keyed::Sha512(mac) => mac_truncated(mac, &message),
        };
        truncated % digits.modulus()
    }
}

fn keyed_mac<M: KeyInit>(key: &[u8]) -> M {
    // HMAC takes keys of any length, so this cannot fail; the fallback keeps the
    // non-test code free of unwrap.
    M::new_from_slice(key).unwrap_or_else(|_| M::new(&Default::default()))
}

fn mac_truncated<M: Mac + Clone>(keyed: &M, message: &[u8]) -> u32 {
    let mut mac = keyed.clone();
    mac.update(message);
    truncate(&mac.finalize().into_bytes())
}

/// Dynamic truncation (RFC 4226 §5.3).
fn truncate(hash: &[u8]) -> u32 {
    let offset = usize::from(hash[hash.len() - 1] & 0x0f);
    u32::from_be_bytes([
        hash[offset] & 0x7f,
        hash[offset + 1],
        hash[offset + 2],
        hash[offset + 3],
    ])
}

/// Zero-padded decimal digits of `value`, in a fixed buffer (no allocation).
fn format_digits(mut value: u32, digits: Digits) -> [u8; 8] {
    let mut out = [b'0'; 8];
    for i in (0..usize::from(digits.get())).rev() {
        out[i] = b'0' + (value % 10) as u8;
        value /= 10;
    }
    out
}

fn format_code(value: u32, digits: Digits) -> String {
    let buf = format_digits(value, digits);
    String::from_utf8_lossy(&buf[..usize::from(digits.get())]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc_secret() -> Secret {
        Secret::from_bytes(b"12345678901234567890").unwrap()
    }

    #[test]
    fn parameters_are_validated() {
        assert_eq!(Digits::try_new(5), Err(ParamError::Digits));
        assert_eq!(Digits::try_new(9), Err(ParamError::Digits));
        assert_eq!(Digits::try_new(7).unwrap().get(), 7);
        assert_eq!(Period::try_new(14), Err(ParamError::Period));
        assert_eq!(Period::try_new(301), Err(ParamError::Period));
        assert_eq!(Period::try_new(60).unwrap().seconds(), 60);
        assert_eq!(Skew::try_new(11, 0), Err(ParamError::Skew));
        assert_eq!("sha-256".parse::<Algorithm>(), Ok(Algorithm::Sha256));
        assert_eq!("md5".parse::<Algorithm>(), Err(ParamError::Algorithm));
    }

    #[test]
    fn code_input_is_normalised() {
        let six = Digits::SIX;
        assert_eq!(Code::parse(" 123 456 ", six).unwrap().as_str(), "123456");
        assert_eq!(Code::parse("\t123456\n", six).unwrap().as_str(), "123456");
        assert!(Code::parse("12345", six).is_none());
        assert!(Code::parse("1234567", six).is_none());
        assert!(Code::parse("12345a", six).is_none());
        assert!(Code::parse("123-456", six).is_none());
        assert!(Code::parse("١٢٣٤٥٦", six).is_none(), "non-ASCII digits");
        assert!(Code::parse(&" ".repeat(100), six).is_none());
    }

    #[test]
    fn malformed_codes_are_refused_before_any_hmac() {
        let params = TotpParams::default();
        for bad in ["", "abcdef", "12345", "1234567", "12 34 5x"] {
            assert_eq!(
                verify_totp(&rfc_secret(), bad, 59, params, Skew::default(), None),
                Verdict::Malformed
            );
        }
    }

    #[test]
    fn replayed_steps_are_refused() {
        let params = TotpParams::default();
        let t = 1_111_111_109;
        let code = totp(&rfc_secret(), t, params);
        let step = params.step_at(t);
        let skew = Skew::default();
        assert_eq!(
            verify_totp(&rfc_secret(), &code, t, params, skew, None),
            Verdict::Valid { step }
        );
        assert_eq!(
            verify_totp(&rfc_secret(), &code, t, params, skew, Some(step)),
            Verdict::Invalid
        );
        assert_eq!(
            verify_totp(&rfc_secret(), &code, t, params, skew, Some(step + 1)),
            Verdict::Invalid
        );
        assert_eq!(
            verify_totp(&rfc_secret(), &code, t, params, skew, Some(step - 1)),
            Verdict::Valid { step }
        );
    }

    #[test]
    fn hotp_look_ahead_returns_the_matched_counter() {
        let params = HotpParams::default();
        // RFC 4226 Appendix D, counter 3.
        assert_eq!(
            verify_hotp(&rfc_secret(), "969429", 0, 5, params),
            Verdict::Valid { step: 3 }
        );
        assert_eq!(
            verify_hotp(&rfc_secret(), "969429", 4, 5, params),
            Verdict::Invalid
        );
    }

    #[test]
    fn early_times_do_not_underflow() {
        let params = TotpParams::default();
        let code = totp(&rfc_secret(), 0, params);
        assert_eq!(
            verify_totp(&rfc_secret(), &code, 0, params, Skew::default(), None),
            Verdict::Valid { step: 0 }
        );
    }
}
