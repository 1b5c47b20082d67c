//! Pipeline shapes of the matmul kernels (kernels/int4_matmul.cu): the one every entry point is
//! compiled with, and the INT4 g128 variants compiled beside them to be measured against it
//! (`INT4_MATMUL_VARIANT`). A variant is used only when asked for: the environment variable
//! `QMTOT_MATMUL_VARIANTS` (read when the backend starts) or
//! [`CudaBackend::use_matmul_variants`](super::CudaBackend::use_matmul_variants), and
//! `qmtot bench kernels --matmul-variants` times every one beside the default.

use crate::error::{Error, Result};

/// The batch widths of the matmul entry points: `NT` tiles of 8 rows.
pub const MATMUL_TILES: [usize; 4] = [1, 2, 4, 8];

/// The batch width (tiles of 8 rows) of the entry point that serves `m` rows: the narrowest
/// that holds them, at most 8 tiles (larger `m` takes more blocks along z).
pub fn batch_tiles(m: usize) -> usize {
    MATMUL_TILES.into_iter().find(|&t| 8 * t >= m).unwrap_or(8)
}

/// Threads per matmul block (4 warps).
pub const MATMUL_WARPS: usize = 4;

/// A matmul pipeline: `ring` weight slots per warp (`ring − 1` stages in flight behind the one
/// computed) and activation chunks of `xc` inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pipeline {
    pub ring: usize,
    pub xc: usize,
}

impl Pipeline {
    /// The default entry points' pipeline for `nt` batch tiles (`DEFAULT_RING`,
    /// `XChunk<NT>::XC`): about 16 KB of activations per block.
    pub fn default_for(nt: usize) -> Self {
        let xc = match nt {
            1 => 1024,
            2 => 512,
            _ => 256,
        };
        Self { ring: 3, xc }
    }

    /// Dynamic shared memory of one block in bytes (`mma_smem_bytes<NT, W, RING, XC>()`) for
    /// INT4 group size `group` (`None`: f16): a weight ring of 4 warps × `ring` slots × (4 weight
    /// uint4 + the INT4 scale quads' ceil(8·256/group / 32)) uint4 per lane, an x chunk of 8·NT
    /// rows × (XC + 8) halves, and Σ x of each 32 inputs for INT4. The kernel traps if it is
    /// launched with less.
    pub fn smem_bytes(self, nt: usize, group: Option<usize>) -> usize {
        let aux = group.map_or(0, |g| (8 * (256 / g)).div_ceil(32));
        let ring = MATMUL_WARPS * self.ring * (4 + aux) * 32 * 16;
        let x = 8 * nt * (self.xc + 8) * 2;
        let sum_x = if group.is_some() {
            8 * nt * (self.xc / 32) * 4
        } else {
            0
        };
        ring + x + sum_x
    }
}

/// The default matmul entry point for batch tiles `nt` and INT4 group size `group` (`None`:
/// f16).
pub fn matmul_kernel(nt: usize, group: Option<usize>) -> String {
    match group {
        Some(g) => format!("int4_matmul_n{nt}_g{g}_f16"),
        None => format!("dense_matmul_n{nt}_f16"),
    }
}

/// A compiled INT4 g128 pipeline variant for `nt` batch tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulVariant {
    pub nt: usize,
    pub pipeline: Pipeline,
}

/// INT4 group size of the variants.
pub const VARIANT_GROUP: usize = 128;

const fn variant(nt: usize, ring: usize, xc: usize) -> MatmulVariant {
    MatmulVariant {
        nt,
        pipeline: Pipeline { ring, xc },
    }
}

/// The variants kernels/int4_matmul.cu compiles (its `INT4_MATMUL_VARIANT` lines; a test keeps
/// the two lists equal).
pub const MATMUL_VARIANTS: [MatmulVariant; 9] = [
    variant(1, 4, 1024),
    variant(1, 3, 512),
    variant(1, 4, 512),
    variant(1, 6, 512),
    variant(1, 3, 256),
    variant(1, 5, 256),
    variant(2, 3, 256),
    variant(2, 4, 256),
    variant(2, 3, 512),
];

impl MatmulVariant {
    pub fn kernel_name(&self) -> String {
        format!(
            "int4_matmul_n{}_g{VARIANT_GROUP}_r{}_x{}_f16",
            self.nt, self.pipeline.ring, self.pipeline.xc
        )
    }

    /// `n1=r4x512`: the form [`MatmulVariant::parse_list`] reads.
    pub fn label(&self) -> String {
        format!("n{}=r{}x{}", self.nt, self.pipeline.ring, self.pipeline.xc)
    }

