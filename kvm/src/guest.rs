//! The built-in guest: a tiny x86-64 program that counts and reports over port I/O.
//!
//! The VMM builds everything the guest needs in guest memory before the first
//! KVM_RUN: identity-mapped page tables, a GDT with kernel and user segments, a TSS and
//! kernel stack per vCPU, an IDT, an `iretq` frame per vCPU and the program itself. The
//! vCPU starts directly in 64-bit mode at ring 0 on a single `iretq` instruction, which
//! drops it to ring 3 with IOPL 3 and interrupts off. From then on the guest runs
//! user-mode code, which on a PVM host runs natively (kernel-mode code there is
//! emulated and thousands of times slower), and reaches the VMM only through `out` to
//! [`REPORT_PORT`].
//!
//! IOPL emulation: where the platform does not honour IOPL 3 for user code (PVM runs
//! guest user mode with the hardware IOPL at 0), the `out` raises #GP. The guest's #GP
//! handler then does the port write on the user's behalf and skips the instruction,
//! as an OS kernel that virtualises IOPL does (Linux's IOPL emulation, Xen PV). It
//! accepts only the work loop's own `out`; any other #GP is reported on
//! [`PANIC_PORT`], and the VMM stops the vCPU as failed. On VMX/SVM hosts the `out` runs in ring 3 directly and
//! the handler never runs.
//!
//! The work loop, per vCPU (`rbx` = this vCPU's slot, `rsi` = the parameter block):
//! 1. spin `iterations` times (the VMM calibrates this so one round takes ~10 ms);
//! 2. write the counter into `touch_per_round` pages of the touch region, walking a
//!    cursor through it, so snapshots have real dirty pages;
//! 3. increment the counter in guest RAM and `out` its low 32 bits to the report port.
//!
//! Guest physical memory layout (virtual = physical, identity-mapped with 2 MiB pages):
//!
//! | address      | content                                              |
//! |--------------|------------------------------------------------------|
//! | `0x1000`     | GDT                                                  |
//! | `0x2000`     | TSS per vCPU, 128 bytes each (RSP0 = its kernel stack) |
//! | `0x3000`     | IDT (only #GP, vector 13, is present)                |
//! | `0x4000`     | `iretq` frames, 64 bytes per vCPU                    |
//! | `0x5000`     | kernel stacks for #GP, 128 bytes per vCPU            |
//! | `0x6000`     | parameter block; per-vCPU slots from `+0x100`        |
//! | `0x7000`     | kernel code: `iretq`; the #GP handler at `+0x10`     |
//! | `0x8000`     | user code: the work loop                             |
//! | `0xF000`     | top of the (unused) user stack                       |
//! | `0x10000`    | PML4, then PDPT, then one PD per GiB                 |
//! | `0x200000`.. | touch region (to the end of memory)                  |

/// Guest page size; also the dirty-log granularity.
pub const PAGE_SIZE: u64 = 4096;
/// The port the guest writes its counter to.
pub const REPORT_PORT: u16 = 0x0555;
/// The port the guest's #GP handler reports an unexpected fault to (value: the low 32
/// bits of the faulting RIP).
pub const PANIC_PORT: u16 = 0x0556;
/// Marks a parameter block the VMM wrote (ASCII "VIGILGST").
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"VIGILGST");

pub const GDT_GPA: u64 = 0x1000;
pub const TSS_GPA: u64 = 0x2000;
pub const IDT_GPA: u64 = 0x3000;
pub const IRET_FRAMES_GPA: u64 = 0x4000;
pub const KERNEL_STACKS_GPA: u64 = 0x5000;
/// The #GP handler (kernel mode), inside the kernel code page.
pub const GP_HANDLER_GPA: u64 = KERNEL_CODE_GPA + 0x10;
/// Bytes per vCPU for its TSS and for its kernel stack.
const TSS_BYTES: u64 = 128;
const KERNEL_STACK_BYTES: u64 = 128;
/// The vector of #GP (general protection).
pub const GP_VECTOR: u64 = 13;
pub const PARAMS_GPA: u64 = 0x6000;
pub const KERNEL_CODE_GPA: u64 = 0x7000;
pub const USER_CODE_GPA: u64 = 0x8000;
pub const USER_STACK_TOP: u64 = 0xF000;
pub const PML4_GPA: u64 = 0x10000;
pub const PDPT_GPA: u64 = 0x11000;
pub const PD_GPA: u64 = 0x12000;
pub const TOUCH_REGION_GPA: u64 = 0x20_0000;

/// The most vCPUs the layout has room for (iretq frames and slots).
pub const MAX_GUEST_VCPUS: usize = 32;
/// The most guest memory one PDPT of identity mappings covers (and the PDs fit below
/// the touch region).
pub const MAX_GUEST_MEMORY: u64 = 64 << 30;

