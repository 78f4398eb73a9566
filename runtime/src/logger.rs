//! `--log FILE --log-format text|json` in runc's shape, behind the `log` crate.
//!
//! JSON lines are `{"level":"error","msg":"...","time":"<RFC3339>"}`, one object
//! per line (containerd decodes line by line; podman reads the file as one object,
//! so a failing command writes exactly one error line).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use chrono::{SecondsFormat, Utc};
use log::{Level, LevelFilter, Log, Metadata, Record};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    level: &'a str,
    msg: &'a str,
    time: String,
}

/// Formats one log line (without the trailing newline).
pub fn format_line(format: LogFormat, level: Level, msg: &str) -> String {
    let time = Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true);
    let level = level.as_str().to_ascii_lowercase();
    match format {
        LogFormat::Json => serde_json::to_string(&JsonLine {
            level: &level,
            msg,
            time,
        })
        .unwrap_or_else(|_| String::from("{\"level\":\"error\",\"msg\":\"log encoding failed\"}")),
        LogFormat::Text => format!("time=\"{time}\" level={level} msg={msg:?}"),
    }
}

struct Logger {
    file: Option<Mutex<File>>,
    format: LogFormat,
    level: LevelFilter,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        match &self.file {
            Some(f) => {
                let line = format_line(self.format, record.level(), &msg);
                if let Ok(mut f) = f.lock() {
                    let _ = writeln!(f, "{line}");
                }
            }
            // Without --log, diagnostics go to stderr; errors are printed by main.
            None if record.level() > Level::Error => eprintln!("{}: {msg}", record.level()),
            None => {}
        }
    }

    fn flush(&self) {}
}

/// Installs the process-wide logger. `path` is opened for appending.
pub fn init(path: Option<&Path>, format: LogFormat, debug: bool) -> std::io::Result<()> {
    let file = match path {
        Some(p) => Some(Mutex::new(
            OpenOptions::new().create(true).append(true).open(p)?,
        )),
        None => None,
    };
    let level = if debug {
        LevelFilter::Debug
    } else if file.is_some() {
        LevelFilter::Info
    } else {
        LevelFilter::Warn
    };
    let logger = Logger {
        file,
        format,
        level,
    };
    log::set_max_level(level);
    // A second init (tests) keeps the first logger.
    let _ = log::set_boxed_logger(Box::new(logger));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_is_runc_shaped() {
        let line = format_line(
            LogFormat::Json,
            Level::Error,
            "container does not exist \"x\"",
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "container does not exist \"x\"");
        let t = v["time"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(t).expect("RFC3339 time");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn text_line_quotes_message() {
        let line = format_line(LogFormat::Text, Level::Warn, "a\nb");
        assert!(line.contains("level=warn"));
        assert!(line.contains("msg=\"a\\nb\""));
    }
}
