//! The `otpauth://` Key URI that authenticator apps read from a QR code: building
//! it for enrolment and parsing the ones other systems produce.
//!
//! The format is Google Authenticator's "Key Uri Format":
//! `otpauth://TYPE/ISSUER:ACCOUNT?secret=BASE32&issuer=ISSUER&...`. Building is
//! strict; parsing accepts what apps accept (either case of scheme and type, `:` or
//! `%3A` between issuer and account, missing parameters left at their defaults,
//! unknown parameters ignored) and refuses anything ambiguous, such as a repeated
//! parameter.
//!
//! A rendered URI contains the secret, so it must never be logged. [`KeyUri`]'s
//! `Debug` output redacts the secret.

use std::borrow::Cow;
use std::str::FromStr;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use zeroize::Zeroizing;

use crate::otp::{Algorithm, Digits, HotpParams, MAX_PERIOD, MIN_PERIOD, Period, TotpParams};
use crate::secret::{Secret, SecretError};

/// Longest URI [`KeyUri::parse`] reads, in bytes. Every URI [`KeyUri::to_uri`]
/// renders fits well within it; the bound keeps hostile input cheap.
pub const MAX_URI_LEN: usize = 4096;

/// Longest issuer or account name, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 256;

const SCHEME: &str = "otpauth://";

/// Everything but RFC 3986 unreserved characters is escaped, so a name can carry
/// `:`, `&`, `=`, `%`, `/` or `?` without changing the URI's structure.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a Key URI could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("uri is longer than {MAX_URI_LEN} bytes")]
    TooLong,
    #[error("uri must start with otpauth://")]
    Scheme,
    #[error("otp type must be totp or hotp")]
    Type,
    #[error("uri is not valid percent-encoded utf-8")]
    Encoding,
    #[error("parameter {0} is required")]
    Missing(&'static str),
    #[error("parameter {0} appears more than once")]
    Duplicate(&'static str),
    #[error("issuer {0}")]
    Issuer(NameError),
    #[error("account name {0}")]
    Account(NameError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("algorithm must be SHA1, SHA256 or SHA512")]
    Algorithm,
    #[error("digits must be 6, 7 or 8")]
    Digits,
    #[error("period must be a whole number of seconds from {MIN_PERIOD} to {MAX_PERIOD}")]
    Period,
    #[error("counter must be a whole number from 0 to 2^64 - 1")]
    Counter,
}

/// What is wrong with an issuer or account name. Messages read after the name's
/// role, as in "issuer is empty".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("contains a control character")]
    Control,
    #[error("has leading or trailing whitespace")]
    Whitespace,
    #[error("contains a colon, which apps read as the issuer separator")]
    Colon,
}

/// The kind of factor a Key URI enrols, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Totp(TotpParams),
    /// `counter` is the next counter the app will use.
    Hotp {
        params: HotpParams,
        counter: u64,
    },
}

/// A validated Key URI. Its fields can only be set through [`KeyUri::try_new`] or
/// [`KeyUri::parse`], so every value renders to a URI that parses back to itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUri {
    issuer: Option<String>,
    account: String,
    // `Secret`'s own Debug redacts, which keeps the derived Debug above safe.
    secret: Secret,
    kind: Kind,
}

impl KeyUri {
    /// Validate the parts of a Key URI.
    ///
    /// Names must be 1 to [`MAX_NAME_LEN`] bytes with no control characters and no
    /// surrounding whitespace (apps trim it). The issuer must not contain a colon,
    /// and neither may the account when there is no issuer: apps split the label
    /// at its first colon and would read the part before it as the issuer.
    pub fn try_new(
        issuer: Option<String>,
        account: String,
        secret: Secret,
        kind: Kind,
    ) -> Result<KeyUri, UriError> {
        if let Some(issuer) = &issuer {
            check_name(issuer, false).map_err(UriError::Issuer)?;
        }
        check_name(&account, issuer.is_some()).map_err(UriError::Account)?;
        Ok(KeyUri {
            issuer,
            account,
            secret,
            kind,
        })
    }