// Parameter block fields (offsets from PARAMS_GPA), written by the VMM.
pub const PARAM_MAGIC: u64 = 0;
/// Spin iterations per round.
pub const PARAM_ITERATIONS: u64 = 8;
/// First byte of the touch region.
pub const PARAM_TOUCH_BASE: u64 = 16;
/// Pages in the touch region (0: touch nothing).
pub const PARAM_TOUCH_PAGES: u64 = 24;
/// Pages written per round.
pub const PARAM_TOUCH_PER_ROUND: u64 = 32;
/// Per-vCPU slots start here; each is [`SLOT_BYTES`] long.
pub const PARAM_SLOTS: u64 = 0x100;
pub const SLOT_BYTES: u64 = 64;
/// In a slot: the counter (incremented once per round, before the report).
pub const SLOT_COUNTER: u64 = 0;
/// In a slot: the touch cursor (page index, grows without bound, used modulo pages).
pub const SLOT_CURSOR: u64 = 8;

// GDT selectors.
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
pub const TSS_SELECTOR: u16 = 0x28;

/// GDT entries: null, kernel code (64-bit), kernel data, user data, user code
/// (64-bit), then the 16-byte TSS descriptor (filled in by [`gdt`]).
const GDT_KERNEL_CODE: u64 = 0x00AF_9A00_0000_FFFF; // P, DPL0, code exec/read, L=1, G=1
const GDT_KERNEL_DATA: u64 = 0x00CF_9200_0000_FFFF; // P, DPL0, data read/write, D=1, G=1
const GDT_USER_DATA: u64 = 0x00CF_F200_0000_FFFF; // P, DPL3, data read/write, D=1, G=1
const GDT_USER_CODE: u64 = 0x00AF_FA00_0000_FFFF; // P, DPL3, code exec/read, L=1, G=1
/// TSS limit (a 64-bit TSS is 104 bytes).
pub const TSS_LIMIT: u32 = 0x67;

/// RFLAGS of the user code: IOPL 3 (bits 12-13) so `out` works in ring 3, the
/// always-one bit 1, interrupts off.
pub const USER_RFLAGS: u64 = 0x3002;

/// The GDT, as 8-byte little-endian entries.
pub fn gdt() -> [u64; 7] {
    // A 64-bit TSS descriptor: limit 15:0, base 23:0, type 0xB (busy 64-bit TSS),
    // present, base 31:24; then base 63:32 in the second quadword.
    let base = TSS_GPA;
    let limit = u64::from(TSS_LIMIT);
    let low = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x8B << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    let high = base >> 32;
    [
        0,
        GDT_KERNEL_CODE,
        GDT_KERNEL_DATA,
        GDT_USER_DATA,
        GDT_USER_CODE,
        low,
        high,
    ]
}

/// The `iretq` frame for one vCPU: popped in this order (lowest address first).
pub fn iret_frame() -> [u64; 5] {
    [
        USER_CODE_GPA,  // RIP
        USER_CS as u64, // CS
        USER_RFLAGS,    // RFLAGS
        USER_STACK_TOP, // RSP
        USER_DS as u64, // SS
    ]
}

/// Address of vCPU `index`'s iretq frame (its initial RSP).
pub fn iret_frame_gpa(index: usize) -> u64 {
    assert!(index < MAX_GUEST_VCPUS);
    IRET_FRAMES_GPA + index as u64 * 64
}

/// Address of vCPU `index`'s TSS (each vCPU's TR points at its own).
pub fn tss_gpa(index: usize) -> u64 {
    assert!(index < MAX_GUEST_VCPUS);
    TSS_GPA + index as u64 * TSS_BYTES
}

/// Top of vCPU `index`'s kernel stack (RSP0 in its TSS).
pub fn kernel_stack_top(index: usize) -> u64 {
    assert!(index < MAX_GUEST_VCPUS);
    KERNEL_STACKS_GPA + (index as u64 + 1) * KERNEL_STACK_BYTES
}

/// Offset of RSP0 in a 64-bit TSS.
pub const TSS_RSP0: u64 = 4;

/// The IDT entry for the #GP handler: a present 64-bit interrupt gate, DPL 0, in the
/// kernel code segment. Returns the two quadwords of the 16-byte descriptor.
pub fn gp_gate() -> [u64; 2] {
    let offset = GP_HANDLER_GPA;
    let low = (offset & 0xFFFF)
        | (u64::from(KERNEL_CS) << 16)
        | (0x8E << 40) // present, DPL 0, type 0xE: 64-bit interrupt gate (IST 0)
        | (((offset >> 16) & 0xFFFF) << 48);
    [low, offset >> 32]
}

