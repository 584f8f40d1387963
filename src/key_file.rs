//! Auth key files (`serve`, `client`, `bench --auth-key-file`): refused when
//! other users could read or change them, as ssh refuses a private key;
//! the key itself is never printed (errors name the file, not its bytes).

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::{bail, Context as _};

/// Permission bits a key file may not have: any access by group or others.
const MODE_TOO_OPEN: u32 = 0o077;
/// Largest key file read (a key is a short token; this bounds the read).
const KEY_FILE_BYTES_MAX: u64 = 64 * 1024;

/// The one-line refusal for a key file whose mode is too open, or None.
pub fn mode_refusal(mode: u32, path: &Path) -> Option<String> {
    (mode & MODE_TOO_OPEN != 0).then(|| {
        format!(
            "permissions {:04o} for '{}' are too open: the key file must not be readable or writable \
             by group or others (chmod 600)",
            mode & 0o7777,
            path.display()
        )
    })
}

/// Reads a key file: its content without one trailing newline (and a
/// carriage return before it). Checks the mode of the file it opened, so a
/// rename between check and read cannot slip another file in.
pub fn read_key_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading auth key file {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading auth key file {}", path.display()))?;
    if let Some(refusal) = mode_refusal(meta.permissions().mode(), path) {
        bail!(refusal);
    }
    if meta.len() > KEY_FILE_BYTES_MAX {
        bail!(
            "auth key file {} is {} bytes, more than the {KEY_FILE_BYTES_MAX} allowed",
            path.display(),
            meta.len()
        );
    }
    let mut key = Vec::with_capacity(meta.len() as usize);
    file.take(KEY_FILE_BYTES_MAX)
        .read_to_end(&mut key)
        .with_context(|| format!("reading auth key file {}", path.display()))?;
    if key.last() == Some(&b'\n') {
        key.pop();
        if key.last() == Some(&b'\r') {
            key.pop();
        }
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue11_only_owner_only_modes_pass() {
        let p = Path::new("key.txt");
        for ok in [0o600, 0o400, 0o700, 0o100600] {
            assert_eq!(mode_refusal(ok, p), None, "{ok:o}");
        }
        for bad in [0o644, 0o640, 0o604, 0o620, 0o602, 0o610, 0o100644] {
            assert!(mode_refusal(bad, p).is_some(), "{bad:o}");
        }
        assert_eq!(
            mode_refusal(0o100644, p).unwrap(),
            "permissions 0644 for 'key.txt' are too open: the key file must not be readable or writable \
             by group or others (chmod 600)"
        );
    }

    #[test]
    fn issue11_a_private_key_file_reads_without_its_newline() {
        let path = std::env::temp_dir().join(format!("cnse-key-file-{}", std::process::id()));
        std::fs::write(&path, "s3cret\r\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_key_file(&path).unwrap(), b"s3cret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_key_file(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(e.starts_with("permissions 0644 for '"), "{e}");
        assert!(!e.contains("s3cret"), "the key is never printed: {e}");
    }
}
