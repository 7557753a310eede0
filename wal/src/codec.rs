//! The archive object format: a fixed header carrying the SHA-256 of the
//! original bytes, then a zstd frame. Keeping the checksum inside the object
//! (rather than in a sidecar or store-specific metadata) makes every object
//! self-verifying and written in one atomic put on any target.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};

/// Segments are hashed and compressed in pieces of this size, so a 16 MiB
/// segment never sits in memory whole and the piece is still in cache when
/// the compressor reads it after the hasher.
const PIECE: usize = 256 << 10;

/// `FWAL1 ` + 64 hex digits + `\n`.
pub const MAGIC: &[u8; 6] = b"FWAL1 ";
pub const HEADER_LEN: usize = MAGIC.len() + 64 + 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not a fleet-agent archive object (bad header)")]
    BadHeader,
    #[error("decompression failed: {0}")]
    Zstd(std::io::Error),
    #[error("reading the WAL file: {0}")]
    Read(std::io::Error),
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

/// Compresses what `original` yields into an archive object, hashing it in
/// the same pass; returns the object, the checksum and the original length.
pub fn encode(mut original: impl Read, level: i32) -> Result<(Vec<u8>, String, u64), CodecError> {
    let mut out = vec![0u8; HEADER_LEN];
    let mut encoder = zstd::stream::Encoder::new(&mut out, level).map_err(CodecError::Zstd)?;
    let mut hasher = Sha256::new();
    let mut piece = vec![0u8; PIECE];
    let mut length = 0u64;
    loop {
        let n = match original.read(&mut piece) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CodecError::Read(e)),
        };
        hasher.update(&piece[..n]);
        encoder.write_all(&piece[..n]).map_err(CodecError::Zstd)?;
        length += n as u64;
    }
    encoder.finish().map_err(CodecError::Zstd)?;
    let sha = hex::encode(hasher.finalize());
    out[..HEADER_LEN].copy_from_slice(&header(&sha));
    Ok((out, sha, length))
}

/// The SHA-256 of what `original` yields, read in pieces.
pub fn sha256_of(mut original: impl Read) -> Result<String, CodecError> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut original, &mut hasher).map_err(CodecError::Read)?;
    Ok(hex::encode(hasher.finalize()))
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
        let (obj, sha, length) = encode(&data[..], 3).unwrap();
        assert_eq!(length, data.len() as u64);
        assert_eq!(sha, sha256_hex(&data));
        assert_eq!(sha256_of(&data[..]).unwrap(), sha);
        assert_eq!(recorded_sha(&obj).unwrap(), sha);
        assert_eq!(decode(&obj).unwrap(), data);
        let mut bad = obj.clone();
        bad[10] = if bad[10] == b'0' { b'1' } else { b'0' };
        assert!(matches!(decode(&bad), Err(CodecError::Checksum { .. })));
    }
}
