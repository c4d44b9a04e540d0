//! The master key file: read it, create it with mode 0600 on first start, and
//! append a new key to it when keys are rotated.
//!
//! A key file holds one base64 master key per line (blank lines are ignored).
//! The *first* key is the primary: it keys the hashes of API keys and backup
//! codes, which cannot be recomputed, so it stays for as long as they are in use.
//! The *last* key is active: it seals everything new. Every key opens what it
//! sealed. A file with one key is all three at once. `TWOFOLD_MASTER_KEY` may
//! carry the same list, separated by commas.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use twofold_core::seal::{KeyId, Keyring, MasterKey};
use zeroize::Zeroizing;

/// Environment variable that may carry the base64 master keys instead of a file.
pub const MASTER_KEY_ENV: &str = "TWOFOLD_MASTER_KEY";
const DEFAULT_FILE: &str = "master.key";

/// The keyring from `TWOFOLD_MASTER_KEY`, else from `explicit`, else from
/// `data_dir/master.key`, which is created if it does not exist yet. A file named
/// explicitly must exist: silently creating a new key would orphan every secret
/// sealed under the intended one.
pub fn load_keyring(data_dir: &Path, explicit: Option<&Path>) -> anyhow::Result<Keyring> {
    if let Ok(text) = std::env::var(MASTER_KEY_ENV) {
        let text = Zeroizing::new(text);
        let keys = parse_keys(text.split(','))
            .with_context(|| format!("{MASTER_KEY_ENV} does not hold valid master keys"))?;
        return keyring(keys);
    }
    let path = key_path(data_dir, explicit);
    if path.exists() {
        return keyring(read(&path)?);
    }
    if explicit.is_some() {
        bail!("master key file {} does not exist", path.display());
    }
    let key = MasterKey::generate().context("cannot generate a master key")?;
    write_new(&path, &key)?;
    tracing::info!(path = %path.display(), key_id = %key.id(), "generated a new master key; back it up");
    Ok(Keyring::new(key))
}

/// What [`rotate`] did, by key id only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub path: PathBuf,
    /// The new, now active, key.
    pub active: KeyId,
    /// The first key of the file, which keeps keying the hashes.
    pub primary: KeyId,
    /// Keys in the file after the rotation.
    pub count: usize,
}

/// Generate a new master key and append it to the key file, which must exist,
/// so it becomes the active key. The file is replaced atomically: the new
/// content goes to a temporary file with mode 0600 in the same directory, is
/// synced, and is renamed over the old one.
pub fn rotate(data_dir: &Path, explicit: Option<&Path>) -> anyhow::Result<Rotated> {
    if std::env::var_os(MASTER_KEY_ENV).is_some() {
        bail!(
            "{MASTER_KEY_ENV} is set, and a variable cannot be rotated in place: rotate a key \
             file (--master-key-file), then give its keys, comma-separated, to {MASTER_KEY_ENV}"
        );
    }
    let path = key_path(data_dir, explicit);
    if !path.exists() {
        bail!(
            "master key file {} does not exist; nothing to rotate",
            path.display()
        );
    }
    let mut keys = read(&path)?;
    let new = loop {
        let key = MasterKey::generate().context("cannot generate a master key")?;
        // Two keys with one id would make every open try both; draw again.
        if !keys.iter().any(|k| k.id() == key.id()) {
            break key;
        }
    };
    let active = new.id();
    keys.push(new);
    let mut text = Zeroizing::new(String::new());
    for key in &keys {
        text.push_str(&key.to_text());
        text.push('\n');
    }
    replace(&path, text.as_bytes())?;
    Ok(Rotated {
        path,
        active,
        primary: keys[0].id(),
        count: keys.len(),
    })
}

fn key_path(data_dir: &Path, explicit: Option<&Path>) -> PathBuf {
    explicit.map_or_else(|| data_dir.join(DEFAULT_FILE), Path::to_path_buf)
}

/// Parse the keys of a list, in order; empty entries are skipped. Errors name
/// the entry's position, never its text.
fn parse_keys<'a>(entries: impl Iterator<Item = &'a str>) -> anyhow::Result<Vec<MasterKey>> {
    let mut keys = Vec::new();
    for (i, entry) in entries.enumerate() {
        if entry.trim().is_empty() {
            continue;
        }
        let key = MasterKey::from_text(entry)
            .with_context(|| format!("entry {} is not a base64 32-byte key", i + 1))?;
        keys.push(key);
    }
    if keys.is_empty() {
        bail!("no master key found");
    }
    Ok(keys)
}

/// The first key is primary (hash key), the last active, every one opens.
fn keyring(keys: Vec<MasterKey>) -> anyhow::Result<Keyring> {
    let mut keys = keys.into_iter();
    let primary = keys.next().context("no master key found")?;
    let mut ring = Keyring::new(primary);
    let mut rest: Vec<MasterKey> = keys.collect();
    if let Some(active) = rest.pop() {
        for retired in rest {
            ring = ring.with_retired(retired);
        }
        ring = ring.with_active(active);
    }
    Ok(ring)
}

fn read(path: &Path) -> anyhow::Result<Vec<MasterKey>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "master key file is readable by others; chmod 600 it");
        }
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read master key file {}", path.display()))?,
    );
    parse_keys(text.lines())
        .with_context(|| format!("{} does not hold valid master keys", path.display()))
}

fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

fn write_new(path: &Path, key: &MasterKey) -> anyhow::Result<()> {
    let mut file = private_options()
        .open(path)
        .with_context(|| format!("cannot create master key file {}", path.display()))?;
    file.write_all(key.to_text().as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(())
}

/// Replace `path` with `content` atomically: a reader (or a crash) sees the old
/// file or the new one, never a part of either.
fn replace(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| DEFAULT_FILE.to_owned());
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| -> anyhow::Result<()> {
        let mut file = private_options()
            .open(&temp)
            .with_context(|| format!("cannot create {}", temp.display()))?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    // The rename is durable once the directory is synced too.
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use twofold_core::seal::Binding;

    use super::*;

    const OWNER: Binding<'static> = Binding {
        tenant: "acme",
        user: "alice",
        factor: "f_1",
    };

    fn mode(path: &Path) -> u32 {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(path).unwrap().permissions().mode() & 0o777
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            0o600
        }
    }

    #[test]
    fn creates_once_with_private_mode_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_keyring(dir.path(), None).unwrap();
        let second = load_keyring(dir.path(), None).unwrap();
        assert_eq!(first.active_id(), second.active_id());
        assert_eq!(mode(&dir.path().join(DEFAULT_FILE)), 0o600);
    }

    #[test]
    fn a_named_file_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("elsewhere.key");
        let err = load_keyring(dir.path(), Some(&missing)).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        std::fs::write(&missing, "not a key").unwrap();
        assert!(load_keyring(dir.path(), Some(&missing)).is_err());
    }

    #[test]
    fn first_key_is_primary_last_is_active_and_all_open() {
        let keys: Vec<MasterKey> = (0..3).map(|_| MasterKey::generate().unwrap()).collect();
        let text: Vec<String> = keys.iter().map(|k| k.to_text().to_string()).collect();
        let blobs: Vec<_> = keys
            .iter()
            .map(|k| Keyring::new(k.clone()).seal(b"x", &OWNER).unwrap())
            .collect();
        let hash_of_primary = Keyring::new(keys[0].clone())
            .hash_key()
            .hash("backup-code", b"c");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        // Blank lines and surrounding whitespace do not count.
        std::fs::write(
            &path,
            format!("{}\n\n  {}\n{}\n\n", text[0], text[1], text[2]),
        )
        .unwrap();
        let from_file = load_keyring(dir.path(), Some(&path)).unwrap();
        let from_list = keyring(parse_keys(text.join(",").split(',')).unwrap()).unwrap();
        for ring in [&from_file, &from_list] {
            assert_eq!(ring.active_id(), keys[2].id());
            assert_eq!(ring.hash_key().hash("backup-code", b"c"), hash_of_primary);
            let mut ids: Vec<_> = ring.ids().collect();
            ids.sort();
            let mut want: Vec<_> = keys.iter().map(MasterKey::id).collect();
            want.sort();
            assert_eq!(ids, want);
            for blob in &blobs {
                assert_eq!(ring.open(blob, &OWNER).unwrap().as_slice(), b"x");
            }
        }

        // One key: primary and active at once, as before rotation existed.
        let one = keyring(parse_keys([text[1].as_str()].into_iter()).unwrap()).unwrap();
        assert_eq!(one.active_id(), keys[1].id());
        assert_eq!(one.ids().count(), 1);
    }

    #[test]
    fn bad_lists_are_refused_without_showing_keys() {
        let good = MasterKey::generate().unwrap().to_text().to_string();
        for (list, why) in [
            (String::new(), "no master key"),
            (" , ,".to_owned(), "no master key"),
            (format!("{good},nope"), "entry 2"),
            (format!("{good}x"), "entry 1"),
        ] {
            let err = parse_keys(list.split(',')).unwrap_err();
            let shown = format!("{err:#}");
            assert!(shown.contains(why), "{list}: {shown}");
            assert!(!shown.contains(&good), "{shown}");
        }
    }

    #[test]
    fn rotate_appends_an_active_key_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let before = load_keyring(dir.path(), None).unwrap();
        let path = dir.path().join(DEFAULT_FILE);
        let first_line = std::fs::read_to_string(&path).unwrap();

        let rotated = rotate(dir.path(), None).unwrap();
        assert_eq!(rotated.primary, before.active_id());
        assert_ne!(rotated.active, before.active_id());
        assert_eq!(rotated.count, 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], first_line.trim(), "the primary stays first");
        assert_eq!(mode(&path), 0o600);
        // Nothing left behind but the key file itself.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let after = load_keyring(dir.path(), None).unwrap();
        assert_eq!(after.active_id(), rotated.active);
        let blob = before.seal(b"old", &OWNER).unwrap();
        assert_eq!(after.open(&blob, &OWNER).unwrap().as_slice(), b"old");
        assert_eq!(
            after.hash_key().hash("api-key", b"k"),
            before.hash_key().hash("api-key", b"k")
        );

        let again = rotate(dir.path(), None).unwrap();
        assert_eq!(again.count, 3);
        assert_eq!(again.primary, rotated.primary);
    }

    #[test]
    fn rotate_needs_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = rotate(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!dir.path().join(DEFAULT_FILE).exists());
    }
}
