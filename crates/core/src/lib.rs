//! Pure core of Twofold, shared by the control plane and the data plane.
//!
//! # Layout
//!
//! - [`otp`]: HOTP (RFC 4226) and TOTP (RFC 6238) generation and verification.
//! - [`secret`]: OTP shared secrets, their generation and base32 form.
//! - [`uri`]: the `otpauth://` Key URI that authenticator apps read, and [`qr`] to draw it.
//! - [`backup`]: single-use backup (recovery) codes and their keyed hashes.
//! - [`seal`]: authenticated encryption of secrets at rest, bound to their owner.
//! - [`ids`]: validated identifiers (tenants, users, factors, keys).
//! - [`throttle`]: the policy for throttling and locking users after failures.
//! - [`feed`]: the records the control plane publishes and data planes apply, and
//!   the digest both compute over them, and the usage events data planes report.
//!
//! # Invariants
//!
//! This crate does no I/O and never reads the clock: every function that depends on
//! time takes it as an argument. The one system call it makes is to the operating
//! system's CSPRNG (through `getrandom`) when it generates secrets, codes and nonces.

pub mod backup;
pub mod feed;
pub mod ids;
pub mod otp;
pub mod qr;
pub mod seal;
pub mod secret;
pub mod throttle;
pub mod uri;
