//! Run-time kernel build: NVRTC compiles `kernels/*.cu` (embedded in the binary) to a cubin for
//! a real architecture, so ptxas runs and reports each kernel's registers, shared memory and
//! spills. libnvrtc is loaded dynamically (cudarc `dynamic-loading`): a machine without it
//! gets a typed error, never a panic ([`nvrtc_present`] is checked first).
//!
//! Options: `--gpu-architecture=sm_XX` (`sm_90a` on Hopper), C++17, the CUDA include folder
//! (for `cuda_fp16.h`), and no `--use_fast_math`: kernels opt into fast intrinsics one by one
//! where their tests show it is harmless. `common.cuh` is handed to NVRTC as a named header.

use std::ffi::{c_char, c_int, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result, sys};

use crate::error::{Error, Result};

/// One kernel source file.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name under `kernels/`.
    pub name: &'static str,
    pub source: &'static str,
}

/// The header every kernel includes.
pub const COMMON_HEADER: KernelSource = KernelSource {
    name: "common.cuh",
    source: include_str!("../../../kernels/common.cuh"),
};

/// Every kernel source, compiled (and resource-checked) as a unit each.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "norm_rope_act.cu",
        source: include_str!("../../../kernels/norm_rope_act.cu"),
    },
    KernelSource {
        name: "kv_cache.cu",
        source: include_str!("../../../kernels/kv_cache.cu"),
    },
    KernelSource {
        name: "int4_matmul.cu",
        source: include_str!("../../../kernels/int4_matmul.cu"),
    },
    KernelSource {
        name: "attention.cu",
        source: include_str!("../../../kernels/attention.cu"),
    },
    KernelSource {
        name: "sampling.cu",
        source: include_str!("../../../kernels/sampling.cu"),
    },
];

fn err(reason: String) -> Error {
    Error::Backend {
        backend: "cuda",
        reason,
    }
}

/// Whether libnvrtc can be loaded (on `LD_LIBRARY_PATH` or the system's library path).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library; no NVRTC call is made.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(err(
            "libnvrtc not found (set LD_LIBRARY_PATH; see scripts/fetch-nvrtc)".into()
        ));
    }
    let (mut major, mut minor) = (0 as c_int, 0 as c_int);
    // SAFETY: the library is present; the out-pointers are valid.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| err(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// The folder holding `cuda_fp16.h`: `$CUDA_INCLUDE_DIR`, `$CUDA_HOME/include` or
/// `/usr/local/cuda/include`, the first that has it.
pub fn cuda_include_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("CUDA_INCLUDE_DIR").map(PathBuf::from),
        std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include")),
        Some(PathBuf::from("/usr/local/cuda/include")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("cuda_fp16.h").is_file())
}

/// NVRTC options for `arch` (see the module doc); part of the kernel cache's key.
pub fn options(arch: &str, include: &std::path::Path, ptxas_verbose: bool) -> Vec<String> {
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        format!("--include-path={}", include.display()),
    ];
    if ptxas_verbose {
        options.push("--ptxas-options=-v".to_string());
    }
    options
}

/// A compiled kernel file.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// NVRTC's log, including ptxas's resource report when asked for.
    pub log: String,
}

/// Compiles `src` for `arch` (e.g. `sm_90a`, `sm_80`). With `ptxas_verbose` the log carries
/// ptxas's per-kernel resource report (see [`parse_ptxas_report`]).
pub fn compile(src: &KernelSource, arch: &str, ptxas_verbose: bool) -> Result<Compiled> {
    let include = cuda_include_dir()
        .ok_or_else(|| err("cuda_fp16.h not found: set CUDA_INCLUDE_DIR (see scripts/fetch-nvrtc)".into()))?;
    if !nvrtc_present() {
        return Err(err(
            "libnvrtc not found (set LD_LIBRARY_PATH; see scripts/fetch-nvrtc)".into()
        ));
    }
    let cstr = |s: &str| CString::new(s).map_err(|_| err(format!("{}: NUL byte in source or option", src.name)));
    let source = cstr(src.source)?;
    let name = cstr(src.name)?;
    let header = cstr(COMMON_HEADER.source)?;
    let header_name = cstr(COMMON_HEADER.name)?;
    let headers = [header.as_ptr()];
    let header_names = [header_name.as_ptr()];
    let options = options(arch, &include, ptxas_verbose);
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all strings outlive the program (destroyed below); arrays hold one header.
    unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            source.as_ptr(),
            name.as_ptr(),
            1,
            headers.as_ptr(),
            header_names.as_ptr(),
        )
    }
    .result()
    .map_err(|e| err(format!("{}: nvrtcCreateProgram: {e:?}", src.name)))?;
    // SAFETY: `prog` was created above and is destroyed exactly once, at the end.
    let outcome = unsafe {
        let compiled = result::compile_program(prog, &options);
        let log = result::get_program_log(prog)
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        let built = match compiled {
            Ok(()) => cubin(prog).map(|cubin| Compiled {
                cubin,
                log: log.clone(),
            }),
            Err(e) => Err(err(format!("{} for {arch}: {e:?}\n{log}", src.name))),
        };
        let _ = result::destroy_program(prog);
        built
    };
    outcome
}

/// # Safety
/// `prog` is a successfully compiled program for a real architecture.
unsafe fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    sys::nvrtcGetCUBINSize(prog, &mut size)
        .result()
        .map_err(|e| err(format!("nvrtcGetCUBINSize: {e:?}")))?;
    let mut out = vec![0u8; size];
    sys::nvrtcGetCUBIN(prog, out.as_mut_ptr() as *mut c_char)
        .result()
        .map_err(|e| err(format!("nvrtcGetCUBIN: {e:?}")))?;
    Ok(out)
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// ptxas's resources for one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: u32,
    /// Static shared memory, bytes.
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Reads ptxas's `-v` report out of an NVRTC log: per kernel, the `Function properties`
/// line (stack, spills) and the `Used N registers …` line (registers, `smem`).
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    // The number just before `unit` in `text` ("… 0 bytes spill stores …").
    let number_before = |text: &str, unit: &str| -> Option<u32> {
        let at = text.find(unit)?;
        text[..at].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            out.push(KernelResources {
                kernel: rest.trim().to_string(),
                ..Default::default()
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("stack frame") {
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_is_parsed_per_kernel() {
        let log = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'rope_f16' for 'sm_90a'
ptxas info    : Function properties for rope_f16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 0 barriers, 396 bytes cmem[0]
ptxas info    : Compiling entry function 'rmsnorm_residual_f16' for 'sm_90a'
ptxas info    : Function properties for rmsnorm_residual_f16
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 24 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]
";
        assert_eq!(
            parse_ptxas_report(log),
            vec![
                KernelResources {
                    kernel: "rope_f16".into(),
                    registers: 18,
                    ..Default::default()
                },
                KernelResources {
                    kernel: "rmsnorm_residual_f16".into(),
                    registers: 24,
                    shared_bytes: 128,
                    stack_bytes: 8,
                    spill_stores: 4,
                    spill_loads: 12,
                },
            ]
        );
    }
}
