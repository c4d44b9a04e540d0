//! Sealing secrets at rest: authenticated encryption bound to the secret's owner,
//! and the keyed hash used for backup codes and API keys.
//!
//! A [`Keyring`] is built from one or more [`MasterKey`]s read from a key file.
//! From each master key it derives (HKDF-SHA256) a sealing key; from the primary
//! one it also derives the [`HashKey`]. Master keys themselves are not kept.
//!
//! A [`Sealed`] blob is `version (1) | key id (4, big endian) | nonce (24) |
//! ciphertext and tag`, encrypted with XChaCha20-Poly1305. The associated data
//! binds it to its owner ([`Binding`]) and to its own header, so a blob copied
//! into another row, or given another header, fails to open.

use std::fmt;

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};
use data_encoding::BASE64;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::secret::{Secret, SecretError, fill_random};

/// Length of a master key in bytes.
pub const MASTER_KEY_LEN: usize = 32;

/// Largest plaintext [`Keyring::seal`] accepts. Sealed values are OTP secrets and
/// similar small records; the bound keeps a mistake from sealing a whole file.
pub const MAX_PLAINTEXT_LEN: usize = 64 * 1024;

/// The current blob format. A new version would change the layout or algorithm.
const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 4;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// A blob sealing an empty plaintext: header, nonce and tag.
const MIN_SEALED_LEN: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

/// Base64 of 32 bytes is 44 characters; anything much longer is not a key file.
const MAX_KEY_TEXT_LEN: usize = 64;

const KEY_ID_LABEL: &[u8] = b"twofold/key-id/v1";
const SEAL_INFO: &[u8] = b"twofold/seal/v1";
const HASH_INFO: &[u8] = b"twofold/hash/v1";
/// Leads the associated data so a blob's tag cannot be valid in any other
/// protocol that happens to share a key.
const AAD_CONTEXT: &[u8] = b"twofold sealed secret v1";

/// Why a key could not be read, or a secret could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("master key must be {MASTER_KEY_LEN} bytes, written in base64")]
    KeyFormat,
    #[error("no key with id {0} in the keyring")]
    UnknownKey(KeyId),
    #[error("sealed blob is malformed")]
    Malformed,
    #[error("sealed blob has unsupported version {0}")]
    Version(u8),
    /// Wrong key, wrong owner, or a blob that was altered. These are not told
    /// apart, by design.
    #[error("sealed blob failed authentication")]
    Authentication,
    #[error("plaintext is longer than {MAX_PLAINTEXT_LEN} bytes")]
    TooLong,
    #[error("opened bytes are not a valid secret: {0}")]
    Secret(SecretError),
    #[error("the operating system's random number generator failed")]
    Rng,
}

/// A 256-bit root key, as kept in the key file. Only used to derive sub-keys.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; MASTER_KEY_LEN]);

impl MasterKey {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Result<MasterKey, SealError> {
        let mut key = MasterKey([0; MASTER_KEY_LEN]);
        fill_random(&mut key.0).map_err(|_| SealError::Rng)?;
        Ok(key)
    }

    /// Import raw key bytes, which must be exactly 32 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<MasterKey, SealError> {
        let mut key = MasterKey([0; MASTER_KEY_LEN]);
        if bytes.len() != MASTER_KEY_LEN {
            return Err(SealError::KeyFormat);
        }
        key.0.copy_from_slice(bytes);
        Ok(key)
    }

    /// The key file form: standard base64 with padding, no newline.
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(BASE64.encode(&self.0))
    }

    /// Read the key file form. Surrounding whitespace (such as the newline an
    /// editor adds) is ignored.
    pub fn from_text(text: &str) -> Result<MasterKey, SealError> {
        let text = text.trim();
        if text.len() > MAX_KEY_TEXT_LEN {
            return Err(SealError::KeyFormat);
        }
        let bytes = Zeroizing::new(
            BASE64
                .decode(text.as_bytes())
                .map_err(|_| SealError::KeyFormat)?,
        );
        MasterKey::from_bytes(&bytes)
    }

    /// The stable id of this key, written into every blob it seals.
    pub fn id(&self) -> KeyId {
        let mut mac = hmac_sha256(&self.0);
        mac.update(KEY_ID_LABEL);
        let tag: [u8; 32] = mac.finalize().into_bytes().into();
        KeyId(u32::from_be_bytes([tag[0], tag[1], tag[2], tag[3]]))
    }

    fn derive(&self, info: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut okm = Zeroizing::new([0u8; 32]);
        // Expanding 32 bytes from SHA-256 is far below HKDF's 255-block limit,
        // so this cannot fail.
        let _ = Hkdf::<Sha256>::new(None, &self.0).expand(info, okm.as_mut_slice());
        okm
    }
}

