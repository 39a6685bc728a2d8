//! The AMX microkernel (`tdpbf16ps` on tile registers), for Intel Sapphire Rapids and later.
//!
//! Same B panels as the AVX-512 kernel: 32 columns, each k-pair a 128-byte row holding the 32
//! columns' two bf16 values, so a 16-pair × 16-column B tile is a strided load (stride 128) of
//! half a panel. A is packed differently: in panels of [`MA`] = 32 rows, each 16-pair chunk of
//! the panel two 1 KiB tiles (rows 0..16 and 16..32) of 16 rows × 16 pairs, k contiguous within
//! a row, zero past the rows and past k up to a whole chunk.
//!
//! The kernel keeps a 32 × 32 f32 C tile in four accumulator tiles (tmm0–3), loads two A tiles
//! (tmm4, tmm5) and two B tiles (tmm6, tmm7) per chunk and issues four `tdpbf16ps`, then stores
//! the accumulators once to a stack buffer for the `alpha · acc + beta · C` epilogue. B's last
//! chunk, when k-pairs do not fill it, is read from a zero-padded copy so that no tile row reads
//! past the panel.
//!
//! Tiles need the kernel's permission (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`,
//! once per process) and a tile configuration per thread (`ldtilecfg`), loaded at the start of
//! each [`compute`] call and released (`tilerelease`) at its end, so no tile state outlives it.
//!
//! Numerics: each output element is still the f32 sum over k-pairs in order, one accumulator per
//! element, but `tdpbf16ps` rounds its pair of products differently from `vdpbf16ps` (measured:
//! about two thirds of results bit-equal), so the two paths are not bit-identical; results do
//! not depend on the thread count or on the row's position in a tile.

use super::{KCat, MatRef};
use super::{
    NR, PACK_PF, blocking, load32, mask16, pack_interleave, pack_lines, pack_scalar, prefetch_elem,
    store_row, transpose16,
};
use core::arch::asm;
use core::arch::x86_64::*;
use std::cell::Cell;

/// Rows of an A panel (two 16-row tiles).
pub(in super::super) const MA: usize = 32;
/// k-pairs per tile chunk (a tile row is 64 bytes: 16 pairs of bf16).
const CHUNK_PAIRS: usize = 16;
/// u16 elements of one 16 × 16-pair tile.
const TILE_U16: usize = 16 * CHUNK_PAIRS * 2;

thread_local! {
    static PAIRS: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
}

/// Whether the AMX path can run: the CPU reports AMX-TILE and AMX-BF16 (and the AVX-512 bf16
/// subset the packers use), and the kernel granted this process the tile data state. Asked once.
pub(in super::super) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| super::super::has_avx512_bf16() && cpu_has_amx_bf16() && request_permission())
}

/// CPUID.(EAX=7, ECX=0): EDX bit 22 (AMX-BF16) and bit 24 (AMX-TILE).
fn cpu_has_amx_bf16() -> bool {
    // cpuid exists on every x86-64 CPU; leaf 7 is below the maximum leaf on any CPU with AVX-512
    // (checked by the caller first).
    let leaf7 = __cpuid_count(7, 0);
    leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0
}

