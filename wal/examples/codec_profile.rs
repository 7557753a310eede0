//! Where one segment's push spends its CPU: reading, SHA-256 (sha2 and ring;
//! FWAL1 objects), BLAKE3 (FWAL2 objects), XXH3-128 (FWAL3 objects: twox-hash,
//! which the codec uses, and xxhash-rust; whole and in the codec's 256 KiB
//! pieces),
//! zstd (a streaming frame with a new encoder per segment, as the codec did
//! before issue 13's profiling; one call over the whole segment; one frame
//! per MiB), and the codec's own paths: `EncoderPool` as the WAL service runs
//! it (BLAKE3 and XXH3), `codec::encode` (a new encoder per object), `decode`
//! (of FWAL2 and FWAL3 objects).
//!
//!   cargo run --release -p fleet-wal --example codec_profile -- SEGMENT... [ROUNDS]
//!
//! Thread CPU time per segment (CLOCK_THREAD_CPUTIME_ID), best of the rounds,
//! so a shared host's noise mostly drops out. `LEVEL` sets the zstd level (1),
//! `ONLY` a comma-separated list of rows. Under valgrind the SHA-256 rows are
//! meaningless: valgrind's CPU has no SHA extensions, so sha2 falls back to
//! its portable code. A measuring tool, not a test (docs/benchmarks.md).

use sha2::Digest;
use std::io::Read;

type Error = Box<dyn std::error::Error>;

fn thread_cpu_ms() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(0.0, |ts| {
        ts.tv_sec() as f64 * 1e3 + ts.tv_nsec() as f64 / 1e6
    })
}

fn best(rounds: usize, f: &mut dyn FnMut() -> Result<(), Error>) -> Result<f64, Error> {
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let t = thread_cpu_ms();
        f()?;
        best = best.min(thread_cpu_ms() - t);
    }
    Ok(best)
}

