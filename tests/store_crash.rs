//! Issue 3: `put` killed with SIGKILL at any moment leaves no partial blob;
//! the store still verifies, and `gc` clears what the dead writer left.

mod store_support;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Instant;
use store_support::*;

const KILLS: u64 = 20;
const FILE_BYTES: usize = 48 << 20;

#[test]
fn sigkill_mid_put_leaves_no_partial_blob_issue_3() {
    let dir = Scratch::new("crash");
    let store = dir.path("store");
    let file = dir.path("model.bin");
    write_noise(&file, FILE_BYTES, 77);

    // How long a whole put takes here, to spread the kills over it: the
    // fastest of three, so a probe slowed by other work on the machine
    // does not push the kills past the commit.
    let full = (0..3)
        .map(|k| {
            let t = Instant::now();
            put(&dir.path(&format!("probe-store-{k}")), &file, &[]);
            t.elapsed()
        })
        .min()
        .expect("three probes");

    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let tmp = store.join("tmp");
    let temp_files = || -> usize {
        std::fs::read_dir(&tmp)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("put-"))
                })
                .count()
            })
            .unwrap_or(0)
    };
    let mut stored = 0;
    let mut killed_mid_write = 0;
    for i in 0..KILLS {
        // A new digest each round: without it a later put would only dedupe.
        f.write_all_at(&i.to_le_bytes(), 0).unwrap();
        let digest = sha256sum(&file);
        let before = temp_files();
        let mut child = Command::new(BIN)
            .args([
                "store",
                "--store",
                store.to_str().unwrap(),
                "put",
                file.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for the writer's temporary file, then kill at a point spread
        // over the rest of the put (process start-up is not the target).
        let t = Instant::now();
        while temp_files() == before && t.elapsed() < full * 20 && child.try_wait().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        std::thread::sleep(full.mul_f64(i as f64 / KILLS as f64 * 0.8));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        if temp_files() > before {
            killed_mid_write += 1;
        }
        let blob = blob_path(&store, &digest);
        if blob.exists() {
            // The kill came after the commit: the blob must be whole.
            stored += 1;
            assert_eq!(sha256sum(&blob), digest, "round {i}: a committed blob is not intact");
        }
        // Whatever is in the store verifies, chunk by chunk and whole.
        let o = store_cmd(&store, &["verify", "--all", "--full"]);
        assert!(
            o.status.success(),
            "round {i} ({status}): {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    eprintln!("{KILLS} kills: {killed_mid_write} mid-write, {stored} after the commit");
    assert!(
        killed_mid_write >= KILLS / 2,
        "only {killed_mid_write} kills landed mid-write; the test proves little"
    );

    let gc = json(&store, &["gc"]);
    assert!(gc["temp_files_removed"].as_u64().unwrap() > 0, "{gc}");
    let left: Vec<_> = std::fs::read_dir(store.join("tmp")).unwrap().collect();
    assert!(left.is_empty(), "gc left temporary files: {left:?}");

    let digest = put(&store, &file, &[]);
    assert_eq!(digest, sha256sum(&file));
    ok(&store, &["verify", "--all", "--full"]);
}
