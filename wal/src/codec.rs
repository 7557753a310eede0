//! The archive object format: a fixed header carrying the SHA-256 of the
//! original bytes, then a zstd frame. Keeping the checksum inside the object
//! (rather than in a sidecar or store-specific metadata) makes every object
//! self-verifying and written in one atomic put on any target.

use sha2::{Digest, Sha256};

/// `FWAL1 ` + 64 hex digits + `\n`.
pub const MAGIC: &[u8; 6] = b"FWAL1 ";
pub const HEADER_LEN: usize = MAGIC.len() + 64 + 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not a fleet-agent archive object (bad header)")]
    BadHeader,
    #[error("decompression failed: {0}")]
    Zstd(std::io::Error),
    #[error("checksum mismatch: recorded {recorded}, content {actual}")]
    Checksum { recorded: String, actual: String },
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn header(sha_hex: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(sha_hex.as_bytes());
    h.push(b'\n');
    h
}

/// Compresses `original` into an archive object; returns it and the checksum.
pub fn encode(original: &[u8], level: i32) -> Result<(Vec<u8>, String), CodecError> {
    let sha = sha256_hex(original);
    let mut out = header(&sha);
    let compressed = zstd::bulk::compress(original, level).map_err(CodecError::Zstd)?;
    out.extend_from_slice(&compressed);
    Ok((out, sha))
}

/// The checksum recorded in an object's header (its first `HEADER_LEN` bytes suffice).
pub fn recorded_sha(object: &[u8]) -> Result<String, CodecError> {
    let head = object.get(..HEADER_LEN).ok_or(CodecError::BadHeader)?;
    if &head[..MAGIC.len()] != MAGIC || head[HEADER_LEN - 1] != b'\n' {
        return Err(CodecError::BadHeader);
    }
    let sha = std::str::from_utf8(&head[MAGIC.len()..HEADER_LEN - 1])
        .map_err(|_| CodecError::BadHeader)?;
    if !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CodecError::BadHeader);
    }
    Ok(sha.to_string())
}

/// Decompresses an object and checks the content against its recorded checksum.
pub fn decode(object: &[u8]) -> Result<Vec<u8>, CodecError> {
    let recorded = recorded_sha(object)?;
    let body = &object[HEADER_LEN..];
    // WAL segments are 16 MiB by default: one allocation instead of doubling up to it.
    let mut original = Vec::with_capacity(16 << 20);
    zstd::stream::copy_decode(body, &mut original).map_err(CodecError::Zstd)?;
    let actual = sha256_hex(&original);
    if actual != recorded {
        return Err(CodecError::Checksum { recorded, actual });
    }
    Ok(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let data = vec![7u8; 100_000];
        let (obj, sha) = encode(&data, 3).unwrap();
        assert_eq!(recorded_sha(&obj).unwrap(), sha);
        assert_eq!(decode(&obj).unwrap(), data);
        let mut bad = obj.clone();
        bad[10] = if bad[10] == b'0' { b'1' } else { b'0' };
        assert!(matches!(decode(&bad), Err(CodecError::Checksum { .. })));
    }
}
