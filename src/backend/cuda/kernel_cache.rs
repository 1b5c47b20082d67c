//! On-disk cache of compiled kernels, so a process start does not pay NVRTC for every file.
//!
//! Key: FNV-1a (64-bit) over the kernel source, the common header, the NVRTC options (which
//! name the architecture and include folder) and the NVRTC version. One file per (kernel file,
//! arch, key): `<dir>/<name>-<arch>-<key>.cubin`, holding a small header (magic, key, length,
//! FNV-1a of the cubin) before the cubin. A file that fails any check (truncated, corrupt, a
//! different key) is recompiled and replaced; files are written to a temporary name and renamed,
//! so a killed process never leaves a half-written entry behind. A cache that cannot be written
//! (read-only folder) only costs the recompilation.

use std::path::{Path, PathBuf};

use super::nvrtc::{self, KernelSource, COMMON_HEADER};
use crate::error::{Error, Result};
use crate::hash::{fnv1a_extend, FNV1A_START};

const MAGIC: &[u8; 8] = b"QMTKCUB1";

/// FNV-1a over several parts, each followed by a 0xff separator byte, so ("ab", "c") and
/// ("a", "bc") differ.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .fold(FNV1A_START, |h, part| fnv1a_extend(fnv1a_extend(h, part), &[0xff]))
}

pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `$QMTOT_KERNEL_CACHE`, else `$XDG_CACHE_HOME/qmtot/kernels`, else
    /// `$HOME/.cache/qmtot/kernels`, else `qmtot-kernels` in the temporary folder.
    pub fn default_dir() -> PathBuf {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        env("QMTOT_KERNEL_CACHE")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("qmtot/kernels")))
            .or_else(|| env("HOME").map(|d| d.join(".cache/qmtot/kernels")))
            .unwrap_or_else(|| std::env::temp_dir().join("qmtot-kernels"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cubin of `src` for `arch`, from the cache or freshly compiled (then stored). The
    /// flag says whether it came from the cache.
    pub fn get_or_compile(&self, src: &KernelSource, arch: &str) -> Result<(Vec<u8>, bool)> {
        let include = nvrtc::cuda_include_dir().ok_or_else(|| Error::Backend {
            backend: "cuda",
            reason: "cuda_fp16.h not found: set CUDA_INCLUDE_DIR (see scripts/fetch-nvrtc)".into(),
        })?;
        let (major, minor) = nvrtc::version()?;
        let options = nvrtc::options(arch, &include, false).join("\u{1f}");
        let version = format!("{major}.{minor}");
        let key = fnv1a(&[
            src.source.as_bytes(),
            COMMON_HEADER.source.as_bytes(),
            options.as_bytes(),
            version.as_bytes(),
        ]);
        let path = self.dir.join(format!("{}-{arch}-{key:016x}.cubin", src.name));
        if let Some(cubin) = read_entry(&path, key) {
            return Ok((cubin, true));
        }
        let cubin = nvrtc::compile(src, arch, false)?.cubin;
        // Best effort: a cache that cannot be written only costs the recompilation.
        let _ = write_entry(&self.dir, &path, key, &cubin);
        Ok((cubin, false))
    }
}

/// The cubin stored at `path` if the entry is complete and matches `key`.
fn read_entry(path: &Path, key: u64) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    let header = bytes.get(..32)?;
    let word = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
    if &header[..8] != MAGIC || word(8) != key {
        return None;
    }
    let cubin = &bytes[32..];
    (cubin.len() as u64 == word(16) && fnv1a(&[cubin]) == word(24)).then(|| cubin.to_vec())
}

fn write_entry(dir: &Path, path: &Path, key: u64, cubin: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut bytes = Vec::with_capacity(32 + cubin.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&key.to_le_bytes());
    bytes.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&fnv1a(&[cubin]).to_le_bytes());
    bytes.extend_from_slice(cubin);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_keys_separate_their_parts() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(fnv1a(&[b"x"]), fnv1a(&[b"x"]));
        // The key of existing cache entries: the value this function has always given.
        assert_eq!(fnv1a(&[b"ab", b"c"]), 0x20ba_9b30_25a8_b421);
    }

    #[test]
    fn entries_that_fail_a_check_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.cubin");
        write_entry(dir.path(), &path, 7, b"cubin bytes").unwrap();
        assert_eq!(read_entry(&path, 7).as_deref(), Some(&b"cubin bytes"[..]));
        assert_eq!(read_entry(&path, 8), None, "another key");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(read_entry(&path, 7), None, "truncated");
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(read_entry(&path, 7), None, "corrupt");
        std::fs::write(&path, b"short").unwrap();
        assert_eq!(read_entry(&path, 7), None, "no header");
    }
}
