//! The activation arena of the CPU backend: an allocator that keeps freed large buffers for the
//! next allocation of the same size class.
//!
//! A training step allocates the same few hundred activation buffers (megabytes each) every step
//! and frees them in the backward pass. Through the C allocator each is a fresh `mmap`, and
//! every page is faulted in and zeroed by the kernel again: on the SmolLM2 shape that was a third
//! of the step's time (swiglu, elementwise and matmul outputs paid for the faults). Kept here,
//! the second step on reuses the first step's memory.
//!
//! [`BlockCache`] is a [`GlobalAlloc`] over another allocator; [`ActivationArena`] is the
//! process-wide one over the system allocator, which the `graft` binary installs as its global
//! allocator ([`release_kept`] empties it). Allocations of at least [`BlockCache::MIN_BYTES`] are rounded up to a
//! size class (steps of an eighth of a power of two, so at most 12.5% larger) and, when freed,
//! kept in a bounded table of free blocks; an allocation of the same class takes one back. Small
//! allocations go straight through.
//!
//! Peak memory stays close to what the inner allocator alone would reach: the bytes in use plus
//! the bytes kept never exceed by more than an eighth the largest number of (class-rounded)
//! bytes that were in use at once. An allocation that finds no block of its class first hands
//! back the oldest kept blocks until that holds again. (Kept blocks cannot be split or joined,
//! so a step whose temporaries come in other sizes than the blocks freed before them needs that
//! eighth to run from kept blocks alone.) [`BlockCache::release`] hands every kept block back, e.g. when
//! a training job ends in a long-lived server.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Most free blocks kept at once; more are handed back.
const SLOTS: usize = 256;
/// Largest alignment served from the table (a page); larger ones go straight through.
const MAX_ALIGN: usize = 4096;

/// A [`GlobalAlloc`] that keeps freed large blocks for reuse (see the module docs).
pub struct BlockCache<A: GlobalAlloc = System> {
    inner: A,
    free: Mutex<FreeBlocks>,
}

/// The kept blocks: `(class bytes, address)`, oldest first, in a fixed table (the allocator may
/// not allocate for itself), and the class bytes handed out.
struct FreeBlocks {
    blocks: [(usize, usize); SLOTS],
    len: usize,
    /// Bytes in the kept blocks.
    bytes: usize,
    /// Bytes of the large blocks in use now.
    live: usize,
    /// The most bytes of large blocks that were in use at once.
    high: usize,
}

impl BlockCache<System> {
    /// A cache over the system allocator.
    pub const fn new() -> Self {
        Self::over(System)
    }
}

impl Default for BlockCache<System> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: GlobalAlloc> BlockCache<A> {
    /// Allocations smaller than this go straight to the inner allocator.
    pub const MIN_BYTES: usize = 256 << 10;

    /// A cache over `inner`.
    pub const fn over(inner: A) -> Self {
        Self {
            inner,
            free: Mutex::new(FreeBlocks {
                blocks: [(0, 0); SLOTS],
                len: 0,
                bytes: 0,
                live: 0,
                high: 0,
            }),
        }
    }

    /// The size class of a large allocation: `bytes` rounded up to a multiple of an eighth of
    /// the power of two below it.
    pub fn class_bytes(bytes: usize) -> usize {
        let step = 1usize << (bytes.ilog2().saturating_sub(3));
        bytes.div_ceil(step) * step
    }

