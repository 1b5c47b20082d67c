//! Every CUDA kernel compiles for Hopper (`sm_90a`) and Ampere (`sm_80`) through NVRTC with
//! ptxas in verbose mode, with no errors and no register spills; registers and shared memory
//! per kernel are printed. Needs libnvrtc and the CUDA headers, not a GPU: `scripts/test`
//! fetches the pinned NVRTC 13.0 (scripts/fetch-nvrtc) and sets `REQUIRE_NVRTC=1`, so there a
//! missing NVRTC fails the test instead of skipping it.

use qmtot::backend::cuda::nvrtc::{self, KernelResources};

fn nvrtc_or_skip() -> bool {
    let present = nvrtc::nvrtc_present() && nvrtc::cuda_include_dir().is_some();
    if !present {
        assert!(
            std::env::var("REQUIRE_NVRTC").as_deref() != Ok("1"),
            "REQUIRE_NVRTC=1 but libnvrtc or cuda_fp16.h is missing (LD_LIBRARY_PATH, CUDA_INCLUDE_DIR)"
        );
        eprintln!("skipped: NVRTC not available (run scripts/fetch-nvrtc and set LD_LIBRARY_PATH, CUDA_INCLUDE_DIR)");
    }
    present
}

#[test]
fn every_kernel_compiles_for_sm90a_and_sm80_without_spills() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    let mut failures = Vec::new();
    for arch in ["sm_90a", "sm_80"] {
        for src in nvrtc::SOURCES {
            match nvrtc::compile(src, arch, true) {
                Err(e) => failures.push(format!("{} for {arch}: {e}", src.name)),
                Ok(built) => {
                    assert!(!built.cubin.is_empty(), "{} for {arch}: empty cubin", src.name);
                    let report = nvrtc::parse_ptxas_report(&built.log);
                    assert!(
                        !report.is_empty(),
                        "{} for {arch}: no ptxas report in\n{}",
                        src.name,
                        built.log
                    );
                    for KernelResources {
                        kernel,
                        registers,
                        shared_bytes,
                        stack_bytes,
                        spill_stores,
                        spill_loads,
                    } in report
                    {
                        eprintln!(
                            "{arch} {:<18} {kernel:<30} {registers:>3} registers {shared_bytes:>6} B smem {stack_bytes:>4} B stack",
                            src.name
                        );
                        if spill_stores + spill_loads > 0 {
                            failures.push(format!(
                                "{kernel} ({}) for {arch}: {spill_stores} B spill stores, {spill_loads} B spill loads",
                                src.name
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "kernel build failures:\n{}", failures.join("\n"));
}

#[test]
fn a_kernel_with_an_error_is_a_typed_error_with_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken = nvrtc::KernelSource {
        name: "broken.cu",
        source:
            "#include \"common.cuh\"\nextern \"C\" __global__ void broken_f16(float* x) { x[0] = undefined_name; }\n",
    };
    match nvrtc::compile(&broken, "sm_80", false) {
        Err(qmtot::Error::Backend { reason, .. }) => assert!(reason.contains("undefined_name"), "{reason}"),
        other => panic!("expected a backend error, got {other:?}"),
    }
}

#[test]
fn the_kernel_cache_compiles_once_and_survives_a_corrupt_entry() {
    use qmtot::backend::cuda::kernel_cache::KernelCache;
    if !nvrtc_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = KernelCache::new(dir.path());
    let src = &nvrtc::SOURCES[0];
    let (cold, hit) = cache.get_or_compile(src, "sm_80").unwrap();
    assert!(!hit, "an empty cache compiles");
    let (warm, hit) = cache.get_or_compile(src, "sm_80").unwrap();
    assert!(hit, "the second call reads the cache");
    assert_eq!(cold, warm);
    let (_, hit) = cache.get_or_compile(src, "sm_90a").unwrap();
    assert!(!hit, "another architecture is another entry");
    // Truncate every entry: the next call recompiles and gets the same cubin.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    }
    let (again, hit) = cache.get_or_compile(src, "sm_80").unwrap();
    assert!(!hit, "a truncated entry is not trusted");
    assert_eq!(again, cold);
}
