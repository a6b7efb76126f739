//! Where a result came from: the build's git revision, candle's version, the machine, the
//! thread count. Written into every table row and into `results/<exp>/env.txt`.

use serde::{Deserialize, Serialize};

pub const GIT_REV: &str = env!("DATAMUX_GIT_REV");
pub const GIT_DIRTY: &str = env!("DATAMUX_GIT_DIRTY");
/// candle-core as pinned in the workspace (`Cargo.toml`); candle exposes no version constant.
pub const CANDLE_VERSION: &str = "0.11.1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    pub git_rev: String,
    pub git_dirty: bool,
    pub candle_version: String,
    pub device: String,
    pub dtype: String,
    pub threads: i64,
}

impl Provenance {
    pub fn current() -> Self {
        Self {
            git_rev: GIT_REV.to_string(),
            git_dirty: GIT_DIRTY == "true",
            candle_version: CANDLE_VERSION.to_string(),
            device: format!("cpu: {}", cpu_model()),
            dtype: "f32".into(),
            threads: candle_core::utils::get_num_threads() as i64,
        }
    }
}

/// The CPU model from `/proc/cpuinfo`, or `unknown`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The text of `env.txt`.
pub fn env_txt(command: &str) -> String {
    let p = Provenance::current();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!(
        "command: {command}\ngit_rev: {}\ngit_dirty: {}\ncpu: {}\ncores: {cores}\nthreads_per_run: see the `threads` column\ncandle: {}\nrustflags: {}\navx512f: {}\n",
        p.git_rev,
        p.git_dirty,
        cpu_model(),
        p.candle_version,
        option_env!("RUSTFLAGS").unwrap_or(""),
        has_avx512(),
    )
}

/// Whether the CPU has AVX-512F (gemm's `x86-v4` kernels use it when present).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
