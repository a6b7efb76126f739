//! The two foreign calls the rest of the workspace cannot make under `unsafe_code = "forbid"`,
//! each behind a safe function that checks what the callee assumes.
//!
//! - [`matmul`]: one single-threaded strided f32 product through `gemm`, for kernels that run
//!   many small products in parallel themselves (fused attention: one task per sequence, its
//!   heads' `T x T` scores in a task-local buffer). candle's batched matmul runs each small
//!   product with its own thread split, which measured 47 GFLOP/s at `(32, 130, 64) x (64, 130)`
//!   against ~250 for one large product (docs/performance.md).
//! - [`keep_freed_memory`]: mimalloc's purge delay set to "never", so memory freed by one step
//!   is reused by the next instead of being returned to the OS and faulted back in zeroed.

/// A strided view of a row-major-ish f32 matrix inside a slice: element `(i, j)` is
/// `data[offset + i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

/// The destination of [`matmul`]: element `(i, j)` is `data[offset + i * rs + j]`.
#[derive(Debug)]
pub struct ViewMut<'a> {
    pub data: &'a mut [f32],
    pub offset: usize,
    pub rs: usize,
}

/// Index one past the last element a `(rows, cols)` view touches; `None` on overflow.
fn extent(offset: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(offset);
    }
    let last = (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)?;
    offset.checked_add(last)?.checked_add(1)
}

/// Whether two `(rows, cols)` index sets with the given strides can only meet where they are the
/// same element: true when the destination's rows do not alias each other.
fn rows_disjoint(rows: usize, cols: usize, rs: usize) -> bool {
    rows <= 1 || rs >= cols
}

