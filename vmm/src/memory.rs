//! Guest RAM: anonymous mappings laid out around the MMIO gap, registered
//! with KVM as memory slots.
//!
//! Each mapping starts on a 2 MiB boundary and asks for transparent huge
//! pages: KVM maps a guest 2 MiB page with one nested/extended page table
//! entry only when host and guest addresses agree modulo 2 MiB, and every
//! 4 KiB guest page otherwise costs a nested page fault (an exit) on its
//! first touch. QEMU aligns its RAM the same way. Guest RAM lives as long
//! as the process (one VM per frakti-vmm process): device and API threads
//! hold guest memory handles, so it is never unmapped under them.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Alignment of guest RAM in the VMM's address space: a huge page.
const HUGE_PAGE: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot map {0} bytes of guest memory")]
    Map(u64, #[source] std::io::Error),
    #[error("cannot use the mapping of guest memory")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    #[error("bad guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    #[error("KVM refused memory slot {0}")]
    Register(u32, #[source] kvm_ioctls::Error),
}

/// RAM ranges for `size` bytes: below the MMIO gap, the rest above 4 GiB.
pub fn ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Maps `size` bytes of guest RAM (anonymous, private, not yet touched).
pub fn create(size: u64) -> Result<GuestMemoryMmap, Error> {
    let regions = ranges(size)
        .into_iter()
        .map(|(start, len)| {
            let host = map_aligned(len).map_err(|e| Error::Map(len as u64, e))?;
            // SAFETY: `host` is a fresh private mapping of `len` bytes that
            // is never unmapped (see the module comment).
            let region = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(host) }
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
                .map_err(Error::Region)?;
            GuestRegionMmap::new(region, start).ok_or(Error::Map(
                len as u64,
                std::io::Error::from_raw_os_error(libc::EOVERFLOW),
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(Error::Layout)
}

/// An anonymous read-write mapping of `len` bytes that starts on a 2 MiB
/// boundary and asks for transparent huge pages, between two inaccessible
/// guard pages. The guards also keep the kernel from placing another
/// mapping (a thread stack) flush against guest RAM, where it would be
/// 2 MiB-aligned too and get a huge page of its own.
fn map_aligned(len: usize) -> std::io::Result<*mut u8> {
    let page = page_size();
    let padded = len
        .checked_add(HUGE_PAGE + 2 * page)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a new anonymous mapping at an address the kernel picks; no
    // existing memory is affected. It starts inaccessible.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            padded,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = base as usize;
    let start = (base + page).next_multiple_of(HUGE_PAGE);
    let head = start - page - base;
    let tail_start = start + len + page;
    let tail = base + padded - tail_start;
    // SAFETY: every range below lies inside the mapping made above, which
    // nothing else refers to yet: the slack around the two guard pages is
    // unmapped and guest RAM between them made read-write.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap(tail_start as *mut libc::c_void, tail);
        }
        if libc::mprotect(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
        ) != 0
        {
            let error = std::io::Error::last_os_error();
            libc::munmap((start - page) as *mut libc::c_void, len + 2 * page);
            return Err(error);
        }
        // A kernel without THP says EINVAL, which only costs speed.
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    Ok(start as *mut u8)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no side effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// Registers every region of `mem` with KVM.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| Error::Register(slot, kvm_ioctls::Error::new(libc::EFAULT)))?;
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping behind `userspace_addr` belongs to `mem`, which
        // the VM keeps alive for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| Error::Register(slot, e))?;
    }
    Ok(())
}

/// Host address ranges of guest RAM, to tell them apart in /proc/self/smaps.
pub fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter()
        .filter_map(|r| {
            let start = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()? as u64;
            Some((start, start + r.len()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_is_aligned_to_huge_pages_between_guards() {
        let mem = create(130 << 20).unwrap();
        let ranges = host_ranges(&mem);
        assert_eq!(ranges.len(), 1);
        let (start, end) = ranges[0];
        assert_eq!(start % HUGE_PAGE as u64, 0);
        assert_eq!(end - start, 130 << 20);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let page = page_size() as u64;
        let guard = |from: u64| format!("{from:x}-{:x} ---p", from + page);
        assert!(maps.contains(&guard(start - page)), "{maps}");
        assert!(maps.contains(&guard(end)), "{maps}");
    }

    #[test]
    fn small_vm_is_one_range() {
        assert_eq!(ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_vm_skips_the_gap() {
        let r = ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }
}
