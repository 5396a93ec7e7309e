//! The RAM-fill guest: a hand-assembled boot sector that fills guest RAM from 1 MiB up to
//! 1 GiB with a non-zero pattern, so that migration has real pages to write (zero pages are
//! skipped by QEMU and would make an external checkpoint look free).
//!
//! SeaBIOS loads the sector at 0000:7C00 in 16-bit real mode. The code enables the A20 gate
//! (fast A20, port 0x92), loads a three-entry GDT (null, flat 4 GiB code, flat 4 GiB data),
//! switches to 32-bit protected mode, fills `[FILL_START, FILL_END)` with [`FILL_PATTERN`]
//! using `rep stosd`, then writes [`FILL_DONE`] to [`DONE_ADDR`] and halts with interrupts
//! off. The benchmark waits for the done word (HMP `xp`) before it measures anything.
//! The bytes were checked against `nasm -f bin` of the listing in the comments.
//!
//! The idle guest of the operations is a boot sector that halts with interrupts off at once,
//! so that its virtual CPU sleeps (under TCG a busy guest takes a whole host core, and the
//! benchmark would measure how long each process waits for a core).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// First byte the guest fills (1 MiB: above the BIOS, the boot sector and the done word).
pub const FILL_START: u64 = 0x0010_0000;
/// End of the filled range (1 GiB, exclusive).
pub const FILL_END: u64 = 0x4000_0000;
/// The 32-bit word written everywhere in the filled range.
pub const FILL_PATTERN: u32 = 0x5A5A_A5A5;
/// Where the guest writes [`FILL_DONE`] once the whole range is filled.
pub const DONE_ADDR: u64 = 0x9000;
/// The done word.
pub const FILL_DONE: u32 = 0x600D_F111;

/// Bytes 0x00-0x47: code. Addresses are 0x7C00 + offset.
const FILL_CODE: [u8; 70] = [
    // 16-bit real mode
    0xFA, //                                  00 cli
    0x31, 0xC0, //                            01 xor  ax, ax
    0x8E, 0xD8, //                            03 mov  ds, ax             ; DS = 0 for lgdt
    0xE4, 0x92, //                            05 in   al, 0x92           ; fast A20 gate
    0x0C, 0x02, //                            07 or   al, 2
    0xE6, 0x92, //                            09 out  0x92, al
    0x0F, 0x01, 0x16, 0x60, 0x7C, //          0B lgdt [0x7C60]           ; gdt_desc below
    0x0F, 0x20, 0xC0, //                      10 mov  eax, cr0
    0x0C, 0x01, //                            13 or   al, 1              ; CR0.PE
    0x0F, 0x22, 0xC0, //                      15 mov  cr0, eax
    0xEA, 0x1D, 0x7C, 0x08, 0x00, //          18 jmp  0x08:0x7C1D        ; flush, CS = code
    // 32-bit protected mode (offset 0x1D)
    0x66, 0xB8, 0x10, 0x00, //                1D mov  ax, 0x10           ; data selector
    0x8E, 0xD8, //                            21 mov  ds, ax
    0x8E, 0xC0, //                            23 mov  es, ax             ; stosd writes ES:EDI
    0x8E, 0xD0, //                            25 mov  ss, ax
    0xBF, 0x00, 0x00, 0x10, 0x00, //          27 mov  edi, 0x00100000    ; FILL_START
    0xB9, 0x00, 0x00, 0xFC, 0x0F, //          2C mov  ecx, 0x0FFC0000    ; (END-START)/4
    0xB8, 0xA5, 0xA5, 0x5A, 0x5A, //          31 mov  eax, 0x5A5AA5A5    ; FILL_PATTERN
    0xFC, //                                  36 cld
    0xF3, 0xAB, //                            37 rep  stosd
    0xC7, 0x05, 0x00, 0x90, 0x00, 0x00, //    39 mov  dword [0x9000], .. ; DONE_ADDR
    0x11, 0xF1, 0x0D, 0x60, //                3F    0x600DF111           ; FILL_DONE
    0xF4, //                                  43 hlt                     ; done: (IF = 0)
    0xEB, 0xFD, //                            44 jmp  done
];

