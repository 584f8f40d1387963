//! `gpu bench`'s load part: unverified and verified loads of one blob side
//! by side, thread and staging sweeps (docs/BENCHMARKS.md, GPU path).

use std::time::Instant;

use anyhow::Result;
use cnse_kernels::stream::{OwnedSpec, COPY_GRANULE_DEFAULT};
use cnse_kernels::{DeviceBuffer, LoadOptions, Mover, PinnedBuffer, Pipeline, SourceMode, Streamer, StreamerConfig};

use crate::gpu::{gbps, make_blob, median, BenchArgs};
use crate::gpu_load::{compare_with_file, hex};

struct Row {
    what: String,
    seconds: f64,
    bytes: u64,
}

fn print_row(r: &Row, base: Option<f64>) {
    let ratio = base.map(|b| format!("{:>7.2}x", b / r.seconds)).unwrap_or_default();
    println!(
        "| {:<52} | {:>9.4} s | {:>7.2} GB/s | {ratio}",
        r.what,
        r.seconds,
        gbps(r.bytes, r.seconds)
    );
}

pub(crate) fn bench_load(a: &BenchArgs) -> Result<()> {
    let size = a.size_gib << 30;
    let fresh = std::fs::metadata(&a.blob).map(|m| m.len() != size).unwrap_or(true);
    if fresh {
        let t = Instant::now();
        make_blob(&a.blob, size)?;
        println!(
            "wrote {} ({} bytes) in {:.2} s",
            a.blob.display(),
            size,
            t.elapsed().as_secs_f64()
        );
    }
    let t = Instant::now();
    let spec_owned = OwnedSpec::from_file(&a.blob, a.chunk_mib << 20, 16)?;
    println!(
        "manifest: {} chunks of {} MiB, sha256:{} ({:.2} s; the blob is now in the page cache)",
        spec_owned.chunk_digests.len(),
        a.chunk_mib,
        hex(&spec_owned.digest),
        t.elapsed().as_secs_f64()
    );
    let spec = spec_owned.as_spec();
    let max_threads = a.sweep.iter().copied().max().unwrap_or(16).max(1);
    let reps = a.reps.max(1);
    if !a.configs.is_empty() {
        return crate::gpu_bench_configs::bench_configs(a, &spec, reps);
    }

    // Reference rates: one core's SHA-256, the copy engine from pinned memory,
    // and a pageable copy from memory already read.
    // One core's SHA-256 over bytes already in memory (no page faults),
    // median of three passes.
    let sha_rate = {
        let f = std::fs::File::open(&a.blob)?;
        // SAFETY: read-only map of the bench blob, which nothing truncates.
        let map = unsafe { memmap2::Mmap::map(&f) }?;
        let buf = map[..(256usize << 20).min(size as usize)].to_vec();
        let mut rates = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, &buf));
            rates.push(gbps(buf.len() as u64, t.elapsed().as_secs_f64()));
        }
        median(rates)
    };

    let mut s_wc = Streamer::new(
        a.device,
        StreamerConfig {
            threads: max_threads,
            write_combined: true,
            ..a.pool.config()
        },
    )?;
    let mut s_plain = Streamer::new(
        a.device,
        StreamerConfig {
            threads: max_threads,
            write_combined: false,
            ..a.pool.config()
        },
    )?;
    println!(
        "staging pools: {} threads x {} slots x {} MiB, {} streams, {} (rows without a mover named); pinning took {:.3} s (write-combined) and {:.3} s (cached)",
        max_threads,
        s_plain.config().slots_per_thread,
        s_plain.config().slot_bytes >> 20,
        s_plain.config().streams,
        s_plain.config().mover,
        s_wc.pool_alloc_s(),
        s_plain.pool_alloc_s()
    );
    let ctx = s_plain.context().clone();
    let copy_limit = |wc: bool| -> Result<f64> {
        let chunk = 256usize << 20;
        let pinned = PinnedBuffer::new(&ctx, chunk, wc)?;
        let mut dev = DeviceBuffer::new(&ctx, chunk)?;
        dev.copy_from_host(0, pinned.as_slice())?; // warm-up
        let n = (size as usize / chunk).max(4);
        let t = Instant::now();
        for _ in 0..n {
            dev.copy_from_host(0, pinned.as_slice())?;
        }
        Ok(gbps((n * chunk) as u64, t.elapsed().as_secs_f64()))
    };
    let small_sync_rate = {
        let piece = 4usize << 20;
        let pinned = PinnedBuffer::new(&ctx, piece, false)?;
        let mut dev = DeviceBuffer::new(&ctx, piece)?;
        let n = 256;
        let t = Instant::now();
        for _ in 0..n {
            dev.copy_from_host(0, pinned.as_slice())?;
        }
        gbps((n * piece) as u64, t.elapsed().as_secs_f64())
    };
    let pinned_wc_rate = copy_limit(true)?;
    let pinned_rate = copy_limit(false)?;
    // The same copies into a freshly allocated buffer of the blob's size,
    // allocation included (what every load pays), then again into it warm.
    let (fresh_rate, warm_rate) = {
        let chunk = 256usize << 20;
        let pinned = PinnedBuffer::new(&ctx, chunk, false)?;
        let n = (size as usize / chunk).max(1);
        let t = Instant::now();
        let mut dev = DeviceBuffer::new(&ctx, n * chunk)?;
        for i in 0..n {
            dev.copy_from_host(i * chunk, pinned.as_slice())?;
        }
        let fresh = gbps((n * chunk) as u64, t.elapsed().as_secs_f64());
        let t = Instant::now();
        for i in 0..n {
            dev.copy_from_host(i * chunk, pinned.as_slice())?;
        }
        (fresh, gbps((n * chunk) as u64, t.elapsed().as_secs_f64()))
    };

    println!();
    println!("reference rates:");
    println!("  SHA-256, one core (ring)          {sha_rate:>7.2} GB/s");
    println!("  H2D from pinned, cached           {pinned_rate:>7.2} GB/s");
    println!("  H2D from pinned, write-combined   {pinned_wc_rate:>7.2} GB/s");
    println!("  H2D from pinned, 4 MiB sync copies {small_sync_rate:>7.2} GB/s");
    println!("  H2D from pinned into a fresh {} GiB buffer, alloc included {fresh_rate:>7.2} GB/s; same buffer again {warm_rate:>7.2} GB/s", a.size_gib);

    // The plain path users take today: read the file, then a pageable copy.
    let plain = {
        let mut v = Vec::new();
        let mut read_s = Vec::new();
        let mut copy_s = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            let data = std::fs::read(&a.blob)?;
            let r = t.elapsed().as_secs_f64();
            let t2 = Instant::now();
            let mut dev = DeviceBuffer::new(&ctx, data.len())?;
            dev.copy_from_host(0, &data)?;
            let c = t2.elapsed().as_secs_f64();
            drop(dev);
            v.push(r + c);
            read_s.push(r);
            copy_s.push(c);
        }
        println!(
            "  plain path phases (median): read {:.3} s ({:.2} GB/s), pageable alloc+copy {:.3} s ({:.2} GB/s)",
            median(read_s.clone()),
            gbps(size, median(read_s)),
            median(copy_s.clone()),
            gbps(size, median(copy_s))
        );
        median(v)
    };

    let time = |streamer: &mut Streamer, opts: LoadOptions| -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..reps {
            let (blob, r) = streamer.load(&spec, opts)?;
            drop(blob);
            times.push(r.total_s);
        }
        Ok(median(times))
    };
    let t = max_threads;
    let row = |what: String, seconds: f64| {
        print_row(
            &Row {
                what,
                seconds,
                bytes: size,
            },
            Some(plain),
        )
    };
    let staged = |verify, source, threads, pipeline| LoadOptions {
        pipeline,
        ..LoadOptions::new(verify, source, threads)
    };

    println!();
    println!("stages alone ({} GiB, {t} threads, median of {reps}):", a.size_gib);
    println!("| {:<52} | {:>11} | {:>12} |", "stage", "time", "rate");
    let s = time(&mut s_plain, staged(false, SourceMode::Mmap, t, Pipeline::HostOnly))?;
    row("page cache -> pinned memcpy, no DMA".into(), s);
    let s = time(&mut s_plain, staged(true, SourceMode::Mmap, t, Pipeline::HostOnly))?;
    row("hash + memcpy into pinned, no DMA".into(), s);
    let s = time(&mut s_plain, staged(false, SourceMode::Mmap, t, Pipeline::DmaOnly))?;
    row(
        format!(
            "DMA only: {} streams, {} MiB pinned pieces",
            s_plain.config().streams,
            s_plain.config().slot_bytes >> 20
        ),
        s,
    );
    let mut hash_s = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        cnse_kernels::stream::hash_chunks(&a.blob, a.chunk_mib << 20, t)?;
        hash_s.push(t0.elapsed().as_secs_f64());
    }
    row(format!("SHA-256 of every chunk only, {t} threads"), median(hash_s));
    let register = s_plain.supports_register();
    if register {
        let s = time(&mut s_plain, staged(false, SourceMode::Register, t, Pipeline::HostOnly))?;
        row("cuMemHostRegister + unregister of the page cache only".into(), s);
    } else {
        println!("| device lacks read-only host registration: register mode not measured");
    }

    println!();
    println!("staging sweep, unverified, {t} threads, cached staging (median of {reps}):");
    println!(
        "| {:<52} | {:>11} | {:>12} |",
        "slot MiB x in flight, memcpy KiB, streams", "time", "rate"
    );
    let ce = Mover::CopyEngine;
    let mut sweep: Vec<(usize, usize, usize, usize, Mover)> = a
        .slot_sweep
        .iter()
        .map(|&m| (m << 20, 3, COPY_GRANULE_DEFAULT, 16, ce))
        .collect();
    sweep.push((8 << 20, 3, 8 << 20, 16, ce));
    for &streams in &a.stream_sweep {
        for slot_mib in [2usize, 4] {
            sweep.push((slot_mib << 20, 3, COPY_GRANULE_DEFAULT, streams, ce));
        }
    }
    for &(slot_mib, streams) in &[(2usize, 4usize), (4, 16), (32, 4)] {
        sweep.push((slot_mib << 20, 3, COPY_GRANULE_DEFAULT, streams, Mover::Kernel));
    }
    for slot_mib in [2usize, 8, 32] {
        sweep.push((slot_mib << 20, 3, COPY_GRANULE_DEFAULT, 16, Mover::Sync));
    }
    for (slot_bytes, slots_per_thread, granule, streams, mover) in sweep {
        let cfg = StreamerConfig {
            threads: t,
            slot_bytes,
            slots_per_thread,
            streams,
            write_combined: false,
            copy_granule_bytes: granule.min(slot_bytes),
            mover,
        };
        let mut st = Streamer::new(a.device, cfg)?;
        let name = format!(
            "{} x {}, {} KiB, {} streams, {mover}",
            slot_bytes >> 20,
            slots_per_thread,
            granule.min(slot_bytes) >> 10,
            streams
        );
        let s = time(&mut st, staged(false, SourceMode::Mmap, t, Pipeline::DmaOnly))?;
        row(format!("{name}: DMA only"), s);
        let s = time(&mut st, LoadOptions::new(false, SourceMode::Mmap, t))?;
        row(format!("{name}: full load"), s);
        let s = time(&mut st, LoadOptions::new(true, SourceMode::Mmap, t))?;
        row(format!("{name}: verified load"), s);
    }

    println!();
    println!(
        "loads of {} GiB from the page cache, median of {reps}, ratio = plain path / this:",
        a.size_gib
    );
    println!("| {:<52} | {:>11} | {:>12} | ratio", "path", "time", "rate");
    row("plain: read file + pageable cuMemcpyHtoD".into(), plain);
    let s = time(&mut s_wc, LoadOptions::new(false, SourceMode::Mmap, t))?;
    row(format!("unverified, mmap, write-combined staging, {t} thr"), s);
    let s = time(&mut s_plain, LoadOptions::new(false, SourceMode::Mmap, t))?;
    row(format!("unverified, mmap, cached staging, {t} thr"), s);
    let s = time(&mut s_plain, LoadOptions::new(false, SourceMode::Pread, t))?;
    row(format!("unverified, pread, cached staging, {t} thr"), s);
    if register {
        let s = time(&mut s_plain, LoadOptions::new(false, SourceMode::Register, t))?;
        row(format!("unverified, registered page cache, {t} thr"), s);
    }
    let mut s_ce = Streamer::new(
        a.device,
        StreamerConfig {
            threads: t,
            mover: Mover::CopyEngine,
            ..a.pool.config()
        },
    )?;
    let s = time(&mut s_ce, LoadOptions::new(false, SourceMode::Mmap, t))?;
    row(format!("unverified, mmap, cached staging, copy engine, {t} thr"), s);
    let s = time(&mut s_ce, LoadOptions::new(true, SourceMode::Mmap, t))?;
    row(format!("verified, mmap, cached staging, copy engine, {t} thr"), s);
    let (blob, _) = s_ce.load(&spec, LoadOptions::new(true, SourceMode::Mmap, t))?;
    compare_with_file(&blob.buffer, &a.blob)?;
    drop(blob);
    println!("check: device bytes of the copy-engine load equal the file");
    let mut sources = vec![(SourceMode::Mmap, "mmap, cached staging")];
    if register {
        sources.push((SourceMode::Register, "registered page cache"));
    }
    for (source, label) in sources {
        for &n in &a.sweep {
            let s = time(&mut s_plain, LoadOptions::new(true, source, n))?;
            row(format!("verified, {label}, {n} thr"), s);
            let target = 0.8 * pinned_rate.min(n as f64 * sha_rate);
            println!("|   target 0.8 x min(pinned {pinned_rate:.1}, {n} x {sha_rate:.2}) = {target:.2} GB/s");
        }
    }
    let s = time(&mut s_wc, LoadOptions::new(true, SourceMode::Mmap, t))?;
    row(format!("verified, mmap, write-combined staging, {t} thr"), s);
    let s = time(&mut s_plain, LoadOptions::new(true, SourceMode::Pread, t))?;
    row(format!("verified, pread, cached staging, {t} thr"), s);

    // The bytes on the device are the file's, for each full source.
    let mut sources = vec![SourceMode::Mmap, SourceMode::Pread];
    if register {
        sources.push(SourceMode::Register);
    }
    for source in sources {
        let (blob, _) = s_plain.load(&spec, LoadOptions::new(true, source, t))?;
        compare_with_file(&blob.buffer, &a.blob)?;
        println!("check: device bytes of the verified {source} load equal the file");
    }
    Ok(())
}
