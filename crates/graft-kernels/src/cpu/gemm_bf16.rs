//! bf16 GEMM with f32 accumulation: `C = alpha · A · B + beta · C`.
//!
//! Inputs are f32 (rounded to bf16, round-to-nearest-even, while packing) or already bf16, seen
//! through arbitrary strides, so the three training layouts (forward NT, backward NN and TN) need no
//! copies. On CPUs with `avx512_bf16` (and F/BW/VL) the products run on a `vdpbf16ps` microkernel:
//!
//! * B is packed in panels of [`NR`] = 32 columns in the "VNNI" pair layout (for each pair of
//!   consecutive k, the 32 columns' two bf16 values interleaved: 128 bytes = two zmm per k-pair);
//! * A is packed in panels of [`MR`] = 8 rows, also by k-pair (8 × 4 bytes per k-pair), so that one
//!   32-bit broadcast feeds a row's pair into a `vdpbf16ps`;
//! * the 8 × 32 microkernel keeps 16 zmm f32 accumulators and issues 16 `vdpbf16ps` per k-pair
//!   (2 vector loads + 8 broadcasts) over a whole k-block, then writes the tile once
//!   (`alpha · acc + beta · C`, masked at the edges);
//! * odd k is padded with a zero k and edge panels with zero rows/columns when packing;
//! * packing is vectorised for the unit-stride cases: rows of A / columns of B with k contiguous
//!   (NT's A and B, NN's A) are converted 32 elements at a time (`vcvtne2ps2bf16`) and transposed
//!   16 lines × 16 pairs in registers; operands contiguous across a k-row (NN's B, TN's A and B)
//!   interleave two k-rows per pair with one `vpermw`. Any other stride takes a scalar path.
//! * blocking: k longer than [`KC`] is cut into balanced k-blocks, each packed and multiplied on its
//!   own (C is read and written once per k-block, so KC is large: the B micro-panel streams from
//!   L1/L2); rows in blocks of [`MC`] (the packed A block stays in L2 while B panels pass).
//!
//! A `B` used for many products (a frozen weight, the LM head multiplied chunk after chunk) can be
//! packed once with [`PackedB::new`] and passed to [`gemm_bf16_packed`]; when the other operand has
//! few rows, packing B otherwise costs as much as a good part of the product.
//!
//! A `B` that is not stored as f32/bf16 — a block-quantized frozen weight — is a [`BSource`]: it
//! writes bf16 tiles of itself (at most [`CHUNK`](x86) columns × one k-block) into a per-thread
//! scratch buffer that the packer then packs as it packs a view ([`gemm_bf16_source`],
//! [`PackedB::from_source`]), so the whole matrix never exists in bf16 outside the packed panels.
//!
//! Threads split the larger of the two output dimensions into contiguous ranges. The operand that
//! every worker needs (all of A when splitting columns, all of B when splitting rows) is packed
//! once per k-block, in parallel, and shared; each worker packs its own part of the other operand
//! in chunks of 512 rows or columns, so a chunk is still in its core's cache when multiplied.
//!
//! Measured on the 2-core Zen 5 development VM (per core: `vdpbf16ps` peak ≈ 515 GFLOP/s, f32 FMA
//! ≈ 257): 430–490 GFLOP/s on 1 thread and 780–920 on 2 for the SmolLM2-135M training shapes, about
//! 3.5–4.5× the `gemm` crate's f32 (see `examples/bench_gemm_bf16.rs`). The blocking can be
//! overridden for tuning with `GRAFT_GEMM_BF16_BLOCKING=kc,mc,nc,chunk` (read once).
//!
//! Numerics: results do not depend on the thread count (each element is summed over the same
//! k-blocks in the same order). Products of bf16 values are exact in f32; each `vdpbf16ps` adds its two products to the
//! f32 accumulator. Like the instruction, the f32→bf16 conversion while packing flushes denormal
//! inputs to zero (`half`'s conversion keeps them), and denormal accumulations flush to zero.
//!
//! On Intel CPUs without AMX (or with AMX not granted) the same panels feed an f32-FMA kernel
//! instead ([`GemmPath::Avx512Fma`]): there `vdpbf16ps` issues at half the FMA rate (measured on
//! a Xeon model 207: 86 GFLOP/s a core against 173 for `vfmadd231ps`), so multiplying the bf16
//! values as f32 is twice the peak. B's pairs are widened in registers (a shift for the even k, a
//! mask for the odd: 4 ALU operations per 32 FMAs); A's panels are widened to f32 after packing,
//! so each FMA takes its A value as a broadcast from memory. Each lane adds its even-k product,
//! then its odd-k one; the few-row product ([`gemm_bf16_rows_packed`]) does the same, so decode
//! rows stay bit-identical to the GEMM on this path too.
//!
//! Elsewhere (no `avx512_bf16`, or not x86-64) the inputs are rounded to bf16 and widened to f32
//! copies, then multiplied with the `gemm` crate: the same products with f32 accumulation, only
//! summed in another order.

use half::bf16;

/// Element storage of a [`MatRef`].
#[derive(Clone, Copy, Debug)]
pub enum MatData<'a> {
    /// f32 elements, rounded to bf16 (nearest-even) when packed.
    F32(&'a [f32]),
    /// bf16 elements, used as they are.
    Bf16(&'a [bf16]),
}

/// A strided read-only matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// The elements.
    pub data: MatData<'a>,
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance in elements between (i, j) and (i + 1, j).
    pub row_stride: usize,
    /// Distance in elements between (i, j) and (i, j + 1).
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major f32 matrix `rows × cols`.
    pub fn f32_row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data: MatData::F32(data),
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A row-major bf16 matrix `rows × cols`.
    pub fn bf16_row_major(data: &'a [bf16], rows: usize, cols: usize) -> Self {
        MatRef {
            data: MatData::Bf16(data),
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn len(&self) -> usize {
        match self.data {
            MatData::F32(d) => d.len(),
            MatData::Bf16(d) => d.len(),
        }
    }

    /// Panics unless every element of the view lies inside `data`.
    fn check(&self, what: &str) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|r| {
                (self.cols - 1)
                    .checked_mul(self.col_stride)
                    .and_then(|c| r.checked_add(c))
            })
            .expect("gemm_bf16: view extent overflows usize");
        assert!(
            last < self.len(),
            "gemm_bf16: {what} view {}x{} (strides {}, {}) needs {} elements, data has {}",
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
            last + 1,
            self.len()
        );
    }

    /// Element (i, j) rounded to bf16, as its bit pattern.
    #[inline(always)]
    fn bits(&self, i: usize, j: usize) -> u16 {
        let idx = i * self.row_stride + j * self.col_stride;
        match self.data {
            MatData::F32(d) => bf16::from_f32(d[idx]).to_bits(),
            MatData::Bf16(d) => d[idx].to_bits(),
        }
    }
}

/// A `B` operand (`k × n`) produced a tile at a time, e.g. a block-quantized weight dequantized
/// to bf16 while it is packed.
pub trait BSource: Sync {
    /// k (rows of B).
    fn rows(&self) -> usize;
    /// n (columns of B).
    fn cols(&self) -> usize;
    /// Whether [`BSource::tile`] writes column after column (each column's k values contiguous)
    /// rather than row after row.
    fn columns_contiguous(&self) -> bool;
    /// Writes `B[k0..k1, j0..j1]` as bf16 bit patterns (round to nearest even) into `out`:
    /// `out[(j − j0)·(k1 − k0) + (k − k0)]` when [`BSource::columns_contiguous`], else
    /// `out[(k − k0)·(j1 − j0) + (j − j0)]`.
    fn tile(&self, k0: usize, k1: usize, j0: usize, j1: usize, out: &mut [u16]);
}

/// The strided view of a tile [`BSource::tile`] wrote (`kb × nj`).
fn tile_view<'a>(src: &dyn BSource, buf: &'a [bf16], kb: usize, nj: usize) -> MatRef<'a> {
    let (row_stride, col_stride) = if src.columns_contiguous() {
        (1, kb)
    } else {
        (nj, 1)
    };
    MatRef {
        data: MatData::Bf16(&buf[..kb * nj]),
        rows: kb,
        cols: nj,
        row_stride,
        col_stride,
    }
}

/// Rows of the microkernel's register tile (A panel height).
pub const MR: usize = 8;
/// Columns of the microkernel's register tile (B panel width): two zmm of 16 f32.
pub const NR: usize = 32;
/// Largest k-block: longer k is split into balanced blocks of at most this many, each packed and
/// multiplied on its own (C is read and written once per block).
pub const KC: usize = 2048;
/// Row block: the packed A block `MC × KC` stays in L2 while the B panels stream past it.
pub const MC: usize = 96;
/// Column block of the inner loops.
pub const NC: usize = 2048;

/// Whether the CPU has the avx512_bf16 instructions (and the AVX-512 F/BW/VL subsets this kernel
/// uses).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernel that runs the products on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPath {
    /// AMX tiles (`tdpbf16ps`, 32 × 32 output tiles): Intel Sapphire Rapids and later.
    Amx,
    /// The AVX-512 `vdpbf16ps` microkernel (8 × 32 register tile): AMD Zen 4/5, where a
    /// `vdpbf16ps` does twice the work of an f32 FMA in the same time.
    Avx512Bf16,
    /// The same panels and tile multiplied with f32 FMAs, each bf16 operand widened in registers
    /// (a shift or a mask): Intel without AMX (Sapphire Rapids with AMX hidden, Cooper Lake),
    /// where `vdpbf16ps` issues at half the FMA rate and so runs at half its throughput
    /// (measured on a Xeon model 207: 86 GFLOP/s per core against 173 for FMAs).
    Avx512Fma,
    /// Inputs rounded to bf16, widened to f32 and multiplied by the `gemm` crate.
    Portable,
}

impl GemmPath {
    /// The path in words, for benchmark headers.
    pub fn describe(self) -> &'static str {
        match self {
            GemmPath::Amx => "AMX tiles (tdpbf16ps)",
            GemmPath::Avx512Bf16 => "avx512_bf16 (vdpbf16ps)",
            GemmPath::Avx512Fma => "AVX-512 f32 FMA on bf16 operands widened in registers",
            GemmPath::Portable => "portable (bf16-rounded, widened to f32)",
        }
    }

    /// The instruction the path's microkernel is built on, whose register-resident rate
    /// [`instruction_peak_gflops`] measures; `None` for AMX and the portable path.
    pub fn peak_instruction(self) -> Option<&'static str> {
        match self {
            GemmPath::Avx512Fma => Some("vfmadd231ps"),
            GemmPath::Avx512Bf16 => Some("vdpbf16ps"),
            GemmPath::Amx | GemmPath::Portable => None,
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            GemmPath::Amx => x86::amx::available(),
            #[cfg(not(target_arch = "x86_64"))]
            GemmPath::Amx => false,
            GemmPath::Avx512Bf16 | GemmPath::Avx512Fma => has_avx512_bf16(),
            GemmPath::Portable => true,
        }
    }
}

/// The path [`gemm_bf16`] and its variants take: the fastest this CPU supports — AMX tiles where
/// granted; else on Intel the FMA kernel (its `vdpbf16ps` issues at half the rate), elsewhere the
/// `vdpbf16ps` one — or the one named by `GRAFT_GEMM_BF16_PATH` (`amx`, `avx512`, `fma`,
/// `portable`; for comparisons) when supported. Decided once.
pub fn gemm_path() -> GemmPath {
    static PATH: std::sync::OnceLock<GemmPath> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| {
        let wanted = match std::env::var("GRAFT_GEMM_BF16_PATH").as_deref() {
            Ok("amx") => Some(GemmPath::Amx),
            Ok("avx512") => Some(GemmPath::Avx512Bf16),
            Ok("fma") => Some(GemmPath::Avx512Fma),
            Ok("portable") => Some(GemmPath::Portable),
            _ => None,
        };
        match wanted {
            Some(p) if p.supported() => p,
            _ if GemmPath::Amx.supported() => GemmPath::Amx,
            _ if GemmPath::Avx512Fma.supported() && cpu_is_intel() => GemmPath::Avx512Fma,
            _ if GemmPath::Avx512Bf16.supported() => GemmPath::Avx512Bf16,
            _ => GemmPath::Portable,
        }
    })
}

/// Whether the CPU is Intel's (CPUID vendor "GenuineIntel").
fn cpu_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // cpuid leaf 0 exists on every x86-64 CPU.
        let v = core::arch::x86_64::__cpuid(0);
        let bytes: Vec<u8> = [v.ebx, v.edx, v.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        bytes == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C[m×n] = alpha · A[m×k] · B[k×n] + beta · C`, with bf16-rounded inputs and f32 accumulation.
///
/// `C` is row-major with row stride `c_row_stride` (≥ n). `threads` is how many rayon workers to use
/// (0 or 1: the current thread only). With `beta == 0`, `C` is not read (it may hold garbage or NaN);
/// with `alpha == 0`, A and B are not read (C is only scaled by `beta`).
///
/// # Example: the three layouts of a linear layer's training step, without copies
/// ```
/// use graft_kernels::cpu::gemm_bf16::{MatRef, gemm_bf16};
/// let (t, k, n) = (4, 6, 5);
/// let x = vec![0.5f32; t * k]; // activations [t×k]
/// let w = vec![0.25f32; n * k]; // weight [n×k]
/// let (xv, wv) = (MatRef::f32_row_major(&x, t, k), MatRef::f32_row_major(&w, n, k));
/// // Forward NT: Y[t×n] = X · Wᵀ.
/// let mut y = vec![0.0f32; t * n];
/// gemm_bf16(&mut y, n, xv, wv.t(), 1.0, 0.0, 1);
/// assert!(y.iter().all(|&v| v == 0.75));
/// let dy = MatRef::f32_row_major(&y, t, n);
/// // Backward NN: dX[t×k] = dY · W.
/// let mut dx = vec![f32::NAN; t * k]; // beta = 0: never read
/// gemm_bf16(&mut dx, k, dy, wv, 1.0, 0.0, 2);
/// // Backward TN: dW[n×k] += dYᵀ · X.
/// let mut dw = vec![1.0f32; n * k];
/// gemm_bf16(&mut dw, k, dy.t(), xv, 1.0, 1.0, 2);
/// assert!(dw.iter().all(|&v| v == 1.0 + 4.0 * 0.75 * 0.5));
/// ```
///
/// # Panics
/// If `a.cols != b.rows`, or a view or `C` is too short for its shape and strides.
pub fn gemm_bf16(
    c: &mut [f32],
    c_row_stride: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    beta: f32,
    threads: usize,
) {
    gemm_bf16_impl(
        c,
        c_row_stride,
        a,
        BInput::View(b),
        alpha,
        beta,
        threads,
        gemm_path(),
    );
}

/// A `B` operand packed once, for products that reuse it (a frozen weight multiplied chunk after
/// chunk, e.g. the LM head): [`gemm_bf16_packed`] then skips packing it, which matters when the
/// other operand has few rows (packing B costs about as much as multiplying it by ~100 rows).
/// Holds `k × n` bf16 (2 bytes per element; an f32 copy on CPUs without avx512_bf16).
#[derive(Clone)]
pub struct PackedB {
    rows: usize,
    cols: usize,
    repr: PackedRepr,
}

#[derive(Clone)]
enum PackedRepr {
    /// k-blocks `(k0, k1, offset)` and their VNNI panels.
    #[cfg(target_arch = "x86_64")]
    Vnni(Vec<(usize, usize, usize)>, Vec<u16>),
    /// The bf16-rounded values widened to f32, row-major `k × n` (fallback path).
    Widened(Vec<f32>),
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB({}x{}, {} bytes)", self.rows, self.cols, self.bytes())
    }
}