impl PartialEq for MasterKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for MasterKey {}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(id {}, <redacted>)", self.id())
    }
}

impl fmt::Display for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Names a master key inside sealed blobs: the first four bytes of an HMAC of
/// the key, so it is stable, needs no storage of its own and reveals nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(u32);

impl KeyId {
    pub fn get(self) -> u32 {
        self.0
    }
}

impl From<u32> for KeyId {
    fn from(id: u32) -> Self {
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// The key of the keyed hash that stores backup codes and API keys.
///
/// A fast HMAC, not a password hash, is the right tool here: backup codes carry
/// 60 bits and API keys at least 128 bits of entropy from the CSPRNG, so a
/// stolen hash cannot be brute-forced, and without this key it cannot even be
/// tried. A slow hash would only make every verification expensive.
#[derive(Clone)]
pub struct HashKey {
    /// HMAC-SHA256 with the key's inner and outer pads already absorbed, so a
    /// hash, which clones it, costs two compressions fewer: every verification
    /// hashes its API key. Only these states are kept, not the key; they are
    /// key material all the same, and zeroize themselves on drop.
    keyed: Hmac<Sha256>,
}

impl HashKey {
    /// Derive the hash key of a master key. [`Keyring::new`] does this for its
    /// primary key.
    pub fn derive(master: &MasterKey) -> HashKey {
        HashKey {
            keyed: hmac_sha256(&master.derive(HASH_INFO)),
        }
    }

    /// HMAC-SHA256 of `input` in `domain`. The domain is length-prefixed, so no
    /// (domain, input) pair can collide with another.
    pub fn hash(&self, domain: &str, input: &[u8]) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(&(domain.len() as u64).to_be_bytes());
        mac.update(domain.as_bytes());
        mac.update(input);
        mac.finalize().into_bytes().into()
    }

    /// Whether `input` hashes to `expected` in `domain`, compared in constant time.
    pub fn verify(&self, domain: &str, input: &[u8], expected: &[u8; 32]) -> bool {
        self.hash(domain, input).ct_eq(expected).into()
    }
}

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey(<redacted>)")
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The owner a sealed blob belongs to. Opening with any other owner fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding<'a> {
    pub tenant: &'a str,
    pub user: &'a str,
    pub factor: &'a str,
}

impl Binding<'_> {
    /// The associated data: context, owner, then the blob header. Every field is
    /// length-prefixed so ("ab", "c") and ("a", "bc") differ.
    fn aad(&self, header: &[u8; HEADER_LEN]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(
            AAD_CONTEXT.len() + 24 + self.tenant.len() + self.user.len() + self.factor.len() + 5,
        );
        aad.extend_from_slice(AAD_CONTEXT);
        for field in [self.tenant, self.user, self.factor] {
            aad.extend_from_slice(&(field.len() as u64).to_be_bytes());
            aad.extend_from_slice(field.as_bytes());
        }
        aad.extend_from_slice(header);
        aad
    }
}

/// A sealed secret, as stored: see the [module documentation](self) for the
/// layout. It carries no key material, but `Debug` still shows only its size and
/// key id.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed(Vec<u8>);

impl Sealed {
    /// Read a stored blob, checking its length and version. Whether it is
    /// authentic is only known when it is opened.
    pub fn from_bytes(bytes: &[u8]) -> Result<Sealed, SealError> {
        if bytes.len() < MIN_SEALED_LEN {
            return Err(SealError::Malformed);
        }
        if bytes[0] != VERSION {
            return Err(SealError::Version(bytes[0]));
        }
        Ok(Sealed(bytes.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The id of the master key that sealed this blob.
    pub fn key_id(&self) -> KeyId {
        KeyId(u32::from_be_bytes([
            self.0[1], self.0[2], self.0[3], self.0[4],
        ]))
    }

    fn header(&self) -> [u8; HEADER_LEN] {
        [self.0[0], self.0[1], self.0[2], self.0[3], self.0[4]]
    }
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &format_args!("{}", self.key_id()))
            .field("len", &self.0.len())
            .finish()
    }
}

/// The sealing key derived from one master key.
#[derive(Clone)]
struct SealKey {
    id: KeyId,
    key: Zeroizing<[u8; 32]>,
}

impl SealKey {
    fn derive(master: &MasterKey) -> SealKey {
        SealKey {
            id: master.id(),
            key: master.derive(SEAL_INFO),
        }
    }

