//! Intel MultiProcessor Specification 1.4 table.
//!
//! Without ACPI, a Linux guest finds its processors and interrupt wiring in
//! the MP table: a floating pointer structure (`_MP_`), which Linux looks for
//! in the last KiB of base memory (the EBDA at [`layout::MPTABLE_START`]),
//! pointing at a configuration table (`PCMP`) right after it, that lists
//!
//! * one processor per vCPU, local APIC ID = vCPU index, vCPU 0 the BSP;
//! * one ISA bus;
//! * one I/O APIC (ID `vcpu_count`, at [`layout::IOAPIC_START`]);
//! * ISA IRQs 0..=23 wired to the I/O APIC pin of the same number, as KVM's
//!   default IRQ routing has them;
//! * LINT0 as ExtINT and LINT1 as NMI on every local APIC.
//!
//! The table is assembled in host memory and written to the guest in one go.

use std::mem::size_of;

use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};

use super::layout;

/// Errors from writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MP table describes 1 to [`MAX_VCPUS`] processors.
    #[error("cannot describe {0} vCPUs in an MP table (1 to {MAX_VCPUS})")]
    InvalidVcpuCount(u8),
    /// The table would reach past the legacy area below 1 MiB.
    #[error("the MP table would end at {end:#x}, past {limit:#x}", limit = layout::HIMEM_START)]
    TooLarge {
        /// First address after the table.
        end: u64,
    },
    /// Guest memory does not cover the table.
    #[error("guest memory does not cover the MP table ({start:#x}..{end:#x})")]
    NotInMemory {
        /// Where the table starts.
        start: u64,
        /// First address after the table.
        end: u64,
    },
    /// Writing the table to guest memory failed.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(GuestMemoryError),
}

/// Most vCPUs an MP table can describe: APIC IDs are 8 bits, 0xff is the
/// broadcast ID and the I/O APIC takes the one after the last vCPU.
pub const MAX_VCPUS: u8 = 254;

const MPF_SIGNATURE: [u8; 4] = *b"_MP_";
const MPC_SIGNATURE: [u8; 4] = *b"PCMP";
/// MP specification revision 1.4.
const MP_SPEC_REV: u8 = 4;
const OEM_ID: [u8; 8] = *b"FRAKTI  ";
const PRODUCT_ID: [u8; 12] = *b"000000000000";

// Configuration table entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;

/// Local and I/O APIC addresses, as the 32-bit fields of the table hold them.
const LAPIC_ADDRESS: u32 = layout::APIC_START as u32;
const IOAPIC_ADDRESS: u32 = layout::IOAPIC_START as u32;
const _: () = assert!(LAPIC_ADDRESS as u64 == layout::APIC_START);
const _: () = assert!(IOAPIC_ADDRESS as u64 == layout::IOAPIC_START);
/// Local APIC version (integrated APIC, as KVM emulates).
const LAPIC_VERSION: u8 = 0x14;
/// I/O APIC version (82093AA, as KVM emulates).
const IOAPIC_VERSION: u8 = 0x11;
// Processor entry flags.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOT_PROCESSOR: u8 = 1 << 1;
/// CPU signature: family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX feature flags: FPU (bit 0) and on-chip APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 9) | (1 << 0);
/// I/O APIC entry flag: usable.
const IOAPIC_ENABLED: u8 = 1;

const ISA_BUS_ID: u8 = 0;
const ISA_BUS_TYPE: [u8; 6] = *b"ISA   ";
/// I/O APIC pins, and ISA IRQs routed to them (0..=23).
const IOAPIC_PINS: u8 = 24;

// Interrupt types.
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode conform to the bus (ISA: active high, edge).
const INT_FLAGS_CONFORMING: u16 = 0;
/// Destination "all local APICs" of a local interrupt entry.
const ALL_LOCAL_APICS: u8 = 0xff;

