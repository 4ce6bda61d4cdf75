//! Outputs appear whole or not at all: write to a temporary sibling, then rename.
//!
//! A reader of the output path never sees a half-written file, a crash leaves the previous
//! version intact, and inputs are never opened for writing.

use crate::error::{Error, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Temporary sibling path in the same directory (so that the final rename is atomic).
fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = format!(".peftkit-tmp-{}-{}", std::process::id(), name);
    path.with_file_name(tmp)
}

/// Write `bytes` to `path` atomically (temp file, fsync, rename).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_with(path, |f| f.write_all(bytes))
}

/// Write to `path` atomically through a callback that receives the temporary file.
pub fn write_file_with(
    path: &Path,
    fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> Result<()> {
    write_file_try(path, |f| fill(f).map_err(|e| Error::io(path, e)))
}

/// [`write_file_with`] for a callback whose failures are ours (a bad input found while
/// streaming): on any error the temporary file is removed and the error returned unchanged.
pub fn write_file_try(path: &Path, fill: impl FnOnce(&mut fs::File) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
        fill(&mut f)?;
        f.sync_all().map_err(|e| Error::io(path, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // The rename itself is durable only once the directory is synced (a power cut could
    // otherwise bring back the old file, or none).
    sync_parent(path);
    Ok(())
}

/// fsync the directory holding `path`, best effort: some filesystems refuse to sync a
/// directory, and the data itself is already synced by then.
fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        sync_dir(parent);
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// An output directory built under a temporary name and renamed into place by `commit`.
/// Dropped without `commit`, it removes itself, so a failed run leaves nothing behind.
pub struct AtomicDir {
    final_path: PathBuf,
    tmp_path: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Start a new output directory. `inputs` are paths that must not be overwritten.
    pub fn create(final_path: &Path, inputs: &[&Path]) -> Result<Self> {
        refuse_overwriting_inputs(final_path, inputs)?;
        if let Some(parent) = final_path.parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(parent).map_err(|e| {
                    // create_dir_all says "File exists" when a parent is a regular file: say
                    // what is wrong with the output path instead (ENOTDIR).
                    if parent.ancestors().any(Path::is_file) {
                        Error::io(final_path, std::io::Error::from_raw_os_error(20))
                    } else {
                        Error::io(parent, e)
                    }
                })?;
            }
        }
        let tmp_path = temp_sibling(final_path);
        if tmp_path.exists() {
            let _ = fs::remove_dir_all(&tmp_path);
        }
        fs::create_dir(&tmp_path).map_err(|e| Error::io(final_path, e))?;
        Ok(Self {
            final_path: final_path.to_path_buf(),
            tmp_path,
            committed: false,
        })
    }

    /// Path of a file inside the (temporary) directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.tmp_path.join(name)
    }

    /// Report an error about a file inside the temporary directory under its final path
    /// (users never see the temporary name).
    pub fn rename_error(&self, e: Error) -> Error {
        let fix = |p: PathBuf| match p.strip_prefix(&self.tmp_path) {
            Ok(rest) => self.final_path.join(rest),
            Err(_) => p,
        };
        match e {
            Error::Io { path, source } => Error::Io {
                path: fix(path),
                source,
            },
            Error::BadInput { path, msg } => Error::BadInput {
                path: fix(path),
                msg,
            },
            other => other,
        }
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self.join(name);
        fs::write(&p, bytes).map_err(|e| Error::io(self.final_path.join(name), e))
    }

    /// Move the finished directory into place. An existing output directory is replaced
    /// only after the new one is complete.
    pub fn commit(mut self) -> Result<()> {
        sync_dir_files(&self.tmp_path).map_err(|e| Error::io(&self.final_path, e))?;
        // The folder's own entries (files renamed into it) must be durable before it appears
        // under its final name.
        sync_dir(&self.tmp_path);
        if self.final_path.exists() {
            let old = self.final_path.with_file_name(format!(
                ".peftkit-old-{}-{}",
                std::process::id(),
                self.final_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            fs::rename(&self.final_path, &old).map_err(|e| Error::io(&self.final_path, e))?;
            fs::rename(&self.tmp_path, &self.final_path)
                .map_err(|e| Error::io(&self.final_path, e))?;
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&self.tmp_path, &self.final_path)
                .map_err(|e| Error::io(&self.final_path, e))?;
        }
        self.committed = true;
        sync_parent(&self.final_path);
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp_path);
        }
    }
}

fn sync_dir_files(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    Ok(())
}

/// Remove what killed processes left in `dir`: the temporary siblings (`.peftkit-tmp-PID-…`)
/// of writes they never finished and the replaced folders (`.peftkit-old-PID-…`) they never
/// deleted. Only entries of processes that are gone are touched (a live PID, ours included, may
/// be writing there), so this is safe to call at any time; where liveness cannot be checked
/// (no /proc), nothing is removed.
pub fn remove_stale_temps(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix(".peftkit-tmp-")
            .or_else(|| name.strip_prefix(".peftkit-old-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let p = e.path();
        let _ = match e.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&p),
            _ => fs::remove_file(&p),
        };
    }
}

/// Delete a directory without ever leaving part of it under its name: it is first renamed to a
/// hidden `.peftkit-old-PID-…` sibling (atomic), then removed. A kill during the removal leaves
/// only the hidden name, which [`remove_stale_temps`] clears later.
pub fn remove_dir_atomically(dir: &Path) -> std::io::Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let old = dir.with_file_name(format!(".peftkit-old-{}-{name}", std::process::id()));
    if old.exists() {
        fs::remove_dir_all(&old)?;
    }
    fs::rename(dir, &old)?;
    fs::remove_dir_all(&old)
}

/// Refuse an output path that is, or contains, one of the inputs.
pub fn refuse_overwriting_inputs(out: &Path, inputs: &[&Path]) -> Result<()> {
    let out_abs = absolute(out);
    for input in inputs {
        let in_abs = absolute(input);
        if in_abs == out_abs || in_abs.starts_with(&out_abs) {
            return Err(Error::usage(format!(
                "{}: output path would overwrite the input {}; choose another --out",
                out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    })
}
