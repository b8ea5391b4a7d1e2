//! Shared by the fuzz targets: inputs go through a file, as they do in the product, and a panic
//! the trainer contains on purpose (see `finetune_trainer::error::contain_panic`) is not a crash.

use std::path::PathBuf;
use std::sync::Once;

/// A scratch directory for this process, reused by every execution.
pub fn scratch() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("scratch dir")).path()
}

/// Writes `data` to `name` in the scratch directory.
pub fn write(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, data).expect("write fuzz input");
    path
}

/// libFuzzer's hook aborts on every panic; keep that for real panics only.
#[allow(dead_code)] // not every target calls into a library that panics
pub fn allow_contained_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !finetune_trainer::error::panic_is_contained() {
                abort(info);
            }
        }));
    });
}