/// MP floating pointer structure (16 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
struct FloatingPointer {
    signature: [u8; 4],
    /// Physical address of the configuration table.
    physptr: u32,
    /// Length in 16-byte units.
    length: u8,
    spec_rev: u8,
    checksum: u8,
    /// Feature byte 1: 0 means a configuration table is present.
    /// Bytes 2-5: bit 7 of byte 2 clear means virtual wire mode (no IMCR).
    features: [u8; 5],
}

/// MP configuration table header (44 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
struct ConfigHeader {
    signature: [u8; 4],
    /// Length of the base table, header included.
    length: u16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table_ptr: u32,
    oem_table_size: u16,
    entry_count: u16,
    lapic_address: u32,
    extended_table_length: u16,
    extended_table_checksum: u8,
    reserved: u8,
}

/// Processor entry (20 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
struct ProcessorEntry {
    entry_type: u8,
    lapic_id: u8,
    lapic_version: u8,
    flags: u8,
    signature: u32,
    features: u32,
    reserved: [u32; 2],
}

/// Bus entry (8 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
struct BusEntry {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

/// I/O APIC entry (8 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
struct IoApicEntry {
    entry_type: u8,
    ioapic_id: u8,
    ioapic_version: u8,
    flags: u8,
    address: u32,
}

/// I/O interrupt and local interrupt assignment entries (8 bytes each).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
struct InterruptEntry {
    entry_type: u8,
    int_type: u8,
    flags: u16,
    src_bus: u8,
    src_irq: u8,
    /// I/O APIC ID, or local APIC ID (0xff: all) for a local interrupt.
    dst_apic: u8,
    /// I/O APIC pin, or LINT number for a local interrupt.
    dst_pin: u8,
}

// SAFETY: plain old data: `repr(C, packed)` structs of integers and byte
// arrays, so no padding and every bit pattern is a valid value.
unsafe impl ByteValued for FloatingPointer {}
// SAFETY: as above.
unsafe impl ByteValued for ConfigHeader {}
// SAFETY: as above.
unsafe impl ByteValued for ProcessorEntry {}
// SAFETY: as above.
unsafe impl ByteValued for BusEntry {}
// SAFETY: as above.
unsafe impl ByteValued for IoApicEntry {}
// SAFETY: as above.
unsafe impl ByteValued for InterruptEntry {}

/// Where the configuration table goes: right after the floating pointer.
const CONFIG_TABLE_START: u64 = layout::MPTABLE_START + size_of::<FloatingPointer>() as u64;
const _: () = assert!(CONFIG_TABLE_START + 0x1_0000 <= u32::MAX as u64);

/// The value that makes the byte sum of `bytes` plus itself 0 mod 256.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and the configuration table, as they are
/// laid out from [`layout::MPTABLE_START`].
fn build(vcpu_count: u8) -> Result<Vec<u8>, Error> {
    let ioapic_id = vcpu_count;
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    let mut add = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        entry_count += 1;
    };

    for id in 0..vcpu_count {
        let flags = if id == 0 {
            CPU_ENABLED | CPU_BOOT_PROCESSOR
        } else {
            CPU_ENABLED
        };
        add(ProcessorEntry {
            entry_type: ENTRY_PROCESSOR,
            lapic_id: id,
            lapic_version: LAPIC_VERSION,
            flags,
            signature: CPU_SIGNATURE,
            features: CPU_FEATURES,
            reserved: [0; 2],
        }
        .as_slice());
    }
    add(BusEntry {
        entry_type: ENTRY_BUS,
        bus_id: ISA_BUS_ID,
        bus_type: ISA_BUS_TYPE,
    }
    .as_slice());
    add(IoApicEntry {
        entry_type: ENTRY_IOAPIC,
        ioapic_id,
        ioapic_version: IOAPIC_VERSION,
        flags: IOAPIC_ENABLED,
        address: IOAPIC_ADDRESS,
    }
    .as_slice());
    for irq in 0..IOAPIC_PINS {
        add(InterruptEntry {
            entry_type: ENTRY_INTSRC,
            int_type: INT_TYPE_INT,
            flags: INT_FLAGS_CONFORMING,
            src_bus: ISA_BUS_ID,
            src_irq: irq,
            dst_apic: ioapic_id,
            dst_pin: irq,
        }
        .as_slice());
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        add(InterruptEntry {
            entry_type: ENTRY_LINTSRC,
            int_type,
            flags: INT_FLAGS_CONFORMING,
            src_bus: ISA_BUS_ID,
            src_irq: 0,
            dst_apic: ALL_LOCAL_APICS,
            dst_pin: lint,
        }
        .as_slice());
    }

