//! Property tests of backup-code normalisation: however a code is re-typed, it
//! reads back as itself and matches its hash, and no input makes the reader panic.

use proptest::prelude::*;
use twofold_core::backup::{self, ALPHABET, BackupCode, CODE_LEN, HASH_DOMAIN};
use twofold_core::seal::{HashKey, MasterKey};

/// Any code's 12 symbols, drawn by proptest so that failures shrink and replay.
fn symbols() -> impl Strategy<Value = String> {
    proptest::collection::vec(0usize..ALPHABET.len(), CODE_LEN)
        .prop_map(|picks| picks.into_iter().map(|i| char::from(ALPHABET[i])).collect())
}

/// How to re-type a code: the case of each symbol, and the run of spaces, dashes
/// and tabs before, between and after the symbols.
fn typing() -> impl Strategy<Value = (Vec<bool>, Vec<String>)> {
    (
        proptest::collection::vec(any::<bool>(), CODE_LEN),
        proptest::collection::vec("[ \\-\t]{0,3}", CODE_LEN + 1),
    )
}

fn hash_key() -> HashKey {
    HashKey::derive(&MasterKey::from_bytes(&[7; 32]).expect("a 32-byte key"))
}

/// Re-type `code` as a careless person would. Dashes already in `code` are
/// dropped; `gaps` supplies the separators.
fn retype(code: &str, (upper, gaps): &(Vec<bool>, Vec<String>)) -> String {
    let mut out = gaps[0].clone();
    for (i, c) in code.chars().filter(|c| *c != '-').enumerate() {
        out.push(if upper[i] { c.to_ascii_uppercase() } else { c });
        out.push_str(&gaps[i + 1]);
    }
    out
}

fn is_symbols(text: &str) -> bool {
    text.len() == CODE_LEN && text.bytes().all(|b| ALPHABET.contains(&b))
}

proptest! {
    #[test]
    fn retyped_symbols_normalise_to_themselves(symbols in symbols(), typing in typing()) {
        let typed = retype(&symbols, &typing);
        let normalized = backup::normalize(&typed);
        prop_assert_eq!(normalized.as_ref().map(|n| n.as_str()), Some(symbols.as_str()), "{:?}", typed);
        let key = hash_key();
        let normalized = normalized.expect("checked above");
        prop_assert_eq!(
            backup::hash_input(&normalized, &key),
            key.hash(HASH_DOMAIN, symbols.as_bytes())
        );
    }

    /// Codes come only from the OS CSPRNG, so each case draws a real one; the
    /// re-typing is what proptest varies and shrinks.
    #[test]
    fn retyped_generated_codes_match_their_hash(typing in typing()) {
        let key = hash_key();
        let code = BackupCode::generate().expect("the OS CSPRNG works");
        let typed = retype(code.expose(), &typing);
        let canonical = backup::normalize(code.expose()).expect("a generated code normalises");
        prop_assert_eq!(backup::normalize(&typed), Some(canonical.clone()), "{:?}", typed);
        prop_assert_eq!(backup::hash_input(&canonical, &key), code.hash(&key));
        let other = BackupCode::generate().expect("the OS CSPRNG works");
        let stored = [other.hash(&key), code.hash(&key)];
        prop_assert_eq!(backup::find_match(&key, &typed, &stored), Some(1));
    }

    #[test]
    fn any_string_normalises_to_nothing_or_twelve_symbols(input in any::<String>()) {
        if let Some(code) = backup::normalize(&input) {
            prop_assert!(is_symbols(code.as_str()), "{:?}", input);
        }
    }

    /// Strings close to codes reach the interesting branches far more often than
    /// arbitrary Unicode does.
    #[test]
    fn near_codes_normalise_to_nothing_or_twelve_symbols(
        input in "[0-9a-zA-Z \\-_\u{2013}\u{00e9}!.]{0,40}",
    ) {
        if let Some(code) = backup::normalize(&input) {
            prop_assert!(is_symbols(code.as_str()), "{:?}", input);
        }
    }
}
