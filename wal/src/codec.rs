//! The archive object format: a fixed header carrying the checksum of the
//! original bytes, then a zstd frame. Keeping the checksum inside the object
//! (rather than in a sidecar or store-specific metadata) makes every object
//! self-verifying and written in one atomic put on any target.
//!
//! Three header versions, one layout (6-byte magic, the digest in lowercase
//! hex, `\n`): `FWAL1 ` records the SHA-256 of the original (64 digits),
//! `FWAL2 ` its BLAKE3-256 (64), `FWAL3 ` its XXH3-128 (32).
//! `[wal] object_checksum` picks what new objects record
//! (`fleet_model::config::DEFAULT_OBJECT_CHECKSUM` when absent; 0.1.0 wrote
//! FWAL1). BLAKE3 hashed a 16 MiB segment in 3.7 ms where SHA-256 took 9.3 ms
//! (with SHA-NI); XXH3-128 takes well under 1 ms (docs/benchmarks.md, xxh13).
//! A non-cryptographic digest is enough because the header is unkeyed:
//! whoever can write the target can write a consistent header in any
//! algorithm, so the digest only finds accidental damage and tells whether a
//! name pushed again is the same content, and 128 bits do both as well
//! (docs/wal.md, "Why this checksum").
//! Every version decodes and verifies, so archives written before FWAL3 stay
//! readable; a checksum is only ever compared with one of its own algorithm.

use sha2::{Digest, Sha256};
use std::io::Read;

/// Segments are hashed and compressed in pieces of this size (one zstd
/// frame each), so a 16 MiB segment never sits in memory whole and the piece
/// is still in cache when the compressor reads it after the hasher. Each
/// encoder holds a piece, an output buffer of that size and a zstd context
/// sized for it: with 1 MiB pieces 2.7 MiB per encoder (heaptrack, two of
/// them beside the objects at the peak of a drain to S3); 256 KiB pieces
/// took as much CPU per segment and made objects 0.3-0.7% larger
/// (docs/benchmarks.md, arch13's frame sizes and rss13).
const PIECE: usize = 256 << 10;

/// `FWAL2 ` + 64 hex digits (BLAKE3) + `\n`: `object_checksum = "blake3"`.
pub const MAGIC: &[u8; 6] = b"FWAL2 ";
/// `FWAL1 ` + 64 hex digits (SHA-256) + `\n`: `object_checksum = "sha256"`, and all objects before FWAL2.
pub const MAGIC_V1: &[u8; 6] = b"FWAL1 ";
/// `FWAL3 ` + 32 hex digits (XXH3-128) + `\n`: `object_checksum = "xxh3"`.
pub const MAGIC_V3: &[u8; 6] = b"FWAL3 ";
const MAGIC_LEN: usize = MAGIC.len();
/// The longest header (FWAL1, FWAL2): this many bytes of an object always
/// hold its header, whichever version it is.
pub const MAX_HEADER_LEN: usize = MAGIC_LEN + 64 + 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not a fleet-agent archive object (bad header)")]
    BadHeader,
    #[error("decompression failed: {0}")]
    Zstd(std::io::Error),
    #[error("reading the WAL file: {0}")]
    Read(std::io::Error),
    #[error("writing the archive object: {0}")]
    Write(std::io::Error),
    #[error("checksum mismatch: recorded {recorded}, content {actual}")]
    Checksum {
        recorded: Checksum,
        actual: Checksum,
    },
}

/// Which hash an object's header records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// FWAL1 objects.
    Sha256,
    /// FWAL2 objects.
    Blake3,
    /// FWAL3 objects.
    Xxh3,
}

impl Algorithm {
    const ALL: [Algorithm; 3] = [Algorithm::Sha256, Algorithm::Blake3, Algorithm::Xxh3];

    fn magic(self) -> &'static [u8; 6] {
        match self {
            Algorithm::Sha256 => MAGIC_V1,
            Algorithm::Blake3 => MAGIC,
            Algorithm::Xxh3 => MAGIC_V3,
        }
    }

    /// Hex digits of the digest in the header.
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 | Algorithm::Blake3 => 64,
            Algorithm::Xxh3 => 32,
        }
    }

    /// The length of this version's header: the body starts there.
    pub fn header_len(self) -> usize {
        MAGIC_LEN + self.hex_len() + 1
    }

    fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(Box::default()),
            Algorithm::Blake3 => Hasher::Blake3(Box::default()),
            Algorithm::Xxh3 => Hasher::Xxh3(Box::default()),
        }
    }
}

