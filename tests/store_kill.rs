//! Issue 11, fault and bad-input suite: SIGKILL at random points (from a
//! seeded RNG, printed) of `store put`, `store pull` and `store gc`. After
//! every kill a user finds the store whole: `verify --all --full` passes,
//! every file under blobs/ hashes to its name (no partial blob visible),
//! every committed blob is still intact and every name points at a blob
//! that is there; and the same command run again succeeds.

mod common;
mod store_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fault::{seed, Rng};
use store_support::*;

/// Runs `cnse-dp store --store STORE ARGS` and SIGKILLs it after `after`
/// (or lets it finish first). True when the kill came before the exit.
fn run_killed(store: &Path, args: &[&str], after: Duration) -> bool {
    let mut child = Command::new(BIN)
        .arg("store")
        .arg("--store")
        .arg(store)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning cnse-dp store");
    let end = Instant::now() + after;
    while Instant::now() < end {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let killed = child.try_wait().unwrap().is_none();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    killed
}

/// The fastest of three runs of `run`: the kills are spread over this.
fn duration_of(mut run: impl FnMut(u32)) -> Duration {
    (0..3)
        .map(|k| {
            let t = Instant::now();
            run(k);
            t.elapsed()
        })
        .min()
        .unwrap()
}

/// What a user checks of a store after a crash (see the file's comment);
/// `committed` are blobs that must still be there, intact.
fn check_store(store: &Path, committed: &[String], when: &str) {
    let o = store_cmd(store, &["verify", "--all", "--full"]);
    assert!(
        o.status.success(),
        "{when}: verify --all --full failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if let Ok(dir) = std::fs::read_dir(store.join("blobs/sha256")) {
        for e in dir {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert_eq!(
                sha256sum(&path),
                format!("sha256:{name}"),
                "{when}: a partial blob is visible"
            );
        }
    }
    for d in committed {
        let blob = blob_path(store, d);
        assert!(blob.exists(), "{when}: committed blob {d} is gone");
    }
    if let Ok(names) = std::fs::read_dir(store.join("refs")) {
        for name in names {
            for tag in std::fs::read_dir(name.unwrap().path()).unwrap() {
                let path = tag.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap();
                let d = text.lines().next().unwrap_or("");
                assert!(
                    blob_path(store, d).exists(),
                    "{when}: name {} points at {d}, which is not there",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn issue11_sigkill_at_random_points_of_put_leaves_every_blob_intact() {
    const ROUNDS: u64 = 12;
    let seed = seed("issue11_sigkill_at_random_points_of_put");
    let mut rng = Rng::new(seed);
    let dir = Scratch::new("kill-put");
    let store = dir.path("store");
    let file = dir.path("model.bin");
    let mut bytes = noise(24 << 20, seed);
    std::fs::write(&file, &bytes).unwrap();
    let full = duration_of(|k| {
        put(&dir.path(&format!("probe-{k}")), &file, &[]);
    });
    let mut committed = Vec::new();
    let (mut mid, mut after_commit, mut left_temp) = (0, 0, 0);
    for round in 0..ROUNDS {
        // A new digest each round: a put of the same bytes only dedupes.
        bytes[..8].copy_from_slice(&(seed ^ round).to_le_bytes());
        std::fs::write(&file, &bytes).unwrap();
        let digest = sha256sum(&file);
        let name = format!("m:r{round}");
        // Up to twice a put's time: some kills land after the commit.
        let at = full.mul_f64(rng.range(0, 2_000) as f64 / 1_000.0);
        let args = ["put", file.to_str().unwrap(), "--name", &name];
        let temps = || std::fs::read_dir(store.join("tmp")).map_or(0, |d| d.count());
        let temp_before = temps();
        let killed = run_killed(&store, &args, at);
        let when = format!("put round {round} (seed {seed}), killed at {at:?}");
        if blob_path(&store, &digest).exists() {
            after_commit += 1;
        } else if killed {
            mid += 1;
        }
        left_temp += (temps() > temp_before) as u32;
        check_store(&store, &committed, &when);
        // Run again, it succeeds: the blob and its name are there.
        assert_eq!(put(&store, &file, &["--name", &name]), digest, "{when}: rerun");
        assert_eq!(
            json(&store, &["inspect", &name])["digest"].as_str(),
            Some(digest.as_str())
        );
        assert_eq!(sha256sum(&blob_path(&store, &digest)), digest, "{when}: rerun");
        committed.push(digest);
    }
    eprintln!(
        "put: {ROUNDS} kills over {full:?} puts: {mid} before the commit ({left_temp} left a temporary file), {after_commit} after it or after the exit"
    );
    assert!(mid > 0, "no kill landed before a commit; the test proves little");
    json(&store, &["gc"]);
    check_store(&store, &committed, "after every put round and a gc");
    let left: Vec<_> = std::fs::read_dir(store.join("tmp")).unwrap().collect();
    assert!(left.is_empty(), "gc left temporary files: {left:?}");
}

#[test]
fn issue11_sigkill_at_random_points_of_pull_leaves_every_blob_intact() {
    let Some(filer) = FilerServer::start("issue11_sigkill_at_random_points_of_pull") else {
        return;
    };
    const ROUNDS: u64 = 6;
    let seed = seed("issue11_sigkill_at_random_points_of_pull");
    let mut rng = Rng::new(seed);
    let dir = Scratch::new("kill-pull");
    let src = dir.path("src");
    let file = dir.path("model.bin");
    write_noise(&file, 32 << 20, seed);
    let digest = put(&src, &file, &["--chunk-bytes", "1MiB", "--name", "pulled:v1"]);
    ok(&src, &["push", "pulled:v1", "--filer", &filer.url]);
    // A local blob the pulls must never disturb.
    let other = dir.path("other.bin");
    write_noise(&other, 3 << 20, seed ^ 1);
    let pull = ["pull", "pulled:v1", "--filer", &filer.url, "--limit-rate", "64MiB"];
    let full = duration_of(|k| {
        ok(&dir.path(&format!("probe-{k}")), &pull);
    });
    let (mut kills, mut mid) = (0, 0);
    for round in 0..ROUNDS {
        let store = dir.path(&format!("dest-{round}"));
        let kept = put(&store, &other, &["--name", "kept:v1"]);
        // One to three kills at random points, each resuming the last.
        for k in 0..rng.range(1, 4) {
            let at = full.mul_f64(rng.range(0, 1_100) as f64 / 1_000.0);
            kills += 1;
            if run_killed(&store, &pull, at) && !blob_path(&store, &digest).exists() {
                mid += 1;
            }
            check_store(
                &store,
                std::slice::from_ref(&kept),
                &format!("pull round {round} kill {k} at {at:?} (seed {seed})"),
            );
        }
        let r = json(&store, &["pull", "pulled:v1", "--filer", &filer.url]);
        assert_eq!(r["digest"].as_str(), Some(digest.as_str()), "round {round}: rerun");
        check_store(
            &store,
            &[kept, digest.clone()],
            &format!("pull round {round}, after the rerun"),
        );
        assert_eq!(sha256sum(&blob_path(&store, &digest)), sha256sum(&file));
    }
    eprintln!("pull: {kills} kills over {full:?} pulls, {mid} of them mid-download");
    assert!(mid > 0, "no kill landed mid-download; the test proves little");
}

#[test]
fn issue11_sigkill_at_random_points_of_gc_leaves_every_blob_intact() {
    const ROUNDS: u64 = 8;
    const BLOBS: u64 = 24;
    const PINNED: u64 = 4;
    let seed = seed("issue11_sigkill_at_random_points_of_gc");
    let mut rng = Rng::new(seed);
    let dir = Scratch::new("kill-gc");
    let file = dir.path("blob.bin");
    // A store of 24 named 1 MiB blobs, 4 of them pinned, and leftovers of
    // dead writers; gc evicts down to 8 MiB.
    let fill = |store: &Path, round: u64| -> Vec<String> {
        let mut pinned = Vec::new();
        for b in 0..BLOBS {
            write_noise(&file, 1 << 20, seed ^ (round << 16) ^ b);
            let name = format!("b{b}:v1");
            let mut extra = vec!["--name", name.as_str()];
            if b < PINNED {
                extra.push("--pin");
            }
            let d = put(store, &file, &extra);
            if b < PINNED {
                pinned.push(d);
            }
        }
        for t in 0..8 {
            std::fs::write(store.join(format!("tmp/put-dead-{t}")), noise(4096, t)).unwrap();
        }
        pinned
    };
    let budget = (8u64 << 20).to_string();
    let gc = ["gc", "--max-bytes", budget.as_str()];
    // How long one gc takes here (the fastest of three).
    let gc_time = (0..3u64)
        .map(|k| {
            let store = dir.path(&format!("probe-{k}"));
            fill(&store, 1_000 + k);
            let t = Instant::now();
            ok(&store, &gc);
            t.elapsed()
        })
        .min()
        .unwrap();
    let (mut killed, mut evicted_before_kill) = (0, 0);
    for round in 0..ROUNDS {
        let store = dir.path(&format!("store-{round}"));
        let pinned = fill(&store, round);
        let blobs_before = std::fs::read_dir(store.join("blobs/sha256")).unwrap().count();
        let at = gc_time.mul_f64(rng.range(0, 1_200) as f64 / 1_000.0);
        if run_killed(&store, &gc, at) {
            killed += 1;
            let blobs_after = std::fs::read_dir(store.join("blobs/sha256")).unwrap().count();
            if blobs_after < blobs_before {
                evicted_before_kill += 1;
            }
        }
        let when = format!("gc round {round}, killed at {at:?} (seed {seed})");
        check_store(&store, &pinned, &when);
        // Run again, it succeeds and meets the budget; the pinned stay.
        let r = json(&store, &gc);
        assert!(r["bytes_after"].as_u64().unwrap() <= 8 << 20, "{when}: rerun: {r}");
        check_store(&store, &pinned, &format!("{when}, after the rerun"));
        let left: Vec<_> = std::fs::read_dir(store.join("tmp")).unwrap().collect();
        assert!(left.is_empty(), "{when}: temporary files left: {left:?}");
    }
    eprintln!(
        "gc: {ROUNDS} kills over a {gc_time:?} gc: {killed} before it exited, {evicted_before_kill} of them after evicting some blobs"
    );
    assert!(killed > 0, "no kill landed before gc exited; the test proves little");
}
