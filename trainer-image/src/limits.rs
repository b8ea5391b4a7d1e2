//! Size limits on everything read from a file, and the readers that enforce them. Model files,
//! tokenizers and datasets come from the internet, so a declared length or a file's size must never
//! decide how much memory we take: each reader checks the size first, reads at most the limit plus
//! one byte, and reports the file (and line) it refused.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::error::{Error, Result};

/// JSON side files of a model (`config.json`, `generation_config.json`, `tokenizer_config.json`,
/// a shard index, a chat template): kilobytes in practice.
pub const MAX_SIDE_FILE: u64 = 64 << 20;

/// `tokenizer.json`: the largest real ones (256k-token vocabularies with merges) are ~35 MB.
pub const MAX_TOKENIZER_FILE: u64 = 256 << 20;

/// One JSONL line of a data set. A 128k-token conversation is about 0.5 MB of text; a larger line
/// is almost certainly not a training sample, and its parsed JSON could take many times its size.
pub const MAX_DATA_LINE: usize = 8 << 20;

/// A dataset file downloaded from `s3://` or the Hub onto the job's storage, or an adapter's
/// file into a verification pod's scratch space (streamed, never held in memory): well past any
/// fine-tuning set or adapter, short of filling a volume by mistake.
pub const MAX_REMOTE_FILE: u64 = 64 << 30;

/// Reads a whole text file of at most `max` bytes. `what` names the file's role in the error.
pub fn read_text(path: &Path, max: u64, what: &str) -> Result<String> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let declared = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let too_big = |n: u64| {
        Error::format(
            path,
            format!("{what} is {n} bytes, more than the {max}-byte limit"),
        )
    };
    if declared > max {
        return Err(too_big(declared));
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(too_big(bytes.len() as u64));
    }
    utf8(bytes).map_err(|(line, _)| Error::format(path, format!("line {line}: not valid UTF-8")))
}

/// Converts bytes to a string; on failure returns the 1-based line of the first invalid byte.
fn utf8(bytes: Vec<u8>) -> std::result::Result<String, (usize, Vec<u8>)> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.into_bytes();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        (line, bytes)
    })
}

/// The lines of a text file, streamed: each at most `max_line` bytes, valid UTF-8, without its
/// line ending, with a UTF-8 byte-order mark on the first line dropped (editors on Windows write
/// one). Yields `(1-based line number, text)`; an over-long or non-UTF-8 line is an error naming it.
pub struct Lines {
    reader: BufReader<File>,
    path: std::sync::Arc<Path>,
    max_line: usize,
    line: usize,
    buf: Vec<u8>,
    /// Set after an error: the reader's position inside a refused line is arbitrary.
    done: bool,
}

impl Lines {
    pub fn open(path: &Path, max_line: usize) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(Lines {
            reader: BufReader::with_capacity(1 << 16, file),
            path: std::sync::Arc::from(path),
            max_line,
            line: 0,
            buf: Vec::new(),
            done: false,
        })
    }

    fn error(&self, message: String) -> Error {
        Error::Data {
            path: self.path.to_path_buf(),
            line: self.line,
            message,
        }
    }

    fn next_line(&mut self) -> Result<Option<String>> {
        self.buf.clear();
        self.line += 1;
        let limit = self.max_line as u64 + 1;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| Error::io(&self.path, e))?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        } else if n as u64 == limit {
            return Err(self.error(format!(
                "line is longer than the {}-byte limit for one sample",
                self.max_line
            )));
        }
        let mut bytes = std::mem::take(&mut self.buf);
        if self.line == 1 && bytes.starts_with(b"\xEF\xBB\xBF") {
            bytes.drain(..3);
        }
        match String::from_utf8(bytes) {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                Err(self.error(format!("not valid UTF-8 (byte {})", at + 1)))
            }
        }
    }
}

impl Iterator for Lines {
    type Item = Result<(usize, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_line().transpose()?;
        self.done = item.is_err();
        Some(item.map(|text| (self.line, text)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(bytes: &[u8], max: usize) -> Vec<Result<(usize, String)>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, bytes).unwrap();
        Lines::open(&path, max).unwrap().collect()
    }

    #[test]
    fn bom_crlf_and_last_line_without_newline() {
        let got = lines_of(b"\xEF\xBB\xBF{\"a\":1}\r\n\n{\"b\":2}", 100);
        let got: Vec<_> = got.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(
            got,
            vec![
                (1, "{\"a\":1}".to_string()),
                (2, String::new()),
                (3, "{\"b\":2}".to_string())
            ]
        );
    }

    #[test]
    fn long_line_and_bad_utf8_name_their_line() {
        let got = lines_of(b"ok\n0123456789abc\nnext\n", 8);
        assert!(got[0].is_ok());
        let e = got[1].as_ref().unwrap_err().to_string();
        assert!(e.contains(":2:") && e.contains("8-byte limit"), "{e}");
        assert_eq!(got.len(), 2, "an error ends the stream");
        let got = lines_of(b"ok\nok\nbad \xff\n", 100);
        let e = got[2].as_ref().unwrap_err().to_string();
        assert!(e.contains(":3:") && e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn read_text_refuses_large_and_non_utf8_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, vec![b' '; 101]).unwrap();
        let e = read_text(&path, 100, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("101 bytes") && e.contains("100-byte limit"),
            "{e}"
        );
        std::fs::write(&path, b"{\n\n\xc3\x28}").unwrap();
        let e = read_text(&path, 100, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
    }
}