impl PackedB {
    /// Packs `b` (`k × n`, any strides, f32 rounded to bf16 or bf16) using `threads` workers.
    pub fn new(b: MatRef, threads: usize) -> Self {
        Self::new_impl(b, threads, gemm_path() == GemmPath::Portable)
    }

    /// Packs a [`BSource`] (`k × n`) using `threads` workers, a tile at a time.
    pub fn from_source(b: &dyn BSource, threads: usize) -> Self {
        Self::source_impl(b, threads, gemm_path() == GemmPath::Portable)
    }

    fn source_impl(b: &dyn BSource, threads: usize, force_fallback: bool) -> Self {
        let (rows, cols) = (b.rows(), b.cols());
        #[cfg(target_arch = "x86_64")]
        if !force_fallback && has_avx512_bf16() && rows > 0 && cols > 0 {
            let (blocks, data) = x86::pack_b_whole(x86::BArg::Source(b), rows, cols, threads.max(1));
            return PackedB {
                rows,
                cols,
                repr: PackedRepr::Vnni(blocks, data),
            };
        }
        let _ = (force_fallback, threads);
        let mut w = vec![0.0f32; rows * cols];
        source_widened(b, 0, cols, &mut w);
        PackedB {
            rows,
            cols,
            repr: PackedRepr::Widened(w),
        }
    }

    fn new_impl(b: MatRef, threads: usize, force_fallback: bool) -> Self {
        b.check("B");
        let (rows, cols) = (b.rows, b.cols);
        #[cfg(target_arch = "x86_64")]
        if !force_fallback && has_avx512_bf16() && rows > 0 && cols > 0 {
            let (blocks, data) =
                x86::pack_b_whole(x86::BArg::View(x86::KCat::b(b)), rows, cols, threads.max(1));
            return PackedB {
                rows,
                cols,
                repr: PackedRepr::Vnni(blocks, data),
            };
        }
        let _ = (force_fallback, threads);
        let mut w = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            w.extend((0..cols).map(|j| bf16::from_bits(b.bits(i, j)).to_f32()));
        }
        PackedB {
            rows,
            cols,
            repr: PackedRepr::Widened(w),
        }
    }

    /// k (rows of B).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// n (columns of B).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element `(i, j)` (row `i < k`, column `j < n`) as f32.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        assert!(
            i < self.rows && j < self.cols,
            "PackedB::get({i}, {j}) outside {}x{}",
            self.rows,
            self.cols
        );
        match &self.repr {
            #[cfg(target_arch = "x86_64")]
            PackedRepr::Vnni(blocks, data) => {
                let &(k0, k1, off) = blocks
                    .iter()
                    .find(|b| i < b.1)
                    .expect("a k-block holds every row");
                let kp = (k1 - k0).div_ceil(2);
                let at = off + (j / NR) * kp * NR * 2 + ((i - k0) / 2) * NR * 2 + (j % NR) * 2 + (i - k0) % 2;
                bf16::from_bits(data[at]).to_f32()
            }
            PackedRepr::Widened(w) => w[i * self.cols + j],
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.repr {
            #[cfg(target_arch = "x86_64")]
            PackedRepr::Vnni(blocks, data) => data.len() * 2 + blocks.len() * 24,
            PackedRepr::Widened(w) => w.len() * 4,
        }
    }
}

/// [`gemm_bf16`] with a `B` packed in advance by [`PackedB::new`].
///
/// # Panics
/// If `a.cols != b.rows()`, or `a` or `C` is too short for its shape and strides.
pub fn gemm_bf16_packed(
    c: &mut [f32],
    c_row_stride: usize,
    a: MatRef,
    b: &PackedB,
    alpha: f32,
    beta: f32,
    threads: usize,
) {
    gemm_bf16_impl(
        c,
        c_row_stride,
        a,
        BInput::Packed(b),
        alpha,
        beta,
        threads,
        gemm_path(),
    );
}

/// [`gemm_bf16`] with a `B` produced by a [`BSource`] (dequantized tile by tile while packed).
///
/// # Panics
/// If `a.cols != b.rows()`, or `a` or `C` is too short for its shape and strides.
pub fn gemm_bf16_source(
    c: &mut [f32],
    c_row_stride: usize,
    a: MatRef,
    b: &dyn BSource,
    alpha: f32,
    beta: f32,
    threads: usize,
) {
    gemm_bf16_impl(
        c,
        c_row_stride,
        a,
        BInput::Source(b),
        alpha,
        beta,
        threads,
        gemm_path(),
    );
}

/// `C = alpha · (A₁ · B₁ + A₂ · B₂) + beta · C` as one product over the concatenated k
/// (`[A₁ A₂] · [B₁; B₂]`): a linear layer and its LoRA side product in one pass over `C`, with
/// `A₂`/`B₂` the rank-`r` factors. The packers read the two parts of each operand into the same
/// panels, so it gives the same bits as [`gemm_bf16`] on the concatenated matrices.
///
/// `A₁`'s columns (= `B₁`'s rows) must be even for that; otherwise, or on a CPU without
/// avx512_bf16, it runs as two products (the second accumulating).
///
/// # Panics
/// If the shapes do not chain (`A₁`, `A₂` the same rows; `B₁`, `B₂` the same columns;
/// `Aᵢ.cols == Bᵢ.rows`), or a view or `C` is too short.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_cat(
    c: &mut [f32],
    c_row_stride: usize,
    a: (MatRef, MatRef),
    b: (MatRef, MatRef),
    alpha: f32,
    beta: f32,
    threads: usize,
) {
    assert!(
        a.0.rows == a.1.rows && b.0.cols == b.1.cols && a.0.cols == b.0.rows && a.1.cols == b.1.rows,
        "gemm_bf16_cat: shapes do not chain"
    );
    let path = gemm_path();
    #[cfg(target_arch = "x86_64")]
    if path != GemmPath::Portable && a.0.cols.is_multiple_of(2) && a.0.cols > 0 && a.1.cols > 0 {
        for (v, what) in [(&a.0, "A1"), (&a.1, "A2"), (&b.0, "B1"), (&b.1, "B2")] {
            v.check(what);
        }
        let (m, n) = (a.0.rows, b.0.cols);
        if m == 0 || n == 0 {
            return;
        }
        assert!(
            c_row_stride >= n,
            "gemm_bf16_cat: c_row_stride {c_row_stride} < n {n}"
        );
        assert!(
            c.len() >= (m - 1) * c_row_stride + n,
            "gemm_bf16_cat: C too short"
        );
        if alpha == 0.0 {
            scale_c(c, c_row_stride, m, n, beta);
            return;
        }
        let ka = x86::KCat {
            main: a.0,
            tail: Some(a.1),
            k_rows: false,
        };
        let kb = x86::KCat {
            main: b.0,
            tail: Some(b.1),
            k_rows: true,
        };
        x86::gemm(
            c,
            c_row_stride,
            &ka,
            x86::BArg::View(kb),
            alpha,
            beta,
            threads.max(1),
            path,
        );
        return;
    }
    let _ = path;
    gemm_bf16(c, c_row_stride, a.0, b.0, alpha, beta, threads);
    gemm_bf16(c, c_row_stride, a.1, b.1, alpha, 1.0, threads);
}

/// `C[t×n] = alpha · A[t×k] · B + beta · C` for a few rows (`t ≤ MR`) of a row-major f32 `A`
/// against a [`PackedB`]: the decode product on a weight packed once for inference. It streams
/// the packed panels once with no padding to the microkernel's 8 rows, and computes each element
/// bit for bit as the AVX-512 kernel does (the same bf16 rounding of `A`, k-blocks, pair order
/// and epilogue); where that kernel is also [`gemm_path`] (see [`few_rows_match_gemm`]) a row's
/// result does not depend on how many rows are multiplied with it — a request's greedy output
/// does not change with the server's load. `C` is row-major with row stride `n`.
///
/// Returns `false` without touching `C` when `t` is 0 or above [`MR`], or `b` holds the widened
/// fallback copy (a CPU without avx512_bf16); callers then use [`gemm_bf16_packed`].
///
/// # Panics
/// If `a` (`t × k`) or `c` (`t × n`) is shorter than its shape.
pub fn gemm_bf16_rows_packed(c: &mut [f32], a: &[f32], b: &PackedB, t: usize, alpha: f32, beta: f32) -> bool {
    rows_packed_on(c, a, b, t, alpha, beta, gemm_path())
}

/// [`gemm_bf16_rows_packed`] with the sums of `path`'s kernel (the FMA kernel's on
/// [`GemmPath::Avx512Fma`], else the `vdpbf16ps` kernel's).
fn rows_packed_on(
    c: &mut [f32],
    a: &[f32],
    b: &PackedB,
    t: usize,
    alpha: f32,
    beta: f32,
    path: GemmPath,
) -> bool {
    let (k, n) = (b.rows, b.cols);
    if !(1..=MR).contains(&t) {
        return false;
    }
    match &b.repr {
        #[cfg(target_arch = "x86_64")]
        PackedRepr::Vnni(blocks, data) => {
            assert!(
                a.len() >= t * k && c.len() >= t * n,
                "gemm_bf16_rows_packed: operands too short"
            );
            if n == 0 {
                return true;
            }
            if k == 0 || alpha == 0.0 {
                scale_c(c, n, t, n, beta);
                return true;
            }
            x86::rows_packed(
                c,
                a,
                blocks,
                data,
                t,
                k,
                n,
                alpha,
                beta,
                path == GemmPath::Avx512Fma,
            );
            true
        }
        PackedRepr::Widened(_) => false,
    }
}

/// Whether [`gemm_bf16_rows_packed`] gives each row the bits [`gemm_bf16_packed`] gives it (true
/// unless the GEMM runs on AMX tiles, whose rounding of a pair of products differs); where not,
/// callers that must not let the row count change a row's result keep few-row and many-row
/// products apart.
pub fn few_rows_match_gemm() -> bool {
    gemm_path() != GemmPath::Amx
}

/// Columns `j0..j0 + nc` of a source, bf16-rounded and widened, row-major `k × nc` into `out`.
fn source_widened(b: &dyn BSource, j0: usize, nc: usize, out: &mut [f32]) {
    let k = b.rows();
    let mut tile = vec![0u16; k * nc];
    b.tile(0, k, j0, j0 + nc, &mut tile);
    let widen = |x: u16| bf16::from_bits(x).to_f32();
    for p in 0..k {
        for j in 0..nc {
            let idx = if b.columns_contiguous() {
                j * k + p
            } else {
                p * nc + j
            };
            out[p * nc + j] = widen(tile[idx]);
        }
    }
}

/// The `B` operand of a product.
enum BInput<'x, 'a> {
    View(MatRef<'a>),
    Packed(&'x PackedB),
    Source(&'x dyn BSource),
}

#[allow(clippy::too_many_arguments)]
fn gemm_bf16_impl(
    c: &mut [f32],
    ldc: usize,
    a: MatRef,
    b: BInput,
    alpha: f32,
    beta: f32,
    threads: usize,
    path: GemmPath,
) {
    let (k, n) = match &b {
        BInput::View(v) => (v.rows, v.cols),
        BInput::Packed(p) => (p.rows, p.cols),
        BInput::Source(s) => (s.rows(), s.cols()),
    };
    let m = a.rows;
    assert_eq!(a.cols, k, "gemm_bf16: inner dimensions differ");
    a.check("A");
    if let BInput::View(v) = &b {
        v.check("B");
    }
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n, "gemm_bf16: c_row_stride {ldc} < n {n}");
    assert!(c.len() >= (m - 1) * ldc + n, "gemm_bf16: C too short");
    let threads = threads.max(1);
    if k == 0 || alpha == 0.0 {
        // Nothing to multiply (BLAS convention: alpha = 0 does not read A or B).
        scale_c(c, ldc, m, n, beta);
        return;
    }
    match b {
        BInput::View(v) => {
            #[cfg(target_arch = "x86_64")]
            if path != GemmPath::Portable {
                x86::gemm(
                    c,
                    ldc,
                    &x86::KCat::a(a),
                    x86::BArg::View(x86::KCat::b(v)),
                    alpha,
                    beta,
                    threads,
                    path,
                );
                return;
            }
            fallback_gemm(
                c,
                ldc,
                &a,
                n,
                |j0, nc, out| {
                    for p in 0..k {
                        out.extend((j0..j0 + nc).map(|j| bf16::from_bits(v.bits(p, j)).to_f32()));
                    }
                },
                alpha,
                beta,
                threads,
            );
        }
        BInput::Source(s) => {
            #[cfg(target_arch = "x86_64")]
            if path != GemmPath::Portable {
                x86::gemm(
                    c,
                    ldc,
                    &x86::KCat::a(a),
                    x86::BArg::Source(s),
                    alpha,
                    beta,
                    threads,
                    path,
                );
                return;
            }
            fallback_gemm(
                c,
                ldc,
                &a,
                n,
                |j0, nc, out| {
                    out.resize(k * nc, 0.0);
                    source_widened(s, j0, nc, out);
                },
                alpha,
                beta,
                threads,
            );
        }
        BInput::Packed(p) => match &p.repr {
            #[cfg(target_arch = "x86_64")]
            PackedRepr::Vnni(blocks, data) => x86::gemm(
                c,
                ldc,
                &x86::KCat::a(a),
                x86::BArg::Packed(blocks, data, n),
                alpha,
                beta,
                threads,
                // Packed panels exist only where the AVX-512 kernels run.
                path,
            ),
            PackedRepr::Widened(w) => fallback_gemm(
                c,
                ldc,
                &a,
                n,
                |j0, nc, out| {
                    for p in 0..k {
                        out.extend_from_slice(&w[p * n + j0..p * n + j0 + nc]);
                    }
                },
                alpha,
                beta,
                threads,
            ),
        },
    }
}

/// `C = beta · C` (`beta == 0` writes zeros without reading).
fn scale_c(c: &mut [f32], ldc: usize, m: usize, n: usize, beta: f32) {
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + n];
        if beta == 0.0 {
            row.fill(0.0);
        } else {
            row.iter_mut().for_each(|x| *x *= beta);
        }
    }
}

