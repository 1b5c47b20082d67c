//! Vector helpers shared by the CPU kernels.

/// Horizontal sum of 8 lanes in the tree the AVX2 [`hsum`] uses:
/// `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`. Portable kernels that must match the AVX2 ones bit
/// for bit sum their lanes with this.
#[inline(always)]
pub(crate) fn hsum8(l: &[f32; 8]) -> f32 {
    let a = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

/// Horizontal sum of an 8-lane vector (see [`hsum8`] for the order).
///
/// # Safety
/// Only called from functions compiled with AVX enabled.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}
