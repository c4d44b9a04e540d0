//! Backup (recovery) codes: single-use codes a user writes down in case the
//! authenticator is lost, generated here and stored only as keyed hashes.
//!
//! A code is 12 symbols of Crockford's base32 alphabet in lower case
//! (`0-9a-z` without `i`, `l`, `o` and `u`), shown in three groups of four, such as
//! `k7q4-m2xp-9dvr`. The alphabet has exactly 32 symbols, so each symbol is five
//! uniform random bits (60 bits a code) with no modulo bias. It has no pair of
//! look-alike symbols: the letters that could be misread as `0` or `1` are left
//! out, and [`normalize`] reads them as the digit, as Crockford's decoding does.

use std::fmt;

use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::seal::HashKey;
use crate::secret::fill_random;

/// How many codes a set holds.
pub const SET_SIZE: usize = 10;

/// Symbols in a code, not counting the dashes between groups.
pub const CODE_LEN: usize = 12;

/// Symbols in each dash-separated group of the displayed form.
const GROUP_LEN: usize = 4;

/// Longest input [`normalize`] reads. Generous for a 14-character code typed
/// with spaces, and a bound on hostile input.
pub const MAX_INPUT_LEN: usize = 64;

/// The code alphabet: Crockford's base32, lower case.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// Domain of the keyed hash, so a backup-code hash never equals the hash of the
/// same bytes used elsewhere (API keys).
pub const HASH_DOMAIN: &str = "backup-code";

/// Why backup codes could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackupError {
    #[error("the operating system's random number generator failed")]
    Rng,
}

/// A freshly generated set of [`SET_SIZE`] distinct codes, to show the user once
/// and then store as [`BackupCodes::hashes`].
#[derive(Debug)]
pub struct BackupCodes(Vec<BackupCode>);

impl BackupCodes {
    /// A new set of distinct codes from the OS CSPRNG.
    pub fn generate() -> Result<BackupCodes, BackupError> {
        let mut codes: Vec<BackupCode> = Vec::with_capacity(SET_SIZE);
        while codes.len() < SET_SIZE {
            let code = BackupCode::generate()?;
            // Two equal codes out of 2^60 will not happen, but distinctness is
            // what lets a match name exactly one code, so it is checked anyway.
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
        Ok(BackupCodes(codes))
    }

    pub fn as_slice(&self) -> &[BackupCode] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<BackupCode> {
        self.0
    }

    /// The keyed hashes to store, in the same order as the codes.
    pub fn hashes(&self, key: &HashKey) -> Vec<[u8; 32]> {
        self.0.iter().map(|code| code.hash(key)).collect()
    }
}

/// One backup code. It is a secret: `Debug` and `Display` redact it, and it is
/// wiped from memory when dropped. [`BackupCode::expose`] gives the text to
/// show the user, once.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct BackupCode {
    /// The grouped form, `xxxx-xxxx-xxxx`.
    grouped: String,
}

impl BackupCode {
    /// A single code from the OS CSPRNG.
    pub fn generate() -> Result<BackupCode, BackupError> {
        let mut random = Zeroizing::new([0u8; CODE_LEN]);
        fill_random(random.as_mut_slice()).map_err(|_| BackupError::Rng)?;
        let mut grouped = String::with_capacity(CODE_LEN + CODE_LEN / GROUP_LEN - 1);
        for (i, byte) in random.iter().enumerate() {
            if i > 0 && i % GROUP_LEN == 0 {
                grouped.push('-');
            }
            // The low five bits of a uniform byte are uniform over the 32 symbols.
            grouped.push(char::from(ALPHABET[usize::from(byte & 0x1f)]));
        }
        Ok(BackupCode { grouped })
    }

    /// The code as the user should see it: `xxxx-xxxx-xxxx`. Show it once, and
    /// never log it.
    pub fn expose(&self) -> &str {
        &self.grouped
    }

    /// The keyed hash to store for this code.
    pub fn hash(&self, key: &HashKey) -> [u8; 32] {
        let normalized = Zeroizing::new(self.grouped.replace('-', ""));
        key.hash(HASH_DOMAIN, normalized.as_bytes())
    }
}

impl fmt::Debug for BackupCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackupCode(<redacted>)")
    }
}