    /// Parse a Key URI as authenticator apps do; see the module documentation for
    /// what is accepted.
    pub fn parse(input: &str) -> Result<KeyUri, UriError> {
        if input.len() > MAX_URI_LEN {
            return Err(UriError::TooLong);
        }
        let rest = strip_prefix_ignore_case(input, SCHEME).ok_or(UriError::Scheme)?;
        // A fragment is not part of the key; apps drop it as any URI parser would.
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (otp_type, label) = path.split_once('/').unwrap_or((path, ""));
        let is_totp = if otp_type.eq_ignore_ascii_case("totp") {
            true
        } else if otp_type.eq_ignore_ascii_case("hotp") {
            false
        } else {
            return Err(UriError::Type);
        };

        let label = percent_decode_str(label)
            .decode_utf8()
            .map_err(|_| UriError::Encoding)?;
        let (prefix, account) = match label.split_once(':') {
            Some((prefix, account)) => (Some(prefix.trim()), account.trim()),
            None => (None, label.trim()),
        };

        let params = Params::parse(query)?;
        // Google's format says the prefix and the parameter should match. When they
        // differ, the parameter wins: it is the newer field and the one apps display.
        let issuer = match params.issuer.map(decode_value).transpose()? {
            Some(issuer) if !issuer.trim().is_empty() => Some(issuer.trim().to_owned()),
            _ => prefix
                .filter(|prefix| !prefix.is_empty())
                .map(str::to_owned),
        };

        let secret = {
            let raw = params.secret.ok_or(UriError::Missing("secret"))?;
            let text = Zeroizing::new(decode_value(raw)?);
            Secret::from_base32(&text)?
        };
        let algorithm = match params.algorithm {
            Some(raw) => decode_value(raw)?
                .parse::<Algorithm>()
                .map_err(|_| UriError::Algorithm)?,
            None => Algorithm::default(),
        };
        let digits = match params.digits {
            Some(raw) => decode_value(raw)?
                .parse::<u8>()
                .ok()
                .and_then(|digits| Digits::try_new(digits).ok())
                .ok_or(UriError::Digits)?,
            None => Digits::default(),
        };
        let kind = if is_totp {
            let period = match params.period {
                Some(raw) => decode_value(raw)?
                    .parse::<u32>()
                    .ok()
                    .and_then(|seconds| Period::try_new(seconds).ok())
                    .ok_or(UriError::Period)?,
                None => Period::default(),
            };
            Kind::Totp(TotpParams {
                algorithm,
                digits,
                period,
            })
        } else {
            let raw = params.counter.ok_or(UriError::Missing("counter"))?;
            let counter = decode_value(raw)?
                .parse::<u64>()
                .map_err(|_| UriError::Counter)?;
            Kind::Hotp {
                params: HotpParams { algorithm, digits },
                counter,
            }
        };

        KeyUri::try_new(issuer, account.to_owned(), secret, kind)
    }

    /// Render the URI, for example
    /// `otpauth://totp/ACME%20Co:alice%40example.com?secret=...&issuer=ACME%20Co&algorithm=SHA1&digits=6&period=30`.
    ///
    /// The result contains the secret: show it to the enrolling user (usually as a
    /// QR code) and never log it.
    pub fn to_uri(&self) -> String {
        let account = utf8_percent_encode(&self.account, ESCAPED);
        let (label, issuer_param) = match &self.issuer {
            Some(issuer) => {
                let issuer = utf8_percent_encode(issuer, ESCAPED);
                (format!("{issuer}:{account}"), format!("&issuer={issuer}"))
            }
            None => (account.to_string(), String::new()),
        };
        let (otp_type, algorithm, digits, last_param) = match self.kind {
            Kind::Totp(params) => (
                "totp",
                params.algorithm,
                params.digits,
                format!("period={}", params.period.seconds()),
            ),
            Kind::Hotp { params, counter } => (
                "hotp",
                params.algorithm,
                params.digits,
                format!("counter={counter}"),
            ),
        };
        format!(
            "{SCHEME}{otp_type}/{label}?secret={secret}{issuer_param}\
             &algorithm={algorithm}&digits={digits}&{last_param}",
            secret = self.secret.to_base32(),
            digits = digits.get(),
        )
    }

    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
}

impl FromStr for KeyUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyUri::parse(s)
    }
}

/// The raw (still encoded) values of the parameters Twofold reads.
#[derive(Default)]
struct Params<'a> {
    secret: Option<&'a str>,
    issuer: Option<&'a str>,
    algorithm: Option<&'a str>,
    digits: Option<&'a str>,
    period: Option<&'a str>,
    counter: Option<&'a str>,
}

impl<'a> Params<'a> {
    fn parse(query: &'a str) -> Result<Params<'a>, UriError> {
        let mut params = Params::default();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            // Names are matched without regard to case, so a `Secret=` after a
            // `secret=` is a repeat, refused like any other.
            let (slot, name) = match name.to_ascii_lowercase().as_str() {
                "secret" => (&mut params.secret, "secret"),
                "issuer" => (&mut params.issuer, "issuer"),
                "algorithm" => (&mut params.algorithm, "algorithm"),
                "digits" => (&mut params.digits, "digits"),
                "period" => (&mut params.period, "period"),
                "counter" => (&mut params.counter, "counter"),
                // Apps add their own (`image`, `color`, ...); none changes the key.
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(UriError::Duplicate(name));
            }
        }
        Ok(params)
    }
}