    fn same_as(&self, other: &SealKey) -> bool {
        self.id == other.id && bool::from(self.key.ct_eq(&*other.key))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&*self.key).into())
    }
}

/// The keys a plane seals, opens and hashes with.
///
/// One key is *active* and seals everything new; *retired* keys only open blobs
/// sealed before a rotation.
///
/// The [`HashKey`] always comes from the *primary* key, the one given to
/// [`Keyring::new`], even after [`Keyring::with_active`] makes another key
/// active. Rotation re-seals secrets under the new active key, but backup-code
/// and API-key hashes cannot be recomputed without their inputs, so changing the
/// hash key would break them all. Rotating the hash key, if ever needed, is a
/// separate, later piece of work; until then the primary key stays in the key
/// file for as long as any hash made with it is in use.
#[derive(Clone)]
pub struct Keyring {
    /// The active key first, then retired keys in the order they were added.
    seal_keys: Vec<SealKey>,
    hash_key: HashKey,
    /// The id of the key the hash key comes from.
    primary: KeyId,
}

impl Keyring {
    /// A keyring whose primary key `primary` gives the hash key and is active
    /// until [`Keyring::with_active`] names another.
    pub fn new(primary: MasterKey) -> Keyring {
        Keyring {
            seal_keys: vec![SealKey::derive(&primary)],
            hash_key: HashKey::derive(&primary),
            primary: primary.id(),
        }
    }

    /// Add a key that only opens existing blobs. Adding a key already in the
    /// keyring changes nothing.
    pub fn with_retired(mut self, retired: MasterKey) -> Keyring {
        let key = SealKey::derive(&retired);
        if !self.seal_keys.iter().any(|k| k.same_as(&key)) {
            self.seal_keys.push(key);
        }
        self
    }

    /// Make `active` the key that seals from now on. The key it replaces is kept
    /// to open older blobs, and the hash key does not change.
    pub fn with_active(mut self, active: MasterKey) -> Keyring {
        let key = SealKey::derive(&active);
        self.seal_keys.retain(|k| !k.same_as(&key));
        self.seal_keys.insert(0, key);
        self
    }

    /// The id new blobs are sealed under.
    pub fn active_id(&self) -> KeyId {
        self.seal_keys[0].id
    }

    /// The id of the primary key, the one the hash key comes from. It stays
    /// the same across rotations.
    pub fn primary_id(&self) -> KeyId {
        self.primary
    }