impl fmt::Display for BackupCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A code as typed by a user, reduced to its 12 alphabet symbols. Secret like
/// the code itself.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct NormalizedCode(String);

impl NormalizedCode {
    /// The 12 symbols, lower case, without separators.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl PartialEq for NormalizedCode {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for NormalizedCode {}

impl fmt::Debug for NormalizedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NormalizedCode(<redacted>)")
    }
}

/// Read a code as a person types it, or `None` if it cannot be one.
///
/// Case is ignored; whitespace, `-`, `_` and the Unicode hyphens and dashes that
/// word processors substitute are dropped wherever they are; `o` is read as `0`
/// and `i` and `l` as `1`, since they never appear in a code. What remains must
/// be exactly 12 alphabet symbols. Input longer than [`MAX_INPUT_LEN`] bytes is
/// refused before it is read.
pub fn normalize(input: &str) -> Option<NormalizedCode> {
    if input.len() > MAX_INPUT_LEN {
        return None;
    }
    let mut symbols = String::with_capacity(CODE_LEN);
    for c in input.chars() {
        if c.is_whitespace() || is_separator(c) {
            continue;
        }
        let symbol = match c.to_ascii_lowercase() {
            'o' => '0',
            'i' | 'l' => '1',
            c if u8::try_from(c).is_ok_and(|b| ALPHABET.contains(&b)) => c,
            _ => {
                symbols.zeroize();
                return None;
            }
        };
        if symbols.len() == CODE_LEN {
            symbols.zeroize();
            return None;
        }
        symbols.push(symbol);
    }
    if symbols.len() != CODE_LEN {
        symbols.zeroize();
        return None;
    }
    Some(NormalizedCode(symbols))
}

fn is_separator(c: char) -> bool {
    // ASCII hyphen-minus and underscore; U+2010..U+2015 hyphens and dashes;
    // U+2212 minus sign.
    matches!(c, '-' | '_' | '\u{2010}'..='\u{2015}' | '\u{2212}')
}

/// The keyed hash of a normalized code; equal to [`BackupCode::hash`] of the code
/// it was typed from.
pub fn hash_input(code: &NormalizedCode, key: &HashKey) -> [u8; 32] {
    key.hash(HASH_DOMAIN, code.0.as_bytes())
}

