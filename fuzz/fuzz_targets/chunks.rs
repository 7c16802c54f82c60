//! Chunk sizes for feeding one fuzz input to a resumable parser in pieces, shared by the fuzz
//! targets (included with `#[path]`, not a target of its own).

/// At most this many chunks: keeps one execution linear-ish on large inputs (the parser re-scans
/// an incomplete inline line on every call, as Redis does).
pub const MAX_CHUNKS: usize = 256;

/// Chunk sizes derived from one control byte.
///
/// * bits 0..=5: `max`, 1..=64;
/// * bit 6: scale `max` by 64 (chunks up to 4096 bytes, around `max_bulk_bytes`);
/// * bit 7: every chunk is exactly `max` bytes; otherwise sizes are pseudo-random in `1..=max`
///   from a xorshift generator seeded with the control byte and the input length.
pub struct Chunks {
    max: usize,
    fixed: bool,
    state: u64,
    floor: usize,
}

impl Chunks {
    pub fn new(control: u8, len: usize) -> Self {
        let mut max = 1 + usize::from(control & 0x3f);
        if control & 0x40 != 0 {
            max *= 64;
        }
        let floor = len.div_ceil(MAX_CHUNKS).max(1);
        let state = (u64::from(control) << 32 | len as u64) ^ 0x9e37_79b9_7f4a_7c15;
        Self { max, fixed: control & 0x80 != 0, state: state | 1, floor }
    }

    pub fn next_size(&mut self) -> usize {
        let size = if self.fixed {
            self.max
        } else {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            1 + (self.state % self.max as u64) as usize
        };
        size.max(self.floor)
    }
}
