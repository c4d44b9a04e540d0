//! The master key file: read it, or create it with mode 0600 on first start.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use twofold_core::seal::{Keyring, MasterKey};

/// Environment variable that may carry the base64 master key instead of a file.
pub const MASTER_KEY_ENV: &str = "TWOFOLD_MASTER_KEY";
const DEFAULT_FILE: &str = "master.key";

/// The keyring from `TWOFOLD_MASTER_KEY`, else from `explicit`, else from
/// `data_dir/master.key`, which is created if it does not exist yet. A file named
/// explicitly must exist: silently creating a new key would orphan every secret
/// sealed under the intended one.
pub fn load_keyring(data_dir: &Path, explicit: Option<&Path>) -> anyhow::Result<Keyring> {
    if let Ok(text) = std::env::var(MASTER_KEY_ENV) {
        let key = MasterKey::from_text(&text)
            .with_context(|| format!("{MASTER_KEY_ENV} is not a valid master key"))?;
        return Ok(Keyring::new(key));
    }
    let path: PathBuf = explicit.map_or_else(|| data_dir.join(DEFAULT_FILE), Path::to_path_buf);
    if path.exists() {
        return read(&path).map(Keyring::new);
    }
    if explicit.is_some() {
        bail!("master key file {} does not exist", path.display());
    }
    let key = MasterKey::generate().context("cannot generate a master key")?;
    write_new(&path, &key)?;
    tracing::info!(path = %path.display(), key_id = %key.id(), "generated a new master key; back it up");
    Ok(Keyring::new(key))
}

fn read(path: &Path) -> anyhow::Result<MasterKey> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "master key file is readable by others; chmod 600 it");
        }
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read master key file {}", path.display()))?,
    );
    MasterKey::from_text(&text)
        .with_context(|| format!("{} does not hold a valid master key", path.display()))
}

fn write_new(path: &Path, key: &MasterKey) -> anyhow::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create master key file {}", path.display()))?;
    file.write_all(key.to_text().as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_with_private_mode_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_keyring(dir.path(), None).unwrap();
        let second = load_keyring(dir.path(), None).unwrap();
        assert_eq!(first.active_id(), second.active_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(DEFAULT_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
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
}