impl From<fleet_model::config::ObjectChecksum> for Algorithm {
    fn from(configured: fleet_model::config::ObjectChecksum) -> Self {
        use fleet_model::config::ObjectChecksum;
        match configured {
            ObjectChecksum::Sha256 => Algorithm::Sha256,
            ObjectChecksum::Blake3 => Algorithm::Blake3,
            ObjectChecksum::Xxh3 => Algorithm::Xxh3,
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Blake3 => "blake3",
            Algorithm::Xxh3 => "xxh3",
        })
    }
}

/// A checksum with its algorithm: two are equal only if both are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checksum {
    pub algorithm: Algorithm,
    /// Lowercase hex digits: 64 (SHA-256, BLAKE3) or 32 (XXH3-128).
    pub hex: String,
}

impl std::fmt::Display for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.algorithm, self.hex)
    }
}

enum Hasher {
    Sha256(Box<Sha256>),
    Blake3(Box<blake3::Hasher>),
    Xxh3(Box<twox_hash::XxHash3_128>),
}

impl Hasher {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
            Hasher::Xxh3(h) => h.write(bytes),
        }
    }

    fn finish(self) -> Checksum {
        let (algorithm, hex) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Blake3(h) => (Algorithm::Blake3, h.finalize().to_hex().to_string()),
            // Big-endian, as xxhsum -H2 prints it (XXH128_canonicalFromHash).
            Hasher::Xxh3(h) => (Algorithm::Xxh3, format!("{:032x}", h.finish_128())),
        };
        Checksum { algorithm, hex }
    }
}

/// The checksum of `bytes` with `algorithm`.
pub fn checksum(algorithm: Algorithm, bytes: &[u8]) -> Checksum {
    let mut hasher = algorithm.hasher();
    hasher.update(bytes);
    hasher.finish()
}

/// The header recording `sum` (its algorithm picks the version).
pub fn header(sum: &Checksum) -> Vec<u8> {
    let mut h = Vec::with_capacity(sum.algorithm.header_len());
    h.extend_from_slice(sum.algorithm.magic());
    h.extend_from_slice(sum.hex.as_bytes());
    h.push(b'\n');
    h
}

/// Compresses what `original` yields into an archive object, hashing it in
/// the same pass; returns the object, the checksum and the original length.
/// One-off: the WAL service reuses its encoders through an [`EncoderPool`].
pub fn encode(
    original: impl Read,
    level: i32,
    algorithm: Algorithm,
) -> Result<(Vec<u8>, Checksum, u64), CodecError> {
    Encoder::new(level, algorithm)?.encode(original)
}

fn zstd_error(code: zstd::zstd_safe::ErrorCode) -> CodecError {
    CodecError::Zstd(std::io::Error::other(zstd::zstd_safe::get_error_name(code)))
}

/// A zstd compression context with its piece and output buffers, kept from
/// one object to the next (an [`EncoderPool`] hands them out), so a push
/// allocates nothing large: the object goes out in output chunks, to a file
/// as it is made ([`Encoder::encode_to_file`]) or into one `Vec`.
pub struct Encoder {
    cctx: zstd::zstd_safe::CCtx<'static>,
    piece: Vec<u8>,
    chunk: Vec<u8>,
    algorithm: Algorithm,
}

impl Encoder {
    pub fn new(level: i32, algorithm: Algorithm) -> Result<Self, CodecError> {
        let mut cctx = zstd::zstd_safe::CCtx::try_create().ok_or_else(|| {
            CodecError::Zstd(std::io::Error::other("cannot allocate a zstd context"))
        })?;
        cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
            .map_err(zstd_error)?;
        Ok(Self {
            cctx,
            piece: vec![0u8; PIECE],
            // Room for a piece that does not compress at all.
            chunk: Vec::with_capacity(zstd::zstd_safe::compress_bound(PIECE)),
            algorithm,
        })
    }