/// Portable path: bf16-rounded f32 copies multiplied by the `gemm` crate (f32 accumulation).
/// `b_cols(j0, nc, out)` appends columns `j0..j0 + nc` of B, bf16-rounded, row-major `k × nc`.
#[allow(clippy::too_many_arguments)]
fn fallback_gemm(
    c: &mut [f32],
    ldc: usize,
    a: &MatRef,
    n: usize,
    b_cols: impl Fn(usize, usize, &mut Vec<f32>),
    alpha: f32,
    beta: f32,
    threads: usize,
) {
    let (m, k) = (a.rows, a.cols);
    let widen = |x: u16| bf16::from_bits(x).to_f32();
    let mut a32 = Vec::with_capacity(m * k);
    for i in 0..m {
        a32.extend((0..k).map(|p| widen(a.bits(i, p))));
    }
    // Bound the B copy: columns in chunks.
    let chunk = (1 << 22) / k.max(1);
    let chunk = chunk.clamp(64, n.max(64));
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut b32 = Vec::new();
    for j0 in (0..n).step_by(chunk) {
        let nc = chunk.min(n - j0);
        b32.clear();
        b_cols(j0, nc, &mut b32);
        let dst = &mut c[j0..];
        assert!(dst.len() >= (m - 1) * ldc + nc);
        // SAFETY: `dst` holds rows `0..m` with stride `ldc` and `nc` columns (checked just above);
        // `a32` is `m × k` and `b32` is `k × nc`, both row-major and fully initialised. With
        // `read_dst == false` gemm does not read `dst`. gemm computes dst := beta_g·(lhs·rhs) +
        // alpha_g·dst, hence the swapped scalars.
        unsafe {
            gemm::gemm(
                m,
                nc,
                k,
                dst.as_mut_ptr(),
                1,
                ldc as isize,
                beta != 0.0,
                a32.as_ptr(),
                1,
                k as isize,
                b32.as_ptr(),
                1,
                nc as isize,
                beta,
                alpha,
                false,
                false,
                false,
                par,
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BSource, GemmPath, KC, MC, MR, MatData, MatRef, NC, NR, tile_view};
    use core::arch::x86_64::*;
    use std::cell::Cell;

    pub(super) mod amx;

    /// The microkernel a product runs on, with its A panel layout.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Micro {
        /// 8 × 32 `vdpbf16ps` register tile, A in 8-row pair panels.
        Avx512,
        /// The same tile on f32 FMAs, A in 8-row pair panels of f32 (bf16 values widened, so a
        /// broadcast from memory feeds the FMA), B's pairs widened in registers.
        Fma,
        /// 32 × 32 AMX tiles, A in 32-row tile panels ([`amx::pack_a`]).
        Amx,
    }

    impl Micro {
        /// Rows of an A panel.
        fn mr(self) -> usize {
            match self {
                Micro::Avx512 | Micro::Fma => MR,
                Micro::Amx => amx::MA,
            }
        }
        /// u16 elements of an A panel of `kp` pairs.
        fn a_panel(self, kp: usize) -> usize {
            match self {
                Micro::Avx512 => kp * MR * 2,
                Micro::Fma => kp * MR * 4,
                Micro::Amx => amx::a_panel_len(kp),
            }
        }
        /// Packs the A panels `q0..q1` of `kp` pairs into `out`.
        fn pack_a(self, a: &KCat, q0: usize, q1: usize, kp: usize, out: &mut [u16]) {
            match self {
                Micro::Avx512 => pack_a(a, q0, q1, kp, out),
                Micro::Fma => with_scratch(&NARROW, out.len() / 2, |narrow| {
                    pack_a(a, q0, q1, kp, narrow);
                    widen(narrow, out);
                }),
                Micro::Amx => amx::pack_a(a, q0, q1, kp, out),
            }
        }
        /// The kernel's `compute` over packed panels (safety contract of [`compute`] and
        /// [`amx::compute`]).
        #[allow(clippy::too_many_arguments)]
        unsafe fn compute(
            self,
            ap: &[u16],
            bp: &[u16],
            kp: usize,
            rows: usize,
            cols: usize,
            c: *mut f32,
            ldc: usize,
            alpha: f32,
            beta: f32,
        ) {
            // SAFETY: per the caller.
            unsafe {
                match self {
                    Micro::Avx512 => compute::<false>(ap, bp, kp, rows, cols, c, ldc, alpha, beta),
                    Micro::Fma => compute::<true>(ap, bp, kp, rows, cols, c, ldc, alpha, beta),
                    Micro::Amx => amx::compute(ap, bp, kp, rows, cols, c, ldc, alpha, beta),
                }
            }
        }
    }

    /// bf16 bits `src` widened to f32 bits in `dst` (twice as long): element `i` becomes the
    /// little-endian u16 pair `(0, src[i])` at `2i`.
    fn widen(src: &[u16], dst: &mut [u16]) {
        assert_eq!(dst.len(), 2 * src.len(), "widen: lengths");
        // SAFETY: the kernels that use widened panels run only where avx512f is present.
        unsafe { widen_avx512(src, dst) }
    }

    /// [`widen`], sixteen elements at a time.
    ///
    /// # Safety
    /// `dst.len() == 2 * src.len()`; the CPU must have avx512f.
    #[target_feature(enable = "avx512f")]
    unsafe fn widen_avx512(src: &[u16], dst: &mut [u16]) {
        let n = src.len();
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: elements i..i+16 of src and 2i..2i+32 of dst are inside (i + 16 ≤ n).
            unsafe {
                let v = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v));
                _mm512_storeu_si512(dst.as_mut_ptr().add(2 * i) as *mut __m512i, w);
            }
            i += 16;
        }
        for j in i..n {
            dst[2 * j] = 0;
            dst[2 * j + 1] = src[j];
        }
    }

    /// Owned-operand chunk (rows of A or columns of B) a worker packs at a time.
    const CHUNK: usize = 512;

    thread_local! {
        static SHARED: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
        static OWNED: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
        static TILE: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
        static NARROW: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    }

    /// Runs `f` on a thread-local scratch buffer of `len` u16 (contents unspecified). The buffer
    /// is taken out of its slot while in use, so a nested call (rayon work stealing) gets its own.
    fn with_scratch<R>(
        slot: &'static std::thread::LocalKey<Cell<Vec<u16>>>,
        len: usize,
        f: impl FnOnce(&mut [u16]) -> R,
    ) -> R {
        let mut v = slot.with(|s| s.take());
        if v.len() < len {
            v.resize(len, 0);
        }
        let r = f(&mut v[..len]);
        slot.with(|s| {
            let other = s.take();
            s.set(if other.len() > v.len() { other } else { v });
        });
        r
    }

    /// Pointer to C shared by the workers; each writes a disjoint set of tiles.
    #[derive(Clone, Copy)]
    struct CPtr(*mut f32);
    // SAFETY: the workers write disjoint tiles of C (disjoint row or column ranges) and the
    // pointer does not outlive the `gemm_bf16` call that borrows `c` mutably.
    unsafe impl Send for CPtr {}
    // SAFETY: as above.
    unsafe impl Sync for CPtr {}

    impl CPtr {
        /// The element `off` past the start of C (a method, so closures capture the whole `CPtr`).
        ///
        /// # Safety
        /// `off` must be within C.
        unsafe fn at(self, off: usize) -> *mut f32 {
            // SAFETY: per the caller.
            unsafe { self.0.add(off) }
        }
    }

    /// Runs `f(t)` for `t in 0..threads`, on up to `threads` rayon workers.
    fn par_for(threads: usize, f: impl Fn(usize) + Sync) {
        if threads <= 1 {
            f(0);
            return;
        }
        rayon::scope(|s| {
            let f = &f;
            for t in 1..threads {
                s.spawn(move |_| f(t));
            }
            f(0);
        });
    }

    /// Balanced split of `units` into `parts` contiguous ranges: the start of part `t`.
    fn split(units: usize, parts: usize, t: usize) -> usize {
        units * t / parts
    }

    /// Where B comes from: a view packed on the fly, or panels packed in advance.
    pub(super) enum BArg<'x, 'a> {
        /// B's rows, possibly two views one after the other along k.
        View(KCat<'a>),
        /// Tiles written on demand (see [`pack_b_source`]).
        Source(&'x dyn BSource),
        /// `(k0, k1, offset)` per k-block, the packed panels (see [`pack_b_whole`]) and n.
        Packed(&'x [(usize, usize, usize)], &'x [u16], usize),
    }

    /// A GEMM operand whose k range is one view's k followed by another's: A's columns (`k()`
    /// = columns) or B's rows. The main view's k is even, so no k-pair straddles the two; the
    /// packers fill each panel's pairs from both.
    #[derive(Clone, Copy)]
    pub(super) struct KCat<'a> {
        pub main: MatRef<'a>,
        pub tail: Option<MatRef<'a>>,
        /// Whether k runs along the rows (a B operand) rather than the columns (an A operand).
        pub k_rows: bool,
    }

    impl<'a> KCat<'a> {
        /// An A operand (k = columns) of one view.
        pub fn a(main: MatRef<'a>) -> Self {
            KCat {
                main,
                tail: None,
                k_rows: false,
            }
        }
        /// A B operand (k = rows) of one view.
        pub fn b(main: MatRef<'a>) -> Self {
            KCat {
                main,
                tail: None,
                k_rows: true,
            }
        }
        fn k_of(&self, v: &MatRef) -> usize {
            if self.k_rows { v.rows } else { v.cols }
        }
        /// The length of k.
        pub fn k(&self) -> usize {
            self.k_of(&self.main) + self.tail.as_ref().map_or(0, |t| self.k_of(t))
        }
        /// k range `k0..k1` of a view (k0 and the length even unless at the end).
        fn k_view(&self, v: &MatRef<'a>, k0: usize, k1: usize) -> MatRef<'a> {
            if self.k_rows {
                sub_view(v, k0, 0, k1 - k0, v.cols)
            } else {
                sub_view(v, 0, k0, v.rows, k1 - k0)
            }
        }
        /// The operand restricted to k range `k0..k1` (even bounds, or the end).
        fn sub(&self, k0: usize, k1: usize) -> Self {
            let km = self.k_of(&self.main);
            let one = |v: MatRef<'a>| KCat {
                main: v,
                tail: None,
                k_rows: self.k_rows,
            };
            match &self.tail {
                None => one(self.k_view(&self.main, k0, k1)),
                Some(_) if k1 <= km => one(self.k_view(&self.main, k0, k1)),
                Some(t) if k0 >= km => one(self.k_view(t, k0 - km, k1 - km)),
                Some(t) => KCat {
                    main: self.k_view(&self.main, k0, km),
                    tail: Some(self.k_view(t, 0, k1 - km)),
                    k_rows: self.k_rows,
                },
            }
        }
    }

    /// Balanced k-blocks of at most `kc` (even boundaries, so pairs never straddle blocks).
    fn k_blocks(k: usize) -> Vec<(usize, usize)> {
        let kp = k.div_ceil(2);
        let nkb = kp.div_ceil(blocking().kc / 2).max(1);
        let kcp = kp.div_ceil(nkb);
        (0..nkb)
            .map(|kb| (2 * kcp * kb, (2 * kcp * (kb + 1)).min(k)))
            .collect()
    }

    /// Packs all of B (`k × n`, a view or a source), k-block after k-block: `(k0, k1, offset)`
    /// per block, and the panels.
    pub(super) fn pack_b_whole(
        b: BArg,
        k: usize,
        n: usize,
        threads: usize,
    ) -> (Vec<(usize, usize, usize)>, Vec<u16>) {
        let np = n.div_ceil(NR);
        let mut blocks = Vec::new();
        let mut len = 0;
        for (k0, k1) in k_blocks(k) {
            blocks.push((k0, k1, len));
            len += np * (k1 - k0).div_ceil(2) * NR * 2;
        }
        let mut data = vec![0u16; len];
        for &(k0, k1, off) in &blocks {
            let kp = (k1 - k0).div_ceil(2);
            let b_panel = kp * NR * 2;
            let out = &mut data[off..off + np * b_panel];
            match &b {
                BArg::View(b) => {
                    let b_blk = b.sub(k0, k1);
                    pack_parallel(out, b_panel, np, threads, |q0, q1, out| {
                        pack_b(&b_blk, q0, q1, kp, out)
                    });
                }
                BArg::Source(s) => pack_parallel(out, b_panel, np, threads, |q0, q1, out| {
                    pack_b_source(*s, k0, k1, q0, q1, kp, out)
                }),
                BArg::Packed(..) => unreachable!("packing packed panels"),
            }
        }
        (blocks, data)
    }

    /// `C = alpha · A · B + beta · C` on the kernel of `path` (AMX: [`amx::available`] must be
    /// true; `Portable` takes the `vdpbf16ps` kernel).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        c: &mut [f32],
        ldc: usize,
        a: &KCat,
        b: BArg,
        alpha: f32,
        beta: f32,
        threads: usize,
        path: GemmPath,
    ) {
        let micro = match path {
            GemmPath::Amx => {
                assert!(amx::available(), "gemm_bf16: AMX path without AMX");
                Micro::Amx
            }
            GemmPath::Avx512Fma => Micro::Fma,
            GemmPath::Avx512Bf16 | GemmPath::Portable => Micro::Avx512,
        };
        // Each k-block is packed and multiplied on its own; C is read and written once per block.
        let owned_blocks;
        let blocks: Vec<(usize, usize, Option<&[u16]>)> = match b {
            BArg::View(_) | BArg::Source(_) => {
                owned_blocks = k_blocks(a.k());
                owned_blocks.iter().map(|&(k0, k1)| (k0, k1, None)).collect()
            }
            BArg::Packed(blocks, data, _) => blocks
                .iter()
                .map(|&(k0, k1, off)| (k0, k1, Some(&data[off..])))
                .collect(),
        };
        for (kb, &(k0, k1, packed)) in blocks.iter().enumerate() {
            let a_blk = a.sub(k0, k1);
            let beta = if kb == 0 { beta } else { 1.0 };
            match (&b, packed) {
                (BArg::View(b), _) => {
                    let b_blk = b.sub(k0, k1);
                    gemm_kblock(micro, c, ldc, &a_blk, KBlockB::View(&b_blk), alpha, beta, threads);
                }
                (BArg::Source(s), _) => {
                    let b = KBlockB::Source(*s, k0, k1);
                    gemm_kblock(micro, c, ldc, &a_blk, b, alpha, beta, threads)
                }
                (BArg::Packed(_, _, n), Some(p)) => gemm_kblock(
                    micro,
                    c,
                    ldc,
                    &a_blk,
                    KBlockB::Packed(p, *n),
                    alpha,
                    beta,
                    threads,
                ),
                (BArg::Packed(..), None) => unreachable!(),
            }
        }
    }

    /// [`super::gemm_bf16_rows_packed`]: A is packed per k-block as the GEMM packs it (widened
    /// to f32 for the FMA kernel's sums when `fma`); each worker takes a range of B's 32-column
    /// panels and runs them through [`rows_panel`] (or [`rows_panel_fma`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rows_packed(
        c: &mut [f32],
        a: &[f32],
        blocks: &[(usize, usize, usize)],
        data: &[u16],
        t: usize,
        k: usize,
        n: usize,
        alpha: f32,
        beta: f32,
        fma: bool,
    ) {
        use rayon::prelude::*;
        // A's panels, one per k-block, and the k-block's B panels.
        let parts: Vec<(usize, Vec<u16>, &[u16])> = blocks
            .iter()
            .map(|&(k0, k1, off)| {
                let kp = (k1 - k0).div_ceil(2);
                let mut ap = vec![0u16; kp * MR * 2];
                // SAFETY: rows 0..t of `a` hold k elements each (asserted by the caller), so
                // elements k0..k1 of each lie inside it; features: avx512_bf16 (Vnni panels
                // exist only on such CPUs).
                unsafe { pack_lines::<MR>(MatData::F32(a), k0, k, t, k1 - k0, kp, &mut ap) };
                if fma {
                    let mut wide = vec![0u16; 2 * ap.len()];
                    widen(&ap, &mut wide);
                    ap = wide;
                }
                (kp, ap, &data[off..off + n.div_ceil(NR) * kp * NR * 2])
            })
            .collect();
        let panels = n.div_ceil(NR);
        let per_task = panels.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
        let cp = CPtr(c.as_mut_ptr());
        (0..panels.div_ceil(per_task)).into_par_iter().for_each(|task| {
            let (mut q, end) = (task * per_task, ((task + 1) * per_task).min(panels));
            while q < end {
                // Panels at a time: several accumulator chains per row, at most 16 registers.
                let p = match t {
                    1 | 2 => 4,
                    3 | 4 => 2,
                    _ => 1,
                }
                .min(end - q);
                // SAFETY: panels q..q+p write columns 32q.. of the t rows of C only; they are
                // inside `data`; features as above.
                unsafe {
                    macro_rules! go {
                        ($f:ident: $($t:literal)*) => {
                            match (t, p) {
                                $(
                                    ($t, 4) => $f::<$t, 4>(cp, &parts, q, n, alpha, beta),
                                    ($t, 2 | 3) => $f::<$t, 2>(cp, &parts, q, n, alpha, beta),
                                    ($t, _) => $f::<$t, 1>(cp, &parts, q, n, alpha, beta),
                                )*
                                _ => unreachable!("1..=MR rows"),
                            }
                        };
                    }
                    if fma {
                        go!(rows_panel_fma: 1 2 3 4 5 6 7 8);
                    } else {
                        go!(rows_panel: 1 2 3 4 5 6 7 8);
                    }
                }
                q += match p {
                    4 => 4,
                    2 | 3 => 2,
                    _ => 1,
                };
            }
        });
    }

    /// Columns `32q .. 32(q + P)` (panels `q .. q + P`, all inside B) of the `T` rows of
    /// [`rows_packed`], k-block after k-block: the microkernel's loop ([`kernel`]) for `T` rows
    /// instead of [`MR`], over `P` panels at once so that few rows still keep several
    /// accumulator chains in flight (each lane's own sequence of `vdpbf16ps` is unchanged).
    ///
    /// # Safety
    /// C (row stride `n`) must hold `T` rows no other thread writes in these columns; each part
    /// holds `kp` pairs of A (`kp · MR · 2`) and whole B panels of `kp` pairs; the CPU must have
    /// avx512f/bw/vl/bf16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn rows_panel<const T: usize, const P: usize>(
        c: CPtr,
        parts: &[(usize, Vec<u16>, &[u16])],
        q: usize,
        n: usize,
        alpha: f32,
        beta: f32,
    ) {
        for (kb, (kp, ap, bp)) in parts.iter().enumerate() {
            let ap = ap.as_ptr() as *const i32;
            let panel = kp * NR * 2;
            let bp = bp[q * panel..(q + P) * panel].as_ptr();
            let mut acc = [[[_mm512_setzero_ps(); 2]; T]; P];
            for p in 0..*kp {
                // SAFETY: pair p of panel q + j is 2 × 32 u16 at `bp + j·panel + p·64`, and row
                // m's pair the i32 at `ap + p·MR + m` (caller); prefetches never fault.
                unsafe {
                    let mut av = [_mm512_setzero_si512(); T];
                    for (m, av) in av.iter_mut().enumerate() {
                        *av = _mm512_set1_epi32(ap.add(p * MR + m).read_unaligned());
                    }
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let b = bp.add(j * panel + p * NR * 2);
                        _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(16 * NR) as *const i8);
                        let b0 = _mm512_loadu_si512(b as *const __m512i).into_bh();
                        let b1 = _mm512_loadu_si512(b.add(32) as *const __m512i).into_bh();
                        for (acc, av) in acc.iter_mut().zip(&av) {
                            acc[0] = _mm512_dpbf16_ps(acc[0], av.into_bh(), b0);
                            acc[1] = _mm512_dpbf16_ps(acc[1], av.into_bh(), b1);
                        }
                    }
                }
            }
            let beta = if kb == 0 { beta } else { 1.0 };
            // SAFETY: per the caller.
            unsafe { store_panels(c, &acc, q, n, alpha, beta) };
        }
    }

    /// [`rows_panel`] with the FMA kernel's sums ([`kernel_fma`]): A's parts hold f32 pairs
    /// (`kp · MR · 2` f32 as u16 pairs); each lane adds its even-k product, then its odd-k one,
    /// pair after pair, as the kernel does.
    ///
    /// # Safety
    /// As [`rows_panel`], with A's parts widened.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn rows_panel_fma<const T: usize, const P: usize>(
        c: CPtr,
        parts: &[(usize, Vec<u16>, &[u16])],
        q: usize,
        n: usize,
        alpha: f32,
        beta: f32,
    ) {
        let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
        for (kb, (kp, ap, bp)) in parts.iter().enumerate() {
            let ap = ap.as_ptr() as *const f32;
            let panel = kp * NR * 2;
            let bp = bp[q * panel..(q + P) * panel].as_ptr();
            let mut acc = [[[_mm512_setzero_ps(); 2]; T]; P];
            for p in 0..*kp {
                // SAFETY: as in `rows_panel`; row m's pair is the two f32 at `ap + (p·MR + m)·2`.
                unsafe {
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let b = bp.add(j * panel + p * NR * 2);
                        _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(16 * NR) as *const i8);
                        let b0 = _mm512_loadu_si512(b as *const __m512i);
                        let b1 = _mm512_loadu_si512(b.add(32) as *const __m512i);
                        let (b0e, b0o) = widen_pairs(b0, hi);
                        let (b1e, b1o) = widen_pairs(b1, hi);
                        for (m, acc) in acc.iter_mut().enumerate() {
                            let a = ap.add((p * MR + m) * 2);
                            let ae = _mm512_set1_ps(a.read_unaligned());
                            let ao = _mm512_set1_ps(a.add(1).read_unaligned());
                            acc[0] = _mm512_fmadd_ps(ae, b0e, acc[0]);
                            acc[1] = _mm512_fmadd_ps(ae, b1e, acc[1]);
                            acc[0] = _mm512_fmadd_ps(ao, b0o, acc[0]);
                            acc[1] = _mm512_fmadd_ps(ao, b1o, acc[1]);
                        }
                    }
                }
            }
            let beta = if kb == 0 { beta } else { 1.0 };
            // SAFETY: per the caller.
            unsafe { store_panels(c, &acc, q, n, alpha, beta) };
        }
    }

    /// Writes the accumulators of [`rows_panel`] / [`rows_panel_fma`] (`P` panels from `q`, `T`
    /// rows each) as `alpha · acc + beta · C`, masked at B's last column.
    ///
    /// # Safety
    /// As the callers': C (row stride `n`) holds `T` rows this thread alone writes in these
    /// columns; the CPU must have avx512f.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_panels<const T: usize, const P: usize>(
        c: CPtr,
        acc: &[[[__m512; 2]; T]; P],
        q: usize,
        n: usize,
        alpha: f32,
        beta: f32,
    ) {
        let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
        for (j, acc) in acc.iter().enumerate() {
            let (j0, nr) = ((q + j) * NR, (n - (q + j) * NR).min(NR));
            let (m0, m1) = (mask16(nr), mask16(nr.saturating_sub(16)));
            for (m, acc) in acc.iter().enumerate() {
                // SAFETY: row m < T, columns j0..j0+nr of C (caller); masked lanes untouched.
                unsafe { store_row(c.at(m * n + j0), acc, va, vb, beta != 0.0, m0, m1) };
            }
        }
    }

    /// The 16 bf16 pairs of a B panel's k-pair as f32: (the even-k values, the odd-k values).
    #[inline(always)]
    fn widen_pairs(v: __m512i, hi: __m512i) -> (__m512, __m512) {
        // SAFETY: plain integer/bit operations of AVX-512F, enabled in every caller.
        unsafe {
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                _mm512_castsi512_ps(_mm512_and_si512(v, hi)),
            )
        }
    }

    /// The `rows × cols` part of `v` starting at element (i0, j0).
    fn sub_view<'a>(v: &MatRef<'a>, i0: usize, j0: usize, rows: usize, cols: usize) -> MatRef<'a> {
        let off = if rows == 0 || cols == 0 {
            0
        } else {
            i0 * v.row_stride + j0 * v.col_stride
        };
        MatRef {
            data: match v.data {
                MatData::F32(d) => MatData::F32(&d[off..]),
                MatData::Bf16(d) => MatData::Bf16(&d[off..]),
            },
            rows,
            cols,
            row_stride: v.row_stride,
            col_stride: v.col_stride,
        }
    }

    /// One k-block: `C = alpha · A · B + beta · C` with `A`, `B` packed whole (k ≤ kc).
    /// B of one k-block: a view to pack, or `(panels, n)` packed in advance.
    enum KBlockB<'x, 'a> {
        View(&'x KCat<'a>),
        Packed(&'x [u16], usize),
        /// A source and the k-block's rows `k0..k1`.
        Source(&'x dyn BSource, usize, usize),
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_kblock(
        micro: Micro,
        c: &mut [f32],
        ldc: usize,
        a: &KCat,
        b: KBlockB,
        alpha: f32,
        beta: f32,
        threads: usize,
    ) {
        let (m, k) = (a.main.rows, a.k());
        let n = match b {
            KBlockB::View(b) => b.main.cols,
            KBlockB::Packed(_, n) => n,
            KBlockB::Source(s, _, _) => s.cols(),
        };
        let kp = k.div_ceil(2);
        let mr = micro.mr();
        let (mp, np) = (m.div_ceil(mr), n.div_ceil(NR));
        let a_panel = micro.a_panel(kp);
        let b_panel = kp * NR * 2;
        let cptr = CPtr(c.as_mut_ptr());
        // Split the output along its larger dimension; the other operand is packed whole and
        // shared, each worker packs its own part of this one, a chunk at a time.
        let split_cols = n >= m;
        if split_cols {
            let threads = threads.min(np).max(1);
            with_scratch(&SHARED, mp * a_panel, |ap| {
                pack_parallel(ap, a_panel, mp, threads, |q0, q1, out| {
                    micro.pack_a(a, q0, q1, kp, out)
                });
                let ap: &[u16] = ap;
                par_for(threads, |t| {
                    let (q0, q1) = (split(np, threads, t), split(np, threads, t + 1));
                    let chunk_panels = blocking().chunk / NR;
                    let run = |q: usize, qe: usize, bp: &[u16]| {
                        let cols = (qe * NR).min(n) - q * NR;
                        // SAFETY: see `compute`; this worker owns columns q*NR..q*NR+cols.
                        unsafe { micro.compute(ap, bp, kp, m, cols, cptr.at(q * NR), ldc, alpha, beta) };
                    };
                    match b {
                        KBlockB::View(b) => with_scratch(&OWNED, chunk_panels.min(q1 - q0) * b_panel, |bp| {
                            for q in (q0..q1).step_by(chunk_panels) {
                                let qe = (q + chunk_panels).min(q1);
                                pack_b(b, q, qe, kp, &mut bp[..(qe - q) * b_panel]);
                                run(q, qe, bp);
                            }
                        }),
                        KBlockB::Packed(bp, _) => {
                            for q in (q0..q1).step_by(chunk_panels) {
                                let qe = (q + chunk_panels).min(q1);
                                run(q, qe, &bp[q * b_panel..qe * b_panel]);
                            }
                        }
                        KBlockB::Source(s, k0, k1) => {
                            with_scratch(&OWNED, chunk_panels.min(q1 - q0) * b_panel, |bp| {
                                for q in (q0..q1).step_by(chunk_panels) {
                                    let qe = (q + chunk_panels).min(q1);
                                    pack_b_source(s, k0, k1, q, qe, kp, &mut bp[..(qe - q) * b_panel]);
                                    run(q, qe, bp);
                                }
                            })
                        }
                    }
                });
            });
        } else {
            let threads = threads.min(mp).max(1);
            let run = |bp: &[u16]| {
                par_for(threads, |t| {
                    let (q0, q1) = (split(mp, threads, t), split(mp, threads, t + 1));
                    let chunk_panels = (blocking().chunk / mr).max(1);
                    with_scratch(&OWNED, chunk_panels.min(q1 - q0) * a_panel, |ap| {
                        for q in (q0..q1).step_by(chunk_panels) {
                            let qe = (q + chunk_panels).min(q1);
                            micro.pack_a(a, q, qe, kp, &mut ap[..(qe - q) * a_panel]);
                            let rows = (qe * mr).min(m) - q * mr;
                            // SAFETY: see `compute`; this worker owns rows q*mr..q*mr+rows.
                            unsafe {
                                let c = cptr.at(q * mr * ldc);
                                micro.compute(ap, bp, kp, rows, n, c, ldc, alpha, beta)
                            };
                        }
                    });
                });
            };
            match b {
                KBlockB::View(b) => with_scratch(&SHARED, np * b_panel, |bp| {
                    pack_parallel(bp, b_panel, np, threads, |q0, q1, out| pack_b(b, q0, q1, kp, out));
                    run(bp);
                }),
                KBlockB::Packed(bp, _) => run(&bp[..np * b_panel]),
                KBlockB::Source(s, k0, k1) => with_scratch(&SHARED, np * b_panel, |bp| {
                    pack_parallel(bp, b_panel, np, threads, |q0, q1, out| {
                        pack_b_source(s, k0, k1, q0, q1, kp, out)
                    });
                    run(bp);
                }),
            }
        }
    }

    /// Packs `panels` panels of `panel_len` into `buf` with `threads` workers, each packing a
    /// contiguous range `pack(q0, q1, out)`.
    fn pack_parallel(
        buf: &mut [u16],
        panel_len: usize,
        panels: usize,
        threads: usize,
        pack: impl Fn(usize, usize, &mut [u16]) + Sync,
    ) {
        let threads = threads.min(panels).max(1);
        // Small operands (a decode step's few rows) are packed faster than a fork-join costs.
        if threads == 1 || panels * panel_len < 1 << 16 {
            pack(0, panels, &mut buf[..panels * panel_len]);
            return;
        }
        let pack = &pack;
        rayon::scope(|s| {
            let mut rest = buf;
            for t in 0..threads {
                let (q0, q1) = (split(panels, threads, t), split(panels, threads, t + 1));
                let (mine, tail) = rest.split_at_mut((q1 - q0) * panel_len);
                rest = tail;
                s.spawn(move |_| pack(q0, q1, mine));
            }
        });
    }

    /// Packs the A panels `q0..q1` (rows `q*MR..`, zero rows past the end, zero k past k) into
    /// `out`, panel after panel: `out[(q-q0)*kp*MR*2 + p*MR*2 + r*2 + e] = A[q*MR + r][2p + e]`.
    fn pack_a(a: &KCat, q0: usize, q1: usize, kp: usize, out: &mut [u16]) {
        let Some(tail) = &a.tail else {
            return pack_a_view(&a.main, q0, q1, kp, out);
        };
        // Panel by panel: the main view's pairs, then the tail's (the main k is even).
        let (panel, kpm) = (kp * MR * 2, a.main.cols / 2);
        for (q, out) in (q0..q1).zip(out.chunks_exact_mut(panel)) {
            let (head, rest) = out.split_at_mut(kpm * MR * 2);
            pack_a_view(&a.main, q, q + 1, kpm, head);
            pack_a_view(tail, q, q + 1, kp - kpm, rest);
        }
    }

    /// [`pack_a`] of one view.
    fn pack_a_view(a: &MatRef, q0: usize, q1: usize, kp: usize, out: &mut [u16]) {
        let panel = kp * MR * 2;
        assert!(out.len() >= (q1 - q0) * panel && q1 * MR < a.rows + MR);
        let (k, rs, cs) = (a.cols, a.row_stride, a.col_stride);
        let rows = a.rows.min(q1 * MR) - q0 * MR;
        if cs == 1 {
            for (q, out) in (q0..q1).zip(out.chunks_exact_mut(panel)) {
                let lines = MR.min(a.rows - q * MR);
                // SAFETY: line r < lines holds k elements at (q*MR + r)*rs (inside the view,
                // checked by `MatRef::check`); `out` holds one panel; features: this module is
                // only entered when `has_avx512_bf16()`.
                unsafe { pack_lines::<MR>(a.data, q * MR * rs, rs, lines, k, kp, out) }
            }
        } else if rs == 1 {
            // SAFETY: k-row kk holds rows q0*MR..q0*MR+rows at q0*MR + kk*cs (inside the view);
            // `out` holds the q1 - q0 panels (asserted); features as above.
            unsafe { pack_interleave::<MR>(a.data, q0 * MR, cs, rows, k, kp, &mut out[..(q1 - q0) * panel]) }
        } else {
            for (q, out) in (q0..q1).zip(out.chunks_exact_mut(panel)) {
                let lines = MR.min(a.rows - q * MR);
                pack_scalar::<MR>(kp, lines, k, out, |r, kk| a.bits(q * MR + r, kk));
            }
        }
    }

    /// Packs the B panels `q0..q1` (columns `q*NR..`, zero past the end) into `out`, panel after
    /// panel: `out[(q-q0)*kp*NR*2 + p*NR*2 + c*2 + e] = B[2p + e][q*NR + c]`.
    fn pack_b(b: &KCat, q0: usize, q1: usize, kp: usize, out: &mut [u16]) {
        let Some(tail) = &b.tail else {
            return pack_b_view(&b.main, q0, q1, kp, out);
        };
        // Panel by panel: the main view's pairs, then the tail's (the main k is even).
        let (panel, kpm) = (kp * NR * 2, b.main.rows / 2);
        for (q, out) in (q0..q1).zip(out.chunks_exact_mut(panel)) {
            let (head, rest) = out.split_at_mut(kpm * NR * 2);
            pack_b_view(&b.main, q, q + 1, kpm, head);
            pack_b_view(tail, q, q + 1, kp - kpm, rest);
        }
    }

    /// [`pack_b`] of one view.
    fn pack_b_view(b: &MatRef, q0: usize, q1: usize, kp: usize, out: &mut [u16]) {
        let panel = kp * NR * 2;
        assert!(out.len() >= (q1 - q0) * panel && q1 * NR < b.cols + NR);
        let (k, rs, cs) = (b.rows, b.row_stride, b.col_stride);
        let cols = b.cols.min(q1 * NR) - q0 * NR;
        if rs == 1 {
            for (q, out) in (q0..q1).zip(out.chunks_exact_mut(panel)) {
                let lines = NR.min(b.cols - q * NR);
                // SAFETY: column c < lines holds k elements at (q*NR + c)*cs (inside the view);
                // `out` holds one panel; features: module entered only with avx512_bf16.
                unsafe { pack_lines::<NR>(b.data, q * NR * cs, cs, lines, k, kp, out) }
            }
        } else if cs == 1 {
            // SAFETY: k-row kk holds columns q0*NR..q0*NR+cols at q0*NR + kk*rs (inside the
            // view); `out` holds the q1 - q0 panels (asserted); features as above.
            unsafe { pack_interleave::<NR>(b.data, q0 * NR, rs, cols, k, kp, &mut out[..(q1 - q0) * panel]) }
        } else {
            for (q, out) in (q0..q1).zip(out.chunks_exact_mut(panel)) {
                let lines = NR.min(b.cols - q * NR);
                pack_scalar::<NR>(kp, lines, k, out, |c, kk| b.bits(kk, q * NR + c));
            }
        }
    }

    /// Packs the B panels `q0..q1` of the k-block `k0..k1` of a source as [`pack_b`] packs a view:
    /// the source writes a bf16 tile of at most [`CHUNK`] columns into a per-thread scratch
    /// buffer, which is then packed through the unit-stride paths.
    #[allow(clippy::too_many_arguments)]
    fn pack_b_source(
        s: &dyn BSource,
        k0: usize,
        k1: usize,
        q0: usize,
        q1: usize,
        kp: usize,
        out: &mut [u16],
    ) {
        let panel = kp * NR * 2;
        let (n, kb) = (s.cols(), k1 - k0);
        let step = (CHUNK / NR).max(1);
        with_scratch(&TILE, kb * step * NR, |tile| {
            for q in (q0..q1).step_by(step) {
                let qe = (q + step).min(q1);
                let (j0, j1) = (q * NR, (qe * NR).min(n));
                s.tile(k0, k1, j0, j1, &mut tile[..kb * (j1 - j0)]);
                let tile: &[half::bf16] = bytemuck::cast_slice(&tile[..kb * (j1 - j0)]);
                let view = tile_view(s, tile, kb, j1 - j0);
                pack_b_view(
                    &view,
                    0,
                    qe - q,
                    kp,
                    &mut out[(q - q0) * panel..(qe - q0) * panel],
                );
            }
        });
    }

    /// Generic strided packing: `out[p*W*2 + l*2 + e] = get(l, 2p + e)` (zero past `lines`/`k`).
    fn pack_scalar<const W: usize>(
        kp: usize,
        lines: usize,
        k: usize,
        out: &mut [u16],
        get: impl Fn(usize, usize) -> u16,
    ) {
        for p in 0..kp {
            let o = &mut out[p * W * 2..][..W * 2];
            for l in 0..W {
                for e in 0..2 {
                    let kk = 2 * p + e;
                    o[l * 2 + e] = if l < lines && kk < k { get(l, kk) } else { 0 };
                }
            }
        }
    }

    /// `row[..32] = alpha·acc (+ beta·row)` on the lanes of `m0` (columns 0..16) and `m1`
    /// (16..32): one C row of a 32-column panel, as the microkernel and the few-row product
    /// both write it.
    ///
    /// # Safety
    /// The masked lanes of `row[..32]` must be valid to read and write; the CPU must have
    /// avx512f.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store_row(
        row: *mut f32,
        acc: &[__m512; 2],
        va: __m512,
        vb: __m512,
        add: bool,
        m0: __mmask16,
        m1: __mmask16,
    ) {
        let mut v0 = _mm512_mul_ps(acc[0], va);
        let mut v1 = _mm512_mul_ps(acc[1], va);
        // SAFETY: masked lanes only (caller).
        unsafe {
            if add {
                v0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m0, row), vb, v0);
                v1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m1, row.add(16)), vb, v1);
            }
            _mm512_mask_storeu_ps(row, m0, v0);
            _mm512_mask_storeu_ps(row.add(16), m1, v1);
        }
    }

    /// Mask of the first `n` (≤ 16) lanes.
    #[inline(always)]
    fn mask16(n: usize) -> __mmask16 {
        if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as u16 }
    }

    /// Mask of the first `n` (≤ 32) lanes.
    #[inline(always)]
    fn mask32(n: usize) -> __mmask32 {
        if n >= 32 { u32::MAX } else { (1u32 << n) - 1 }
    }

    /// The 32 consecutive elements at `idx` as bf16 bits (element `i ≥ n` reads as zero).
    ///
    /// # Safety
    /// Elements `idx..idx+n` must be inside the data; the CPU must have avx512f/bw/bf16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    unsafe fn load32(src: MatData, idx: usize, n: usize) -> __m512i {
        // SAFETY: masked-off lanes are not accessed; the pointers are formed with wrapping
        // arithmetic, and the lanes that are read lie inside the data per the caller.
        unsafe {
            match src {
                MatData::F32(d) => {
                    let p = d.as_ptr().wrapping_add(idx);
                    let lo = _mm512_maskz_loadu_ps(mask16(n), p);
                    let hi = _mm512_maskz_loadu_ps(mask16(n.saturating_sub(16)), p.wrapping_add(16));
                    _mm512_cvtne2ps_pbh(hi, lo).into_i()
                }
                MatData::Bf16(d) => {
                    _mm512_maskz_loadu_epi16(mask32(n), d.as_ptr().wrapping_add(idx) as *const i16)
                }
            }
        }
    }

    /// The 16 consecutive elements at `idx0` as bf16 bits in the low half and the 16 at `idx1`
    /// in the high half (element `i ≥ n` of either reads as zero; the high half is zero when
    /// `idx1` is `None`).
    ///
    /// # Safety
    /// Elements `idx0..idx0+n` (and `idx1..idx1+n`) must be inside the data; the CPU must have
    /// avx512f/bw/vl/bf16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    unsafe fn load16x2(src: MatData, idx0: usize, idx1: Option<usize>, n: usize) -> __m512i {
        let m = mask16(n);
        // SAFETY: as for `load32`.
        unsafe {
            match src {
                MatData::F32(d) => {
                    let lo = _mm512_maskz_loadu_ps(m, d.as_ptr().wrapping_add(idx0));
                    let hi = match idx1 {
                        Some(i) => _mm512_maskz_loadu_ps(m, d.as_ptr().wrapping_add(i)),
                        None => _mm512_setzero_ps(),
                    };
                    _mm512_cvtne2ps_pbh(hi, lo).into_i()
                }
                MatData::Bf16(d) => {
                    let p = d.as_ptr() as *const i16;
                    let lo = _mm256_maskz_loadu_epi16(m, p.wrapping_add(idx0));
                    let hi = match idx1 {
                        Some(i) => _mm256_maskz_loadu_epi16(m, p.wrapping_add(i)),
                        None => _mm256_setzero_si256(),
                    };
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
                }
            }
        }
    }

    /// How far ahead (in elements) the packing routines prefetch each line or k-row.
    const PACK_PF: usize = 128;

    /// Prefetches the cache line of element `idx` (never faults, so `idx` may run past the data).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    fn prefetch_line(src: MatData, idx: usize) {
        let p = match src {
            MatData::F32(d) => d.as_ptr().wrapping_add(idx) as *const i8,
            MatData::Bf16(d) => d.as_ptr().wrapping_add(idx) as *const i8,
        };
        _mm_prefetch::<_MM_HINT_T0>(p);
    }

    /// Prefetches the cache lines of elements `idx..idx + 32` (never faults, so `idx` may run past
    /// the data).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    fn prefetch_elem(src: MatData, idx: usize) {
        match src {
            MatData::F32(d) => {
                let p = d.as_ptr().wrapping_add(idx) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(p);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
            }
            MatData::Bf16(d) => _mm_prefetch::<_MM_HINT_T0>(d.as_ptr().wrapping_add(idx) as *const i8),
        }
    }

    /// Transposes a 16 × 16 matrix of 32-bit elements held as 16 rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4q + j], 128-bit lane L: rows 4q..4q+4 of column 4L + j.
        let mut u = [_mm512_setzero_si512(); 16];
        for q in 0..4 {
            u[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
            u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
            u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
            u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
        }
        let mut o = [_mm512_setzero_si512(); 16];
        for j in 0..4 {
            let v0 = _mm512_shuffle_i32x4::<0x44>(u[j], u[4 + j]);
            let v1 = _mm512_shuffle_i32x4::<0xee>(u[j], u[4 + j]);
            let v2 = _mm512_shuffle_i32x4::<0x44>(u[8 + j], u[12 + j]);
            let v3 = _mm512_shuffle_i32x4::<0xee>(u[8 + j], u[12 + j]);
            o[j] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
            o[4 + j] = _mm512_shuffle_i32x4::<0xdd>(v0, v2);
            o[8 + j] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
            o[12 + j] = _mm512_shuffle_i32x4::<0xdd>(v1, v3);
        }
        o
    }

    /// Packs `lines` lines (line `l` = `k` contiguous elements at `base + l * stride`) as
    /// `out[p*W*2 + l*2 + e] = line_l[2p + e]` (zero past `lines` and `k`): pairs are already
    /// adjacent, so this is a transpose of 32-bit pairs, 16 lines × 16 pairs at a time.
    ///
    /// # Safety
    /// Line `l < lines` must have its `k` elements inside `src`; `out.len() ≥ kp * W * 2`,
    /// `kp = k.div_ceil(2)`, `W` is 8 or a multiple of 16; the CPU must have avx512f/bw/vl/bf16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pack_lines<const W: usize>(
        src: MatData,
        base: usize,
        stride: usize,
        lines: usize,
        k: usize,
        kp: usize,
        out: &mut [u16],
    ) {
        let o = out.as_mut_ptr();
        for g in 0..W.div_ceil(16) {
            for p0 in (0..kp).step_by(16) {
                let nk = (k - 2 * p0).min(32);
                let mut r = [_mm512_setzero_si512(); 16];
                for (l, r) in r.iter_mut().enumerate() {
                    let line = g * 16 + l;
                    if line < lines.min(W) {
                        // SAFETY: elements 2*p0..2*p0+nk of a valid line (caller).
                        *r = unsafe { load32(src, base + line * stride + 2 * p0, nk) };
                        prefetch_elem(src, base + line * stride + 2 * p0 + PACK_PF);
                    }
                }
                let t = transpose16(r);
                for (p, t) in t.iter().enumerate().take((kp - p0).min(16)) {
                    // SAFETY: pair p0+p < kp, lines g*16.. < W: inside `out` (caller).
                    unsafe {
                        let dst = o.add((p0 + p) * W * 2 + g * 32);
                        if W >= 16 {
                            _mm512_storeu_si512(dst as *mut __m512i, *t);
                        } else {
                            _mm256_storeu_si256(dst as *mut __m256i, _mm512_castsi512_si256(*t));
                        }
                    }
                }
            }
        }
    }

    /// Packs `lines` lines that are contiguous across a k-row (line `l` of k-row `kk` at
    /// `base + kk * kstride + l`) into the consecutive panels of `out` (each `kp * W * 2` long):
    /// `out[(l/W)*kp*W*2 + p*W*2 + (l%W)*2 + e] = src[base + (2p+e)*kstride + l]`, zero past
    /// `lines` and `k`: two k-rows interleaved per pair, each k-row read contiguously across all
    /// the panels.
    ///
    /// # Safety
    /// For every `kk < k`, elements `base + kk*kstride + (0..lines)` must be inside `src`;
    /// `out.len()` must be a multiple of `kp * W * 2` covering `lines`; `W` is 8 or 32; the CPU
    /// must have avx512f/bw/vl/bf16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pack_interleave<const W: usize>(
        src: MatData,
        base: usize,
        kstride: usize,
        lines: usize,
        k: usize,
        kp: usize,
        out: &mut [u16],
    ) {
        // Lane 2i takes element i (first k-row), lane 2i+1 element 16+i (second k-row).
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
            18, 2, 17, 1, 16, 0,
        );
        let panel = kp * W * 2;
        let slots = out.len() / panel * W;
        assert!(slots >= lines && out.len().is_multiple_of(panel));
        let o = out.as_mut_ptr();
        // Blocks of 16 pairs, so that each panel receives 16 pairs (512 or 2048 contiguous
        // bytes) at a time rather than one pair per panel in turn, which thrashes L1 sets (the
        // panels lie a multiple of 4 KiB apart).
        for pb in (0..kp).step_by(16) {
            for l0 in (0..slots).step_by(16) {
                let n = lines.saturating_sub(l0).min(16);
                for p in pb..(pb + 16).min(kp) {
                    let k0 = base + 2 * p * kstride;
                    let k1 = (2 * p + 1 < k).then(|| k0 + kstride);
                    // SAFETY: `n` elements of each present k-row from line l0 (caller).
                    let v = unsafe { load16x2(src, k0 + l0, k1.map(|i| i + l0), n) };
                    prefetch_line(src, k0 + l0 + PACK_PF);
                    prefetch_line(src, k0 + kstride + l0 + PACK_PF);
                    let v = _mm512_permutexvar_epi16(idx, v);
                    // SAFETY: the slots l0..l0+16 (or l0..l0+8 when that is all there is) are inside
                    // `out`: panel l/W, pair p < kp.
                    unsafe {
                        if W == 8 {
                            let dst = o.add((l0 / 8) * panel + p * 16);
                            _mm256_storeu_si256(dst as *mut __m256i, _mm512_castsi512_si256(v));
                            if l0 + 8 < slots {
                                let dst = o.add((l0 / 8 + 1) * panel + p * 16);
                                _mm256_storeu_si256(dst as *mut __m256i, _mm512_extracti64x4_epi64::<1>(v));
                            }
                        } else {
                            let dst = o.add((l0 / W) * panel + p * W * 2 + (l0 % W) * 2);
                            _mm512_storeu_si512(dst as *mut __m512i, v);
                        }
                    }
                }
            }
        }
    }

    /// Multiplies packed A panels (`rows` rows) by packed B panels (`cols` columns) into the C
    /// block at `c`, looping over column blocks, row blocks, then micro-tiles.
    ///
    /// # Safety
    /// `c` must point at a `rows × cols` block (row stride `ldc`) that is valid for reads and writes
    /// and that no other thread accesses during the call; `ap` must hold `rows.div_ceil(MR)` packed
    /// panels of `kp` pairs and `bp` `cols.div_ceil(NR)` panels of `kp` pairs; the CPU must have
    /// avx512f, avx512bw and avx512bf16.
    #[allow(clippy::too_many_arguments)]
    unsafe fn compute<const FMA: bool>(
        ap: &[u16],
        bp: &[u16],
        kp: usize,
        rows: usize,
        cols: usize,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
    ) {
        let (a_panel, b_panel) = (kp * MR * if FMA { 4 } else { 2 }, kp * NR * 2);
        assert!(ap.len() >= rows.div_ceil(MR) * a_panel && bp.len() >= cols.div_ceil(NR) * b_panel);
        let bl = blocking();
        for jc in (0..cols).step_by(bl.nc) {
            let jce = (jc + bl.nc).min(cols);
            for ic in (0..rows).step_by(bl.mc) {
                let ice = (ic + bl.mc).min(rows);
                for jr in (jc..jce).step_by(NR) {
                    let bpan = &bp[(jr / NR) * b_panel..][..b_panel];
                    // The first tile of each B panel prefetches the next one (prefetches never
                    // fault, so the pointer may run past the buffer).
                    let next = bpan.as_ptr().wrapping_add(b_panel);
                    for ir in (ic..ice).step_by(MR) {
                        let apan = &ap[(ir / MR) * a_panel..][..a_panel];
                        let (mr, nr) = (MR.min(rows - ir), NR.min(cols - jr));
                        // SAFETY: the tile (ir, jr) of at most MR × NR elements lies inside the
                        // block the caller vouches for; the panels hold kp pairs (sliced
                        // above); CPU features per the caller.
                        unsafe {
                            let (a, b, c) = (apan.as_ptr(), bpan.as_ptr(), c.add(ir * ldc + jr));
                            match (FMA, ir == ic) {
                                (false, true) => kernel::<true>(kp, a, b, next, c, ldc, alpha, beta, mr, nr),
                                (false, false) => {
                                    kernel::<false>(kp, a, b, next, c, ldc, alpha, beta, mr, nr)
                                }
                                (true, true) => {
                                    kernel_fma::<true>(kp, a, b, next, c, ldc, alpha, beta, mr, nr)
                                }
                                (true, false) => {
                                    kernel_fma::<false>(kp, a, b, next, c, ldc, alpha, beta, mr, nr)
                                }
                            }
                        };
                    }
                }
            }
        }
    }

    /// Cache-blocking parameters (tunable through `GRAFT_GEMM_BF16_BLOCKING=kc,mc,nc,chunk`).
    #[derive(Clone, Copy)]
    struct Blocking {
        kc: usize,
        mc: usize,
        nc: usize,
        chunk: usize,
    }

    fn blocking() -> Blocking {
        static B: std::sync::OnceLock<Blocking> = std::sync::OnceLock::new();
        *B.get_or_init(|| {
            let mut b = Blocking {
                kc: KC,
                mc: MC,
                nc: NC,
                chunk: CHUNK,
            };
            if let Ok(v) = std::env::var("GRAFT_GEMM_BF16_BLOCKING") {
                let f: Vec<usize> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
                if let [kc, mc, nc, chunk] = f[..] {
                    b = Blocking {
                        kc: kc.max(2),
                        mc: mc.div_ceil(MR).max(1) * MR,
                        nc: nc.div_ceil(NR).max(1) * NR,
                        chunk: chunk.div_ceil(NR * MR).max(1) * NR * MR,
                    };
                }
            }
            b
        })
    }

    /// The 8 × 32 microkernel: `C[tile] = alpha · Ap·Bp + beta · C[tile]` over `kcp` k-pairs,
    /// storing only `mr × nr` elements (`beta == 0`: C is not read).
    ///
    /// # Safety
    /// `a` must hold `kcp * MR * 2` and `b` `kcp * NR * 2` readable u16; `c` must be valid for
    /// reads and writes of `mr` rows (stride `ldc`) of `nr` elements; `mr ≤ MR`, `nr ≤ NR`; the CPU
    /// must have avx512f, avx512bw and avx512bf16.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn kernel<const PF: bool>(
        kcp: usize,
        a: *const u16,
        b: *const u16,
        pf: *const u16,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
        mr: usize,
        nr: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let mut ap = a as *const i32;
        let mut bp = b;
        prefetch_tile(c, ldc, mr);
        let mut pf = pf as *const i8;
        for _ in 0..kcp {
            if PF {
                // Two lines of the next B panel per pair: all of it by the end of this tile.
                _mm_prefetch::<_MM_HINT_T0>(pf);
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64));
                pf = pf.wrapping_add(128);
            }
            // SAFETY: the pair p of the B panel is 2 × 32 u16 at `bp`, within `kcp * NR * 2`.
            let (b0, b1) = unsafe {
                (
                    _mm512_loadu_si512(bp as *const __m512i),
                    _mm512_loadu_si512(bp.add(32) as *const __m512i),
                )
            };
            let (b0, b1): (__m512bh, __m512bh) = (b0.into_bh(), b1.into_bh());
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row r's pair is the i32 at `ap + r`, within `kcp * MR * 2` u16.
                let av: __m512bh = _mm512_set1_epi32(unsafe { ap.add(r).read_unaligned() }).into_bh();
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
            // SAFETY: stays within (or one past) the panels.
            unsafe {
                ap = ap.add(MR);
                bp = bp.add(NR * 2);
            }
        }
        // SAFETY: per the caller.
        unsafe { store_tile(c, ldc, &acc, alpha, beta, mr, nr) };
    }

    /// [`kernel`] on f32 FMAs: `a` holds `kcp * MR * 2` f32 (bf16 values widened, as u16
    /// pairs), `b` the same bf16 pair panel, widened in registers; each accumulator lane adds its
    /// even-k product, then its odd-k one. The same results as the `vdpbf16ps` kernel up to the
    /// rounding of each pair's sum (an FMA rounds after each product).
    ///
    /// # Safety
    /// As [`kernel`], with `a` widened; the CPU must have avx512f/bw and fma.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,fma")]
    unsafe fn kernel_fma<const PF: bool>(
        kcp: usize,
        a: *const u16,
        b: *const u16,
        pf: *const u16,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
        mr: usize,
        nr: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let mut ap = a as *const f32;
        let mut bp = b;
        let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
        prefetch_tile(c, ldc, mr);
        let mut pf = pf as *const i8;
        for _ in 0..kcp {
            if PF {
                _mm_prefetch::<_MM_HINT_T0>(pf);
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64));
                pf = pf.wrapping_add(128);
            }
            // SAFETY: the pair p of the B panel is 2 × 32 u16 at `bp`, within `kcp * NR * 2`.
            let (b0, b1) = unsafe {
                (
                    _mm512_loadu_si512(bp as *const __m512i),
                    _mm512_loadu_si512(bp.add(32) as *const __m512i),
                )
            };
            let (b0e, b0o) = widen_pairs(b0, hi);
            let (b1e, b1o) = widen_pairs(b1, hi);
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row r's pair is the two f32 at `ap + 2r`, within `kcp * MR * 2` f32.
                let (ae, ao) = unsafe {
                    (
                        _mm512_set1_ps(ap.add(2 * r).read_unaligned()),
                        _mm512_set1_ps(ap.add(2 * r + 1).read_unaligned()),
                    )
                };
                acc[0] = _mm512_fmadd_ps(ae, b0e, acc[0]);
                acc[1] = _mm512_fmadd_ps(ae, b1e, acc[1]);
                acc[0] = _mm512_fmadd_ps(ao, b0o, acc[0]);
                acc[1] = _mm512_fmadd_ps(ao, b1o, acc[1]);
            }
            // SAFETY: stays within (or one past) the panels.
            unsafe {
                ap = ap.add(MR * 2);
                bp = bp.add(NR * 2);
            }
        }
        // SAFETY: per the caller.
        unsafe { store_tile(c, ldc, &acc, alpha, beta, mr, nr) };
    }

    /// Fetches the `mr` rows of a C tile (read for ownership) while a kernel's products run
    /// (prefetches never fault).
    #[inline(always)]
    fn prefetch_tile(c: *mut f32, ldc: usize, mr: usize) {
        for r in 0..mr.min(MR) {
            let row = c.wrapping_add(r * ldc) as *const i8;
            // SAFETY: a prefetch reads nothing architecturally; SSE is baseline on x86-64.
            unsafe {
                _mm_prefetch::<_MM_HINT_ET0>(row);
                _mm_prefetch::<_MM_HINT_ET0>(row.wrapping_add(64));
            }
        }
    }

    /// Writes a kernel's `MR × 32` accumulators as `alpha · acc + beta · C`, only the `mr × nr`
    /// elements of the tile (`beta == 0`: C is not read).
    ///
    /// # Safety
    /// `c` must be valid for reads and writes of `mr` rows (stride `ldc`) of `nr` elements,
    /// `mr ≤ MR`, `nr ≤ NR`; the CPU must have avx512f.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_tile(
        c: *mut f32,
        ldc: usize,
        acc: &[[__m512; 2]; MR],
        alpha: f32,
        beta: f32,
        mr: usize,
        nr: usize,
    ) {
        let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
        let (m0, m1) = (mask16(nr), mask16(nr.saturating_sub(16)));
        for (r, acc) in acc.iter().enumerate().take(mr) {
            // SAFETY: row r < mr of the tile; masked lanes are neither read nor written.
            unsafe { store_row(c.add(r * ldc), acc, va, vb, beta != 0.0, m0, m1) };
        }
    }

    /// Reinterpretation of 32 packed bf16 bit patterns as `__m512bh` and back.
    trait IntoBh {
        fn into_bh(self) -> __m512bh;
    }
    trait IntoI {
        fn into_i(self) -> __m512i;
    }
    impl IntoI for __m512bh {
        #[inline(always)]
        fn into_i(self) -> __m512i {
            // SAFETY: both are 512-bit plain-data vector types; every bit pattern is valid.
            unsafe { core::mem::transmute::<__m512bh, __m512i>(self) }
        }
    }
    impl IntoBh for __m512i {
        #[inline(always)]
        fn into_bh(self) -> __m512bh {
            // SAFETY: both are 512-bit plain-data vector types; every bit pattern is valid.
            unsafe { core::mem::transmute::<__m512i, __m512bh>(self) }
        }
    }
}

