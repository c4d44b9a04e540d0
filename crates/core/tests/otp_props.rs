//! Property tests of the OTP engine: skew windows and base32 round trips.

use proptest::prelude::*;
use twofold_core::otp::{self, Algorithm, Digits, Period, Skew, TotpParams, Verdict};
use twofold_core::secret::Secret;

fn params() -> impl Strategy<Value = TotpParams> {
    (
        prop_oneof![
            Just(Algorithm::Sha1),
            Just(Algorithm::Sha256),
            Just(Algorithm::Sha512)
        ],
        6u8..=8,
        15u32..=300,
    )
        .prop_map(|(algorithm, digits, period)| TotpParams {
            algorithm,
            digits: Digits::try_new(digits).expect("digits in range"),
            period: Period::try_new(period).expect("period in range"),
        })
}

fn secret() -> impl Strategy<Value = Secret> {
    proptest::collection::vec(any::<u8>(), 16..=64)
        .prop_map(|bytes| Secret::from_bytes(&bytes).expect("length in range"))
}

proptest! {
    /// A code generated at `t` verifies at `t + k` steps exactly when `k` lies
    /// inside the window, and always returns the step it was generated for.
    #[test]
    fn verify_accepts_inside_the_window_only(
        secret in secret(),
        params in params(),
        t in 400u64..4_000_000_000,
        behind in 0u8..=3,
        ahead in 0u8..=3,
        offset in -6i64..=6,
    ) {
        let code = otp::totp(&secret, t, params);
        let period = u64::from(params.period.seconds());
        let now = t.checked_add_signed(offset * period as i64).expect("in range");
        let skew = Skew::try_new(behind, ahead).expect("skew in range");
        let verdict = otp::verify_totp(&secret, &code, now, params, skew, None);
        // The code was made for step(t); at `now` that step is `offset` steps away.
        let inside = (-i64::from(ahead)..=i64::from(behind)).contains(&offset);
        let step = params.step_at(t);
        if inside {
            prop_assert_eq!(verdict, Verdict::Valid { step });
        } else if let Verdict::Valid { step: other } = verdict {
            // Only a chance collision with another step's code may match.
            prop_assert_ne!(other, step);
        } else {
            prop_assert_eq!(verdict, Verdict::Invalid);
        }
    }

    /// A step already used is never accepted again, whatever the time.
    #[test]
    fn used_steps_are_never_accepted_again(
        secret in secret(),
        params in params(),
        t in 400u64..4_000_000_000,
        later in 0i64..=2,
    ) {
        let code = otp::totp(&secret, t, params);
        let step = params.step_at(t);
        let now = t + later as u64 * u64::from(params.period.seconds());
        let verdict = otp::verify_totp(&secret, &code, now, params, Skew::default(), Some(step));
        prop_assert_ne!(verdict, Verdict::Valid { step });
        if let Verdict::Valid { step: other } = verdict {
            prop_assert!(other > step);
        }
    }

    /// Spaces typed anywhere in a code do not change the verdict.
    #[test]
    fn spaces_in_codes_are_ignored(
        secret in secret(),
        t in 400u64..4_000_000_000,
        split in 0usize..=6,
    ) {
        let params = TotpParams::default();
        let code = otp::totp(&secret, t, params);
        let spaced = format!("  {} {} ", &code[..split], &code[split..]);
        prop_assert_eq!(
            otp::verify_totp(&secret, &spaced, t, params, Skew::default(), None),
            Verdict::Valid { step: params.step_at(t) }
        );
    }

    #[test]
    fn base32_round_trips(secret in secret(), lower in any::<bool>(), spaces in any::<bool>()) {
        let mut text = secret.to_base32();
        if lower {
            text = text.to_ascii_lowercase();
        }
        if spaces {
            text = text
                .as_bytes()
                .chunks(4)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
                .join(" ");
        }
        prop_assert_eq!(Secret::from_base32(&text).expect("round trip"), secret);
    }

    /// Arbitrary text never panics the base32 importer.
    #[test]
    fn base32_never_panics(text in ".{0,200}") {
        let _ = Secret::from_base32(&text);
    }
}