    /// Every key id the keyring can open, the active one first.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.seal_keys.iter().map(|k| k.id)
    }

    /// The key for [`HashKey::hash`] and [`HashKey::verify`].
    pub fn hash_key(&self) -> &HashKey {
        &self.hash_key
    }

    /// Encrypt `plaintext` under the active key, bound to `binding`, with a
    /// fresh random nonce.
    pub fn seal(&self, plaintext: &[u8], binding: &Binding<'_>) -> Result<Sealed, SealError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(SealError::TooLong);
        }
        let key = &self.seal_keys[0];
        let mut header = [0u8; HEADER_LEN];
        header[0] = VERSION;
        header[1..].copy_from_slice(&key.id.0.to_be_bytes());
        let mut nonce = [0u8; NONCE_LEN];
        // A random 192-bit nonce never repeats in practice, so no counter has to
        // be kept across processes.
        fill_random(&mut nonce).map_err(|_| SealError::Rng)?;

        // Sized exactly, so the plaintext copied in is never left behind in a
        // reallocated buffer: it is encrypted where it lies.
        let mut blob = Vec::with_capacity(HEADER_LEN + NONCE_LEN + plaintext.len() + TAG_LEN);
        blob.extend_from_slice(&header);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(plaintext);
        let aad = binding.aad(&header);
        let body = &mut blob[HEADER_LEN + NONCE_LEN..];
        let tag = key
            .cipher()
            .encrypt_inout_detached(&XNonce::from(nonce), &aad, body.into());
        let tag = match tag {
            Ok(tag) => tag,
            Err(_) => {
                blob.zeroize();
                return Err(SealError::TooLong);
            }
        };
        blob.extend_from_slice(&tag);
        Ok(Sealed(blob))
    }

    /// Decrypt a blob sealed for `binding` by any key in the keyring.
    pub fn open(
        &self,
        sealed: &Sealed,
        binding: &Binding<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let id = sealed.key_id();
        let header = sealed.header();
        let aad = binding.aad(&header);
        let bytes = sealed.as_bytes();
        let nonce = XNonce::try_from(&bytes[HEADER_LEN..HEADER_LEN + NONCE_LEN])
            .map_err(|_| SealError::Malformed)?;
        let (body, tag) = bytes[HEADER_LEN + NONCE_LEN..].split_at(bytes.len() - MIN_SEALED_LEN);
        let tag = Tag::try_from(tag).map_err(|_| SealError::Malformed)?;

        // Two master keys share an id with odds of 2^-32, so every key carrying
        // the id is tried rather than only the first.
        let mut candidates = self.seal_keys.iter().filter(|k| k.id == id).peekable();
        if candidates.peek().is_none() {
            return Err(SealError::UnknownKey(id));
        }
        for key in candidates {
            let mut plaintext = Zeroizing::new(body.to_vec());
            let opened = key.cipher().decrypt_inout_detached(
                &nonce,
                &aad,
                plaintext.as_mut_slice().into(),
                &tag,
            );
            if opened.is_ok() {
                return Ok(plaintext);
            }
        }
        Err(SealError::Authentication)
    }

    /// [`Keyring::seal`] for an OTP secret.
    pub fn seal_secret(&self, secret: &Secret, binding: &Binding<'_>) -> Result<Sealed, SealError> {
        self.seal(secret.expose(), binding)
    }

    /// [`Keyring::open`] for an OTP secret.
    pub fn open_secret(&self, sealed: &Sealed, binding: &Binding<'_>) -> Result<Secret, SealError> {
        let bytes = self.open(sealed, binding)?;
        Secret::from_bytes(&bytes).map_err(SealError::Secret)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self.ids().map(|id| id.to_string()).collect();
        f.debug_struct("Keyring")
            .field("active", &format_args!("{}", self.active_id()))
            .field("retired", &ids[1..].to_vec())
            .field("hash_key", &self.hash_key)
            .finish()
    }
}