/// Asks Linux for the AMX tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`);
/// true when granted. Elsewhere (no such call) the path stays off.
fn request_permission() -> bool {
    #[cfg(target_os = "linux")]
    {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: the arch_prctl system call with these arguments only changes this process's
        // permitted xsave features; it reads and writes no memory of ours. `syscall` clobbers
        // rcx and r11, declared.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// k-pairs of an A panel: `kp` rounded up to whole tile chunks.
pub(in super::super) fn padded_pairs(kp: usize) -> usize {
    kp.div_ceil(CHUNK_PAIRS) * CHUNK_PAIRS
}

/// u16 elements of one packed A panel of `kp` pairs.
pub(in super::super) fn a_panel_len(kp: usize) -> usize {
    padded_pairs(kp) * MA * 2
}

/// Packs the A panels `q0..q1` (rows `q·MA ..`, zero rows past the end and zero pairs past `kp`
/// up to [`padded_pairs`]) into `out`, panel after panel, in the tile layout:
/// `out[c·2·TILE + h·TILE + r·32 + pp·2 + e] = A[q·MA + 16h + r][2(16c + pp) + e]`.
///
/// Each panel is first packed by pairs (the AVX-512 packers' layout, 32 lines wide, which handles
/// every stride and the concatenated k of a LoRA product), then each 16-pair × 16-row block is
/// transposed into a tile in registers.
pub(in super::super) fn pack_a(a: &KCat, q0: usize, q1: usize, kp: usize, out: &mut [u16]) {
    let panel = a_panel_len(kp);
    let chunks = padded_pairs(kp) / CHUNK_PAIRS;
    assert!(out.len() >= (q1 - q0) * panel);
    // Rows contiguous in memory (the common X·Wᵀ case): a tile row is 32 consecutive elements of
    // one row, so the rows go straight into tiles. A concatenated tail must start on a chunk.
    let direct = |v: &MatRef| v.col_stride == 1;
    let tail_ok = a
        .tail
        .as_ref()
        .is_none_or(|t| direct(t) && a.main.cols.is_multiple_of(2 * CHUNK_PAIRS));
    if direct(&a.main) && tail_ok {
        for (q, out) in (q0..q1).zip(out.chunks_exact_mut(panel)) {
            let main_chunks = a.main.cols.div_ceil(2 * CHUNK_PAIRS);
            // SAFETY: rows of the views are inside their data (`MatRef::check`); the chunks
            // written (main, then tail after it) are `chunks` in all, inside `out`; features:
            // this path runs only where `available()`.
            unsafe {
                pack_rows(&a.main, q, 0, main_chunks, out);
                if let Some(tail) = &a.tail {
                    pack_rows(tail, q, main_chunks, chunks - main_chunks, out);
                }
            }
        }
        return;
    }
    super::with_scratch(&PAIRS, kp * MA * 2, |pairs| {
        for (q, out) in (q0..q1).zip(out.chunks_exact_mut(panel)) {
            match &a.tail {
                None => pack_pairs(&a.main, q, kp, pairs),
                Some(tail) => {
                    let kpm = a.main.cols / 2;
                    let (head, rest) = pairs.split_at_mut(kpm * MA * 2);
                    pack_pairs(&a.main, q, kpm, head);
                    pack_pairs(tail, q, kp - kpm, rest);
                }
            }
            // SAFETY: `pairs` holds kp pairs of 32 lines and `out` `chunks` chunks of two tiles;
            // features: this path runs only where `available()` (avx512 bf16 included).
            unsafe { pairs_to_tiles(pairs, kp, chunks, out) };
        }
    });
}

/// Panel `q` (rows `q·MA ..`) of a view with contiguous rows, straight into the tile layout:
/// chunk `c0 + c` of `out` gets the view's elements `32c .. 32c + 32` of each row (zero past
/// the rows and past k), for `c < chunks`.
///
/// # Safety
/// The view's rows must be inside its data with `col_stride == 1`; `out` must hold `c0 + chunks`
/// chunks of two tiles; the CPU must have avx512f/bw/vl/bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_rows(a: &MatRef, q: usize, c0: usize, chunks: usize, out: &mut [u16]) {
    let (k, rs) = (a.cols, a.row_stride);
    let lines = MA.min(a.rows - q * MA);
    assert!(out.len() >= (c0 + chunks) * 2 * TILE_U16);
    let o = out.as_mut_ptr();
    for l in 0..MA {
        let (h, r) = (l / 16, l % 16);
        for c in 0..chunks {
            let kk = 2 * CHUNK_PAIRS * c;
            let v = if l < lines && kk < k {
                let idx = (q * MA + l) * rs + kk;
                prefetch_elem(a.data, idx + PACK_PF);
                // SAFETY: elements kk .. min(k, kk + 32) of row q·MA + l < rows (caller).
                unsafe { load32(a.data, idx, (k - kk).min(32)) }
            } else {
                _mm512_setzero_si512()
            };
            // SAFETY: chunk c0 + c < c0 + chunks, tile h, row r: inside `out` (asserted).
            unsafe {
                _mm512_storeu_si512(
                    o.add((c0 + c) * 2 * TILE_U16 + h * TILE_U16 + r * 32) as *mut __m512i,
                    v,
                )
            };
        }
    }
}

/// Panel `q` (32 rows) of one view, by pairs: `out[p·64 + l·2 + e] = A[32q + l][2p + e]`.
fn pack_pairs(a: &MatRef, q: usize, kp: usize, out: &mut [u16]) {
    let (k, rs, cs) = (a.cols, a.row_stride, a.col_stride);
    let lines = MA.min(a.rows - q * MA);
    let out = &mut out[..kp * MA * 2];
    if cs == 1 {
        // SAFETY: line l < lines holds k elements at (q·MA + l)·rs, inside the view (checked by
        // `MatRef::check`); `out` holds kp pairs of MA lines; features as in `pack_a`.
        unsafe { pack_lines::<MA>(a.data, q * MA * rs, rs, lines, k, kp, out) }
    } else if rs == 1 {
        // SAFETY: k-row kk holds lines q·MA .. q·MA + lines at q·MA + kk·cs (inside the view);
        // `out` is one panel; features as above.
        unsafe { pack_interleave::<MA>(a.data, q * MA, cs, lines, k, kp, out) }
    } else {
        pack_scalar::<MA>(kp, lines, k, out, |r, kk| a.bits(q * MA + r, kk));
    }
}

/// Rewrites a pair-layout panel (`kp` pairs × 32 lines) as tiles: each 16-pair × 16-line block
/// of 32-bit pairs transposed to 16 lines × 16 pairs, pairs past `kp` zero.
///
/// # Safety
/// `pairs` must hold `kp · 64` and `out` `chunks · 2 · TILE_U16` u16; the CPU must have
/// avx512f/bw/vl/bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pairs_to_tiles(pairs: &[u16], kp: usize, chunks: usize, out: &mut [u16]) {
    assert!(pairs.len() >= kp * MA * 2 && out.len() >= chunks * 2 * TILE_U16);
    for c in 0..chunks {
        for h in 0..2 {
            let mut r = [_mm512_setzero_si512(); 16];
            for (pp, r) in r.iter_mut().enumerate() {
                let p = c * CHUNK_PAIRS + pp;
                if p < kp {
                    // SAFETY: pair p < kp, lines 16h .. 16h + 16 of 32: inside `pairs`.
                    *r = unsafe {
                        _mm512_loadu_si512(pairs.as_ptr().add(p * MA * 2 + h * 32) as *const __m512i)
                    };
                }
            }
            let t = transpose16(r);
            let dst = &mut out[(2 * c + h) * TILE_U16..][..TILE_U16];
            for (line, t) in t.iter().enumerate() {
                // SAFETY: line < 16 of the tile, 32 u16 each: inside `dst`.
                unsafe { _mm512_storeu_si512(dst.as_mut_ptr().add(line * 32) as *mut __m512i, *t) };
            }
        }
    }
}

