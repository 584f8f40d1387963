//! The file a `put` reads, and how a blob is written.

use super::*;

/// Alignment O_DIRECT needs for offsets, lengths and buffers (the largest
/// logical block size in use; maps are page-aligned anyway).
const DIRECT_ALIGN_BYTES: usize = 4096;

/// Writes `data` into the temporary file: whole aligned pieces with O_DIRECT
/// straight from the map (no copy through the page cache), the unaligned
/// tail, or everything when O_DIRECT is refused (tmpfs), buffered.
pub(super) fn write_blob(tmp: &TempFile, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let aligned_len = data.len() / DIRECT_ALIGN_BYTES * DIRECT_ALIGN_BYTES;
    let mut pos = 0usize;
    if aligned_len > 0 {
        if let Ok(direct) = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&tmp.path)
        {
            debug_assert_eq!(data.as_ptr() as usize % DIRECT_ALIGN_BYTES, 0, "maps are page-aligned");
            while pos < aligned_len {
                let n = (aligned_len - pos).min(COPY_PIECE_BYTES as usize);
                match direct.write_at(&data[pos..pos + n], pos as u64) {
                    Ok(k) if k > 0 && k % DIRECT_ALIGN_BYTES == 0 => pos += k,
                    // A short unaligned write or a refusal: finish buffered.
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).ctx("write", &tmp.path),
                }
            }
        }
    }
    while pos < data.len() {
        let n = (data.len() - pos).min(COPY_PIECE_BYTES as usize);
        tmp.file
            .write_all_at(&data[pos..pos + n], pos as u64)
            .ctx("write", &tmp.path)?;
        sys::start_writeback(&tmp.file, pos as u64, n as u64);
        pos += n;
    }
    Ok(())
}

/// A file to put, mapped read-only.
pub struct SourceFile {
    pub(super) map: Mmap,
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) len: u64,
    pub(super) modified: Option<SystemTime>,
}

impl SourceFile {
    /// Opens and maps a regular file.
    ///
    /// # Safety
    ///
    /// No process may truncate the file while the `SourceFile` lives: a read
    /// of a page past the new end raises SIGBUS. (Changes in place are
    /// detected by [`Store::put`], which then refuses the file.)
    pub unsafe fn open(path: &Path) -> Result<SourceFile> {
        let file = File::open(path).ctx("open", path)?;
        let meta = file.metadata().ctx("stat", path)?;
        if !meta.is_file() {
            return Err(StoreError::BadInput {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        // SAFETY: the caller guarantees the file is not truncated while mapped.
        let map = unsafe { Mmap::map(&file) }.ctx("map", path)?;
        let _ = map.advise(Advice::Sequential);
        Ok(SourceFile {
            map,
            file,
            path: path.to_path_buf(),
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn check_unchanged(&self) -> Result<()> {
        let after = self.file.metadata().ctx("stat", &self.path)?;
        if after.len() != self.len || after.modified().ok() != self.modified {
            return Err(StoreError::BadInput {
                path: self.path.clone(),
                reason: "changed while it was being put; nothing was stored".into(),
            });
        }
        Ok(())
    }
}
