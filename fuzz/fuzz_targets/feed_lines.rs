//! The data plane's feed decoder: arbitrary bytes split into lines, each read as a
//! change-stream line and as a snapshot line, and every record checked the way a
//! node checks a batch before applying it. Nothing may panic, and a batch is
//! either accepted whole or refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twofold_core::feed::{ChangeLine, SnapshotLine};
use twofold_data::index::prepare_put;
use twofold_data::sync::{LineBuffer, check_batch};

fuzz_target!(|data: &[u8]| {
    let mut buffer = LineBuffer::new(64 * 1024);
    // Feed the input in two chunks, so lines split across chunks are covered.
    let (first, second) = data.split_at(data.len() / 2);
    let mut lines = Vec::new();
    for chunk in [first, second] {
        match buffer.push(chunk) {
            Ok(more) => lines.extend(more),
            Err(_) => return,
        }
    }
    let mut changes = Vec::new();
    for line in &lines {
        if let Ok(ChangeLine::Change(change)) = serde_json::from_slice::<ChangeLine>(line) {
            changes.push(change);
        }
        if let Ok(SnapshotLine::Entity { entity }) = serde_json::from_slice::<SnapshotLine>(line) {
            let _ = prepare_put(&entity);
        }
    }
    if let Some(first) = changes.first() {
        let applied = first.seq.saturating_sub(1);
        if let Ok(prepared) = check_batch(applied, &changes) {
            let ops: usize = changes.iter().map(|c| c.ops.len()).sum();
            assert_eq!(prepared.len(), ops, "an accepted batch prepares every op");
        }
    }
});
