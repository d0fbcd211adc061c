//! Arrays the XDP program reads field by field (`PC_PORTS`, `PC_VALUES`),
//! written through their mmap with one atomic 32-bit store per field: a map
//! update copies a value with `memcpy`, which promises no atomicity at all,
//! so a reader could see half of a field.

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// One mmapable BPF array of `entries` values of `value_size` bytes.
pub(crate) struct MappedArray {
    base: NonNull<AtomicU32>,
    len: usize,
    stride: usize,
    entries: u32,
}

// SAFETY: the mapping is shared memory this struct alone unmaps; every
// access goes through atomics.
#[expect(unsafe_code, reason = "a raw mapping is Send once accesses are atomic")]
unsafe impl Send for MappedArray {}

impl std::fmt::Debug for MappedArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedArray")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl MappedArray {
    /// Maps the array behind `map` (created with `BPF_F_MMAPABLE`).
    pub(crate) fn open(map: BorrowedFd<'_>, entries: u32, value_size: usize) -> io::Result<Self> {
        // The kernel lays elements out 8-byte aligned.
        let stride = value_size.next_multiple_of(8);
        let page = 4096;
        let len = (stride * entries as usize).next_multiple_of(page);
        #[expect(unsafe_code, reason = "mmap(2) of a BPF array")]
        // SAFETY: a fresh shared mapping of the map's own memory, of the
        // length the kernel allocated for it; nothing else aliases it here.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Page aligned, so aligned for the 32-bit fields.
        let base =
            NonNull::new(base.cast::<AtomicU32>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            base,
            len,
            stride,
            entries,
        })
    }

    fn word(&self, index: u32, word: usize) -> &AtomicU32 {
        assert!(
            index < self.entries && (word + 1) * 4 <= self.stride,
            "index in bounds"
        );
        #[expect(unsafe_code, reason = "a field of the mapped array")]
        // SAFETY: in bounds (checked above) and 4-byte aligned (the mapping is
        // page aligned, the stride a multiple of 8); the memory lives as long
        // as the mapping, which outlives `&self`.
        unsafe {
            &*self.base.as_ptr().add((index as usize * self.stride) / 4 + word)
        }
    }

    /// The `word`th 32-bit field of element `index`.
    pub(crate) fn load(&self, index: u32, word: usize) -> u32 {
        self.word(index, word).load(Ordering::Acquire)
    }

    /// Stores the `word`th 32-bit field of element `index` in one store.
    pub(crate) fn store(&self, index: u32, word: usize, value: u32) {
        self.word(index, word).store(value, Ordering::Release);
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        #[expect(unsafe_code, reason = "munmap(2) of our own mapping")]
        // SAFETY: `base`/`len` are exactly what mmap returned, unmapped once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}
