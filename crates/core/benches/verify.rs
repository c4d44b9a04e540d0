//! TOTP verification in core, worst case: SHA-1, 6 digits, ±1 window and a wrong
//! code, so every candidate in the window is computed and compared.
//!
//! Run: `cargo bench -p twofold-core --bench verify`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use twofold_core::ids::API_KEY_HASH_DOMAIN;
use twofold_core::otp::{self, Skew, TotpParams, Verdict};
use twofold_core::seal::{Binding, Keyring, MasterKey};
use twofold_core::secret::{Secret, random_token};

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

/// What the data plane does before every TOTP check: open the factor's sealed
/// secret, bound to its tenant, user and factor.
fn open_secret(c: &mut Criterion) {
    let keyring = Keyring::new(MasterKey::generate().expect("a master key"));
    let secret = Secret::from_base32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ").expect("valid secret");
    let binding = Binding {
        tenant: "t_0123456789abcdef",
        user: "u0001234",
        factor: "f_0123456789abcdef",
    };
    let sealed = keyring.seal_secret(&secret, &binding).expect("sealed");
    assert_eq!(
        keyring
            .open_secret(&sealed, &binding)
            .expect("opened")
            .expose(),
        secret.expose()
    );
    c.bench_function("open_sealed_totp_secret", |b| {
        b.iter(|| keyring.open_secret(black_box(&sealed), black_box(&binding)))
    });
    // And before that, the caller's API key is looked up by its keyed hash: a
    // key as the control plane issues them (`tfk_` and 52 characters).
    let key = keyring.hash_key();
    let api_key = random_token("tfk_").expect("a token");
    c.bench_function("hash_api_key", |b| {
        b.iter(|| {
            key.hash(
                black_box(API_KEY_HASH_DOMAIN),
                black_box(api_key.as_bytes()),
            )
        })
    });
}

criterion_group!(benches, verify, open_secret);
criterion_main!(benches);