/// Address of vCPU `index`'s slot in the parameter block.
pub fn slot_gpa(index: usize) -> u64 {
    assert!(index < MAX_GUEST_VCPUS);
    PARAMS_GPA + PARAM_SLOTS + index as u64 * SLOT_BYTES
}

/// Kernel code, placed at [`KERNEL_CODE_GPA`]: the entry `iretq`, then at
/// [`GP_HANDLER_GPA`] the #GP handler (IOPL emulation for the work loop's `out`).
pub fn kernel_code() -> Vec<u8> {
    let out_rip = (USER_CODE_GPA + user_out_offset()) as u32;
    let out_rip = out_rip.to_le_bytes();
    let panic = PANIC_PORT.to_le_bytes();
    let mut code = vec![
        0x48, 0xCF, // entry: iretq: pop RIP, CS, RFLAGS, RSP, SS -> ring 3, IOPL 3
    ];
    code.resize((GP_HANDLER_GPA - KERNEL_CODE_GPA) as usize, 0xF4); // padding: hlt
    code.extend_from_slice(&[
        0x48, 0x83, 0xC4, 0x08, // add rsp, 8: drop the #GP error code
        0x48, 0x81, 0x3C, 0x24, // cmp qword [rsp], imm32: faulting RIP ==
        out_rip[0], out_rip[1], out_rip[2], out_rip[3], //  ... the work loop's `out`?
        0x75, 0x08, // jne fail (+8): any other #GP is a guest bug
        0xEF, // out dx, eax: the user's port write, done on its behalf
        0x48, 0x83, 0x04, 0x24, 0x01, // add qword [rsp], 1: skip the 1-byte `out`
        0x48, 0xCF, // iretq: back to the user code after the `out`
        // fail:
        0x48, 0x8B, 0x04, 0x24, // mov rax, [rsp]: the faulting RIP
        0x66, 0xBA, panic[0], panic[1], // mov dx, PANIC_PORT
        0xEF,     // out dx, eax: tell the VMM, which stops this vCPU
        0xF4,     // hlt (not reached: the VMM does not resume a failed vCPU)
    ]);
    code
}

/// Offset of the `out` instruction in [`user_code`].
pub fn user_out_offset() -> u64 {
    let code = user_code();
    let at = code.len() - 3; // `out` is followed by the 2-byte closing `jmp top`
    assert_eq!(code[at], 0xEF);
    at as u64
}

/// A tiny assembler: bytes plus forward/backward 8-bit jumps to labels.
struct Code {
    bytes: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, usize)>, // (offset of the rel8 byte, label)
}