/// Which stored hash, if any, the typed `input` matches.
///
/// Every hash is compared, in constant time, whether or not an earlier one
/// matched, so the time taken does not tell which code was used. The caller
/// then removes the matched hash: each code works once.
pub fn find_match(key: &HashKey, input: &str, hashes: &[[u8; 32]]) -> Option<usize> {
    let code = normalize(input)?;
    let typed = hash_input(&code, key);
    let mut found = Choice::from(0);
    let mut index = 0u64;
    for (i, stored) in hashes.iter().enumerate() {
        let matches = stored.ct_eq(&typed) & !found;
        index.conditional_assign(&(i as u64), matches);
        found |= matches;
    }
    if bool::from(found) {
        usize::try_from(index).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::{Keyring, MasterKey};

    fn hash_key() -> HashKey {
        Keyring::new(MasterKey::generate().unwrap())
            .hash_key()
            .clone()
    }

    fn is_well_formed(code: &str) -> bool {
        let bytes = code.as_bytes();
        bytes.len() == 14
            && bytes.iter().enumerate().all(|(i, b)| match i {
                4 | 9 => *b == b'-',
                _ => ALPHABET.contains(b),
            })
    }

    #[test]
    fn a_set_is_ten_distinct_well_formed_codes() {
        let set = BackupCodes::generate().unwrap();
        let codes: Vec<&str> = set.as_slice().iter().map(BackupCode::expose).collect();
        assert_eq!(codes.len(), SET_SIZE);
        for code in &codes {
            assert!(is_well_formed(code), "{code}");
        }
        let mut unique = codes.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), SET_SIZE);
        let other = BackupCodes::generate().unwrap();
        assert!(
            other
                .as_slice()
                .iter()
                .all(|c| !codes.contains(&c.expose()))
        );
    }

    #[test]
    fn alphabet_has_32_distinct_symbols_without_look_alikes() {
        let mut symbols = ALPHABET.to_vec();
        symbols.sort_unstable();
        symbols.dedup();
        assert_eq!(symbols.len(), 32);
        for absent in b"ilou" {
            assert!(!ALPHABET.contains(absent));
        }
    }

    #[test]
    fn every_symbol_is_used() {
        let mut seen = [false; 32];
        for _ in 0..50 {
            for code in BackupCodes::generate().unwrap().as_slice() {
                for b in code.expose().bytes().filter(|b| *b != b'-') {
                    let at = ALPHABET.iter().position(|a| *a == b).unwrap();
                    seen[at] = true;
                }
            }
        }
        // 6000 draws: missing any of 32 symbols has odds below 2^-260.
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn normalize_accepts_how_people_type() {
        let expected = normalize("k7q4m2xp9dvr").unwrap();
        assert_eq!(expected.as_str(), "k7q4m2xp9dvr");
        for typed in [
            " K7Q4 M2XP-9dvr ",
            "k7q4-m2xp-9dvr",
            "K7Q4-M2XP-9DVR",
            "k7q4\tm2xp\n9dvr",
            "k7q4_m2xp_9dvr",
            "k7q4\u{2013}m2xp\u{2014}9dvr",
            "k-7-q-4-m-2-x-p-9-d-v-r",
        ] {
            assert_eq!(normalize(typed), Some(expected.clone()), "{typed:?}");
        }
        // Letters that look like digits are read as the digit.
        assert_eq!(
            normalize("OIL0-1234-abcd").unwrap().as_str(),
            "01101234abcd"
        );
    }

    #[test]
    fn normalize_refuses_what_cannot_be_a_code() {
        for typed in [
            "",
            "k7q4-m2xp-9dv",
            "k7q4-m2xp-9dvrr",
            "k7q4-m2xp-9dvu",
            "k7q4-m2xp-9dv!",
            "k7q4-m2xp-9dvé",
            "k7q4.m2xp.9dvr",
            "ｋ7q4-m2xp-9dvr",
            &format!("k7q4-m2xp-9dvr{}", " ".repeat(MAX_INPUT_LEN)),
        ] {
            assert_eq!(normalize(typed), None, "{typed:?}");
        }
    }

    #[test]
    fn hashes_match_the_typed_code_only() {
        let key = hash_key();
        let code = BackupCode::generate().unwrap();
        let hash = code.hash(&key);
        let typed = normalize(&code.expose().to_uppercase()).unwrap();
        assert_eq!(hash_input(&typed, &key), hash);
        assert!(key.verify(HASH_DOMAIN, typed.as_str().as_bytes(), &hash));

        let other = BackupCode::generate().unwrap();
        assert_ne!(other.hash(&key), hash);
        assert_ne!(code.hash(&hash_key()), hash, "another key, another hash");
    }

    #[test]
    fn find_match_names_the_matching_code() {
        let key = hash_key();
        let set = BackupCodes::generate().unwrap();
        let hashes = set.hashes(&key);
        for (i, code) in set.as_slice().iter().enumerate() {
            let typed = code.expose().to_uppercase().replace('-', " ");
            assert_eq!(find_match(&key, &typed, &hashes), Some(i));
        }
        let stranger = BackupCode::generate().unwrap();
        assert_eq!(find_match(&key, stranger.expose(), &hashes), None);
        assert_eq!(find_match(&key, "not a code", &hashes), None);
        assert_eq!(find_match(&key, set.as_slice()[0].expose(), &[]), None);
        // A used code whose hash was removed no longer matches.
        let remaining = &hashes[1..];
        assert_eq!(
            find_match(&key, set.as_slice()[0].expose(), remaining),
            None
        );
        assert_eq!(
            find_match(&key, set.as_slice()[1].expose(), remaining),
            Some(0)
        );
    }

    #[test]
    fn debug_and_display_redact() {
        let set = BackupCodes::generate().unwrap();
        let code = &set.as_slice()[0];
        let normalized = normalize(code.expose()).unwrap();
        let shown = format!("{set:?} {code:?} {code} {normalized:?}");
        for c in set.as_slice() {
            assert!(!shown.contains(c.expose()), "{shown}");
        }
        assert!(!shown.contains(normalized.as_str()), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