    let table_length = size_of::<ConfigHeader>() + entries.len();
    let too_large = || Error::TooLarge {
        end: CONFIG_TABLE_START.saturating_add(table_length as u64),
    };
    let mut header = ConfigHeader {
        signature: MPC_SIGNATURE,
        length: u16::try_from(table_length).map_err(|_| too_large())?,
        spec_rev: MP_SPEC_REV,
        oem_id: OEM_ID,
        product_id: PRODUCT_ID,
        entry_count,
        lapic_address: LAPIC_ADDRESS,
        ..Default::default()
    };
    // The checksum covers the header and all the entries.
    header.checksum = checksum(header.as_slice()).wrapping_add(checksum(&entries));

    let mut pointer = FloatingPointer {
        signature: MPF_SIGNATURE,
        physptr: CONFIG_TABLE_START as u32,
        length: 1,
        spec_rev: MP_SPEC_REV,
        ..Default::default()
    };
    pointer.checksum = checksum(pointer.as_slice());

    let mut table = Vec::with_capacity(size_of::<FloatingPointer>() + table_length);
    table.extend_from_slice(pointer.as_slice());
    table.extend_from_slice(header.as_slice());
    table.extend_from_slice(&entries);
    Ok(table)
}

/// Writes the MP table for `vcpu_count` vCPUs at [`layout::MPTABLE_START`].
///
/// The table takes `16 + 44 + 20 * vcpu_count + 8 + 8 + 24 * 8 + 2 * 8`
/// bytes and always ends below [`layout::HIMEM_START`]; `mem` must cover it
/// (nothing is written if it does not).
pub fn setup(mem: &GuestMemoryMmap, vcpu_count: u8) -> Result<(), Error> {
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
        return Err(Error::InvalidVcpuCount(vcpu_count));
    }
    let table = build(vcpu_count)?;
    let end = layout::MPTABLE_START + table.len() as u64;
    if end > layout::HIMEM_START {
        return Err(Error::TooLarge { end });
    }
    // Checked first so that a table that does not fit is not half written.
    let start = GuestAddress(layout::MPTABLE_START);
    if !mem.check_range(start, table.len()) {
        return Err(Error::NotInMemory {
            start: layout::MPTABLE_START,
            end,
        });
    }
    mem.write_slice(&table, start).map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
    }

    fn byte_sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
    }

    fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).expect("read");
        buf
    }

    fn expected_size(vcpu_count: usize) -> usize {
        16 + 44 + 20 * vcpu_count + 8 + 8 + 24 * 8 + 2 * 8
    }

    /// Reads back the table and checks everything about it.
    fn check(mem: &GuestMemoryMmap, vcpu_count: u8) {
        let n = usize::from(vcpu_count);
        let pointer: FloatingPointer = mem
            .read_obj(GuestAddress(layout::MPTABLE_START))
            .expect("read floating pointer");
        assert_eq!(pointer.signature, *b"_MP_");
        assert_eq!({ pointer.physptr }, 0x9fc10);
        assert_eq!(pointer.length, 1);
        assert_eq!(pointer.spec_rev, 4);
        assert_eq!(pointer.features, [0; 5]);
        assert_eq!(byte_sum(&read_bytes(mem, layout::MPTABLE_START, 16)), 0);

        let base = u64::from(pointer.physptr);
        let header: ConfigHeader = mem.read_obj(GuestAddress(base)).expect("read header");
        let length = usize::from(header.length);
        assert_eq!(header.signature, *b"PCMP");
        assert_eq!(header.spec_rev, 4);
        assert_eq!(header.oem_id, *b"FRAKTI  ");
        assert_eq!(header.product_id, *b"000000000000");
        assert_eq!({ header.lapic_address }, 0xfee0_0000);
        assert_eq!({ header.oem_table_ptr }, 0);
        assert_eq!({ header.extended_table_length }, 0);
        assert_eq!(length, expected_size(n) - 16);
        let table = read_bytes(mem, base, length);
        assert_eq!(byte_sum(&table), 0, "configuration table checksum");
        let entry_count = usize::from(header.entry_count);
        assert_eq!(entry_count, n + 1 + 1 + 24 + 2);
        assert!(base + length as u64 <= 0x10_0000, "below 1 MiB");

        // Walk the entries.
        let mut offset = size_of::<ConfigHeader>();
        let mut processors = Vec::new();
        let mut buses = Vec::new();
        let mut ioapics = Vec::new();
        let mut intsrcs = Vec::new();
        let mut lintsrcs = Vec::new();
        let mut seen = 0;
        while offset < length {
            let at = GuestAddress(base + offset as u64);
            offset += match table[offset] {
                ENTRY_PROCESSOR => {
                    processors.push(mem.read_obj::<ProcessorEntry>(at).expect("cpu"));
                    20
                }
                ENTRY_BUS => {
                    buses.push(mem.read_obj::<BusEntry>(at).expect("bus"));
                    8
                }
                ENTRY_IOAPIC => {
                    ioapics.push(mem.read_obj::<IoApicEntry>(at).expect("ioapic"));
                    8
                }
                ENTRY_INTSRC => {
                    intsrcs.push(mem.read_obj::<InterruptEntry>(at).expect("intsrc"));
                    8
                }
                ENTRY_LINTSRC => {
                    lintsrcs.push(mem.read_obj::<InterruptEntry>(at).expect("lintsrc"));
                    8
                }
                other => panic!("unknown entry type {other} at offset {offset}"),
            };
            seen += 1;
        }
        assert_eq!(offset, length, "entries fill the table exactly");
        assert_eq!(seen, entry_count);

        assert_eq!(processors.len(), n);
        for (i, cpu) in processors.iter().enumerate() {
            assert_eq!(usize::from(cpu.lapic_id), i);
            assert_eq!(cpu.lapic_version, 0x14);
            let expected_flags = if i == 0 { 0x3 } else { 0x1 };
            assert_eq!(cpu.flags, expected_flags, "cpu {i}: enabled, BSP only on 0");
            assert_eq!({ cpu.signature }, 0x600);
            assert_eq!({ cpu.features }, 0x201);
        }

        assert_eq!(buses.len(), 1);
        assert_eq!(buses[0].bus_id, 0);
        assert_eq!(buses[0].bus_type, *b"ISA   ");

        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0].ioapic_id, vcpu_count);
        assert_eq!(ioapics[0].ioapic_version, 0x11);
        assert_eq!(ioapics[0].flags, 1);
        assert_eq!({ ioapics[0].address }, 0xfec0_0000);

        assert_eq!(intsrcs.len(), 24);
        for (i, src) in intsrcs.iter().enumerate() {
            assert_eq!(src.int_type, INT_TYPE_INT);
            assert_eq!({ src.flags }, 0);
            assert_eq!(src.src_bus, 0);
            assert_eq!(usize::from(src.src_irq), i);
            assert_eq!(src.dst_apic, vcpu_count);
            assert_eq!(usize::from(src.dst_pin), i);
        }

        assert_eq!(lintsrcs.len(), 2);
        assert_eq!(lintsrcs[0].int_type, INT_TYPE_EXTINT);
        assert_eq!(lintsrcs[0].dst_pin, 0);
        assert_eq!(lintsrcs[1].int_type, INT_TYPE_NMI);
        assert_eq!(lintsrcs[1].dst_pin, 1);
        for lint in &lintsrcs {
            assert_eq!(lint.dst_apic, 0xff);
        }
    }

    #[test]
    fn structure_sizes() {
        assert_eq!(size_of::<FloatingPointer>(), 16);
        assert_eq!(size_of::<ConfigHeader>(), 44);
        assert_eq!(size_of::<ProcessorEntry>(), 20);
        assert_eq!(size_of::<BusEntry>(), 8);
        assert_eq!(size_of::<IoApicEntry>(), 8);
        assert_eq!(size_of::<InterruptEntry>(), 8);
    }

    #[test]
    fn checksum_zeroes_sum() {
        assert_eq!(checksum(&[]), 0);
        assert_eq!(checksum(&[1]), 0xff);
        let bytes = [0x80, 0x80, 0x7f, 0x13];
        assert_eq!(byte_sum(&bytes).wrapping_add(checksum(&bytes)), 0);
    }

    #[test]
    fn one_vcpu() {
        let mem = memory(2 << 20);
        setup(&mem, 1).expect("setup");
        check(&mem, 1);
    }

    #[test]
    fn thirty_two_vcpus() {
        let mem = memory(2 << 20);
        setup(&mem, 32).expect("setup");
        check(&mem, 32);
    }

    #[test]
    fn max_vcpus_fit_below_1mib() {
        let mem = memory(2 << 20);
        setup(&mem, MAX_VCPUS).expect("setup");
        check(&mem, MAX_VCPUS);
        let size = build(MAX_VCPUS).expect("build").len();
        assert_eq!(size, expected_size(254));
        assert!(layout::MPTABLE_START + size as u64 <= layout::HIMEM_START);
    }

    #[test]
    fn every_count_is_consistent() {
        for n in 1..=MAX_VCPUS {
            let table = build(n).expect("build");
            assert_eq!(table.len(), expected_size(usize::from(n)));
            assert_eq!(byte_sum(&table[..16]), 0, "{n}: floating pointer");
            assert_eq!(byte_sum(&table[16..]), 0, "{n}: configuration table");
        }
    }

    #[test]
    fn rewriting_with_fewer_vcpus() {
        let mem = memory(2 << 20);
        setup(&mem, 200).expect("setup");
        setup(&mem, 2).expect("setup");
        check(&mem, 2);
    }

    #[test]
    fn invalid_vcpu_counts() {
        let mem = memory(2 << 20);
        assert!(matches!(setup(&mem, 0), Err(Error::InvalidVcpuCount(0))));
        assert!(matches!(
            setup(&mem, 255),
            Err(Error::InvalidVcpuCount(255))
        ));
        // Nothing written.
        assert_eq!(read_bytes(&mem, layout::MPTABLE_START, 4), [0; 4]);
    }

    #[test]
    fn memory_too_small() {
        // RAM ends at 0xa0000: the EBDA KiB holds the table for up to 32
        // vCPUs (924 bytes), not for 64.
        let mem = memory(0xa0000);
        assert_eq!(mem.last_addr(), GuestAddress(0x9ffff));
        setup(&mem, 32).expect("32 vCPUs fit in the EBDA");
        check(&mem, 32);
        assert!(matches!(
            setup(&mem, 64),
            Err(Error::NotInMemory {
                start: 0x9fc00,
                end: 0xa021c
            })
        ));
        // The failed attempt left the previous table alone.
        check(&mem, 32);
        // No RAM there at all.
        let mem = memory(0x8_0000);
        assert!(matches!(setup(&mem, 1), Err(Error::NotInMemory { .. })));
    }
}