impl Code {
    fn new() -> Self {
        Code {
            bytes: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn bind(&mut self, label: usize) {
        assert!(self.labels[label].is_none(), "label bound twice");
        self.labels[label] = Some(self.bytes.len());
    }
    fn emit(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }
    /// A short jump: `opcode rel8` to `label`.
    fn jump8(&mut self, opcode: u8, label: usize) {
        self.bytes.push(opcode);
        self.fixups.push((self.bytes.len(), label));
        self.bytes.push(0);
    }
    fn finish(mut self) -> Vec<u8> {
        for &(at, label) in &self.fixups {
            let target = self.labels[label].expect("jump to an unbound label");
            let rel = target as i64 - (at as i64 + 1);
            assert!((-128..=127).contains(&rel), "short jump out of range");
            self.bytes[at] = rel as i8 as u8;
        }
        self.bytes
    }
}

/// User code: the work loop (see the module comment). Registers on entry:
/// `rbx` = this vCPU's slot, `rsi` = the parameter block.
pub fn user_code() -> Vec<u8> {
    let port = REPORT_PORT.to_le_bytes();
    let mut c = Code::new();
    let top = c.label();
    let spin = c.label();
    let touch = c.label();
    let report = c.label();

    c.bind(top);
    c.emit(&[0x48, 0x8B, 0x4E, PARAM_ITERATIONS as u8]); // mov rcx, [rsi+ITERATIONS]
    c.bind(spin);
    c.emit(&[0x48, 0xFF, 0xC9]); // dec rcx
    c.jump8(0x75, spin); // jnz spin
    c.emit(&[0x48, 0x8B, 0x4E, PARAM_TOUCH_PER_ROUND as u8]); // mov rcx, [rsi+TOUCH_PER_ROUND]
    c.emit(&[0x4C, 0x8B, 0x46, PARAM_TOUCH_PAGES as u8]); // mov r8, [rsi+TOUCH_PAGES]
    c.emit(&[0x4D, 0x85, 0xC0]); // test r8, r8
    c.jump8(0x74, report); // jz report (no touch region)
    c.bind(touch);
    c.emit(&[0x48, 0x85, 0xC9]); // test rcx, rcx
    c.jump8(0x74, report); // jz report (touched enough this round)
    c.emit(&[0x48, 0x8B, 0x43, SLOT_CURSOR as u8]); // mov rax, [rbx+CURSOR]
    c.emit(&[0x31, 0xD2]); // xor edx, edx
    c.emit(&[0x49, 0xF7, 0xF0]); // div r8: rdx = cursor % touch_pages
    c.emit(&[0x48, 0xC1, 0xE2, 0x0C]); // shl rdx, 12: page index -> byte offset
    c.emit(&[0x48, 0x03, 0x56, PARAM_TOUCH_BASE as u8]); // add rdx, [rsi+TOUCH_BASE]
    c.emit(&[0x48, 0x8B, 0x03]); // mov rax, [rbx+COUNTER]
    c.emit(&[0x48, 0x89, 0x02]); // mov [rdx], rax: dirty the page
    c.emit(&[0x48, 0xFF, 0x43, SLOT_CURSOR as u8]); // inc qword [rbx+CURSOR]
    c.emit(&[0x48, 0xFF, 0xC9]); // dec rcx
    c.jump8(0xEB, touch); // jmp touch
    c.bind(report);
    c.emit(&[0x48, 0xFF, 0x03]); // inc qword [rbx+COUNTER]
    c.emit(&[0x48, 0x8B, 0x03]); // mov rax, [rbx+COUNTER]
    c.emit(&[0x66, 0xBA, port[0], port[1]]); // mov dx, REPORT_PORT
    c.emit(&[0xEF]); // out dx, eax: report the counter's low 32 bits
    c.jump8(0xEB, top); // jmp top
    c.finish()
}

/// Page-table entry flags: present, writable, user-accessible; `PS` marks a 2 MiB page.
const PTE_PRESENT_RW_USER: u64 = 0x7;
const PTE_PAGE_SIZE: u64 = 0x80;

/// Identity page tables covering `memory_bytes`, as (guest address, entry) pairs.
/// PML4[0] -> PDPT; PDPT[i] -> PD i; each PD maps 1 GiB with 2 MiB pages.
pub fn page_table_entries(memory_bytes: u64) -> Vec<(u64, u64)> {
    assert!(memory_bytes > 0 && memory_bytes <= MAX_GUEST_MEMORY);
    let mut entries = vec![(PML4_GPA, PDPT_GPA | PTE_PRESENT_RW_USER)];
    let gib = memory_bytes.div_ceil(1 << 30);
    for pd in 0..gib {
        let pd_gpa = PD_GPA + pd * PAGE_SIZE;
        entries.push((PDPT_GPA + pd * 8, pd_gpa | PTE_PRESENT_RW_USER));
        for i in 0..512u64 {
            let address = (pd << 30) | (i << 21);
            if address >= memory_bytes {
                break;
            }
            entries.push((
                pd_gpa + i * 8,
                address | PTE_PRESENT_RW_USER | PTE_PAGE_SIZE,
            ));
        }
    }
    assert!(PD_GPA + gib * PAGE_SIZE <= TOUCH_REGION_GPA);
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_code_jumps_land_on_instructions() {
        let code = user_code();
        // The first instruction is the load of the iteration count, and the loop
        // closes with a short jump back to offset 0.
        assert_eq!(&code[..4], &[0x48, 0x8B, 0x4E, 0x08]);
        let last = code.len() - 2;
        assert_eq!(code[last], 0xEB);
        assert_eq!(last as i64 + 2 + (code[last + 1] as i8) as i64, 0);
    }

    #[test]
    fn gp_handler_branches_to_the_failure_report() {
        let code = kernel_code();
        let handler = (GP_HANDLER_GPA - KERNEL_CODE_GPA) as usize;
        let jne = handler + 12;
        assert_eq!(code[jne], 0x75);
        let target = jne + 2 + code[jne + 1] as usize;
        assert_eq!(&code[target..target + 4], &[0x48, 0x8B, 0x04, 0x24]);
        assert_eq!(code[target + 8], 0xEF);
        assert_eq!(code.last(), Some(&0xF4));
        assert_eq!(code[jne + 2], 0xEF);
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let g = gdt();
        assert_eq!(g[5] & 0xFFFF, u64::from(TSS_LIMIT));
        assert_eq!((g[5] >> 16) & 0xFF_FFFF, TSS_GPA);
        assert_eq!((g[5] >> 40) & 0xFF, 0x8B);
    }

    #[test]
    fn page_tables_cover_memory() {
        let entries = page_table_entries(3 << 29); // 1.5 GiB
        let pages = entries
            .iter()
            .filter(|(_, e)| e & PTE_PAGE_SIZE != 0)
            .count();
        assert_eq!(pages, 768);
    }
}
