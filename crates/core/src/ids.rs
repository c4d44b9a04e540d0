//! Validated identifiers: users (the tenant's own opaque ids), generated ids for
//! tenants, factors and API keys, and API key scopes.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;

use crate::secret::{SecretError, fill_random};

/// Hash domain of API keys: both planes hash a presented key with the
/// [`HashKey`](crate::seal::HashKey) under this domain and look the hash up.
pub const API_KEY_HASH_DOMAIN: &str = "api-key";

/// Longest user id accepted, in bytes.
pub const MAX_USER_LEN: usize = 256;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("user id must be 1 to {MAX_USER_LEN} bytes of UTF-8 without control characters")]
    User,
    #[error("malformed {0} id")]
    Malformed(&'static str),
    #[error("unknown scope {0:?}; expected manage, verify or replicate")]
    Scope(String),
}

/// A user, named by the tenant: 1 to 256 bytes of UTF-8 with no control
/// characters. Twofold never interprets it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    pub fn try_new(id: impl Into<String>) -> Result<UserId, IdError> {
        let id = id.into();
        if id.is_empty() || id.len() > MAX_USER_LEN || id.chars().any(char::is_control) {
            return Err(IdError::User);
        }
        Ok(UserId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Random bytes behind a generated id: 80 bits, so ids never collide in practice
/// and cannot be guessed.
const ID_BYTES: usize = 10;

macro_rules! generated_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new random id: the prefix, then 16 base32 characters.
            pub fn generate() -> Result<$name, SecretError> {
                let mut bytes = [0u8; ID_BYTES];
                fill_random(&mut bytes)?;
                Ok($name(format!(
                    "{}{}",
                    $prefix,
                    BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
                )))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let body = s.strip_prefix($prefix).ok_or(IdError::Malformed($what))?;
                let valid = body.len() == 16
                    && body.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
                if valid {
                    Ok($name(s.to_owned()))
                } else {
                    Err(IdError::Malformed($what))
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

generated_id!(
    /// A tenant: an application that uses Twofold.
    TenantId,
    "tn_",
    "tenant"
);
generated_id!(
    /// A factor (a TOTP enrolment) of one user.
    FactorId,
    "fa_",
    "factor"
);
generated_id!(
    /// An API key. The id is public; the key's secret is never stored.
    ApiKeyId,
    "key_",
    "api key"
);

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Control-plane calls for the key's own tenant.
    Manage,
    /// Data-plane verification for the key's own tenant.
    Verify,
    /// Reading the feed: data-plane nodes.
    Replicate,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Manage => "manage",
            Scope::Verify => "verify",
            Scope::Replicate => "replicate",
        }
    }
}

impl FromStr for Scope {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "manage" => Ok(Scope::Manage),
            "verify" => Ok(Scope::Verify),
            "replicate" => Ok(Scope::Replicate),
            other => Err(IdError::Scope(other.chars().take(32).collect())),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_validated() {
        assert!(UserId::try_new("alice@example.com").is_ok());
        assert!(UserId::try_new("ünïcødé user 42").is_ok());
        assert!(UserId::try_new("a".repeat(256)).is_ok());
        assert_eq!(UserId::try_new(""), Err(IdError::User));
        assert_eq!(UserId::try_new("a".repeat(257)), Err(IdError::User));
        assert_eq!(UserId::try_new("bob\n"), Err(IdError::User));
        assert_eq!(UserId::try_new("bob\u{7f}"), Err(IdError::User));
        // 128 two-byte characters are 256 bytes; 129 are too many.
        assert!(UserId::try_new("é".repeat(128)).is_ok());
        assert_eq!(UserId::try_new("é".repeat(129)), Err(IdError::User));
    }

    #[test]
    fn generated_ids_parse_back() {
        let id = FactorId::generate().unwrap();
        assert!(id.as_str().starts_with("fa_"));
        assert_eq!(id.as_str().parse::<FactorId>().unwrap(), id);
        assert_ne!(FactorId::generate().unwrap(), id);
        assert!("tn_aaaaaaaaaaaaaaaa".parse::<TenantId>().is_ok());
        for bad in [
            "",
            "fa_",
            "tn_aaaaaaaaaaaaaaaa",
            "fa_AAAAAAAAAAAAAAAA",
            "fa_aaaa",
        ] {
            assert_eq!(bad.parse::<FactorId>(), Err(IdError::Malformed("factor")));
        }
    }

    #[test]
    fn scopes_parse() {
        for scope in [Scope::Manage, Scope::Verify, Scope::Replicate] {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
        }
        assert!("admin".parse::<Scope>().is_err());
    }
}
