//! Property tests of the `otpauth://` Key URI: whatever Twofold builds, it (and so
//! an app following the same format) parses back unchanged.

use proptest::prelude::*;
use twofold_core::otp::{Algorithm, Digits, HotpParams, Period, TotpParams};
use twofold_core::secret::Secret;
use twofold_core::uri::{KeyUri, Kind, NameError, UriError};

/// Characters that mean something in a URI or to a form decoder, so escaping is
/// exercised far more often than arbitrary `char`s alone would.
const AWKWARD: &[char] = &[
    ':', '&', '=', '%', '/', '?', '#', '+', ' ', '@', '.', '~', '\'', '"', 'é', 'ß', '名', '🔑',
];

/// A name that [`KeyUri::try_new`] accepts: no control characters or surrounding
/// whitespace, and a colon only where `colon` allows it.
fn name(colon: bool) -> impl Strategy<Value = String> {
    let one = prop_oneof![
        proptest::sample::select(AWKWARD),
        // Mapped rather than filtered: control characters are common enough in
        // `any::<char>()` that filtering them exhausts proptest's reject budget.
        any::<char>().prop_map(|c| if c.is_control() { '\u{fffd}' } else { c }),
    ];
    proptest::collection::vec(one, 1..40)
        .prop_map(move |chars| {
            let text: String = chars.into_iter().filter(|c| colon || *c != ':').collect();
            text.trim().to_owned()
        })
        .prop_filter("non-empty", |text| !text.is_empty())
}

fn issuer_and_account() -> impl Strategy<Value = (Option<String>, String)> {
    prop_oneof![
        name(false).prop_map(|account| (None, account)),
        (name(false), name(true)).prop_map(|(issuer, account)| (Some(issuer), account)),
    ]
}

fn algorithm() -> impl Strategy<Value = Algorithm> {
    prop_oneof![
        Just(Algorithm::Sha1),
        Just(Algorithm::Sha256),
        Just(Algorithm::Sha512)
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    let digits = (6u8..=8).prop_map(|d| Digits::try_new(d).expect("digits in range"));
    prop_oneof![
        (algorithm(), digits.clone(), 15u32..=300).prop_map(|(algorithm, digits, period)| {
            Kind::Totp(TotpParams {
                algorithm,
                digits,
                period: Period::try_new(period).expect("period in range"),
            })
        }),
        (algorithm(), digits, any::<u64>()).prop_map(|(algorithm, digits, counter)| {
            Kind::Hotp {
                params: HotpParams { algorithm, digits },
                counter,
            }
        }),
    ]
}

fn secret() -> impl Strategy<Value = Secret> {
    proptest::collection::vec(any::<u8>(), 16..=128)
        .prop_map(|bytes| Secret::from_bytes(&bytes).expect("length in range"))
}

fn key_uri() -> impl Strategy<Value = KeyUri> {
    (issuer_and_account(), secret(), kind()).prop_map(|((issuer, account), secret, kind)| {
        KeyUri::try_new(issuer, account, secret, kind).expect("strategy yields valid parts")
    })
}

proptest! {
    #[test]
    fn built_uris_parse_back_unchanged(key in key_uri()) {
        let uri = key.to_uri();
        prop_assert_eq!(KeyUri::parse(&uri), Ok(key.clone()), "{}", uri);
    }

    /// The label's structure survives any name: exactly one literal colon (with an
    /// issuer) or none, and no raw `?`, `&`, `#` or space anywhere.
    #[test]
    fn names_never_leak_structure(key in key_uri()) {
        let uri = key.to_uri();
        let label = uri
            .strip_prefix("otpauth://")
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(_, rest)| rest.split_once('?'))
            .map(|(label, _)| label)
            .expect("scheme, type and query are present");
        let colons = usize::from(key.issuer().is_some());
        prop_assert_eq!(label.matches(':').count(), colons, "{}", uri);
        prop_assert!(!uri.contains(['#', ' ']), "{}", uri);
        prop_assert_eq!(uri.matches('?').count(), 1, "{}", uri);
    }

    #[test]
    fn an_issuer_with_a_colon_is_refused(
        before in name(false),
        after in name(false),
        account in name(true),
        secret in secret(),
        kind in kind(),
    ) {
        prop_assert_eq!(
            KeyUri::try_new(Some(format!("{before}:{after}")), account, secret, kind),
            Err(UriError::Issuer(NameError::Colon))
        );
    }

    #[test]
    fn parse_never_panics(input in any::<String>()) {
        let _ = KeyUri::parse(&input);
        let _ = KeyUri::parse(&format!("otpauth://totp/{input}"));
    }
}