    /// As [`encode`], with this encoder's context and level.
    pub fn encode(&mut self, original: impl Read) -> Result<(Vec<u8>, Checksum, u64), CodecError> {
        let header_len = self.algorithm.header_len();
        let mut out = vec![0u8; header_len];
        let (sha, length) = self.frame(original, &mut |bytes| {
            out.extend_from_slice(bytes);
            Ok(())
        })?;
        out[..header_len].copy_from_slice(&header(&sha));
        Ok((out, sha, length))
    }

    /// As [`Encoder::encode`], the object in chunks: the header, then one
    /// per frame, each allocated at its size (a segment's object reached
    /// 3.8 MiB in a `pgbench` backlog; grown in one `Vec` it was copied on
    /// every doubling and left in the freeing thread's malloc arena).
    /// Returns the chunks, the checksum, the original and the object's length.
    pub fn encode_chunks(
        &mut self,
        original: impl Read,
    ) -> Result<(Vec<bytes::Bytes>, Checksum, u64, u64), CodecError> {
        let mut chunks = vec![bytes::Bytes::new()];
        let mut stored = self.algorithm.header_len() as u64;
        let (sha, length) = self.frame(original, &mut |frame| {
            stored += frame.len() as u64;
            chunks.push(bytes::Bytes::copy_from_slice(frame));
            Ok(())
        })?;
        chunks[0] = bytes::Bytes::from(header(&sha));
        Ok((chunks, sha, length, stored))
    }

    /// Writes the archive object into `file` (new and empty) as it is made;
    /// returns the checksum, the original length and the object's length.
    /// A failure to write is [`CodecError::Write`].
    pub fn encode_to_file(
        &mut self,
        original: impl Read,
        file: &mut std::fs::File,
    ) -> Result<(Checksum, u64, u64), CodecError> {
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        // The header carries the checksum, known at the end: a placeholder first.
        let header_len = self.algorithm.header_len();
        file.write_all(&[0u8; MAX_HEADER_LEN][..header_len])
            .map_err(CodecError::Write)?;
        let mut stored = header_len as u64;
        let (sha, length) = self.frame(original, &mut |bytes| {
            stored += bytes.len() as u64;
            file.write_all(bytes)
        })?;
        file.write_all_at(&header(&sha), 0)
            .map_err(CodecError::Write)?;
        Ok((sha, length, stored))
    }