/// Offset 0x48: the GDT (8-byte aligned), then at 0x60 its descriptor for `lgdt`.
const FILL_GDT: [u8; 30] = [
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 48 null descriptor
    0xFF, 0xFF, 0x00, 0x00, 0x00, 0x9A, 0xCF,
    0x00, // 50 0x08: base 0, limit 4 GiB, code r/x, 32-bit
    0xFF, 0xFF, 0x00, 0x00, 0x00, 0x92, 0xCF, 0x00, // 58 0x10: base 0, limit 4 GiB, data r/w
    0x17, 0x00, 0x48, 0x7C, 0x00, 0x00, //             60 limit 23, base 0x00007C48
];

/// Offset of [`FILL_GDT`] in the sector.
const GDT_OFFSET: usize = 0x48;

/// The fill guest's boot sector: code, GDT, zero padding, 0x55 0xAA at 510-511.
pub fn fill_boot_sector() -> [u8; 512] {
    let mut sector = [0u8; 512];
    sector[..FILL_CODE.len()].copy_from_slice(&FILL_CODE);
    sector[GDT_OFFSET..GDT_OFFSET + FILL_GDT.len()].copy_from_slice(&FILL_GDT);
    sector[510] = 0x55;
    sector[511] = 0xAA;
    sector
}

/// The idle guest: `cli`, then `hlt` for ever (0x7C00: FA F4 EB FD), and the boot signature.
pub fn idle_boot_sector() -> [u8; 512] {
    let mut sector = [0u8; 512];
    sector[..4].copy_from_slice(&[0xFA, 0xF4, 0xEB, 0xFD]);
    sector[510] = 0x55;
    sector[511] = 0xAA;
    sector
}

/// Writes a 1 MiB qcow2 image whose first sector is the fill guest.
pub fn fill_boot_qcow2(path: &Path) -> Result<()> {
    boot_qcow2(path, &fill_boot_sector())
}

/// Writes a 1 MiB qcow2 image whose first sector is the idle guest.
pub fn idle_boot_qcow2(path: &Path) -> Result<()> {
    boot_qcow2(path, &idle_boot_sector())
}

/// Writes a 1 MiB qcow2 image whose first sector is `sector`.
fn boot_qcow2(path: &Path, sector: &[u8; 512]) -> Result<()> {
    let raw = path.with_extension("raw-tmp");
    let mut image = vec![0u8; 1 << 20];
    image[..512].copy_from_slice(sector);
    std::fs::write(&raw, image).with_context(|| format!("cannot write {}", raw.display()))?;
    let status = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(path)
        .status()
        .context("cannot run qemu-img")?;
    let _ = std::fs::remove_file(&raw);
    if !status.success() {
        bail!("qemu-img convert failed ({status})");
    }
    Ok(())
}

/// Addresses the benchmark reads back with `xp` to check that RAM holds the pattern.
pub fn probe_addresses() -> [u64; 4] {
    [FILL_START, 0x1234_5678 & !3, 0x2000_0000, FILL_END - 4]
}

/// Parses HMP `xp /1wx ADDR` output, e.g. `0000000000009000: 0x600df111`.
pub fn parse_xp_word(output: &str) -> Option<u32> {
    let (_, value) = output.trim().split_once(": ")?;
    u32::from_str_radix(value.trim().trim_start_matches("0x"), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_layout() {
        let s = fill_boot_sector();
        assert_eq!(&s[510..], &[0x55, 0xAA]);
        // lgdt operand and far-jump target point at the GDT descriptor and the 32-bit code.
        assert_eq!(u16::from_le_bytes([s[0x0E], s[0x0F]]), 0x7C60);
        assert_eq!(u16::from_le_bytes([s[0x19], s[0x1A]]), 0x7C1D);
        assert_eq!(&s[0x1D..0x1F], &[0x66, 0xB8]);
        assert_eq!(
            u32::from_le_bytes([s[0x62], s[0x63], s[0x64], s[0x65]]),
            0x7C48
        );
        assert_eq!(
            u32::from_le_bytes([s[0x2D], s[0x2E], s[0x2F], s[0x30]]),
            u32::try_from((FILL_END - FILL_START) / 4).unwrap()
        );
    }
}
