//! Memory of the replay-nonce store: heap bytes per live nonce.
//!
//! `cargo bench --bench memory` inserts 1,000,000 distinct nonces into a `NonceStore` and prints
//! one JSON line:
//!
//! ```text
//! {"nonce_bytes_per_entry": 52.4, "entries": 1000000, "rss_bytes_per_entry": 53.1}
//! ```
//!
//! - `nonce_bytes_per_entry`: heap bytes live after the inserts minus before, divided by the
//!   entries, counted by the global allocator below (what the program asked for, without the
//!   allocator's own overhead);
//! - `rss_bytes_per_entry`: the growth of the resident set over the same inserts, divided by the
//!   entries, as the operating system sees it (Linux; `null` elsewhere).
//!
//! `--entries N` measures at N entries instead. Without `--bench` (as `cargo test --benches`
//! runs it) and without `--entries`, it makes a quick run of 10,000 entries. Other arguments
//! (those `cargo bench -- ...` passes to every bench) are ignored.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use portcullis::core::NonceStore;

/// The system allocator, counting the bytes currently allocated.
struct Counting;

/// Heap bytes allocated and not yet freed.
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees hold; the counter is only bookkeeping beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s contract.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `realloc`'s contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // On failure the old block stays allocated and the count stays as it was.
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The resident set size in bytes, from the `VmRSS` line of `/proc/self/status` (Linux only).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Distinct nonces: a counter in the first half, a mixed copy of it in the second, so that
/// they spread over the hash table as random ones do.
fn nonce(i: u64) -> [u8; 16] {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&i.to_le_bytes());
    out[8..].copy_from_slice(&z.to_le_bytes());
    out
}

fn parse_entries(args: &[String]) -> Result<Option<u64>, String> {
    let mut entries = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = if arg == "--entries" {
            Some(it.next().ok_or("--entries needs a number")?.as_str())
        } else {
            arg.strip_prefix("--entries=")
        };
        if let Some(value) = value {
            let n: u64 = value
                .parse()
                .map_err(|_| format!("--entries takes a positive number, not {value:?}"))?;
            if n == 0 {
                return Err("--entries takes a positive number, not 0".into());
            }
            entries = Some(n);
        }
    }
    Ok(entries)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench_mode = args.iter().any(|a| a == "--bench");
    let entries = match parse_entries(&args) {
        Ok(Some(n)) => n,
        Ok(None) if bench_mode => 1_000_000,
        Ok(None) => 10_000,
        Err(message) => {
            eprintln!("memory bench: {message}");
            std::process::exit(2);
        }
    };
    let capacity = usize::try_from(entries).unwrap_or(usize::MAX);

    let rss_before = resident_bytes();
    let live_before = LIVE.load(Ordering::SeqCst);
    let store = NonceStore::new(capacity, 120_001);
    for i in 0..entries {
        store
            .insert(nonce(i), 0)
            .expect("the store has room for every entry");
    }
    let live_after = LIVE.load(Ordering::SeqCst);
    let rss_after = resident_bytes();
    assert_eq!(store.len() as u64, entries);

    let per_entry = |bytes: f64| bytes / entries as f64;
    let heap = per_entry(live_after as f64 - live_before as f64);
    let rss = match (rss_before, rss_after) {
        (Some(before), Some(after)) => format!("{:.1}", per_entry(after as f64 - before as f64)),
        _ => "null".to_owned(),
    };
    println!(
        "{{\"nonce_bytes_per_entry\": {heap:.1}, \"entries\": {entries}, \"rss_bytes_per_entry\": {rss}}}"
    );
    drop(store);
}
