//! The Rust heap, counted: the bytes and blocks this library's own allocations hold.
//!
//! Python's `tracemalloc` sees none of them, and glibc's totals mix them with the
//! interpreter's. A leak of Rust memory (a map entry never removed, a buffer kept by
//! a path that forgot it) shows here as a count that does not come back down; the
//! steady-state test and `/metrics` read it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, with a count of what it holds for us.
pub struct CountingAllocator;

static BYTES: AtomicUsize = AtomicUsize::new(0);
static BLOCKS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to `System` unchanged; the counts are updated only
// when it succeeded, by the sizes the caller's `Layout`s state, which are the sizes
// `GlobalAlloc` requires them to free with.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(System.alloc(layout), layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(System.alloc_zeroed(layout), layout)
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        System.dealloc(block, layout);
        BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = System.realloc(block, layout, new_size);
        if !moved.is_null() {
            if new_size >= layout.size() {
                BYTES.fetch_add(new_size - layout.size(), Ordering::Relaxed);
            } else {
                BYTES.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        moved
    }
}

/// A new block, counted when the allocation succeeded.
fn counted(block: *mut u8, layout: Layout) -> *mut u8 {
    if !block.is_null() {
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        BLOCKS.fetch_add(1, Ordering::Relaxed);
    }
    block
}

/// What the Rust heap holds now: `(bytes, blocks)`, as asked (the allocator's own
/// rounding not included). The two counts are read one after the other: an
/// allocation on another thread between the reads shows in one and not the other.
pub fn held() -> (usize, usize) {
    (
        BYTES.load(Ordering::Relaxed),
        BLOCKS.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Other tests allocate on other threads at the same time, so these look for a
    /// rise and fall far larger than those make, one of these tests at a time.
    const SIZE: usize = 64 << 20;
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    #[test]
    fn a_vector_is_counted_while_it_lives() {
        let _alone = ONE_AT_A_TIME.lock();
        let before = held().0;
        let big: Vec<u8> = Vec::with_capacity(SIZE);
        let during = held().0;
        assert!(
            during.wrapping_sub(before) >= SIZE / 2,
            "{before} -> {during}"
        );
        drop(big);
        let after = held().0;
        assert!(
            during.wrapping_sub(after) >= SIZE / 2,
            "{during} -> {after}"
        );
    }

    #[test]
    fn growing_and_shrinking_is_counted() {
        let _alone = ONE_AT_A_TIME.lock();
        let mut grown: Vec<u8> = Vec::with_capacity(16);
        let before = held().0;
        grown.reserve_exact(SIZE);
        let during = held().0;
        assert!(
            during.wrapping_sub(before) >= SIZE / 2,
            "{before} -> {during}"
        );
        grown.shrink_to(16);
        let after = held().0;
        assert!(
            during.wrapping_sub(after) >= SIZE / 2,
            "{during} -> {after}"
        );
    }
}