    /// A comma-separated list of labels (`n1=r4x512,n2=r3x256`; empty or `none`: no variant),
    /// at most one per batch width, each a compiled variant.
    pub fn parse_list(spec: &str) -> Result<Vec<MatmulVariant>> {
        let spec = spec.trim();
        if spec.is_empty() || spec == "none" {
            return Ok(Vec::new());
        }
        let mut out: Vec<MatmulVariant> = Vec::new();
        for item in spec.split(',').map(str::trim) {
            let Some(v) = MATMUL_VARIANTS.iter().find(|v| v.label() == item) else {
                let known: Vec<String> = MATMUL_VARIANTS.iter().map(|v| v.label()).collect();
                return Err(Error::InvalidArgument(format!(
                    "matmul variant {item:?}: not one of {}",
                    known.join(", ")
                )));
            };
            if out.iter().any(|o| o.nt == v.nt) {
                return Err(Error::InvalidArgument(format!(
                    "matmul variants: two for batch width n{} in {spec:?}",
                    v.nt
                )));
            }
            out.push(*v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_variants_are_the_listed_ones() {
        // kernels/int4_matmul.cu's INT4_MATMUL_VARIANT(NT, R, XC, MINB) lines.
        let src = include_str!("../../../kernels/int4_matmul.cu");
        let compiled: Vec<(usize, usize, usize)> = src
            .lines()
            .filter_map(|l| l.strip_prefix("INT4_MATMUL_VARIANT("))
            .map(|args| {
                let v: Vec<usize> = args
                    .trim_end_matches(')')
                    .split(',')
                    .map(|a| a.trim().parse().unwrap())
                    .collect();
                (v[0], v[1], v[2])
            })
            .collect();
        let listed: Vec<(usize, usize, usize)> = MATMUL_VARIANTS
            .iter()
            .map(|v| (v.nt, v.pipeline.ring, v.pipeline.xc))
            .collect();
        assert_eq!(compiled, listed);
    }

    #[test]
    fn labels_parse_back_and_bad_lists_are_errors() {
        for v in MATMUL_VARIANTS {
            assert_eq!(MatmulVariant::parse_list(&v.label()).unwrap(), vec![v]);
        }
        assert_eq!(
            MatmulVariant::parse_list(" n1=r3x512 , n2=r4x256").unwrap(),
            vec![variant(1, 3, 512), variant(2, 4, 256)]
        );
        assert!(MatmulVariant::parse_list("").unwrap().is_empty());
        assert!(MatmulVariant::parse_list("none").unwrap().is_empty());
        for bad in ["n1=r9x512", "n3=r3x256", "r3x512", "n1=r3x512,n1=r4x512", "n1=r3x512,"] {
            assert!(
                matches!(MatmulVariant::parse_list(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
        assert_eq!(variant(1, 4, 512).kernel_name(), "int4_matmul_n1_g128_r4_x512_f16");
    }

    /// The launcher's shared-memory size is the kernel's `mma_smem_bytes` (worked out by hand
    /// here from the layout in kernels/int4_matmul.cu; the kernel also traps on less).
    #[test]
    fn shared_memory_matches_the_kernel_layout() {
        let d = Pipeline::default_for;
        // INT4 g128, NT = 1: ring 4·3·(4 + 1)·32·16 = 30720, x 8·1032·2 = 16512, Σx 8·32·4 = 1024.
        assert_eq!(d(1).smem_bytes(1, Some(128)), 48256);
        // INT4 g32 (two quad slots), NT = 1: ring 4·3·6·32·16 = 36864.
        assert_eq!(d(1).smem_bytes(1, Some(32)), 36864 + 16512 + 1024);
        // f16, NT = 8: ring 4·3·4·32·16 = 24576, x 64·264·2 = 33792.
        assert_eq!(d(8).smem_bytes(8, None), 58368);
        // A variant: ring 4·5·5·32·16 = 51200, x 8·264·2 = 4224, Σx 8·8·4 = 256.
        assert_eq!(variant(1, 5, 256).pipeline.smem_bytes(1, Some(128)), 55680);
        for nt in MATMUL_TILES {
            for group in [None, Some(32), Some(64), Some(128)] {
                // Under the 227 KB a block may opt into on sm_80 and sm_90.
                assert!(d(nt).smem_bytes(nt, group) <= 227 * 1024);
            }
        }
        // Four default decode blocks (16 warps) fit in an H100/H200 multiprocessor's 228 KB,
        // with the 1 KB the driver keeps per block.
        assert!(4 * (d(1).smem_bytes(1, Some(32)) + 1024) <= 228 * 1024);
        for v in MATMUL_VARIANTS {
            assert!(v.pipeline.smem_bytes(v.nt, Some(VARIANT_GROUP)) <= 227 * 1024, "{v:?}");
        }
    }
}
