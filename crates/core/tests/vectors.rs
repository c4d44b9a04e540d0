//! RFC 4226 and RFC 6238 test vectors, run through one data-driven check.
//!
//! The files in `testdata/` were cross-checked against an independent
//! implementation (oathtool).

use twofold_core::otp::{self, Algorithm, Digits, HotpParams, Period, Skew, TotpParams, Verdict};
use twofold_core::secret::Secret;

/// Data lines of a vector file, split on tabs; `#` lines are comments.
fn rows(text: &'static str) -> impl Iterator<Item = Vec<&'static str>> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split('\t').collect())
}

/// One vector: generation gives `expected`, verification at the same moment
/// returns `step`, and a neighbouring code is not accepted for it.
fn check(secret: &Secret, params: TotpParams, unix_time: u64, expected: &str) {
    assert_eq!(
        otp::totp(secret, unix_time, params),
        expected,
        "t={unix_time}"
    );
    let step = params.step_at(unix_time);
    assert_eq!(
        otp::verify_totp(secret, expected, unix_time, params, Skew::default(), None),
        Verdict::Valid { step },
        "t={unix_time}"
    );
    let far = unix_time + 10 * u64::from(params.period.seconds());
    assert_eq!(
        otp::verify_totp(secret, expected, far, params, Skew::default(), None),
        Verdict::Invalid,
        "t={unix_time} accepted 10 steps later"
    );
}

#[test]
fn rfc6238_vectors() {
    let mut count = 0;
    for row in rows(include_str!("../testdata/rfc6238.tsv")) {
        let [alg, secret, digits, period, time, expected] = row[..] else {
            panic!("bad row {row:?}");
        };
        let params = TotpParams {
            algorithm: alg.parse::<Algorithm>().unwrap(),
            digits: Digits::try_new(digits.parse().unwrap()).unwrap(),
            period: Period::try_new(period.parse().unwrap()).unwrap(),
        };
        let secret = Secret::from_base32(secret).unwrap();
        check(&secret, params, time.parse().unwrap(), expected);
        count += 1;
    }
    assert_eq!(count, 18, "every RFC 6238 vector ran");
}

#[test]
fn rfc4226_vectors() {
    let mut count = 0;
    for row in rows(include_str!("../testdata/rfc4226.tsv")) {
        let [secret, digits, counter, expected] = row[..] else {
            panic!("bad row {row:?}");
        };
        let params = HotpParams {
            algorithm: Algorithm::Sha1,
            digits: Digits::try_new(digits.parse().unwrap()).unwrap(),
        };
        let secret = Secret::from_base32(secret).unwrap();
        let counter: u64 = counter.parse().unwrap();
        assert_eq!(otp::hotp(&secret, counter, params), expected);
        assert_eq!(
            otp::verify_hotp(&secret, expected, counter, 0, params),
            Verdict::Valid { step: counter }
        );
        count += 1;
    }
    assert_eq!(count, 10, "every RFC 4226 vector ran");
}