fn main() -> Result<(), Error> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = match args.last().and_then(|a| a.parse::<usize>().ok()) {
        Some(n) => {
            args.pop();
            n
        }
        None => 5,
    };
    if args.is_empty() {
        return Err("usage: codec_profile SEGMENT... [ROUNDS]".into());
    }
    let level = std::env::var("LEVEL")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(1);
    let only = std::env::var("ONLY").unwrap_or_default();
    let segments: Vec<Vec<u8>> = args.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let n = segments.len() as f64;
    let mut rows: Vec<(&str, f64)> = Vec::new();
    let mut measure =
        |name: &'static str, f: &mut dyn FnMut() -> Result<(), Error>| -> Result<(), Error> {
            if only.is_empty() || only.split(',').any(|o| o == name) {
                rows.push((name, best(rounds, f)? / n));
            }
            Ok(())
        };

    measure("read 1 MiB pieces", &mut || {
        let mut piece = vec![0u8; 1 << 20];
        for path in &args {
            let mut file = std::fs::File::open(path)?;
            while file.read(&mut piece)? > 0 {}
        }
        Ok(())
    })?;
    measure("sha2 SHA-256", &mut || {
        for s in &segments {
            std::hint::black_box(sha2::Sha256::digest(s));
        }
        Ok(())
    })?;
    measure("ring SHA-256", &mut || {
        for s in &segments {
            std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, s));
        }
        Ok(())
    })?;
    // What FWAL2 objects record (one thread, as a push hashes).
    measure("blake3 BLAKE3", &mut || {
        for s in &segments {
            std::hint::black_box(blake3::hash(s));
        }
        Ok(())
    })?;
    // What FWAL3 objects record: the two candidates, over the whole segment
    // and in the pieces the codec hashes (a streaming state across calls).
    measure("twox-hash XXH3-128", &mut || {
        for s in &segments {
            std::hint::black_box(twox_hash::XxHash3_128::oneshot(s));
        }
        Ok(())
    })?;
    measure("twox-hash XXH3-128 pieces", &mut || {
        for s in &segments {
            let mut h = twox_hash::XxHash3_128::new();
            for piece in s.chunks(256 << 10) {
                h.write(piece);
            }
            std::hint::black_box(h.finish_128());
        }
        Ok(())
    })?;
    // The codec hashes each piece just after reading it, still in cache:
    // one 256 KiB piece hashed 64 times is 16 MiB hashed that way.
    let piece = &segments[0][..(256 << 10).min(segments[0].len())];
    measure("twox-hash cached piece x64", &mut || {
        for _ in &segments {
            let mut h = twox_hash::XxHash3_128::new();
            for _ in 0..64 {
                h.write(piece);
            }
            std::hint::black_box(h.finish_128());
        }
        Ok(())
    })?;
    measure("xxhash-rust cached piece x64", &mut || {
        for _ in &segments {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            for _ in 0..64 {
                h.update(piece);
            }
            std::hint::black_box(h.digest128());
        }
        Ok(())
    })?;
    measure("blake3 cached piece x64", &mut || {
        for _ in &segments {
            let mut h = blake3::Hasher::new();
            for _ in 0..64 {
                h.update(piece);
            }
            std::hint::black_box(h.finalize());
        }
        Ok(())
    })?;
    measure("xxhash-rust XXH3-128", &mut || {
        for s in &segments {
            std::hint::black_box(xxhash_rust::xxh3::xxh3_128(s));
        }
        Ok(())
    })?;
    measure("xxhash-rust XXH3-128 pieces", &mut || {
        for s in &segments {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            for piece in s.chunks(256 << 10) {
                h.update(piece);
            }
            std::hint::black_box(h.digest128());
        }
        Ok(())
    })?;
    let mut streamed = 0usize;
    measure("zstd stream, new encoder", &mut || {
        streamed = 0;
        for s in &segments {
            let mut out = Vec::new();
            let mut e = zstd::stream::Encoder::new(&mut out, level)?;
            for piece in s.chunks(256 << 10) {
                std::io::Write::write_all(&mut e, piece)?;
            }
            e.finish()?;
            streamed += std::hint::black_box(out).len();
        }
        Ok(())
    })?;
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    measure("zstd one call per segment", &mut || {
        for s in &segments {
            std::hint::black_box(compressor.compress(s)?);
        }
        Ok(())
    })?;
    let mut bytes = 0usize;
    measure("zstd one frame per MiB", &mut || {
        bytes = 0;
        for s in &segments {
            for piece in s.chunks(1 << 20) {
                bytes += std::hint::black_box(compressor.compress(piece)?).len();
            }
        }
        Ok(())
    })?;
    let pool = fleet_wal::codec::EncoderPool::new(level, 1, fleet_wal::codec::Algorithm::Blake3);
    let mut stored = 0usize;
    measure("codec::EncoderPool (file)", &mut || {
        stored = 0;
        for path in &args {
            let (object, _, _) = pool.encode(std::fs::File::open(path)?)?;
            stored += std::hint::black_box(object).len();
        }
        Ok(())
    })?;
    let pool = fleet_wal::codec::EncoderPool::new(level, 1, fleet_wal::codec::Algorithm::Xxh3);
    measure("codec::EncoderPool xxh3", &mut || {
        for path in &args {
            let (object, _, _) = pool.encode(std::fs::File::open(path)?)?;
            std::hint::black_box(object);
        }
        Ok(())
    })?;
    measure("codec::encode (file)", &mut || {
        for path in &args {
            std::hint::black_box(fleet_wal::codec::encode(
                std::fs::File::open(path)?,
                level,
                fleet_wal::codec::Algorithm::Blake3,
            )?);
        }
        Ok(())
    })?;
    let objects: Vec<Vec<u8>> = segments
        .iter()
        .map(|s| {
            fleet_wal::codec::encode(&s[..], level, fleet_wal::codec::Algorithm::Blake3)
                .map(|(o, _, _)| o)
        })
        .collect::<Result<_, _>>()?;
    measure("codec::decode", &mut || {
        for o in &objects {
            std::hint::black_box(fleet_wal::codec::decode(o)?);
        }
        Ok(())
    })?;
    let objects: Vec<Vec<u8>> = segments
        .iter()
        .map(|s| {
            fleet_wal::codec::encode(&s[..], level, fleet_wal::codec::Algorithm::Xxh3)
                .map(|(o, _, _)| o)
        })
        .collect::<Result<_, _>>()?;
    measure("codec::decode xxh3", &mut || {
        for o in &objects {
            std::hint::black_box(fleet_wal::codec::decode(o)?);
        }
        Ok(())
    })?;
    println!(
        "{} segment(s) of {} MiB, zstd level {level}, best of {rounds}: CPU ms per segment",
        args.len(),
        segments[0].len() >> 20
    );
    for (name, ms) in rows {
        println!("{name:29} {ms:8.2}");
    }
    if streamed > 0 {
        println!(
            "streaming frame: {} bytes per segment",
            streamed / args.len()
        );
    }
    if bytes > 0 {
        println!(
            "one frame per MiB: {} bytes per segment",
            bytes / args.len()
        );
    }
    if stored > 0 {
        println!(
            "EncoderPool objects: {} bytes per segment",
            stored / args.len()
        );
    }
    Ok(())
}