    /// Hashes and compresses what `original` yields, giving `sink` the
    /// output one zstd frame per `PIECE` of input. Whole pieces compress in
    /// one call from where they lie: a streaming frame copied each piece into
    /// zstd's window first and matched across its wrap-around, 1.7 ms more
    /// CPU per 16 MiB segment (12.1 vs 10.3 ms) for 0.5% smaller objects
    /// (examples/codec_profile.rs). Concatenated frames are one zstd stream
    /// to every decoder (`decode`, `zstd -d`).
    fn frame(
        &mut self,
        mut original: impl Read,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(Checksum, u64), CodecError> {
        let mut hasher = self.algorithm.hasher();
        let mut length = 0u64;
        loop {
            let n = fill(&mut original, &mut self.piece).map_err(CodecError::Read)?;
            // An empty original still gets its (empty) frame.
            if n == 0 && length > 0 {
                break;
            }
            let piece = &self.piece[..n];
            hasher.update(piece);
            self.chunk.clear();
            self.cctx
                .compress2(&mut self.chunk, piece)
                .map_err(zstd_error)?;
            sink(&self.chunk).map_err(CodecError::Write)?;
            length += n as u64;
            if n < self.piece.len() {
                break;
            }
        }
        Ok((hasher.finish(), length))
    }
}

/// Reads until `buf` is full or the input ends; the bytes read.
fn fill(original: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match original.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Encoders kept for reuse by whichever blocking thread runs the next push;
/// at most `keep` idle ones (each holds its level's zstd window: ~1.2 MiB at
/// level 1), so concurrency beyond that makes and drops extra ones.
pub struct EncoderPool {
    level: i32,
    algorithm: Algorithm,
    keep: usize,
    idle: std::sync::Mutex<Vec<Encoder>>,
}

impl EncoderPool {
    pub fn new(level: i32, keep: usize, algorithm: Algorithm) -> Self {
        Self {
            level,
            algorithm,
            keep,
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Runs `work` with an idle encoder (or a new one), and keeps it after.
    pub fn with<T>(&self, work: impl FnOnce(&mut Encoder) -> T) -> Result<T, CodecError> {
        let reused = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut encoder = match reused {
            Some(encoder) => encoder,
            None => Encoder::new(self.level, self.algorithm)?,
        };
        let result = work(&mut encoder);
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.keep {
                idle.push(encoder);
            }
        }
        Ok(result)
    }

    pub fn encode(&self, original: impl Read) -> Result<(Vec<u8>, Checksum, u64), CodecError> {
        self.with(|encoder| encoder.encode(original))?
    }

    pub fn encode_chunks(
        &self,
        original: impl Read,
    ) -> Result<(Vec<bytes::Bytes>, Checksum, u64, u64), CodecError> {
        self.with(|encoder| encoder.encode_chunks(original))?
    }

    /// Idle encoders (for tests).
    pub fn idle(&self) -> usize {
        self.idle.lock().map_or(0, |idle| idle.len())
    }
}

/// The checksum with `algorithm` of what `original` yields, read in pieces
/// (a segment pushed again is compared with the stored object in that
/// object's algorithm).
pub fn checksum_of(algorithm: Algorithm, mut original: impl Read) -> Result<Checksum, CodecError> {
    let mut hasher = algorithm.hasher();
    let mut piece = vec![0u8; PIECE];
    loop {
        let n = fill(&mut original, &mut piece).map_err(CodecError::Read)?;
        hasher.update(&piece[..n]);
        if n < piece.len() {
            break;
        }
    }
    Ok(hasher.finish())
}

/// The checksum recorded in an object's header (its first [`MAX_HEADER_LEN`]
/// bytes suffice, or the whole object if shorter); the body starts at its
/// algorithm's [`Algorithm::header_len`].
pub fn recorded(object: &[u8]) -> Result<Checksum, CodecError> {
    let magic = object.get(..MAGIC_LEN).ok_or(CodecError::BadHeader)?;
    let algorithm = Algorithm::ALL
        .into_iter()
        .find(|a| a.magic() == magic)
        .ok_or(CodecError::BadHeader)?;
    let header_len = algorithm.header_len();
    let head = object.get(..header_len).ok_or(CodecError::BadHeader)?;
    // The digest's length is the version's: a digest one short or one long
    // is a damaged header, not a shorter checksum.
    if head[header_len - 1] != b'\n' {
        return Err(CodecError::BadHeader);
    }
    let hex =
        std::str::from_utf8(&head[MAGIC_LEN..header_len - 1]).map_err(|_| CodecError::BadHeader)?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CodecError::BadHeader);
    }
    Ok(Checksum {
        algorithm,
        hex: hex.to_ascii_lowercase(),
    })
}

/// Decompresses an object and checks the content against its recorded
/// checksum, in the algorithm the header names.
pub fn decode(object: &[u8]) -> Result<Vec<u8>, CodecError> {
    let recorded = recorded(object)?;
    let body = &object[recorded.algorithm.header_len()..];
    // WAL segments are 16 MiB by default: one allocation instead of doubling up to it.
    let mut original = Vec::with_capacity(16 << 20);
    zstd::stream::copy_decode(body, &mut original).map_err(CodecError::Zstd)?;
    let actual = checksum(recorded.algorithm, &original);
    if actual != recorded {
        return Err(CodecError::Checksum { recorded, actual });
    }
    Ok(original)
}

/// As [`decode`], the original written into `out` piece by piece as it is
/// decompressed and hashed, never whole in memory; returns its length. A
/// checksum mismatch is found only at the end, so `out` then holds content
/// that must be thrown away (the prefetch writes a temp file and renames it
/// only on success).
pub fn decode_to(object: &[u8], out: &mut impl std::io::Write) -> Result<u64, CodecError> {
    let recorded = recorded(object)?;
    let body = &object[recorded.algorithm.header_len()..];
    let mut decoder = zstd::stream::read::Decoder::with_buffer(body).map_err(CodecError::Zstd)?;
    let mut hasher = recorded.algorithm.hasher();
    let mut piece = vec![0u8; PIECE];
    let mut length = 0u64;
    loop {
        let n = fill(&mut decoder, &mut piece).map_err(CodecError::Zstd)?;
        hasher.update(&piece[..n]);
        out.write_all(&piece[..n]).map_err(CodecError::Write)?;
        length += n as u64;
        if n < piece.len() {
            break;
        }
    }
    let actual = hasher.finish();
    if actual != recorded {
        return Err(CodecError::Checksum { recorded, actual });
    }
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b3(bytes: &[u8]) -> Checksum {
        checksum(Algorithm::Blake3, bytes)
    }

    /// An FWAL1 object as agents before FWAL2 wrote it: the SHA-256 of
    /// `abc` (the FIPS 180-2 test vector, not computed by this code) and a
    /// zstd frame.
    fn fwal1_abc() -> Vec<u8> {
        let mut object =
            b"FWAL1 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n".to_vec();
        object.extend_from_slice(&zstd::encode_all(&b"abc"[..], 3).unwrap());
        object
    }

    #[test]
    fn new_objects_are_fwal2_with_the_blake3_of_the_original() {
        let (obj, sum, _) = encode(&b"abc"[..], 1, Algorithm::Blake3).unwrap();
        assert_eq!(&obj[..MAGIC.len()], b"FWAL2 ");
        // The BLAKE3 test vector for `abc`, not computed by this code.
        let abc = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85";
        assert_eq!(sum.hex, abc);
        assert_eq!(recorded(&obj).unwrap(), sum);
        assert_eq!(
            &obj[MAGIC.len()..Algorithm::Blake3.header_len() - 1],
            abc.as_bytes()
        );
        assert_eq!(checksum_of(Algorithm::Blake3, &b"abc"[..]).unwrap(), sum);
    }

    /// Bytes zstd cannot compress (xorshift), so the body stores them raw
    /// and a flipped byte there is still a valid frame: only the checksum can
    /// tell.
    fn incompressible(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// More than one piece, so a hash spans several updates.
    fn pieces() -> Vec<u8> {
        (0..(2 * PIECE + 4099)).map(|i| (i % 241) as u8).collect()
    }

    #[test]
    fn fwal3_objects_record_the_xxh3_128_of_the_original() {
        // XXH3-128 test values from `xxhsum -H2` 0.8.1 (Debian's xxhash),
        // not computed by this code: `abc`, nothing, and pieces() (the
        // streaming path over piece boundaries).
        let vectors: [(&[u8], &str); 3] = [
            (b"abc", "06b05ab6733a618578af5f94892f3950"),
            (b"", "99aa06d3014798d86001c324468d497f"),
            (&pieces(), "0235791e786718d90b49dffea751b3d6"),
        ];
        for (original, xxhsum) in vectors {
            let (obj, sum, length) = encode(original, 1, Algorithm::Xxh3).unwrap();
            assert_eq!(length, original.len() as u64);
            assert_eq!(&obj[..MAGIC_LEN], b"FWAL3 ");
            assert_eq!(Algorithm::Xxh3.header_len(), 39);
            assert_eq!(
                &obj[..39],
                format!("FWAL3 {xxhsum}\n").as_bytes(),
                "{} bytes",
                original.len()
            );
            assert_eq!(sum.hex, xxhsum);
            assert_eq!(sum.algorithm, Algorithm::Xxh3);
            assert_eq!(recorded(&obj).unwrap(), sum);
            // What the service reads of a stored object: at most MAX_HEADER_LEN bytes.
            assert_eq!(
                recorded(&obj[..MAX_HEADER_LEN.min(obj.len())]).unwrap(),
                sum
            );
            assert_eq!(checksum(Algorithm::Xxh3, original), sum);
            assert_eq!(checksum_of(Algorithm::Xxh3, original).unwrap(), sum);
            assert_eq!(decode(&obj).unwrap(), original);
            let mut out = Vec::new();
            assert_eq!(decode_to(&obj, &mut out).unwrap(), original.len() as u64);
            assert_eq!(out, original);
            // The body is what any zstd reads.
            assert_eq!(zstd::decode_all(&obj[39..]).unwrap(), original);
        }
    }

    #[test]
    fn a_flipped_body_byte_fails_the_check_in_every_version() {
        let data = incompressible(PIECE + 1000);
        for algorithm in Algorithm::ALL {
            let (obj, _, _) = encode(&data[..], 1, algorithm).unwrap();
            assert_eq!(decode(&obj).unwrap(), data);
            // Past the header and the frame's own header, inside the raw block.
            let at = algorithm.header_len() + 5000;
            let mut bad = obj.clone();
            bad[at] ^= 0x20;
            // zstd alone takes the damaged body: its frames carry no checksum.
            let body = &bad[algorithm.header_len()..];
            assert_ne!(zstd::decode_all(body).unwrap(), data);
            match decode(&bad) {
                Err(CodecError::Checksum { recorded, actual }) => {
                    assert_eq!(recorded.algorithm, algorithm);
                    assert_eq!(actual.algorithm, algorithm);
                }
                other => panic!("{algorithm}: a checksum failure, got {other:?}"),
            }
            assert!(
                matches!(
                    decode_to(&bad, &mut std::io::sink()),
                    Err(CodecError::Checksum { .. })
                ),
                "{algorithm}"
            );
        }
    }

    #[test]
    fn fwal1_fwal2_and_fwal3_objects_decode_side_by_side() {
        // One restore's worth: an older agent's FWAL1, then FWAL2, then FWAL3,
        // each decoded and checked in its own algorithm by the same calls.
        let originals: Vec<Vec<u8>> = (0..3u8)
            .map(|n| {
                (0..(PIECE + 77))
                    .map(|i| (i as u8).wrapping_mul(n + 3))
                    .collect()
            })
            .collect();
        let mut objects = vec![fwal1_abc()];
        for (original, algorithm) in originals.iter().zip(Algorithm::ALL) {
            objects.push(encode(&original[..], 1, algorithm).unwrap().0);
        }
        let magics: Vec<&[u8]> = objects.iter().map(|o| &o[..MAGIC_LEN]).collect();
        assert_eq!(
            magics,
            [&b"FWAL1 "[..], b"FWAL1 ", b"FWAL2 ", b"FWAL3 "],
            "every version in one archive"
        );
        let expected: Vec<&[u8]> = std::iter::once(&b"abc"[..])
            .chain(originals.iter().map(|o| &o[..]))
            .collect();
        for (object, original) in objects.iter().zip(&expected) {
            assert_eq!(&decode(object).unwrap(), original);
            let mut out = Vec::new();
            decode_to(object, &mut out).unwrap();
            assert_eq!(&out, original);
            let sum = recorded(object).unwrap();
            assert_eq!(checksum_of(sum.algorithm, &original[..]).unwrap(), sum);
        }
        // The same content is a different checksum in each algorithm: never
        // equal across them, so a comparison is only ever within one.
        let sums: Vec<Checksum> = Algorithm::ALL
            .iter()
            .map(|a| checksum(*a, &originals[0]))
            .collect();
        assert_ne!(sums[0], sums[1]);
        assert_ne!(sums[1], sums[2]);
        assert_ne!(sums[0], sums[2]);
    }

    #[test]
    fn a_header_with_a_digest_of_the_wrong_length_is_refused() {
        let body = zstd::encode_all(&b"abc"[..], 1).unwrap();
        let xxh3 = "06b05ab6733a618578af5f94892f3950";
        let b3 = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85";
        let object = |magic: &str, hex: &str| {
            let mut o = format!("{magic}{hex}\n").into_bytes();
            o.extend_from_slice(&body);
            o
        };
        assert_eq!(decode(&object("FWAL3 ", xxh3)).unwrap(), b"abc");
        assert_eq!(decode(&object("FWAL2 ", b3)).unwrap(), b"abc");
        for (magic, hex) in [
            ("FWAL3 ", &xxh3[..31]),
            ("FWAL3 ", &format!("{xxh3}0")[..]),
            // A version's digest under another's magic.
            ("FWAL3 ", b3),
            ("FWAL2 ", xxh3),
            ("FWAL1 ", xxh3),
            ("FWAL2 ", &b3[..63]),
            ("FWAL4 ", xxh3),
        ] {
            let o = object(magic, hex);
            assert!(
                matches!(recorded(&o), Err(CodecError::BadHeader)),
                "{magic}{hex}: {:?}",
                recorded(&o)
            );
            assert!(matches!(decode(&o), Err(CodecError::BadHeader)));
        }
        // Not hex, and cut short inside the header.
        let mut z = object("FWAL3 ", xxh3);
        z[MAGIC_LEN + 3] = b'g';
        assert!(matches!(recorded(&z), Err(CodecError::BadHeader)));
        assert!(matches!(
            recorded(&object("FWAL3 ", xxh3)[..38]),
            Err(CodecError::BadHeader)
        ));
        assert!(matches!(recorded(b"FWAL"), Err(CodecError::BadHeader)));
    }

    #[test]
    fn fwal1_objects_written_before_fwal2_still_decode_and_verify() {
        let object = fwal1_abc();
        let sum = recorded(&object).unwrap();
        assert_eq!(sum.algorithm, Algorithm::Sha256);
        assert_eq!(decode(&object).unwrap(), b"abc");
        assert_eq!(checksum_of(Algorithm::Sha256, &b"abc"[..]).unwrap(), sum);
        // The same content in the other algorithm is a different checksum.
        assert_ne!(b3(b"abc"), sum);
        // A damaged FWAL1 object is found damaged by SHA-256.
        let mut bad = fwal1_abc();
        bad[10] = if bad[10] == b'0' { b'1' } else { b'0' };
        assert!(
            matches!(decode(&bad), Err(CodecError::Checksum { ref recorded, .. }) if recorded.algorithm == Algorithm::Sha256)
        );
        let mut wrong = fwal1_abc();
        let zst = zstd::encode_all(&b"abd"[..], 3).unwrap();
        wrong.truncate(Algorithm::Sha256.header_len());
        wrong.extend_from_slice(&zst);
        assert!(matches!(decode(&wrong), Err(CodecError::Checksum { .. })));
        // Neither magic: refused.
        let mut other = fwal1_abc();
        other[4] = b'9';
        assert!(matches!(recorded(&other), Err(CodecError::BadHeader)));
    }

    #[test]
    fn round_trip_and_corruption() {
        let data = vec![7u8; 100_000];
        let (obj, sha, length) = encode(&data[..], 3, Algorithm::Blake3).unwrap();
        assert_eq!(length, data.len() as u64);
        assert_eq!(sha, b3(&data));
        assert_eq!(checksum_of(Algorithm::Blake3, &data[..]).unwrap(), sha);
        assert_eq!(recorded(&obj).unwrap(), sha);
        assert_eq!(decode(&obj).unwrap(), data);
        let mut bad = obj.clone();
        bad[10] = if bad[10] == b'0' { b'1' } else { b'0' };
        assert!(matches!(decode(&bad), Err(CodecError::Checksum { .. })));
    }

    #[test]
    fn decode_to_writes_what_decode_returns_and_refuses_the_same_damage() {
        // More than one piece, so the hash spans several writes.
        let data = pieces();
        for algorithm in Algorithm::ALL {
            let (obj, _, _) = encode(&data[..], 1, algorithm).unwrap();
            let mut out = Vec::new();
            assert_eq!(decode_to(&obj, &mut out).unwrap(), data.len() as u64);
            assert_eq!(out, data);
            let mut bad = obj.clone();
            bad[10] = if bad[10] == b'0' { b'1' } else { b'0' };
            assert!(matches!(
                decode_to(&bad, &mut std::io::sink()),
                Err(CodecError::Checksum { .. })
            ));
            let mut cut = obj.clone();
            cut.truncate(obj.len() - 10);
            assert!(decode_to(&cut, &mut std::io::sink()).is_err());
        }
        assert!(matches!(
            decode_to(b"FWAL3 x", &mut std::io::sink()),
            Err(CodecError::BadHeader)
        ));
        assert!(matches!(
            decode_to(b"FWAL9 x", &mut std::io::sink()),
            Err(CodecError::BadHeader)
        ));
        let (empty, _, _) = encode(&[][..], 1, Algorithm::Blake3).unwrap();
        let mut out = Vec::new();
        assert_eq!(decode_to(&empty, &mut out).unwrap(), 0);
        let mut out = Vec::new();
        decode_to(&fwal1_abc(), &mut out).unwrap();
        assert_eq!(out, b"abc");
    }

    #[test]
    fn every_way_out_of_an_encoder_makes_the_same_object_in_every_version() {
        let data = pieces();
        for algorithm in Algorithm::ALL {
            let pool = EncoderPool::new(1, 1, algorithm);
            let (obj, sum, length) = pool.encode(&data[..]).unwrap();
            assert_eq!(&obj[..MAGIC_LEN], algorithm.magic());
            assert_eq!(sum, checksum(algorithm, &data));
            let (chunks, chunked, chunked_length, stored) = pool.encode_chunks(&data[..]).unwrap();
            assert_eq!(chunks[0].len(), algorithm.header_len());
            assert_eq!(chunks.concat(), obj, "{algorithm}: chunks");
            assert_eq!(
                (chunked, chunked_length, stored),
                (sum.clone(), length, obj.len() as u64)
            );
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("object");
            let mut file = std::fs::File::create_new(&path).unwrap();
            let (filed, filed_length, filed_stored) = pool
                .with(|e| e.encode_to_file(&data[..], &mut file))
                .unwrap()
                .unwrap();
            drop(file);
            assert_eq!(std::fs::read(&path).unwrap(), obj, "{algorithm}: file");
            assert_eq!(
                (filed, filed_length, filed_stored),
                (sum, length, obj.len() as u64)
            );
        }
    }

    /// A reader that yields `good` bytes, then fails.
    struct Failing {
        good: usize,
    }

    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.good == 0 {
                return Err(std::io::Error::other("disk gone"));
            }
            let n = buf.len().min(self.good);
            buf[..n].fill(3);
            self.good -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_pooled_encoder_is_reused_and_survives_a_failed_read() {
        let pool = EncoderPool::new(1, 1, Algorithm::Blake3);
        // Several pieces, compressible and not, so frames span many blocks.
        let first: Vec<u8> = (0..(3 * PIECE + 17)).map(|i| (i % 251) as u8).collect();
        let (obj, sha, length) = pool.encode(&first[..]).unwrap();
        assert_eq!(
            (length, sha.hex.as_str()),
            (first.len() as u64, b3(&first).hex.as_str())
        );
        assert_eq!(decode(&obj).unwrap(), first);
        assert_eq!(pool.idle(), 1);
        // A piece compressed and given out, then the read fails: the error is the read's.
        let failed = pool.encode(Failing { good: PIECE + 5 });
        assert!(matches!(failed, Err(CodecError::Read(_))), "{failed:?}");
        assert_eq!(pool.idle(), 1, "the encoder goes back after a failure");
        // The same context starts a clean frame for the next object.
        let second: Vec<u8> = (0..PIECE * 2).map(|i| (i * 7 % 13) as u8).collect();
        let (obj, sha, _) = pool.encode(&second[..]).unwrap();
        assert_eq!(sha, b3(&second));
        assert_eq!(decode(&obj).unwrap(), second);
        // The frames after the header are one zstd stream: `zstd -d` reads it.
        assert_eq!(
            zstd::decode_all(&obj[Algorithm::Blake3.header_len()..]).unwrap(),
            second
        );
        // In chunks, the same object.
        let (chunks, sha, length, stored) = pool.encode_chunks(&second[..]).unwrap();
        let joined: Vec<u8> = chunks.concat();
        assert_eq!(
            (sha.hex.as_str(), length, stored),
            (
                b3(&second).hex.as_str(),
                second.len() as u64,
                joined.len() as u64
            )
        );
        assert_eq!(joined, obj);
        let empty = pool.encode(&[][..]).unwrap();
        assert_eq!(decode(&empty.0).unwrap(), Vec::<u8>::new());
    }
}
