//! The container's stdout/stderr as Docker json-file lines:
//! `{"log":"...\n","stream":"stdout|stderr","time":"<RFC3339Nano>"}`.
//!
//! Volume is bounded: the file rotates at [`DEFAULT_MAX_SIZE`] and
//! [`DEFAULT_MAX_FILES`] files are kept (current + rotated), so a chatty or
//! hostile guest cannot fill the host's disk. Bytes that are not UTF-8 are
//! stored lossily (U+FFFD) here; create's fds receive them unchanged.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Rotate when the current file reaches this size.
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024;
/// Files kept: the current one and the rotated `.1`.
pub const DEFAULT_MAX_FILES: usize = 2;
/// A line longer than this is written as partial entries (as Docker does at 16 KiB).
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Entry {
    pub log: String,
    pub stream: Stream,
    pub time: String,
}

/// Appends json-file entries, splitting output into lines per stream.
pub struct JsonLogWriter {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    max_files: usize,
    partial: [Vec<u8>; 2],
}

impl JsonLogWriter {
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::with_limits(path, DEFAULT_MAX_SIZE, DEFAULT_MAX_FILES)
    }

    pub fn with_limits(path: &Path, max_size: u64, max_files: usize) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            max_size: max_size.max(1024),
            max_files: max_files.max(1),
            partial: [Vec::new(), Vec::new()],
        })
    }

    /// Records output of `stream`; complete lines are written at once, a trailing
    /// partial line is held until its newline, [`MAX_LINE`] bytes, or [`Self::flush_partial`].
    pub fn write(&mut self, stream: Stream, data: &[u8]) -> io::Result<()> {
        let idx = stream as usize;
        let mut buf = std::mem::take(&mut self.partial[idx]);
        buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos + 1;
            self.entry(stream, &buf[start..end])?;
            start = end;
        }
        while buf.len() - start >= MAX_LINE {
            self.entry(stream, &buf[start..start + MAX_LINE])?;
            start += MAX_LINE;
        }
        buf.drain(..start);
        self.partial[idx] = buf;
        Ok(())
    }

    /// Writes out held partial lines (at container exit).
    pub fn flush_partial(&mut self) -> io::Result<()> {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let buf = std::mem::take(&mut self.partial[stream as usize]);
            if !buf.is_empty() {
                self.entry(stream, &buf)?;
            }
        }
        self.file.flush()
    }

    fn entry(&mut self, stream: Stream, data: &[u8]) -> io::Result<()> {
        let e = Entry {
            log: String::from_utf8_lossy(data).into_owned(),
            stream,
            time: Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true),
        };
        let mut line = serde_json::to_vec(&e)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        for i in (1..self.max_files).rev() {
            let from = if i == 1 {
                self.path.clone()
            } else {
                rotated(&self.path, i - 1)
            };
            let _ = fs::rename(&from, rotated(&self.path, i));
        }
        if self.max_files == 1 {
            let _ = fs::remove_file(&self.path);
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    p.into()
}

/// All log files of `path`, oldest first.
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = (1..16)
        .map(|i| rotated(path, i))
        .filter(|p| p.exists())
        .collect();
    out.reverse();
    if path.exists() {
        out.push(path.to_path_buf());
    }
    out
}

/// Reads every entry (oldest first); unparsable lines are skipped.
pub fn read_entries(path: &Path) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for f in files(path) {
        for line in BufReader::new(File::open(f)?).lines() {
            if let Ok(e) = serde_json::from_str::<Entry>(&line?) {
                out.push(e);
            }
        }
    }
    Ok(out)
}

/// Parses `--since`: RFC3339, or a duration back from now (`10s`, `5m`, `2h`).
pub fn parse_since(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    };
    Some(Utc::now() - chrono::Duration::seconds(secs))
}

/// Writes one entry the way `logs` prints it.
pub fn print_entry(
    e: &Entry,
    timestamps: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> io::Result<()> {
    let w: &mut dyn Write = if e.stream == Stream::Stdout { out } else { err };
    if timestamps {
        write!(w, "{} ", e.time)?;
    }
    w.write_all(e.log.as_bytes())
}

/// What `krun-oci logs` prints.
#[derive(Debug, Clone, Default)]
pub struct PrintOptions {
    pub tail: Option<usize>,
    pub since: Option<DateTime<Utc>>,
    pub timestamps: bool,
}

fn keep(e: &Entry, since: Option<DateTime<Utc>>) -> bool {
    since.is_none_or(|s| DateTime::parse_from_rfc3339(&e.time).is_ok_and(|t| t >= s))
}

/// Reads the complete lines of `r` from where it is, as entries; a partial last
/// line is left unread for the next call.
fn read_new_entries(r: &mut BufReader<File>) -> io::Result<Vec<Entry>> {
    use std::io::{Seek, SeekFrom};
    let mut out = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            return Ok(out);
        }
        if !line.ends_with('\n') {
            // The writer is mid-line: read it again whole next time.
            r.seek(SeekFrom::Current(-(n as i64)))?;
            return Ok(out);
        }
        if let Ok(e) = serde_json::from_str::<Entry>(&line) {
            out.push(e);
        }
    }
}

/// Prints the entries `r` gained since the last read.
fn print_new(
    r: Option<&mut BufReader<File>>,
    opts: &PrintOptions,
    out: &mut impl Write,
    err: &mut impl Write,
) -> io::Result<()> {
    let Some(r) = r else { return Ok(()) };
    for e in read_new_entries(r)? {
        if keep(&e, opts.since) {
            print_entry(&e, opts.timestamps, out, err)?;
        }
    }
    out.flush()
}

