//! TOTP verification in core, worst case: SHA-1, 6 digits, ±1 window and a wrong
//! code, so every candidate in the window is computed and compared.
//!
//! Run: `cargo bench -p twofold-core --bench verify`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use twofold_core::otp::{self, Skew, TotpParams, Verdict};
use twofold_core::secret::Secret;

fn verify(c: &mut Criterion) {
    let params = TotpParams::default();
    let secret = Secret::from_base32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ").expect("valid secret");
    let now = 1_700_000_000;
    // A code from far outside the window is well-formed but wrong.
    let wrong = otp::totp(&secret, now + 3600, params);
    assert_eq!(
        otp::verify_totp(&secret, &wrong, now, params, Skew::default(), None),
        Verdict::Invalid
    );
    let right = otp::totp(&secret, now, params);

    c.bench_function("totp_verify_sha1_6d_skew1_wrong_code", |b| {
        b.iter(|| {
            otp::verify_totp(
                black_box(&secret),
                black_box(&wrong),
                black_box(now),
                params,
                Skew::default(),
                None,
            )
        })
    });
    c.bench_function("totp_verify_sha1_6d_skew1_right_code", |b| {
        b.iter(|| {
            otp::verify_totp(
                black_box(&secret),
                black_box(&right),
                black_box(now),
                params,
                Skew::default(),
                None,
            )
        })
    });
    c.bench_function("totp_verify_malformed_code", |b| {
        b.iter(|| {
            otp::verify_totp(
                black_box(&secret),
                black_box("12a456"),
                black_box(now),
                params,
                Skew::default(),
                None,
            )
        })
    });
}

criterion_group!(benches, verify);
criterion_main!(benches);
