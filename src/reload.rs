//! Noticing that the configuration file changed, so that the binary reloads it as on SIGHUP.
//!
//! Owns: a `notify` watch on the file's *directory* and the debounce. Does not own: reading or
//! applying the configuration (`main.rs` reloads it exactly as on SIGHUP, and an invalid file is
//! rejected there with a log line while the running policy stays).
//!
//! Why the directory: editors save by writing a new file and renaming it over the old one, and
//! a Kubernetes ConfigMap volume swaps a `..data` symlink to a new directory; a watch on the file
//! itself would follow the old inode and miss both. Any event in the directory starts a quiet
//! period (`debounce`); when it has passed, the file is read and a change is reported only if
//! its bytes differ from the last ones seen, so the other files of the directory, repeated
//! events and sidecache's own reads cost nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// The quiet period after the last event before the file is read again.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// A watched configuration file.
pub struct FileWatch {
    /// Kept alive for the watch to last.
    _watcher: notify::RecommendedWatcher,
    events: mpsc::Receiver<()>,
    path: PathBuf,
    last: Option<Vec<u8>>,
    debounce: Duration,
}

impl FileWatch {
    /// Starts watching the directory of `path`.
    pub fn new(path: &Path, debounce: Duration) -> notify::Result<FileWatch> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // One pending signal is enough: events only say "look again".
        let (tx, events) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.try_send(());
            }
        })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(FileWatch { _watcher: watcher, events, path: path.to_path_buf(), last: std::fs::read(path).ok(), debounce })
    }

    /// Completes when the file's content differs from when it was last seen (after the quiet
    /// period). Never completes once the watch has failed.
    pub async fn changed(&mut self) {
        loop {
            if self.events.recv().await.is_none() {
                return std::future::pending().await;
            }
            while let Ok(Some(())) = tokio::time::timeout(self.debounce, self.events.recv()).await {}
            let now = std::fs::read(&self.path).ok();
            if now != self.last {
                self.last = now;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_renamed_over_file_is_a_change_and_a_rewrite_of_the_same_bytes_is_not() {
        let dir = std::env::temp_dir().join(format!("sidecache-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "a = 1\n").unwrap();
        let mut watch = FileWatch::new(&file, Duration::from_millis(50)).unwrap();
        // Same bytes again, then new bytes written elsewhere and renamed into place.
        std::fs::write(&file, "a = 1\n").unwrap();
        let tmp = dir.join("c.toml.tmp");
        std::fs::write(&tmp, "a = 2\n").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        tokio::time::timeout(Duration::from_secs(20), watch.changed()).await.expect("the change was noticed");
        assert_eq!(watch.last.as_deref(), Some(&b"a = 2\n"[..]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
