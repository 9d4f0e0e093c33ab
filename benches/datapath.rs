//! Criterion benchmarks of the per-block work on the data path: what a worker does to
//! every block at the source (zero check, hash, compress) and what the target does
//! to every frame (checksum, parse). Compare these against the link speed to see which
//! stage bounds a sync: `cargo bench --bench datapath`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dataplane::protocol::{block_hash, is_zero, FrameKind, FrameReader, FrameWriter};

const BLOCK: usize = 64 << 10;

/// A block that looks like file-system content: text with some variety.
fn text_block() -> Vec<u8> {
    let words = [
        "replica ",
        "epoch ",
        "block ",
        "ferry ",
        "io_uring ",
        "disk ",
        "commit ",
        "hash ",
    ];
    let mut out = Vec::with_capacity(BLOCK);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while out.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % 8) as usize].as_bytes());
        if x % 11 == 0 {
            out.extend_from_slice(format!("{x:x}\n").as_bytes());
        }
    }
    out.truncate(BLOCK);
    out
}

fn random_block() -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..BLOCK)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

fn per_block(c: &mut Criterion) {
    let text = text_block();
    let random = random_block();
    let zeros = vec![0u8; BLOCK];
    let mut g = c.benchmark_group("per_block_64k");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("zero_check_zero_block", |b| {
        b.iter(|| is_zero(std::hint::black_box(&zeros)))
    });
    g.bench_function("xxh3_128", |b| {
        b.iter(|| block_hash(std::hint::black_box(&random)))
    });
    for level in [-3, 1, 3] {
        let mut compressor = zstd::bulk::Compressor::new(level).expect("zstd context");
        let mut out = vec![0u8; BLOCK];
        for (name, data) in [("text", &text), ("random", &random)] {
            g.bench_with_input(
                BenchmarkId::new(format!("zstd_{level}"), name),
                data,
                |b, data| {
                    b.iter(|| {
                        compressor
                            .compress_to_buffer(data.as_slice(), out.as_mut_slice())
                            .ok()
                    })
                },
            );
        }
    }
    let mut compressor = zstd::bulk::Compressor::new(1).expect("zstd context");
    let compressed = compressor.compress(&text).expect("compress");
    let mut decompressor = zstd::bulk::Decompressor::new().expect("zstd context");
    let mut out = vec![0u8; BLOCK];
    g.bench_function("zstd_decompress_text", |b| {
        b.iter(|| {
            decompressor
                .decompress_to_buffer(&compressed, out.as_mut_slice())
                .expect("decompress")
        })
    });
    g.finish();
}

fn framing(c: &mut Criterion) {
    let payload = random_block().repeat(4);
    let mut wire = Vec::with_capacity(payload.len() + 64);
    let mut g = c.benchmark_group("frame_256k");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("encode", |b| {
        b.iter(|| {
            wire.clear();
            FrameWriter::new(&mut wire)
                .send(FrameKind::Data, &[&payload])
                .expect("encode");
        })
    });
    wire.clear();
    FrameWriter::new(&mut wire)
        .send(FrameKind::Data, &[&payload])
        .expect("encode");
    let mut buf = vec![0u8; payload.len()];
    g.bench_function("decode_and_verify", |b| {
        b.iter(|| {
            let mut r = FrameReader::new(wire.as_slice());
            r.read_frame(&mut buf)
                .expect("decode")
                .map(|(k, p)| (k, p.len()))
        })
    });
    g.finish();
}

criterion_group!(benches, per_block, framing);
criterion_main!(benches);