    /// Bytes in kept free blocks now.
    pub fn kept_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Hands every kept block back to the inner allocator.
    pub fn release(&self) {
        let mut free = self.lock();
        for i in 0..free.len {
            let (bytes, addr) = free.blocks[i];
            // SAFETY: every kept block was allocated by `inner` with this layout.
            unsafe { self.inner.dealloc(addr as *mut u8, class_layout(bytes)) };
        }
        free.len = 0;
        free.bytes = 0;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FreeBlocks> {
        // A panic while holding the lock cannot leave the table inconsistent (each update is a
        // few plain stores), so a poisoned lock is used as it is.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached(layout: Layout) -> bool {
        layout.size() >= Self::MIN_BYTES && layout.align() <= MAX_ALIGN
    }

    /// A block of class `bytes`: a kept one, or a new one from `inner` after handing back the
    /// oldest kept blocks while the bytes in use and kept would exceed the high-water mark by more
    /// than an eighth. The
    /// flag says whether it was kept (its contents are stale) or new (zeroed when `zeroed`).
    unsafe fn take(&self, bytes: usize, zeroed: bool) -> (*mut u8, bool) {
        let mut evicted = [(0usize, 0usize); SLOTS];
        let mut n_evicted = 0;
        {
            let mut free = self.lock();
            let len = free.len;
            if let Some(i) = free.blocks[..len].iter().rposition(|&(b, _)| b == bytes) {
                let addr = free.blocks[i].1;
                free.blocks.copy_within(i + 1..len, i);
                free.len -= 1;
                free.bytes -= bytes;
                free.live += bytes;
                return (addr as *mut u8, true);
            }
            free.live += bytes;
            free.high = free.high.max(free.live);
            while n_evicted < len && free.live + free.bytes > free.high + free.high / 8 {
                evicted[n_evicted] = free.blocks[n_evicted];
                free.bytes -= free.blocks[n_evicted].0;
                n_evicted += 1;
            }
            free.blocks.copy_within(n_evicted..len, 0);
            free.len -= n_evicted;
        }
        for &(b, addr) in &evicted[..n_evicted] {
            // SAFETY: every kept block was allocated by `inner` with this layout.
            unsafe { self.inner.dealloc(addr as *mut u8, class_layout(b)) };
        }
        let layout = class_layout(bytes);
        // SAFETY: the layout has a non-zero size.
        let p = unsafe {
            if zeroed {
                self.inner.alloc_zeroed(layout)
            } else {
                self.inner.alloc(layout)
            }
        };
        if p.is_null() {
            self.lock().live -= bytes;
        }
        (p, false)
    }

    /// Keeps a block of class `bytes`, or hands it back when the table is full.
    unsafe fn put(&self, p: *mut u8, bytes: usize) {
        {
            let mut free = self.lock();
            free.live -= bytes;
            if free.len < SLOTS {
                let len = free.len;
                free.blocks[len] = (bytes, p as usize);
                free.len += 1;
                free.bytes += bytes;
                return;
            }
        }
        // SAFETY: the block was allocated by `inner` with this layout.
        unsafe { self.inner.dealloc(p, class_layout(bytes)) }
    }
}

/// The process-wide [`BlockCache`] behind [`ActivationArena`].
static SHARED: BlockCache = BlockCache::new();

/// The process-wide block cache as a global allocator:
/// `#[global_allocator] static A: ActivationArena = ActivationArena;`.
pub struct ActivationArena;

// SAFETY: every call is forwarded to one `BlockCache`, which upholds the contract.
unsafe impl GlobalAlloc for ActivationArena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { SHARED.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { SHARED.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { SHARED.dealloc(p, layout) }
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe { SHARED.realloc(p, layout, new_size) }
    }
}

/// Hands the blocks [`ActivationArena`] keeps back to the system (e.g. after a training job in
/// a server, whose activations would otherwise stay resident). A no-op where the arena is not the
/// global allocator.
pub fn release_kept() {
    SHARED.release();
}

/// Bytes [`ActivationArena`] keeps in free blocks now.
pub fn kept_bytes() -> usize {
    SHARED.kept_bytes()
}

/// The layout every block of a class is allocated with.
fn class_layout(bytes: usize) -> Layout {
    // A class is a non-zero multiple of 32 KiB below `isize::MAX` for any valid request.
    Layout::from_size_align(bytes, MAX_ALIGN).expect("size class layout")
}

// SAFETY: large blocks are allocated by `inner` with their class layout, handed out at most once
// until freed, and freed with that layout; all else is passed through unchanged.
unsafe impl<A: GlobalAlloc> GlobalAlloc for BlockCache<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::cached(layout) {
            return unsafe { self.inner.alloc(layout) };
        }
        unsafe { self.take(Self::class_bytes(layout.size()), false).0 }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::cached(layout) {
            return unsafe { self.inner.alloc_zeroed(layout) };
        }
        let (p, kept) = unsafe { self.take(Self::class_bytes(layout.size()), true) };
        if kept {
            // SAFETY: the block holds at least `layout.size()` bytes.
            unsafe { p.write_bytes(0, layout.size()) };
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if !Self::cached(layout) {
            return unsafe { self.inner.dealloc(p, layout) };
        }
        unsafe { self.put(p, Self::class_bytes(layout.size())) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` with this alignment is a valid layout.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (Self::cached(layout), Self::cached(new)) {
            (false, false) => unsafe { self.inner.realloc(p, layout, new_size) },
            (true, true) if Self::class_bytes(layout.size()) == Self::class_bytes(new_size) => p,
            _ => {
                let q = unsafe { self.alloc(new) };
                if !q.is_null() {
                    // SAFETY: both blocks hold at least the smaller size and do not overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                }
                q
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The system allocator, counting the bytes it has out.
    struct Counting {
        out: AtomicUsize,
        peak: AtomicUsize,
        calls: AtomicUsize,
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let now = self.out.fetch_add(l.size(), Ordering::SeqCst) + l.size();
            self.peak.fetch_max(now, Ordering::SeqCst);
            self.calls.fetch_add(1, Ordering::SeqCst);
            unsafe { System.alloc(l) }
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            let now = self.out.fetch_add(l.size(), Ordering::SeqCst) + l.size();
            self.peak.fetch_max(now, Ordering::SeqCst);
            self.calls.fetch_add(1, Ordering::SeqCst);
            unsafe { System.alloc_zeroed(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            self.out.fetch_sub(l.size(), Ordering::SeqCst);
            unsafe { System.dealloc(p, l) }
        }
    }

    fn cache() -> BlockCache<Counting> {
        BlockCache::over(Counting {
            out: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        })
    }

    const MB: usize = 1 << 20;

    #[test]
    fn classes_round_up_by_at_most_an_eighth() {
        type C = BlockCache<System>;
        for bytes in [256 << 10, 300_000, MB, MB + 1, 3 * MB + 7, 1 << 30, (1 << 30) + 1] {
            let c = C::class_bytes(bytes);
            assert!(c >= bytes && c as f64 <= bytes as f64 * 1.125, "{bytes} -> {c}");
            assert_eq!(c % 4096, 0);
            assert_eq!(C::class_bytes(c), c, "a class is its own class");
        }
        assert_eq!(C::class_bytes(MB + 1), MB + MB / 8);
    }

    #[test]
    fn a_freed_block_is_reused_zeroed_when_asked() {
        let c = cache();
        let l = Layout::from_size_align(3 * MB, 64).unwrap();
        unsafe {
            let p = c.alloc(l);
            p.write_bytes(7, l.size());
            c.dealloc(p, l);
            assert_eq!(c.kept_bytes(), BlockCache::<System>::class_bytes(3 * MB));
            let q = c.alloc_zeroed(l);
            assert_eq!(q, p, "same class: the kept block comes back");
            assert!(std::slice::from_raw_parts(q, l.size()).iter().all(|&b| b == 0));
            assert_eq!(c.kept_bytes(), 0);
            c.dealloc(q, l);
        }
        assert_eq!(c.inner.calls.load(Ordering::SeqCst), 1);
        c.release();
        assert_eq!(c.inner.out.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn small_and_overaligned_allocations_pass_through() {
        let c = cache();
        for l in [
            Layout::from_size_align(1000, 8).unwrap(),
            Layout::from_size_align(4 * MB, 1 << 16).unwrap(),
        ] {
            unsafe {
                let p = c.alloc(l);
                assert!(!p.is_null());
                c.dealloc(p, l);
            }
            assert_eq!(c.kept_bytes(), 0);
            assert_eq!(c.inner.out.load(Ordering::SeqCst), 0);
        }
    }

    fn rng(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// Random allocation and free sequences of varying sizes: the bytes out of the inner
    /// allocator never exceed the largest class-rounded number of bytes in use at once by more
    /// than an eighth.
    #[test]
    fn kept_blocks_never_raise_the_peak() {
        let c = cache();
        let class = BlockCache::<System>::class_bytes;
        let mut next = rng(12345);
        let (mut live, mut live_bytes, mut live_peak) = (Vec::new(), 0, 0);
        for i in 0..3000 {
            if live.is_empty() || next() % 5 < 3 {
                let s = (next() % (8 * MB as u64)) as usize + 256 * 1024;
                let l = Layout::from_size_align(s, 64).unwrap();
                live.push((unsafe { c.alloc_zeroed(l) }, l));
                live_bytes += class(s);
                live_peak = live_peak.max(live_bytes);
            } else {
                let (p, l) = live.swap_remove(next() as usize % live.len());
                unsafe { c.dealloc(p, l) };
                live_bytes -= class(l.size());
            }
            let out = c.inner.out.load(Ordering::SeqCst);
            let peak = c.inner.peak.load(Ordering::SeqCst);
            assert!(peak <= live_peak + live_peak / 8, "at {i}");
            assert_eq!(out, live_bytes + c.kept_bytes(), "at {i}");
        }
        for (p, l) in live {
            unsafe { c.dealloc(p, l) };
        }
        c.release();
        assert_eq!(c.inner.out.load(Ordering::SeqCst), 0);
    }

    /// A training step's pattern: the forward pass allocates activations, the backward pass
    /// allocates and frees temporaries and frees the activations. From the second step on,
    /// nothing new is allocated.
    #[test]
    fn a_repeated_step_reuses_every_block() {
        let c = cache();
        let mut next = rng(7);
        let saved: Vec<usize> = (0..60)
            .map(|_| (next() % (12 * MB as u64)) as usize + MB)
            .collect();
        // The backward pass's temporaries come in a few sizes (a layer's gradient shapes).
        let temps: Vec<usize> = (0..4)
            .map(|_| (next() % (12 * MB as u64)) as usize + MB)
            .collect();
        let lay = |s: usize| Layout::from_size_align(s, 64).unwrap();
        for step in 0..4 {
            let calls = c.inner.calls.load(Ordering::SeqCst);
            let acts: Vec<_> = saved.iter().map(|&s| unsafe { c.alloc_zeroed(lay(s)) }).collect();
            for (i, (&p, &s)) in acts.iter().zip(&saved).enumerate().rev() {
                let t = temps[i % temps.len()];
                unsafe {
                    let q = c.alloc_zeroed(lay(t));
                    c.dealloc(q, lay(t));
                    c.dealloc(p, lay(s));
                }
            }
            if step > 0 {
                assert_eq!(c.inner.calls.load(Ordering::SeqCst), calls, "step {step}");
            }
        }
        c.release();
    }

    #[test]
    fn realloc_keeps_the_block_within_its_class_and_copies_across() {
        let c = cache();
        let l = Layout::from_size_align(MB + 1000, 8).unwrap();
        let filled =
            |p: *mut u8, n: usize| unsafe { std::slice::from_raw_parts(p, n).iter().all(|&b| b == 3) };
        unsafe {
            let p = c.alloc(l);
            p.write_bytes(3, l.size());
            let q = c.realloc(p, l, MB + 2000);
            assert_eq!(q, p, "the same class: the block is kept");
            let l = Layout::from_size_align(MB + 2000, 8).unwrap();
            let r = c.realloc(q, l, 2 * MB);
            assert!(filled(r, MB + 1000));
            let l = Layout::from_size_align(2 * MB, 8).unwrap();
            let s = c.realloc(r, l, 100);
            assert!(filled(s, 100));
            c.dealloc(s, Layout::from_size_align(100, 8).unwrap());
        }
        c.release();
        assert_eq!(c.inner.out.load(Ordering::SeqCst), 0);
    }
}