/// `dst = scale * lhs · rhs` (or `dst += ...` with `accumulate`) for `lhs (m, k)`, `rhs (k, n)`,
/// `dst (m, n)`, on the calling thread. Errors, never writes out of bounds, when a view does not
/// fit its slice or the destination's rows overlap.
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: ViewMut<'_>,
    lhs: View<'_>,
    rhs: View<'_>,
    scale: f32,
    accumulate: bool,
) -> Result<(), String> {
    let fits = |what: &str, end: Option<usize>, len: usize| match end {
        Some(end) if end <= len => Ok(()),
        _ => Err(format!(
            "matmul: {what} view does not fit its {len} elements"
        )),
    };
    fits(
        "destination",
        extent(dst.offset, m, n, dst.rs, 1),
        dst.data.len(),
    )?;
    fits(
        "left",
        extent(lhs.offset, m, k, lhs.rs, lhs.cs),
        lhs.data.len(),
    )?;
    fits(
        "right",
        extent(rhs.offset, k, n, rhs.rs, rhs.cs),
        rhs.data.len(),
    )?;
    if !rows_disjoint(m, n, dst.rs) {
        return Err(format!(
            "matmul: destination rows of {n} overlap at stride {}",
            dst.rs
        ));
    }
    let as_stride = |s: usize| isize::try_from(s).map_err(|_| format!("matmul: stride {s}"));
    let (d_rs, l_rs, l_cs, r_rs, r_cs) = (
        as_stride(dst.rs)?,
        as_stride(lhs.rs)?,
        as_stride(lhs.cs)?,
        as_stride(rhs.rs)?,
        as_stride(rhs.cs)?,
    );
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst_ptr = dst.data[dst.offset..].as_mut_ptr();
    let lhs_ptr = lhs.data[lhs.offset..].as_ptr();
    let rhs_ptr = rhs.data[rhs.offset..].as_ptr();
    // SAFETY: every index gemm forms, `i * rs + j * cs` within the `(m, n)`, `(m, k)` and
    // `(k, n)` shapes, lies inside its slice (checked above); the destination is borrowed
    // mutably and its elements are distinct (rows do not overlap, column stride 1), so it aliases
    // neither source; `Parallelism::None` keeps the work on this thread.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst_ptr,
            1,
            d_rs,
            accumulate,
            lhs_ptr,
            l_cs,
            l_rs,
            rhs_ptr,
            r_cs,
            r_rs,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

/// Rows per task of [`linear`]: enough to fill gemm's register blocks many times over.
const LINEAR_ROWS: usize = 64;

/// `out (R, O) = x (R, I) · wᵀ + bias` for a row-major `w (O, I)`, row blocks in parallel on
/// rayon's pool, each a single-threaded product written over the bias rows.
pub fn linear(
    x: &[f32],
    din: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<(), String> {
    use rayon::prelude::*;
    if din == 0 || w.len() % din != 0 || x.len() % din != 0 {
        return Err(format!(
            "linear: {} inputs, {} weights, width {din}",
            x.len(),
            w.len()
        ));
    }
    let (rows, dout) = (x.len() / din, w.len() / din);
    if out.len() != rows * dout || bias.is_some_and(|b| b.len() != dout) {
        return Err(format!(
            "linear: output of {} for {rows} x {dout}",
            out.len()
        ));
    }
    if dout == 0 {
        return Ok(());
    }
    let per = LINEAR_ROWS.max(rows.div_ceil(rayon::current_num_threads()));
    out.par_chunks_mut(per * dout)
        .zip(x.par_chunks(per * din))
        .try_for_each(|(o, x)| {
            let m = x.len() / din;
            if let Some(b) = bias {
                o.chunks_exact_mut(dout).for_each(|r| r.copy_from_slice(b));
            }
            matmul(
                m,
                dout,
                din,
                ViewMut {
                    data: o,
                    offset: 0,
                    rs: dout,
                },
                View {
                    data: x,
                    offset: 0,
                    rs: din,
                    cs: 1,
                },
                // wᵀ (I, O) read in place: (i, o) -> w[o, i].
                View {
                    data: w,
                    offset: 0,
                    rs: 1,
                    cs: din,
                },
                1.0,
                bias.is_some(),
            )
        })
}

/// Never return freed memory to the OS (mimalloc's `purge_delay = -1`, as the environment
/// variable `MIMALLOC_PURGE_DELAY=-1` would set it at start-up). A training step frees and
/// re-allocates the same tens of megabytes every step; purged, each comes back as fresh pages the
/// kernel zeroes: 38 % of an N = 1 bench run in a profile (docs/performance.md). Call it once, at
/// the start of `main`, in a binary whose global allocator is mimalloc.
pub fn keep_freed_memory() {
    // mimalloc v3's option index of `mi_option_purge_delay` (include/mimalloc.h).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is thread-safe and valid at any time; the value -1 is documented
    // as "no purging".
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A naive product over the same strided views.
    fn naive(m: usize, n: usize, k: usize, lhs: View<'_>, rhs: View<'_>) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| {
                        lhs.data[lhs.offset + i * lhs.rs + p * lhs.cs]
                            * rhs.data[rhs.offset + p * rhs.rs + j * rhs.cs]
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_products_match_a_naive_loop() -> Result<(), String> {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..60).map(|i| (i as f32 * 0.11).cos()).collect();
        // lhs transposed inside a wider buffer, rhs with a row stride larger than n.
        let lhs = View {
            data: &a,
            offset: 2,
            rs: 1,
            cs: 6,
        };
        let rhs = View {
            data: &b,
            offset: 1,
            rs: 9,
            cs: 1,
        };
        let want = naive(m, n, k, lhs, rhs);
        let mut dst = vec![1.0; 2 + m * 8];
        matmul(
            m,
            n,
            k,
            ViewMut {
                data: &mut dst,
                offset: 2,
                rs: 8,
            },
            lhs,
            rhs,
            0.5,
            true,
        )?;
        for i in 0..m {
            for j in 0..n {
                let got = dst[2 + i * 8 + j];
                let w = 1.0 + 0.5 * want[i * n + j];
                assert!((got - w).abs() < 1e-5, "({i}, {j}): {got} vs {w}");
            }
            assert_eq!(dst[2 + i * 8 + 7], 1.0, "the padding column is untouched");
        }
        Ok(())
    }

    #[test]
    fn views_that_do_not_fit_are_errors() {
        let a = vec![0.0f32; 10];
        let mut d = vec![0.0f32; 10];
        let v = View {
            data: &a,
            offset: 0,
            rs: 3,
            cs: 1,
        };
        let err = matmul(
            4,
            3,
            3,
            ViewMut {
                data: &mut d,
                offset: 0,
                rs: 3,
            },
            v,
            v,
            1.0,
            false,
        );
        assert!(err.is_err_and(|e| e.contains("does not fit")));
        let overlap = matmul(
            2,
            3,
            1,
            ViewMut {
                data: &mut d,
                offset: 0,
                rs: 2,
            },
            v,
            v,
            1.0,
            false,
        );
        assert!(overlap.is_err_and(|e| e.contains("overlap")));
    }
}