/// Decode a query value. Generators that use form encoding (PHP's `urlencode`,
/// for one) write a space as `+`, and apps read it back as a space; a literal plus
/// arrives as `%2B`.
fn decode_value(raw: &str) -> Result<String, UriError> {
    let spaced = if raw.contains('+') {
        raw.replace('+', " ").into()
    } else {
        Cow::Borrowed(raw)
    };
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| UriError::Encoding)
}

fn check_name(name: &str, colon_allowed: bool) -> Result<(), NameError> {
    if name.is_empty() {
        Err(NameError::Empty)
    } else if name.len() > MAX_NAME_LEN {
        Err(NameError::TooLong)
    } else if name.chars().any(char::is_control) {
        Err(NameError::Control)
    } else if name.trim() != name {
        Err(NameError::Whitespace)
    } else if !colon_allowed && name.contains(':') {
        Err(NameError::Colon)
    } else {
        Ok(())
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 160 bits: the example secrets in Google's documentation are only 80 bits,
    /// which Twofold refuses.
    const SECRET: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

    fn secret() -> Secret {
        Secret::from_base32(SECRET).unwrap()
    }

    fn totp(issuer: Option<&str>, account: &str) -> KeyUri {
        KeyUri::try_new(
            issuer.map(str::to_owned),
            account.to_owned(),
            secret(),
            Kind::Totp(TotpParams::default()),
        )
        .unwrap()
    }

    #[test]
    fn builds_the_documented_form() {
        assert_eq!(
            totp(Some("ACME Co"), "alice@example.com").to_uri(),
            format!(
                "otpauth://totp/ACME%20Co:alice%40example.com?secret={SECRET}\
                 &issuer=ACME%20Co&algorithm=SHA1&digits=6&period=30"
            )
        );
        assert_eq!(
            totp(None, "alice").to_uri(),
            format!("otpauth://totp/alice?secret={SECRET}&algorithm=SHA1&digits=6&period=30")
        );
        let hotp = KeyUri::try_new(
            None,
            "bob".to_owned(),
            secret(),
            Kind::Hotp {
                params: HotpParams {
                    algorithm: Algorithm::Sha512,
                    digits: Digits::try_new(8).unwrap(),
                },
                counter: 42,
            },
        )
        .unwrap();
        assert_eq!(
            hotp.to_uri(),
            format!("otpauth://hotp/bob?secret={SECRET}&algorithm=SHA512&digits=8&counter=42")
        );
    }

    #[test]
    fn structural_characters_in_names_are_escaped() {
        let uri = totp(Some("a&b=c/d?e%f"), "x:y #z").to_uri();
        assert!(
            uri.starts_with("otpauth://totp/a%26b%3Dc%2Fd%3Fe%25f:x%3Ay%20%23z?"),
            "{uri}"
        );
        assert_eq!(
            KeyUri::parse(&uri).unwrap(),
            totp(Some("a&b=c/d?e%f"), "x:y #z")
        );
    }

    #[test]
    fn googles_example_parses_but_for_its_short_secret() {
        // Google's example as published: well-formed, but its secret is 80 bits.
        assert_eq!(
            KeyUri::parse(
                "otpauth://totp/Example:alice@google.com?secret=JBSWY3DPEHPK3PXP&issuer=Example"
            ),
            Err(UriError::Secret(SecretError::TooShort(80)))
        );
        let uri = format!("otpauth://totp/Example:alice@google.com?secret={SECRET}&issuer=Example");
        assert_eq!(
            KeyUri::parse(&uri).unwrap(),
            totp(Some("Example"), "alice@google.com")
        );
    }

    #[test]
    fn parses_what_apps_accept() {
        let acme = totp(Some("ACME Co"), "john.doe@email.com");
        for uri in [
            // Google's second example: encoded separator, secret in lower case.
            "otpauth://totp/ACME%20Co%3Ajohn.doe@email.com?secret=jbswy3dpehpk3pxpjbswy3dpehpk3pxp&issuer=ACME%20Co&algorithm=SHA1&digits=6&period=30",
            "OTPAUTH://TOTP/ACME%20Co:john.doe@email.com?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP",
            "otpauth://totp/ACME Co: john.doe@email.com?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP",
            "otpauth://totp/john.doe@email.com?issuer=ACME+Co&secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP",
            "otpauth://totp/Old%20Name:john.doe@email.com?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&issuer=ACME%20Co",
            "otpauth://totp/ACME%20Co:john.doe@email.com?image=https%3A%2F%2Fx.example%2Fa.png&secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&&issuer=&algorithm=sha1#frag",
        ] {
            assert_eq!(KeyUri::parse(uri).as_ref(), Ok(&acme), "{uri}");
        }
        let parsed: KeyUri =
            "otpauth://hotp/ACME:bob?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&counter=7&digits=7&algorithm=SHA256"
                .parse()
                .unwrap();
        assert_eq!(parsed.issuer(), Some("ACME"));
        assert_eq!(parsed.account(), "bob");
        assert_eq!(
            parsed.kind(),
            Kind::Hotp {
                params: HotpParams {
                    algorithm: Algorithm::Sha256,
                    digits: Digits::try_new(7).unwrap()
                },
                counter: 7
            }
        );
    }

    #[test]
    fn refuses_malformed_uris() {
        let s = SECRET;
        let check = |uri: &str, expected: UriError| {
            assert_eq!(KeyUri::parse(uri), Err(expected), "{uri}");
        };
        check(
            &format!("otpauth://totp/a?secret={s}{}", "x".repeat(MAX_URI_LEN)),
            UriError::TooLong,
        );
        check(&format!("https://totp/a?secret={s}"), UriError::Scheme);
        check("", UriError::Scheme);
        check("otpauth:/", UriError::Scheme);
        check(&format!("otpauth://motp/a?secret={s}"), UriError::Type);
        check(
            &format!("otpauth://totp?secret={s}"),
            UriError::Account(NameError::Empty),
        );
        check(
            &format!("otpauth://totp/Issuer:?secret={s}"),
            UriError::Account(NameError::Empty),
        );
        check(
            &format!("otpauth://totp/a%0Ab?secret={s}"),
            UriError::Account(NameError::Control),
        );
        check(
            &format!("otpauth://totp/a%FF?secret={s}"),
            UriError::Encoding,
        );
        check("otpauth://totp/a", UriError::Missing("secret"));
        check(
            &format!("otpauth://hotp/a?secret={s}"),
            UriError::Missing("counter"),
        );
        check(
            &format!("otpauth://totp/a?secret={s}&secret={s}"),
            UriError::Duplicate("secret"),
        );
        check(
            &format!("otpauth://totp/a?secret={s}&Secret={s}"),
            UriError::Duplicate("secret"),
        );
        check(
            &format!("otpauth://totp/a?secret={s}&issuer=x&issuer=x"),
            UriError::Duplicate("issuer"),
        );
        check(
            &format!("otpauth://totp/a?secret={s}&digits=6&digits=6"),
            UriError::Duplicate("digits"),
        );
        check(
            "otpauth://totp/a?secret=JBSWY3DP!",
            UriError::Secret(SecretError::Base32),
        );
        check(
            "otpauth://totp/a?secret=",
            UriError::Secret(SecretError::TooShort(0)),
        );
        check(
            &format!("otpauth://totp/a?secret={s}&algorithm=MD5"),
            UriError::Algorithm,
        );
        check(
            &format!("otpauth://totp/a?secret={s}&digits=10"),
            UriError::Digits,
        );
        check(
            &format!("otpauth://totp/a?secret={s}&digits=six"),
            UriError::Digits,
        );
        check(
            &format!("otpauth://totp/a?secret={s}&period=0"),
            UriError::Period,
        );
        check(
            &format!("otpauth://totp/a?secret={s}&period=-30"),
            UriError::Period,
        );
        check(
            &format!("otpauth://hotp/a?secret={s}&counter=-1"),
            UriError::Counter,
        );
        check(
            &format!("otpauth://hotp/a?secret={s}&counter=18446744073709551616"),
            UriError::Counter,
        );
    }

    #[test]
    fn names_are_validated() {
        let build = |issuer: Option<&str>, account: &str| {
            KeyUri::try_new(
                issuer.map(str::to_owned),
                account.to_owned(),
                secret(),
                Kind::Totp(TotpParams::default()),
            )
        };
        assert_eq!(build(None, ""), Err(UriError::Account(NameError::Empty)));
        assert_eq!(
            build(Some(""), "a"),
            Err(UriError::Issuer(NameError::Empty))
        );
        assert_eq!(
            build(None, &"a".repeat(MAX_NAME_LEN + 1)),
            Err(UriError::Account(NameError::TooLong))
        );
        assert_eq!(
            build(Some("a\u{7}"), "a"),
            Err(UriError::Issuer(NameError::Control))
        );
        assert_eq!(
            build(None, " a"),
            Err(UriError::Account(NameError::Whitespace))
        );
        assert_eq!(
            build(Some("a:b"), "c"),
            Err(UriError::Issuer(NameError::Colon))
        );
        assert_eq!(build(None, "a:b"), Err(UriError::Account(NameError::Colon)));
        assert!(build(Some("a"), "b:c").is_ok());
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let shown = format!("{:?}", totp(Some("ACME"), "alice"));
        assert!(!shown.contains("JBSW"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn error_messages_read_as_sentences() {
        assert_eq!(
            UriError::Issuer(NameError::Empty).to_string(),
            "issuer is empty"
        );
        assert_eq!(
            UriError::Secret(SecretError::Base32).to_string(),
            "secret is not valid base32"
        );
    }
}
