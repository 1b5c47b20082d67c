//! The compiled kernels of one device: every `kernels/*.cu` built for the device's architecture
//! (through the disk cache), loaded as modules, and looked up by entry-point name.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;

use super::kernel_cache::KernelCache;
use super::nvrtc::SOURCES;
use crate::error::{Error, Result};

pub(crate) fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend {
        backend: "cuda",
        reason: format!("{what}: {e:?}"),
    }
}

/// The NVRTC architecture for compute capability `(major, minor)`: `sm_90a` on Hopper (its
/// arch-specific features), `sm_XY` elsewhere.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major == 9 && minor == 0 {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

pub(crate) struct Kernels {
    functions: HashMap<String, CudaFunction>,
}

impl Kernels {
    /// Builds (or takes from the cache) and loads every kernel file for `arch`.
    pub fn load(ctx: &Arc<CudaContext>, arch: &str, cache: &KernelCache) -> Result<Self> {
        let mut functions = HashMap::new();
        for src in SOURCES {
            let (cubin, _hit) = cache.get_or_compile(src, arch)?;
            let module = ctx
                .load_module(Ptx::from_binary(cubin))
                .map_err(|e| cuda_err(&format!("loading {}", src.name), e))?;
            for name in entry_points(src.source) {
                let f = module
                    .load_function(&name)
                    .map_err(|e| cuda_err(&format!("{}: function {name}", src.name), e))?;
                functions.insert(name, f);
            }
        }
        Ok(Self { functions })
    }

    pub fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| cuda_err("kernel lookup", format!("no kernel named {name}")))
    }
}

/// Entry-point names of a kernel file: `extern "C" __global__ void NAME(` declarations, and
/// the names the `*_ENTRY(…)` macro lines instantiate (their expansion is spelled out here).
fn entry_points(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in source.lines() {
        let line = line.trim_start();
        if let Some(rest) = line.strip_prefix("extern \"C\" __global__ void ") {
            // Skip an optional `__launch_bounds__(…)`.
            let rest = match rest.strip_prefix("__launch_bounds__(") {
                Some(r) => r.split_once(')').map_or("", |(_, after)| after.trim_start()),
                None => rest,
            };
            let name = rest.split('(').next().unwrap_or("").trim();
            // Inside a macro body the name is spelled with `##`: the instantiations count.
            if !name.is_empty() && !name.contains('#') {
                names.push(name.to_string());
            }
        } else if let Some(args) = line.strip_prefix("INT4_MATMUL_ENTRY(") {
            let mut it = args.trim_end_matches(')').split(',').map(str::trim);
            let (nt, g) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            names.push(format!("int4_matmul_n{nt}_g{g}_f16"));
        } else if let Some(args) = line.strip_prefix("INT4_MATMUL_VARIANT(") {
            let v: Vec<&str> = args.trim_end_matches(')').split(',').map(str::trim).collect();
            if let [nt, r, xc, ..] = v[..] {
                names.push(format!("int4_matmul_n{nt}_g128_r{r}_x{xc}_f16"));
            }
        } else if let Some(args) = line.strip_prefix("DENSE_MATMUL_ENTRY(") {
            names.push(format!("dense_matmul_n{}_f16", first_arg(args)));
        } else if let Some((op, args)) = ["SPLIT", "TILE", "TILE_MMA"]
            .iter()
            .find_map(|op| Some((op, line.strip_prefix(&format!("ATTENTION_{op}_ENTRY("))?)))
        {
            let mut it = args.trim_end_matches(')').split(',').map(str::trim);
            let (hd, g) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            names.push(format!("attention_{}_hd{hd}_g{g}_f16", op.to_lowercase()));
        } else if let Some(args) = line.strip_prefix("ATTENTION_MERGE_ENTRY(") {
            names.push(format!("attention_merge_hd{}_f16", first_arg(args)));
        }
    }
    names
}

fn first_arg(args: &str) -> &str {
    args.split([',', ')']).next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_include_macro_instantiations() {
        let all: Vec<String> = SOURCES.iter().flat_map(|s| entry_points(s.source)).collect();
        for name in [
            "rmsnorm_residual_f16",
            "rope_f16",
            "rope_kv_write_f16",
            "silu_mul_f16",
            "add_f16",
            "embed_f16",
            "embed_int4_f16",
            "kv_write_f16",
            "copy_blocks_f16",
            "gather_rows_f16",
            "fill_f16",
            "int4_matmul_n1_g32_f16",
            "int4_matmul_n2_g64_f16",
            "int4_matmul_n8_g128_f16",
            "dense_matmul_n8_f16",
            "dense_matmul_n4_f16",
            "int4_matmul_n1_g128_r4_x512_f16",
            "int4_matmul_n2_g128_r3_x256_f16",
            "attention_split_hd64_g3_f16",
            "attention_split_hd128_g8_f16",
            "attention_tile_hd64_g1_f16",
            "attention_tile_hd128_g4_f16",
            "attention_tile_mma_hd64_g3_f16",
            "attention_tile_mma_hd128_g8_f16",
            "attention_merge_hd64_f16",
            "attention_merge_hd128_f16",
            "sample_f32",
            "logprobs_f32",
        ] {
            assert!(all.iter().any(|n| n == name), "{name} missing from {all:?}");
        }
        // The macro definitions themselves are not entry points.
        assert!(!all.iter().any(|n| n.contains('#') || n.contains("launch")), "{all:?}");
    }

    #[test]
    fn hopper_gets_its_arch_specific_target() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 0), "sm_80");
        assert_eq!(arch_for(8, 9), "sm_89");
    }
}