fn inode(path: &Path) -> Option<u64> {
    fs::metadata(path)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .ok()
}

/// Prints the log; with `follow`, keeps printing new entries while it returns true.
/// Following reads on from exactly where the first read stopped, and drains a
/// rotated file before moving to the new one, so no entry is skipped.
pub fn print(
    path: &Path,
    opts: &PrintOptions,
    follow: Option<&mut dyn FnMut() -> bool>,
) -> io::Result<()> {
    print_to(
        path,
        opts,
        follow,
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
    )
}

/// [`print`] to the given stdout and stderr writers.
pub fn print_to(
    path: &Path,
    opts: &PrintOptions,
    follow: Option<&mut dyn FnMut() -> bool>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> io::Result<()> {
    // The current file is opened first: what rotation moves away later is still
    // read through this handle.
    let mut current = File::open(path).ok().map(BufReader::new);
    let mut ino = current
        .as_ref()
        .and_then(|r| r.get_ref().metadata().ok())
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let mut entries = Vec::new();
    for f in files(path).iter().filter(|f| f.as_path() != path) {
        for line in BufReader::new(File::open(f)?).lines() {
            if let Ok(e) = serde_json::from_str::<Entry>(&line?) {
                entries.push(e);
            }
        }
    }
    if let Some(r) = current.as_mut() {
        entries.extend(read_new_entries(r)?);
    }
    entries.retain(|e| keep(e, opts.since));
    let skip = opts.tail.map_or(0, |n| entries.len().saturating_sub(n));
    for e in &entries[skip..] {
        print_entry(e, opts.timestamps, out, err)?;
    }
    out.flush()?;
    let Some(still_running) = follow else {
        return Ok(());
    };
    loop {
        let running = still_running();
        print_new(current.as_mut(), opts, out, err)?;
        if !running {
            return Ok(());
        }
        let now = inode(path);
        if now != ino {
            // Rotated (or created): drain the old file once more, then move on.
            print_new(current.as_mut(), opts, out, err)?;
            ino = now;
            current = File::open(path).ok().map(BufReader::new);
            continue;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries written after the first read, and across a rotation, are each
    /// printed once, in order.
    #[test]
    fn follow_misses_nothing_across_writes_and_rotation() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.log");
        let mut w = JsonLogWriter::with_limits(&p, 200, 3).unwrap();
        w.write(Stream::Stdout, b"line-0\n").unwrap();
        let mut n = 0;
        let mut step = || {
            n += 1;
            if n <= 12 {
                // Long enough lines that the 200-byte limit rotates every few.
                let line = format!("line-{n} {}\n", "x".repeat(40));
                w.write(Stream::Stdout, line.as_bytes()).unwrap();
                true
            } else {
                false
            }
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        print_to(
            &p,
            &PrintOptions::default(),
            Some(&mut step),
            &mut out,
            &mut err,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let got: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
        let want: Vec<String> = (0..=12).map(|i| format!("line-{i}")).collect();
        assert_eq!(got, want, "{text}");
        assert!(files(&p).len() > 1, "the test must rotate");
    }

    #[test]
    fn lines_partials_and_streams() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.log");
        let mut w = JsonLogWriter::open(&p).unwrap();
        w.write(Stream::Stdout, b"hel").unwrap();
        w.write(Stream::Stderr, b"oops\n").unwrap();
        w.write(Stream::Stdout, b"lo\nwor").unwrap();
        w.write(Stream::Stdout, &[0xff, b'\n']).unwrap();
        w.write(Stream::Stdout, b"tail-no-newline").unwrap();
        w.flush_partial().unwrap();
        let e = read_entries(&p).unwrap();
        let got: Vec<_> = e.iter().map(|e| (e.stream, e.log.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (Stream::Stderr, "oops\n"),
                (Stream::Stdout, "hello\n"),
                (Stream::Stdout, "wor\u{fffd}\n"),
                (Stream::Stdout, "tail-no-newline"),
            ]
        );
        for e in &e {
            DateTime::parse_from_rfc3339(&e.time).unwrap();
        }
        // Raw lines are exactly Docker's shape.
        let raw = fs::read_to_string(&p).unwrap();
        let v: serde_json::Value = serde_json::from_str(raw.lines().next().unwrap()).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 3);
    }

    #[test]
    fn long_lines_split_and_volume_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.log");
        let mut w = JsonLogWriter::with_limits(&p, 64 * 1024, 2).unwrap();
        w.write(Stream::Stdout, &vec![b'a'; MAX_LINE + 10]).unwrap();
        w.flush_partial().unwrap();
        let e = read_entries(&p).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].log.len(), MAX_LINE);
        for _ in 0..2000 {
            w.write(Stream::Stdout, &[b'x'; 200]).unwrap();
            w.write(Stream::Stdout, b"\n").unwrap();
        }
        let total: u64 = files(&p)
            .iter()
            .map(|f| fs::metadata(f).unwrap().len())
            .sum();
        assert!(total <= 2 * 64 * 1024 + 1024, "{total}");
        assert_eq!(files(&p).len(), 2);
    }

    #[test]
    fn since_parsing() {
        assert!(parse_since("2026-01-01T00:00:00Z").is_some());
        let t = parse_since("10m").unwrap();
        assert!(Utc::now() - t >= chrono::Duration::minutes(10));
        assert!(parse_since("10x").is_none());
        assert!(parse_since("").is_none());
    }
}