/// The instruction peak of `path` in GFLOP/s on `threads` workers at once: each runs a
/// register-resident loop of the instruction the path's microkernel is built on (twelve
/// independent `vfmadd231ps` zmm for [`GemmPath::Avx512Fma`], `vdpbf16ps` zmm for
/// [`GemmPath::Avx512Bf16`]) for about 30 ms, and the rates add up. The physical ceiling MFU is
/// measured against; `None` for paths without such a loop here (AMX, portable).
pub fn instruction_peak_gflops(path: GemmPath, threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !path.supported() || path.peak_instruction().is_none() {
            return None;
        }
        let one = move || {
            let iters = 1u64 << 20;
            let mut best = 0.0f64;
            for _ in 0..3 {
                let t = std::time::Instant::now();
                // SAFETY: the path is supported, so the CPU has avx512f/bw/bf16 and fma.
                let flops = unsafe { peak_loop(path == GemmPath::Avx512Bf16, iters) };
                best = best.max(flops / t.elapsed().as_secs_f64() * 1e-9);
            }
            best
        };
        let threads = threads.max(1);
        let rates: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(one)).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).collect()
        });
        Some(rates.iter().sum())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (path, threads);
        None
    }
}

/// `iters` rounds of twelve independent zmm FMAs (or `vdpbf16ps` when `bf16`) on registers;
/// returns the FLOPs done.
///
/// # Safety
/// The CPU must have avx512f, avx512bw, avx512bf16 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,fma")]
unsafe fn peak_loop(bf16: bool, iters: u64) -> f64 {
    use core::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 12];
    let mut x = _mm512_set1_ps(1e-9);
    // SAFETY: both are 512-bit plain-data vector types; every bit pattern is valid.
    let xb: __m512bh = unsafe { core::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(0x3f80)) };
    let mut xbv = xb;
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = if bf16 {
                _mm512_dpbf16_ps(*a, xbv, xb)
            } else {
                _mm512_fmadd_ps(x, x, *a)
            };
        }
        // Keeps the inputs opaque to the optimiser (no hoisting of the loop).
        x = std::hint::black_box(x);
        xbv = std::hint::black_box(xbv);
    }
    let mut sum = _mm512_setzero_ps();
    for a in acc {
        sum = _mm512_add_ps(sum, a);
    }
    std::hint::black_box(_mm512_reduce_add_ps(sum));
    // FLOPs per instruction: 16 lanes × 2 (FMA), 16 lanes × 2 pairs × 2 (bf16 dot).
    (iters * 12) as f64 * if bf16 { 64.0 } else { 32.0 }
}