/// The 64-byte tile configuration: palette 1, tiles 0–7 all 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
        }
        TileConfig(c)
    }
}

/// Multiplies packed A panels (`rows` rows, [`MA`] per panel, see [`pack_a`]) by packed B panels
/// (`cols` columns) into the C block at `c`, as the AVX-512 `compute` does: column blocks, row
/// blocks, then 32 × 32 tiles.
///
/// # Safety
/// `c` must point at a `rows × cols` block (row stride `ldc`) valid for reads and writes that no
/// other thread accesses during the call; `ap` must hold `rows.div_ceil(MA)` panels of
/// [`a_panel_len`]`(kp)` and `bp` `cols.div_ceil(NR)` panels of `kp` pairs; [`available`] must be
/// true.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(in super::super) unsafe fn compute(
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
    let (a_panel, b_panel) = (a_panel_len(kp), kp * NR * 2);
    assert!(ap.len() >= rows.div_ceil(MA) * a_panel && bp.len() >= cols.div_ceil(NR) * b_panel);
    let (full, rem) = (kp / CHUNK_PAIRS, kp % CHUNK_PAIRS);
    // B's partial last chunk, zero-padded to 16 pairs (aligned for the tile loads).
    #[repr(C, align(64))]
    struct Tail([u16; CHUNK_PAIRS * NR * 2]);
    let mut tail = Tail([0; CHUNK_PAIRS * NR * 2]);
    let cfg = TileConfig::full();
    // SAFETY: the configuration is a valid palette-1 layout; permission granted (`available`).
    unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
    let bl = blocking();
    let mc = bl.mc.div_ceil(MA) * MA;
    for jc in (0..cols).step_by(bl.nc) {
        let jce = (jc + bl.nc).min(cols);
        for ic in (0..rows).step_by(mc) {
            let ice = (ic + mc).min(rows);
            for jr in (jc..jce).step_by(NR) {
                let bpan = &bp[(jr / NR) * b_panel..][..b_panel];
                if rem > 0 {
                    tail.0[..rem * NR * 2].copy_from_slice(&bpan[full * CHUNK_PAIRS * NR * 2..]);
                }
                for ir in (ic..ice).step_by(MA) {
                    let apan = &ap[(ir / MA) * a_panel..][..a_panel];
                    let (mr, nr) = (MA.min(rows - ir), NR.min(cols - jr));
                    // SAFETY: the tile (ir, jr) of at most MA × NR elements lies inside the block
                    // the caller vouches for; the panels hold the chunks read (sliced above);
                    // tiles configured above.
                    unsafe {
                        tile(
                            full,
                            rem > 0,
                            apan.as_ptr(),
                            bpan.as_ptr(),
                            tail.0.as_ptr(),
                            c.add(ir * ldc + jr),
                            ldc,
                            alpha,
                            beta,
                            mr,
                            nr,
                        )
                    };
                }
            }
        }
    }
    // SAFETY: releases the tile state configured above.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// One 32 × 32 tile of C: `full` whole chunks from the panels, then (when `partial`) the last
