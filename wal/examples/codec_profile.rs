//! Where one segment's push spends its CPU: reading, SHA-256 (sha2 and ring),
//! zstd (a new streaming encoder per segment, and a reused bulk compressor),
//! and the codec's own paths: `EncoderPool` as the WAL service runs it, and
//! `codec::encode` (a new encoder per object).
//!
//!   cargo run --release -p fleet-wal --example codec_profile -- SEGMENT... [ROUNDS]
//!
//! Thread CPU time per segment (CLOCK_THREAD_CPUTIME_ID), best of the rounds,
//! so a shared host's noise mostly drops out. Under callgrind, pass one
//! segment and one round and read the instruction counts per function.
//! A measuring tool, not a test (docs/benchmarks.md cites its figures).

use sha2::Digest;
use std::io::Read;

fn thread_cpu_ms() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(0.0, |ts| {
        ts.tv_sec() as f64 * 1e3 + ts.tv_nsec() as f64 / 1e6
    })
}

fn best(rounds: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let t = thread_cpu_ms();
        f();
        best = best.min(thread_cpu_ms() - t);
    }
    best
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
    let run = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    let segments: Vec<Vec<u8>> = args.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let n = segments.len() as f64;
    let mut rows: Vec<(&str, f64)> = Vec::new();
    let measure = |name: &'static str, rows: &mut Vec<(&str, f64)>, f: &mut dyn FnMut()| {
        if run(name) {
            rows.push((name, best(rounds, f) / n));
        }
    };

    measure("read 256 KiB pieces", &mut rows, &mut || {
        for path in &args {
            let mut file = std::fs::File::open(path).expect("open");
            let mut piece = vec![0u8; 256 << 10];
            while file.read(&mut piece).expect("read") > 0 {}
        }
    });
    measure("sha2 SHA-256", &mut rows, &mut || {
        for s in &segments {
            std::hint::black_box(sha2::Sha256::digest(s));
        }
    });
    measure("ring SHA-256", &mut rows, &mut || {
        for s in &segments {
            std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, s));
        }
    });
    measure("zstd stream, new encoder", &mut rows, &mut || {
        for s in &segments {
            let mut out = Vec::new();
            let mut e = zstd::stream::Encoder::new(&mut out, level).expect("encoder");
            for piece in s.chunks(256 << 10) {
                std::io::Write::write_all(&mut e, piece).expect("write");
            }
            e.finish().expect("finish");
            std::hint::black_box(out);
        }
    });
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    measure("zstd bulk, reused", &mut rows, &mut || {
        for s in &segments {
            std::hint::black_box(compressor.compress(s).expect("compress"));
        }
    });
    let mut bytes = 0usize;
    measure("zstd bulk, 1 MiB frames", &mut rows, &mut || {
        bytes = 0;
        for s in &segments {
            for piece in s.chunks(1 << 20) {
                bytes += std::hint::black_box(compressor.compress(piece).expect("compress")).len();
            }
        }
    });
    if bytes > 0 {
        println!("1 MiB frames: {} bytes per segment", bytes / segments.len());
    }
    let pool = fleet_wal::codec::EncoderPool::new(level, 1);
    measure("codec::EncoderPool (file)", &mut rows, &mut || {
        for path in &args {
            let file = std::fs::File::open(path).expect("open");
            std::hint::black_box(pool.encode(file).expect("encode"));
        }
    });
    measure("codec::encode (file)", &mut rows, &mut || {
        for path in &args {
            let file = std::fs::File::open(path).expect("open");
            std::hint::black_box(fleet_wal::codec::encode(file, level).expect("encode"));
        }
    });
    let objects: Vec<Vec<u8>> = segments
        .iter()
        .map(|s| fleet_wal::codec::encode(&s[..], level).map(|(o, _, _)| o))
        .collect::<Result<_, _>>()?;
    measure("codec::decode", &mut rows, &mut || {
        for o in &objects {
            std::hint::black_box(fleet_wal::codec::decode(o).expect("decode"));
        }
    });
    println!(
        "{} segment(s) of {} MiB, zstd level {level}, best of {rounds}: CPU ms per segment",
        args.len(),
        segments[0].len() >> 20
    );
    for (name, ms) in rows {
        println!("{name:28} {ms:8.2}");
    }
    Ok(())
}
