//! A small, stable content hash (FNV-1a, 128-bit) used for cache keys and fingerprints.
//!
//! Stability across platforms and Rust versions matters more than speed here: the hash names cache
//! files on disk, so `std`'s randomly seeded hashers cannot be used.

/// Incremental 128-bit FNV-1a hasher with a stable output.
#[derive(Clone, Debug)]
pub struct ContentHasher {
    state: u128,
}

const FNV_OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
const FNV_PRIME: u128 = 0x0000000001000000000000000000013B;

impl Default for ContentHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl ContentHasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        ContentHasher { state: FNV_OFFSET }
    }

    /// Feeds raw bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.state;
        for &b in bytes {
            h ^= b as u128;
            h = h.wrapping_mul(FNV_PRIME);
        }
        self.state = h;
    }

    /// Feeds a length-prefixed field, so that ("ab","c") and ("a","bc") hash differently.
    pub fn field(&mut self, bytes: &[u8]) {
        self.update(&(bytes.len() as u64).to_le_bytes());
        self.update(bytes);
    }

    /// The digest as 128 bits.
    pub fn finish(&self) -> u128 {
        self.state
    }

    /// The digest as 32 lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:032x}", self.state)
    }
}

/// Hashes one byte string.
pub fn content_hash(bytes: &[u8]) -> u128 {
    let mut h = ContentHasher::new();
    h.update(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_and_field_separation() {
        // FNV-1a 128 of the empty string is the offset basis.
        assert_eq!(content_hash(b""), FNV_OFFSET);
        // Published FNV-1a-128 test vector for "a".
        assert_eq!(content_hash(b"a"), 0xd228cb696f1a8caf78912b704e4a8964);
        let mut a = ContentHasher::new();
        a.field(b"ab");
        a.field(b"c");
        let mut b = ContentHasher::new();
        b.field(b"a");
        b.field(b"bc");
        assert_ne!(a.finish(), b.finish());
    }
}