/// Measures the machine's matrix-multiply throughput in GFLOP/s on `threads` workers:
/// `(f32 via the gemm crate, bf16 via gemm_bf16)`, each the best of a few runs of a
/// 1024 × 1024 × 1024 product (about 0.15 s each).
pub fn measure_peak_gflops(threads: usize) -> (f64, f64) {
    use std::time::Instant;
    let (m, n, k) = (1024usize, 1024usize, 1024usize);
    let flops = 2.0 * (m * n * k) as f64;
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i * 104729 % 1000) as f32 - 500.0) * 1e-3)
        .collect();
    let ab: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
    let bb: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
    let mut c = vec![0.0f32; m * n];
    let best = |f: &mut dyn FnMut()| {
        f();
        let start = Instant::now();
        let mut best = f64::INFINITY;
        while start.elapsed().as_secs_f64() < 0.15 {
            let t = Instant::now();
            f();
            best = best.min(t.elapsed().as_secs_f64());
        }
        flops / best * 1e-9
    };
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let f32_gflops = best(&mut || {
        // SAFETY: row-major m×k, k×n and m×n buffers of exactly those sizes; dst is not read.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    });
    let bf16_gflops = best(&mut || {
        gemm_bf16(
            &mut c,
            n,
            MatRef::bf16_row_major(&ab, m, k),
            MatRef::bf16_row_major(&bb, n, k).t(),
            1.0,
            0.0,
            threads,
        )
    });
    (f32_gflops, bf16_gflops)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    /// The paths this CPU can run, the portable one always (last).
    fn paths() -> Vec<GemmPath> {
        let all = [
            GemmPath::Amx,
            GemmPath::Avx512Bf16,
            GemmPath::Avx512Fma,
            GemmPath::Portable,
        ];
        let have: Vec<GemmPath> = all.into_iter().filter(|p| p.supported()).collect();
        eprintln!("gemm_bf16 paths on this CPU: {have:?}");
        have
    }

    fn rand_vec(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[derive(Clone, Copy, Debug)]
    enum Layout {
        /// A row-major, B = W^T with W row-major [n×k].
        Nt,
        /// A row-major [m×k], B row-major [k×n].
        Nn,
        /// A = G^T with G row-major [k×m], B row-major [k×n].
        Tn,
        /// A = G^T, B = W^T (both transposed).
        Tt,
        /// Neither operand has a unit stride (A row-major and B = W^T, every other element).
        Strided,
    }

    /// Storage for one operand and a view of it as `rows × cols` in the given orientation,
    /// with `pad` extra elements per stored row.
    struct Operand {
        f: Vec<f32>,
        h: Vec<bf16>,
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    }

    impl Operand {
        fn new(rows: usize, cols: usize, transposed: bool, pad: usize, spread: bool, seed: u64) -> Self {
            // Stored as `rows × cols` row-major, or as `cols × rows` row-major when transposed;
            // with `spread`, consecutive elements of a stored row are 2 apart.
            let (sr, sc) = if transposed { (cols, rows) } else { (rows, cols) };
            let unit = if spread { 2 } else { 1 };
            let ld = sc * unit + pad;
            let f = rand_vec(sr.max(1) * ld, seed);
            let h = f.iter().map(|&x| bf16::from_f32(x)).collect();
            let (rs, cs) = if transposed { (unit, ld) } else { (ld, unit) };
            Operand {
                f,
                h,
                rows,
                cols,
                rs,
                cs,
            }
        }
        fn view(&self, bf: bool) -> MatRef<'_> {
            MatRef {
                data: if bf {
                    MatData::Bf16(&self.h)
                } else {
                    MatData::F32(&self.f)
                },
                rows: self.rows,
                cols: self.cols,
                row_stride: self.rs,
                col_stride: self.cs,
            }
        }
        fn at(&self, i: usize, j: usize) -> f64 {
            self.h[i * self.rs + j * self.cs].to_f64()
        }
    }

    /// [`gemm_bf16_cat`] against [`gemm_bf16`] on the concatenated operands: bit for bit where
    /// the fused path runs (the packed panels are the same), within bf16 tolerance otherwise.
    /// Shapes cover both thread splits (m > n and m < n), odd tails, a k-block boundary inside
    /// the main part and inside the tail, and an odd main k (two products).
    #[test]
    fn concatenated_k_equals_the_product_of_the_concatenation() {
        let kc = KC;
        for &(m, n, k1, k2, nn) in &[
            (70, 45, 576, 16, false),
            (300, 97, 64, 7, false),
            (33, 400, 96, 16, true),
            (129, 64, 1536, 16, true),
            (40, 50, kc + 100, 16, false),
            (40, 50, kc - 6, 30, true),
            (17, 33, 45, 8, false),
        ] {
            let k = k1 + k2;
            let a1 = rand_vec(m * k1, 1);
            let a2 = rand_vec(m * k2, 2);
            // B₁ in bf16 (a frozen weight), B₂ in f32 (LoRA factors).
            let b1: Vec<bf16> = rand_vec(k1 * n, 3).iter().map(|&x| bf16::from_f32(x)).collect();
            let b2 = rand_vec(k2 * n, 4);
            let c0 = rand_vec(m * n, 5);
            // Concatenated: A row-major m × k; B as NT (W = [W₁ | W₂], n × k) or NN (k × n).
            let mut a = vec![0.0f32; m * k];
            for i in 0..m {
                a[i * k..i * k + k1].copy_from_slice(&a1[i * k1..(i + 1) * k1]);
                a[i * k + k1..(i + 1) * k].copy_from_slice(&a2[i * k2..(i + 1) * k2]);
            }
            let mut b = vec![0.0f32; k * n];
            let (bv1, bv2) = if nn {
                for (i, v) in b1.iter().enumerate() {
                    b[i] = v.to_f32();
                }
                b[k1 * n..].copy_from_slice(&b2);
                (
                    MatRef::bf16_row_major(&b1, k1, n),
                    MatRef::f32_row_major(&b2, k2, n),
                )
            } else {
                // b1/b2 hold W₁ (n × k1), W₂ (n × k2) row-major.
                for j in 0..n {
                    for p in 0..k1 {
                        b[j * k + p] = b1[j * k1 + p].to_f32();
                    }
                    for p in 0..k2 {
                        b[j * k + k1 + p] = b2[j * k2 + p];
                    }
                }
                (
                    MatRef::bf16_row_major(&b1, n, k1).t(),
                    MatRef::f32_row_major(&b2, n, k2).t(),
                )
            };
            let bv = if nn {
                MatRef::f32_row_major(&b, k, n)
            } else {
                MatRef::f32_row_major(&b, n, k).t()
            };
            for threads in [1, 2] {
                let mut want = c0.clone();
                gemm_bf16(
                    &mut want,
                    n,
                    MatRef::f32_row_major(&a, m, k),
                    bv,
                    0.5,
                    1.0,
                    threads,
                );
                let mut got = c0.clone();
                gemm_bf16_cat(
                    &mut got,
                    n,
                    (
                        MatRef::f32_row_major(&a1, m, k1),
                        MatRef::f32_row_major(&a2, m, k2),
                    ),
                    (bv1, bv2),
                    0.5,
                    1.0,
                    threads,
                );
                let fused = has_avx512_bf16() && k1.is_multiple_of(2);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    if fused {
                        assert_eq!(g.to_bits(), w.to_bits(), "{m}x{n} k {k1}+{k2} at {i}");
                    } else {
                        assert!(
                            (g - w).abs() <= 1e-4 * (k as f32).sqrt() * (1.0 + w.abs()),
                            "{g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        m: usize,
        n: usize,
        k: usize,
        layout: Layout,
        bf: bool,
        alpha: f32,
        beta: f32,
        threads: usize,
        path: GemmPath,
        packed: bool,
    ) {
        let (ta, tb, spread) = match layout {
            Layout::Nt => (false, true, false),
            Layout::Nn => (false, false, false),
            Layout::Tn => (true, false, false),
            Layout::Tt => (true, true, false),
            Layout::Strided => (false, true, true),
        };
        let seed = (m * 1000003 + n * 1009 + k) as u64;
        let a = Operand::new(m, k, ta, 3, spread, seed);
        let b = Operand::new(k, n, tb, 1, spread, seed + 1);
        let ldc = n + 5;
        let c0 = rand_vec(m * ldc, seed + 2);
        let mut c = if beta == 0.0 {
            vec![f32::NAN; m * ldc]
        } else {
            c0.clone()
        };
        if packed {
            let pb = PackedB::new_impl(b.view(bf), threads, path == GemmPath::Portable);
            assert_eq!((pb.rows(), pb.cols()), (k, n));
            let bi = BInput::Packed(&pb);
            gemm_bf16_impl(&mut c, ldc, a.view(bf), bi, alpha, beta, threads, path);
        } else {
            let bi = BInput::View(b.view(bf));
            gemm_bf16_impl(&mut c, ldc, a.view(bf), bi, alpha, beta, threads, path);
        }
        let (mut err, mut norm) = (0.0f64, 0.0f64);
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|p| a.at(i, p) * b.at(p, j)).sum();
                let mut want = alpha as f64 * dot;
                if beta != 0.0 {
                    want += beta as f64 * c0[i * ldc + j] as f64;
                }
                let got = c[i * ldc + j] as f64;
                assert!(got.is_finite(), "non-finite at ({i},{j})");
                err += (got - want) * (got - want);
                norm += want * want;
            }
            // Padding between rows of C is untouched.
            for j in n..ldc {
                let got = c[i * ldc + j];
                let want = if beta == 0.0 { f32::NAN } else { c0[i * ldc + j] };
                assert!(
                    got.to_bits() == want.to_bits(),
                    "padding of C written at ({i},{j})"
                );
            }
        }
        let rel = (err / norm.max(1e-300)).sqrt();
        assert!(
            rel <= 1e-5,
            "m={m} n={n} k={k} {layout:?} bf16={bf} alpha={alpha} beta={beta} threads={threads} \
             path={path:?} packed={packed}: relative error {rel:e}"
        );
    }

    const LAYOUTS: [Layout; 5] = [Layout::Nt, Layout::Nn, Layout::Tn, Layout::Tt, Layout::Strided];

    fn sweep(path: GemmPath) {
        let sizes = [
            (1, 1, 1),
            (1, 3, 17),
            (3, 1, 2),
            (17, 33, 3),
            (9, 31, 64),
            (8, 32, 255),
            (33, 65, 257),
            (172, 40, 17),
            (20, 172, 93),
        ];
        for &(m, n, k) in &sizes {
            for layout in LAYOUTS {
                for bf in [false, true] {
                    for threads in [1, 2] {
                        check(m, n, k, layout, bf, 1.0, 0.0, threads, path, false);
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_bf16_odd_sizes_all_layouts() {
        for path in paths() {
            if path != GemmPath::Portable {
                sweep(path);
            }
        }
    }

    #[test]
    fn gemm_bf16_fallback_odd_sizes_all_layouts() {
        sweep(GemmPath::Portable);
    }

    #[test]
    fn gemm_bf16_alpha_beta() {
        for path in paths() {
            for (alpha, beta) in [(1.0, 1.0), (0.5, 0.0), (-2.0, 0.25), (1.0, -1.0)] {
                for layout in LAYOUTS {
                    check(37, 70, 45, layout, true, alpha, beta, 2, path, false);
                    check(37, 70, 45, layout, false, alpha, beta, 1, path, false);
                }
            }
        }
    }

    #[test]
    fn gemm_bf16_larger_blocks() {
        // Crosses the KC, MC, NC and per-worker chunk boundaries, both split directions.
        for layout in [Layout::Nt, Layout::Nn, Layout::Tn] {
            for path in paths() {
                for threads in [1, 2] {
                    check(100, 1100, 131, layout, false, 1.0, 0.0, threads, path, false);
                    check(600, 130, 97, layout, true, 1.0, 1.0, threads, path, false);
                }
            }
        }
    }

    #[test]
    fn gemm_bf16_alpha_zero_reads_neither_operand() {
        let a = vec![f32::NAN; 6];
        let mut c = vec![2.0f32; 4];
        let (va, vb) = (MatRef::f32_row_major(&a, 2, 3), MatRef::f32_row_major(&a, 3, 2));
        gemm_bf16(&mut c, 2, va, vb, 0.0, 0.5, 2);
        assert!(c.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn gemm_bf16_k_zero_and_empty() {
        let a: Vec<f32> = vec![];
        let mut c = vec![f32::NAN; 6];
        let va = MatRef {
            data: MatData::F32(&a),
            rows: 2,
            cols: 0,
            row_stride: 0,
            col_stride: 1,
        };
        let vb = MatRef {
            data: MatData::F32(&a),
            rows: 0,
            cols: 3,
            row_stride: 3,
            col_stride: 1,
        };
        gemm_bf16(&mut c, 3, va, vb, 1.0, 0.0, 2);
        assert!(c.iter().all(|&x| x == 0.0));
        let mut c = vec![2.0f32; 6];
        gemm_bf16(&mut c, 3, va, vb, 1.0, 0.5, 1);
        assert!(c.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn gemm_bf16_rounds_f32_inputs_to_nearest_even() {
        // 1 + 2^-8 is a tie between bf16 1.0 and 1 + 2^-7: nearest-even gives 1.0.
        let a = [1.0f32 + 1.0 / 256.0, 1.0 + 3.0 / 256.0];
        let b = [1.0f32, 1.0];
        let mut c = [0.0f32];
        for path in paths() {
            gemm_bf16_impl(
                &mut c,
                1,
                MatRef::f32_row_major(&a, 1, 2),
                BInput::View(MatRef::f32_row_major(&b, 2, 1)),
                1.0,
                0.0,
                1,
                path,
            );
            assert_eq!(c[0], 1.0 + (1.0 + 4.0 / 256.0), "path={path:?}");
        }
    }

    #[test]
    fn gemm_bf16_many_k_blocks() {
        // k far past KC: several balanced k-blocks accumulate into C (odd k: a padded last pair).
        for layout in [Layout::Nt, Layout::Nn, Layout::Tn] {
            for path in paths() {
                check(40, 70, 2 * KC + 301, layout, false, 1.5, 0.0, 2, path, false);
                check(70, 40, 3 * KC + 2, layout, true, 1.0, 1.0, 1, path, false);
            }
        }
    }

    /// A source over a stored matrix, writing tiles in either layout.
    struct ViewSource<'a> {
        b: MatRef<'a>,
        columns: bool,
    }

    impl BSource for ViewSource<'_> {
        fn rows(&self) -> usize {
            self.b.rows
        }
        fn cols(&self) -> usize {
            self.b.cols
        }
        fn columns_contiguous(&self) -> bool {
            self.columns
        }
        fn tile(&self, k0: usize, k1: usize, j0: usize, j1: usize, out: &mut [u16]) {
            let (kb, nj) = (k1 - k0, j1 - j0);
            for p in 0..kb {
                for j in 0..nj {
                    let idx = if self.columns { j * kb + p } else { p * nj + j };
                    out[idx] = self.b.bits(k0 + p, j0 + j);
                }
            }
        }
    }

    #[test]
    fn gemm_bf16_source_is_bit_identical_to_the_view() {
        // Through tiles in both layouts, on the fly (both thread splits) and packed once, with and
        // without the fallback; k past KC, n past a tile chunk (512 columns).
        for &(m, n, k) in &[(37, 41, 70), (5, 600, 33), (300, 45, 2 * KC + 3), (9, 1100, 64)] {
            let seed = (m * 31 + n * 7 + k) as u64;
            let a = rand_vec(m * k, seed);
            let b = rand_vec(k * n, seed + 1);
            let av = MatRef::f32_row_major(&a, m, k);
            for path in paths() {
                for threads in [1, 2] {
                    let mut want = vec![0.5f32; m * n];
                    let bv = MatRef::f32_row_major(&b, k, n);
                    gemm_bf16_impl(&mut want, n, av, BInput::View(bv), 1.0, 1.0, threads, path);
                    for columns in [false, true] {
                        let src = ViewSource { b: bv, columns };
                        let mut got = vec![0.5f32; m * n];
                        gemm_bf16_impl(&mut got, n, av, BInput::Source(&src), 1.0, 1.0, threads, path);
                        assert_eq!(
                            got, want,
                            "{m}x{n}x{k} path {path:?} threads {threads} columns {columns}"
                        );
                        let packed = PackedB::source_impl(&src, threads, path == GemmPath::Portable);
                        let mut got = vec![0.5f32; m * n];
                        gemm_bf16_impl(&mut got, n, av, BInput::Packed(&packed), 1.0, 1.0, threads, path);
                        assert_eq!(got, want, "packed {m}x{n}x{k} path {path:?} threads {threads}");
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_bf16_nested_in_rayon() {
        // Calls from inside rayon workers (as a caller running layers in parallel would): the
        // scratch buffers must not be shared between the interleaved calls.
        use rayon::prelude::*;
        (0..8usize).into_par_iter().for_each(|i| {
            check(
                33 + i,
                65,
                40 + i,
                LAYOUTS[i % LAYOUTS.len()],
                i.is_multiple_of(2),
                1.0,
                0.0,
                2,
                gemm_path(),
                false,
            );
        });
    }

    #[test]
    fn gemm_bf16_packed_b() {
        for path in paths() {
            for layout in LAYOUTS {
                for &(m, n, k) in &[(1, 1, 1), (17, 33, 3), (33, 65, 257), (20, 172, 93)] {
                    check(
                        m,
                        n,
                        k,
                        layout,
                        (layout as usize).is_multiple_of(2),
                        1.0,
                        0.0,
                        2,
                        path,
                        true,
                    );
                }
                check(37, 70, 45, layout, true, -2.0, 0.25, 1, path, true);
            }
            // Several k-blocks, both split directions.
            check(40, 300, 2 * KC + 301, Layout::Nt, false, 1.0, 1.0, 2, path, true);
            check(600, 40, KC + 3, Layout::Nn, true, 1.0, 0.0, 2, path, true);
            // Column chunks of the packed panels.
            check(30, 1100, 64, Layout::Nt, false, 1.0, 0.0, 2, path, true);
        }
    }

    #[test]
    fn gemm_bf16_same_bits_for_any_thread_count() {
        // Every C element is summed over the same k-blocks in the same order whatever the split
        // (a property of the vdpbf16ps path; the path leaves the order to the gemm crate).
        if !has_avx512_bf16() {
            return;
        }
        for (m, n, k) in [(300, 100, 77), (60, 700, 2 * KC + 5)] {
            let a = rand_vec(m * k, 1);
            let b = rand_vec(k * n, 2);
            let (va, vb) = (MatRef::f32_row_major(&a, m, k), MatRef::f32_row_major(&b, k, n));
            let run = |threads| {
                let mut c = vec![0.0f32; m * n];
                gemm_bf16(&mut c, n, va, vb, 1.0, 0.0, threads);
                c
            };
            let one = run(1);
            for threads in [2, 3] {
                assert!(
                    one.iter()
                        .zip(run(threads))
                        .all(|(x, y)| x.to_bits() == y.to_bits())
                );
            }
        }
    }

    #[test]
    fn gemm_bf16_rows_packed_is_bit_identical_to_the_gemm() {
        // The decode product must compute each row exactly as the tiled GEMM does: odd shapes,
        // edge columns, several k-blocks, alpha/beta, denormal and rounding-tie inputs.
        for &(k, n) in &[
            (1usize, 1usize),
            (2, 16),
            (3, 17),
            (33, 45),
            (577, 131),
            (4100, 40),
            // Enough panels per task for the 4- and 2-panel steps and their odd tails.
            (70, 1234),
            (40, 2100),
        ] {
            let w: Vec<bf16> = rand_vec(n * k, (n * 7 + k) as u64)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let wv = MatRef::bf16_row_major(&w, n, k);
            let packed = PackedB::new(wv.t(), 2);
            for (i, j) in [(0, 0), (k - 1, n - 1), (k / 2, n / 3)] {
                assert_eq!(packed.get(i, j), w[j * k + i].to_f32(), "get({i}, {j})");
            }
            if !has_avx512_bf16() {
                eprintln!("skipping the product: no avx512_bf16 (gemm_bf16_rows_packed declines)");
                assert!(!gemm_bf16_rows_packed(
                    &mut vec![0.0; n],
                    &vec![0.0; k],
                    &packed,
                    1,
                    1.0,
                    0.0
                ));
                continue;
            }
            for t in 1..=MR {
                let mut a = rand_vec(t * k, (k * 31 + t) as u64);
                a[0] = 1e-40; // denormal: flushed by the packer
                if a.len() > 1 {
                    a[1] = f32::from_bits(0x3f80_8000); // a bf16 rounding tie
                }
                // Each AVX-512 kernel's bits (AMX rounds pairs of products otherwise).
                for path in [GemmPath::Avx512Bf16, GemmPath::Avx512Fma] {
                    for &(alpha, beta) in &[(1.0f32, 0.0f32), (1.0, 1.0), (0.5, 0.75)] {
                        let c0 = rand_vec(t * n, 99);
                        let mut want = c0.clone();
                        gemm_bf16_impl(
                            &mut want,
                            n,
                            MatRef::f32_row_major(&a, t, k),
                            BInput::View(wv.t()),
                            alpha,
                            beta,
                            1,
                            path,
                        );
                        let mut got = c0.clone();
                        assert!(rows_packed_on(&mut got, &a, &packed, t, alpha, beta, path));
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "{path:?}: t {t} k {k} n {n} alpha {alpha} beta {beta} [{i}]"
                            );
                        }
                    }
                }
            }
            // More rows than a tile: not this product's job.
            assert!(!gemm_bf16_rows_packed(
                &mut vec![0.0; 9 * n],
                &vec![0.0; 9 * k],
                &packed,
                9,
                1.0,
                0.0
            ));
        }
    }

    #[test]
    fn gemm_bf16_reports_feature() {
        // Just exercises detection; on this project's Zen 4 machines it is true.
        let _ = has_avx512_bf16();
    }
}
