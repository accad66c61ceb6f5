//! Loading the kernel and initrd and writing the boot information the kernel
//! reads: PVH `hvm_start_info` for an ELF vmlinux with a PVH note, or the
//! Linux zero page (`boot_params`) for a bzImage (or an ELF without PVH).

use std::fs::File;
use std::path::Path;

use linux_loader::bootparam::{boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{self, Elf, PvhBootCapability};
use linux_loader::loader::{Cmdline, KernelLoader, load_cmdline};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// bzImage: 64-bit entry is 0x200 past the protected-mode kernel start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load kernel {path} as ELF vmlinux ({elf}) or bzImage ({bzimage})")]
    LoadKernel {
        path: String,
        elf: String,
        bzimage: String,
    },
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd of {size} bytes does not fit in guest RAM above the kernel")]
    InitrdTooLarge { size: u64 },
    #[error("cannot write the initrd into guest memory")]
    WriteInitrd,
    #[error("cannot write the kernel command line")]
    Cmdline(#[source] linux_loader::loader::Error),
    #[error("cannot write boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh { entry: GuestAddress },
    /// 64-bit long mode, identity-mapped, `%rsi` = zero page.
    Linux64 { entry: GuestAddress },
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub protocol: BootProtocol,
    /// First byte after the kernel image.
    pub end: GuestAddress,
    /// bzImage setup header, copied into the zero page.
    pub setup_header: Option<setup_header>,
}

/// The initrd's place in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub address: GuestAddress,
    pub size: u64,
}

/// Loads an ELF vmlinux (PVH if it has the note) or a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, Error> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| Error::OpenKernel {
        path: display.clone(),
        source,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, &mut file, himem) {
        Ok(result) => {
            let protocol = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => BootProtocol::Pvh { entry },
                _ => BootProtocol::Linux64 {
                    entry: result.kernel_load,
                },
            };
            Ok(LoadedKernel {
                protocol,
                end: kernel_end(&result),
                setup_header: None,
            })
        }
        Err(linux_loader::loader::Error::Elf(elf::Error::InvalidElfMagicNumber)) => {
            let result =
                BzImage::load(mem, None, &mut file, himem).map_err(|e| Error::LoadKernel {
                    path: display.clone(),
                    elf: "not an ELF file".into(),
                    bzimage: e.to_string(),
                })?;
            Ok(LoadedKernel {
                protocol: BootProtocol::Linux64 {
                    entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                },
                end: kernel_end(&result),
                setup_header: result.setup_header,
            })
        }
        Err(e) => Err(Error::LoadKernel {
            path: display,
            elf: e.to_string(),
            bzimage: "not tried".into(),
        }),
    }
}

fn kernel_end(result: &linux_loader::loader::KernelLoaderResult) -> GuestAddress {
    GuestAddress(result.kernel_end)
}

/// Highest guest address + 1 of RAM below the MMIO gap.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

/// Copies the initrd to the top of low RAM, page aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: GuestAddress,
) -> Result<InitrdPlacement, Error> {
    let read_err = |source| Error::ReadInitrd {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let top = low_ram_end(mem);
    let address = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= kernel_end.raw_value())
        .ok_or(Error::InitrdTooLarge { size })?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdTooLarge { size })?;
    mem.read_exact_volatile_from(GuestAddress(address), &mut file, len)
        .map_err(|_| Error::WriteInitrd)?;
    Ok(InitrdPlacement {
        address: GuestAddress(address),
        size,
    })
}

/// Writes the command line at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<(), Error> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(Error::Cmdline)
}

/// The E820 map: RAM, the legacy hole (EBDA, VGA, BIOS) reserved, RAM
/// above 1 MiB up to the MMIO gap, and RAM above 4 GiB.
pub fn e820_entries(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut entries = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            entries.push((start, end - start, E820_RAM));
        }
    }
    entries
}

/// Writes `hvm_start_info`, the memory map and the initrd module for PVH.
pub fn configure_pvh(mem: &GuestMemoryMmap, initrd: Option<InitrdPlacement>) -> Result<(), Error> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_entries(mem)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|i| hvm_modlist_entry {
            paddr: i.address.raw_value(),
            size: i.size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        start_info.nr_modules = modules.len() as u32;
        start_info.modlist_paddr = MODLIST_START;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::BootParams)
}

/// Writes the zero page for the 64-bit Linux boot protocol.
pub fn configure_linux64(
    mem: &GuestMemoryMmap,
    cmdline_size: usize,
    initrd: Option<InitrdPlacement>,
    header: Option<setup_header>,
) -> Result<(), Error> {
    let mut params = boot_params::default();
    if let Some(header) = header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (i, (addr, size, type_)) in e820_entries(mem).into_iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = type_;
        params.e820_entries = (i + 1) as u8;
    }
    let boot = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&boot, mem).map_err(Error::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(mib: u64) -> GuestMemoryMmap {
        crate::memory::create(mib << 20).unwrap()
    }

    #[test]
    fn e820_small_vm() {
        let mem = memory(128);
        assert_eq!(
            e820_entries(&mem),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x60400, E820_RESERVED),
                (0x10_0000, (128 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_large_vm_skips_the_mmio_gap() {
        let mem = memory(4096);
        let entries = e820_entries(&mem);
        assert_eq!(
            entries[2],
            (0x10_0000, MMIO_GAP_START - 0x10_0000, E820_RAM)
        );
        assert_eq!(
            entries[3],
            (MMIO_GAP_END, (4096 << 20) - MMIO_GAP_START, E820_RAM)
        );
        let ram: u64 = entries
            .iter()
            .filter(|e| e.2 == E820_RAM)
            .map(|e| e.1)
            .sum();
        assert_eq!(ram, (4096 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let mem = memory(64);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        std::fs::write(&path, vec![0xabu8; 5000]).unwrap();
        let placed = load_initrd(&mem, &path, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(placed.size, 5000);
        assert_eq!(placed.address.raw_value() % PAGE_SIZE, 0);
        assert!(placed.address.raw_value() + 5000 <= 64 << 20);
        let byte: u8 = mem.read_obj(placed.address).unwrap();
        assert_eq!(byte, 0xab);
    }

    #[test]
    fn oversized_initrd_is_an_error() {
        let mem = memory(32);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        std::fs::write(&path, vec![0u8; 31 << 20]).unwrap();
        let err = load_initrd(&mem, &path, GuestAddress(2 << 20)).unwrap_err();
        assert!(matches!(err, Error::InitrdTooLarge { .. }), "{err}");
    }

    #[test]
    fn pvh_start_info_points_at_memmap_cmdline_and_initrd() {
        let mem = memory(64);
        let initrd = InitrdPlacement {
            address: GuestAddress(0x300_0000),
            size: 1234,
        };
        configure_pvh(&mem, Some(initrd)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 1234));
        let last: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(MEMMAP_START + 2 * 24)).unwrap();
        assert_eq!(last.addr + last.size, 64 << 20);
    }

    #[test]
    fn zero_page_has_e820_cmdline_and_initrd() {
        let mem = memory(64);
        let initrd = InitrdPlacement {
            address: GuestAddress(0x300_0000),
            size: 1234,
        };
        configure_linux64(&mem, 20, Some(initrd), None).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.e820_entries }, 3);
    }

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let mem = memory(32);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel");
        std::fs::write(&path, vec![0x55u8; 8192]).unwrap();
        let err = load_kernel(&mem, &path).unwrap_err();
        assert!(err.to_string().contains("bzImage"), "{err}");
        let missing = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(missing, Error::OpenKernel { .. }));
    }
}
