//! Internet checksums of headers the programs build from scratch (a reset, a VXLAN outer
//! header). Headers the programs only change are fixed incrementally (`nat`).

/// Sum of big-endian 16-bit words (one's complement arithmetic is done by [`fold`]).
#[inline(always)]
pub fn sum_words(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// The checksum field for a [`sum_words`] total.
#[inline(always)]
pub fn fold(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}
