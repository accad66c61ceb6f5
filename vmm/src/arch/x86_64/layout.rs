//! Guest physical memory layout (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)            0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info         0x0000_6040  PVH module list (initrd)
//! 0x0000_7000  zero page (Linux boot) / PVH memory map
//! 0x0000_8ff0  boot stack pointer (grows down)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  MP table (the EBDA); 0x9fc00..0x100000 reserved in E820
//! 0x0010_0000  kernel (HIMEM_START); initrd at the top of low RAM
//! 0xd000_0000  MMIO gap up to 4 GiB (virtio-mmio devices from here)
//! 0x1_0000_0000  RAM above 4 GiB, if the VM has more than the gap allows
//! ```

/// Global descriptor table.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty; the kernel sets its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const MODLIST_START: u64 = 0x6040;
/// PVH memory map, or the Linux zero page (`boot_params`); never both.
pub const MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol `boot_params` (the "zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page tables: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the Extended BIOS Data Area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
pub const MPTABLE_START: u64 = EBDA_START;
/// First address above the legacy hole: the kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap: no RAM from here to 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// I/O APIC and local APIC default addresses (inside the MMIO gap).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// Virtio-mmio devices are placed from here, one 4 KiB window each.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