/// chunk with B from `tail`; stores `mr × nr` elements of `alpha · acc + beta · C`.
///
/// # Safety
/// `a` must hold `full + partial` chunks of two tiles, `b` `full` chunks of a B panel and `tail`
/// one zero-padded chunk; `c` valid for `mr ≤ 32` rows (stride `ldc`) of `nr ≤ 32` elements;
/// tiles configured by [`compute`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile(
    full: usize,
    partial: bool,
    a: *const u16,
    b: *const u16,
    tail: *const u16,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
    mr: usize,
    nr: usize,
) {
    #[repr(C, align(64))]
    struct Acc([f32; MA * NR]);
    let mut acc = Acc([0.0; MA * NR]);
    // SAFETY (every asm block): tile loads read 16 rows of 64 bytes at the given stride, inside
    // the chunks the caller vouches for; the stores write the 4 KiB `acc`.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let step = |a: *const u16, b: *const u16| {
            asm!(
                "tileloadd tmm4, [{a} + {s64}*1]",
                "tileloadd tmm5, [{a1} + {s64}*1]",
                "tileloadd tmm6, [{b} + {s128}*1]",
                "tileloadd tmm7, [{b1} + {s128}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) a,
                a1 = in(reg) a.add(TILE_U16),
                b = in(reg) b,
                b1 = in(reg) b.add(32),
                s64 = in(reg) 64usize,
                s128 = in(reg) 128usize,
                options(nostack, readonly),
            );
        };
        for ch in 0..full {
            step(a.add(ch * 2 * TILE_U16), b.add(ch * CHUNK_PAIRS * NR * 2));
        }
        if partial {
            step(a.add(full * 2 * TILE_U16), tail);
        }
        let p = acc.0.as_mut_ptr();
        asm!(
            "tilestored [{p0} + {s}*1], tmm0",
            "tilestored [{p1} + {s}*1], tmm1",
            "tilestored [{p2} + {s}*1], tmm2",
            "tilestored [{p3} + {s}*1], tmm3",
            p0 = in(reg) p,
            p1 = in(reg) p.add(16),
            p2 = in(reg) p.add(16 * NR),
            p3 = in(reg) p.add(16 * NR + 16),
            s = in(reg) NR * 4,
            options(nostack),
        );
    }
    let va = _mm512_set1_ps(alpha);
    let vb = _mm512_set1_ps(beta);
    let (m0, m1) = (mask16(nr), mask16(nr.saturating_sub(16)));
    for r in 0..mr {
        // SAFETY: row r of the 32 × 32 buffer; row r < mr of C's tile (caller).
        unsafe {
            let row = [
                _mm512_loadu_ps(acc.0.as_ptr().add(r * NR)),
                _mm512_loadu_ps(acc.0.as_ptr().add(r * NR + 16)),
            ];
            store_row(c.add(r * ldc), &row, va, vb, beta != 0.0, m0, m1);
        }
    }
}