fn hmac_sha256(key: &[u8; 32]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; the error only exists for other MACs that
    // share the `KeyInit` trait. Unlike otp.rs, there is no fallback key: a
    // keyed hash must never quietly run under a key other than its own.
    <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("hmac accepts keys of any length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: Binding<'static> = Binding {
        tenant: "acme",
        user: "alice",
        factor: "f_1",
    };

    fn keyring() -> (MasterKey, Keyring) {
        let master = MasterKey::generate().unwrap();
        (master.clone(), Keyring::new(master))
    }

    #[test]
    fn seal_then_open_round_trips() {
        let (_, ring) = keyring();
        for plaintext in [&b""[..], b"x", &[7u8; 64], &[0u8; 1000]] {
            let sealed = ring.seal(plaintext, &OWNER).unwrap();
            assert_eq!(sealed.as_bytes().len(), MIN_SEALED_LEN + plaintext.len());
            assert_eq!(sealed.key_id(), ring.active_id());
            let reread = Sealed::from_bytes(sealed.as_bytes()).unwrap();
            assert_eq!(ring.open(&reread, &OWNER).unwrap().as_slice(), plaintext);
        }
        let a = ring.seal(b"same", &OWNER).unwrap();
        let b = ring.seal(b"same", &OWNER).unwrap();
        assert_ne!(a, b, "each seal draws a fresh nonce");
    }

    #[test]
    fn secrets_round_trip() {
        let (_, ring) = keyring();
        let secret = Secret::generate(crate::otp::Algorithm::Sha1).unwrap();
        let sealed = ring.seal_secret(&secret, &OWNER).unwrap();
        assert_eq!(ring.open_secret(&sealed, &OWNER).unwrap(), secret);

        let short = ring.seal(b"short", &OWNER).unwrap();
        assert_eq!(
            ring.open_secret(&short, &OWNER),
            Err(SealError::Secret(SecretError::TooShort(40)))
        );
    }

    #[test]
    fn another_owner_cannot_open() {
        let (_, ring) = keyring();
        let sealed = ring.seal(b"secret", &OWNER).unwrap();
        for other in [
            Binding {
                tenant: "acme2",
                ..OWNER
            },
            Binding {
                user: "bob",
                ..OWNER
            },
            Binding {
                factor: "f_2",
                ..OWNER
            },
            // Same concatenation, different split: the length prefixes tell them apart.
            Binding {
                tenant: "acmea",
                user: "lice",
                factor: "f_1",
            },
        ] {
            assert_eq!(
                ring.open(&sealed, &other),
                Err(SealError::Authentication),
                "{other:?}"
            );
        }
    }

    #[test]
    fn any_tampered_byte_fails() {
        let (_, ring) = keyring();
        let sealed = ring.seal(b"secret", &OWNER).unwrap();
        for i in 0..sealed.as_bytes().len() {
            let mut bytes = sealed.as_bytes().to_vec();
            bytes[i] ^= 0x01;
            let result = Sealed::from_bytes(&bytes).and_then(|s| ring.open(&s, &OWNER));
            let expected = match i {
                0 => Err(SealError::Version(VERSION ^ 0x01)),
                1..=4 => Err(SealError::UnknownKey(
                    Sealed::from_bytes(&bytes).unwrap().key_id(),
                )),
                _ => Err(SealError::Authentication),
            };
            assert_eq!(result, expected, "byte {i}");
        }
    }

    #[test]
    fn short_and_unknown_blobs_are_refused() {
        assert_eq!(
            Sealed::from_bytes(&[VERSION; MIN_SEALED_LEN - 1]),
            Err(SealError::Malformed)
        );
        assert_eq!(Sealed::from_bytes(&[]), Err(SealError::Malformed));
        let (_, ring) = keyring();
        let (_, other) = keyring();
        let sealed = other.seal(b"secret", &OWNER).unwrap();
        assert_eq!(
            ring.open(&sealed, &OWNER),
            Err(SealError::UnknownKey(other.active_id()))
        );
    }

    #[test]
    fn retired_keys_open_old_blobs_and_new_seals_use_the_active_key() {
        let (old, old_ring) = keyring();
        let old_blob = old_ring.seal(b"before rotation", &OWNER).unwrap();

        let new = MasterKey::generate().unwrap();
        let ring = Keyring::new(old.clone()).with_active(new.clone());
        assert_eq!(ring.active_id(), new.id());
        assert_eq!(ring.ids().collect::<Vec<_>>(), vec![new.id(), old.id()]);
        assert_eq!(
            ring.open(&old_blob, &OWNER).unwrap().as_slice(),
            b"before rotation"
        );
        let new_blob = ring.seal(b"after rotation", &OWNER).unwrap();
        assert_eq!(new_blob.key_id(), new.id());
        assert_eq!(
            old_ring.open(&new_blob, &OWNER),
            Err(SealError::UnknownKey(new.id()))
        );

        // A key given twice is kept once, and with_retired never demotes the
        // active key.
        let ring = ring.with_retired(old.clone()).with_retired(new.clone());
        assert_eq!(ring.ids().collect::<Vec<_>>(), vec![new.id(), old.id()]);
        let back = ring.with_active(old.clone());
        assert_eq!(back.ids().collect::<Vec<_>>(), vec![old.id(), new.id()]);

        // A keyring built only with with_retired opens but never seals with it.
        let plain = Keyring::new(new.clone()).with_retired(old);
        assert_eq!(plain.active_id(), new.id());
        assert_eq!(
            plain.open(&old_blob, &OWNER).unwrap().as_slice(),
            b"before rotation"
        );
    }

    #[test]
    fn key_ids_are_stable() {
        let master = MasterKey::from_bytes(&[42; 32]).unwrap();
        assert_eq!(master.id(), MasterKey::from_bytes(&[42; 32]).unwrap().id());
        assert_ne!(master.id(), MasterKey::from_bytes(&[43; 32]).unwrap().id());
        assert_eq!(Keyring::new(master.clone()).active_id(), master.id());
    }

    #[test]
    fn key_text_round_trips_and_tolerates_whitespace() {
        let master = MasterKey::generate().unwrap();
        let text = master.to_text();
        assert_eq!(text.len(), 44);
        assert_eq!(MasterKey::from_text(&text).unwrap(), master);
        assert_eq!(
            MasterKey::from_text(&format!("  {}\n", text.as_str())).unwrap(),
            master
        );
        for bad in [
            "",
            "not base64!",
            "AAAA",
            &BASE64.encode(&[0; 31]),
            &BASE64.encode(&[0; 33]),
            &"A".repeat(10_000),
        ] {
            assert_eq!(
                MasterKey::from_text(bad),
                Err(SealError::KeyFormat),
                "{bad}"
            );
        }
        assert_eq!(MasterKey::from_bytes(&[0; 16]), Err(SealError::KeyFormat));
    }

    #[test]
    fn debug_and_display_redact() {
        let master = MasterKey::from_bytes(&[0xAB; 32]).unwrap();
        let text = master.to_text();
        // Fixed keys, so the ids shown are fixed and cannot contain "abab" by chance.
        let ring =
            Keyring::new(master.clone()).with_retired(MasterKey::from_bytes(&[0x11; 32]).unwrap());
        let sealed = ring.seal(b"secret", &OWNER).unwrap();
        let hash_key = HashKey::derive(&master);
        let hash_text = BASE64.encode(master.derive(HASH_INFO).as_slice());
        let shown = format!(
            "{master:?} {master} {ring:?} {hash_key:?} {hash_key} {sealed:?} {:?}",
            ring.hash_key()
        );
        for leaked in [text.as_str(), &hash_text, "171", "ab, ab", "abab", "ABAB"] {
            assert!(!shown.contains(leaked), "{leaked} in {shown}");
        }
        assert!(shown.contains("redacted"));
        assert!(shown.contains(&master.id().to_string()), "{shown}");
    }

    #[test]
    fn hash_verifies_and_separates_domains() {
        let (_, ring) = keyring();
        let key = ring.hash_key();
        let hash = key.hash("backup-code", b"k7q4m2xp9dvr");
        assert!(key.verify("backup-code", b"k7q4m2xp9dvr", &hash));
        assert!(!key.verify("backup-code", b"k7q4m2xp9dvs", &hash));
        assert!(!key.verify("api-key", b"k7q4m2xp9dvr", &hash));
        assert_ne!(hash, key.hash("api-key", b"k7q4m2xp9dvr"));
        // The length prefix keeps the domain from running into the input.
        assert_ne!(key.hash("ab", b"c"), key.hash("a", b"bc"));

        let (_, other) = keyring();
        assert_ne!(hash, other.hash_key().hash("backup-code", b"k7q4m2xp9dvr"));
    }

    #[test]
    fn hash_is_hmac_sha256_under_the_derived_key() {
        // Stored API-key and backup-code hashes must stay valid across
        // releases. Expected value computed independently, with Python's
        // `hmac` and `hashlib`: HKDF-SHA256 of the master key (no salt, info
        // "twofold/hash/v1"), then HMAC-SHA256 of the length-prefixed domain
        // and the input.
        let key = HashKey::derive(&MasterKey::from_bytes(&[7; 32]).unwrap());
        let expected = "d2c20c8d992df7426c591e9129e515b5dfba2e32dff43e830770b7d192ab875e";
        let hex = |h: [u8; 32]| data_encoding::HEXLOWER.encode(&h);
        assert_eq!(hex(key.hash("api-key", b"tf_example")), expected);
        // The kept state is cloned, not used up: the next hash is the same.
        assert_eq!(hex(key.hash("api-key", b"tf_example")), expected);
    }

    #[test]
    fn hash_key_survives_rotation() {
        let (primary, ring) = keyring();
        let before = ring.hash_key().hash("backup-code", b"x");
        let rotated = ring.with_active(MasterKey::generate().unwrap());
        assert_ne!(rotated.active_id(), primary.id());
        assert_eq!(rotated.primary_id(), primary.id());
        assert_eq!(rotated.hash_key().hash("backup-code", b"x"), before);
        assert_eq!(HashKey::derive(&primary).hash("backup-code", b"x"), before);
    }
}
