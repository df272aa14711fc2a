//! Ground-truth label files: one CSV line per fault, so detectors can be scored against what
//! the simulator really did.
//!
//! ```text
//! asset,kind,start_us,end_us
//! acme/berlin/assembly/line-1/oven-1/zone-1-temp,overheating,1764000600000000,1764000720000000
//! ```
//!
//! Times are microseconds since the Unix epoch, the readings' `source_ts`. A spike has
//! `end_us == start_us`; an empty `end_us` is a fault still in progress (`PlantSim::final_labels`
//! ends those at the end of the run, so a finished run writes none). Asset paths and kind names
//! are slugs, so no field ever needs quoting.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ferrotwin_models::{AssetPath, Timestamp};

use crate::model::{FaultKind, FaultLabel};

pub const LABELS_HEADER: &str = "asset,kind,start_us,end_us";

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("{}: cannot write the labels", .file.display())]
    Write {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot read the labels", .file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:1: header is {found:?}, expected {LABELS_HEADER:?}", .file.display())]
    Header { file: PathBuf, found: String },
    #[error("{}:{line}: {field}: {problem}", .file.display())]
    Field {
        file: PathBuf,
        line: usize,
        field: &'static str,
        problem: String,
    },
}

/// Writes `labels` to `path` (replacing it) with a header line, in the order given.
pub fn write_labels(path: &Path, labels: &[FaultLabel]) -> Result<(), LabelError> {
    let write_err = |source| LabelError::Write {
        file: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(path).map_err(write_err)?;
    let mut out = BufWriter::new(file);
    writeln!(out, "{LABELS_HEADER}").map_err(write_err)?;
    for l in labels {
        write!(out, "{},{},{},", l.asset, l.kind.as_str(), l.start.0).map_err(write_err)?;
        match l.end {
            Some(end) => writeln!(out, "{}", end.0),
            None => writeln!(out),
        }
        .map_err(write_err)?;
    }
    out.flush().map_err(write_err)
}

/// Reads a file `write_labels` wrote (or a hand-written one in the same format).
pub fn read_labels(path: &Path) -> Result<Vec<FaultLabel>, LabelError> {
    let text = std::fs::read_to_string(path).map_err(|source| LabelError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or("");
    if header.trim_end() != LABELS_HEADER {
        return Err(LabelError::Header {
            file: path.to_path_buf(),
            found: header.to_string(),
        });
    }
    let mut labels = Vec::new();
    for (i, line) in lines.enumerate() {
        let line_no = i + 2;
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let bad = |field: &'static str, problem: String| LabelError::Field {
            file: path.to_path_buf(),
            line: line_no,
            field,
            problem,
        };
        let fields: Vec<&str> = line.split(',').collect();
        let [asset, kind, start, end] = fields[..] else {
            return Err(bad(
                "line",
                format!("{} fields, expected 4 ({LABELS_HEADER})", fields.len()),
            ));
        };
        let asset = AssetPath::parse(asset).map_err(|e| bad("asset", e.to_string()))?;
        let kind = FaultKind::parse(kind)
            .ok_or_else(|| bad("kind", format!("unknown fault kind {kind:?}")))?;
        let time = |field: &'static str, s: &str| {
            s.parse::<i64>().map(Timestamp).map_err(|_| {
                bad(
                    field,
                    format!("{s:?} is not a whole number of microseconds"),
                )
            })
        };
        let start = time("start_us", start)?;
        let end = match end {
            "" => None,
            e => Some(time("end_us", e)?),
        };
        labels.push(FaultLabel {
            asset,
            kind,
            start,
            end,
        });
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> AssetPath {
        AssetPath::parse(s).expect("test path is valid")
    }

    #[test]
    fn labels_round_trip_through_csv_with_header() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("labels.csv");
        let labels = vec![
            FaultLabel {
                asset: path("acme/berlin/assembly/line-1/oven-1/zone-1-temp"),
                kind: FaultKind::Overheating,
                start: Timestamp(1_764_000_600_000_000),
                end: Some(Timestamp(1_764_000_720_000_000)),
            },
            FaultLabel {
                asset: path("acme/berlin/assembly/line-1/press-1"),
                kind: FaultKind::NetworkLoss,
                start: Timestamp(5),
                end: None,
            },
        ];
        write_labels(&file, &labels).expect("writes");
        let text = std::fs::read_to_string(&file).expect("reads back");
        assert_eq!(
            text,
            "asset,kind,start_us,end_us\n\
             acme/berlin/assembly/line-1/oven-1/zone-1-temp,overheating,1764000600000000,1764000720000000\n\
             acme/berlin/assembly/line-1/press-1,network_loss,5,\n"
        );
        assert_eq!(read_labels(&file).expect("parses"), labels);
    }

    #[test]
    fn reading_a_bad_label_file_names_file_line_and_field() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("labels.csv");
        std::fs::write(&file, "asset,kind,start_us,end_us\nacme/a,melting,1,2\n").expect("write");
        let err = read_labels(&file).expect_err("unknown kind");
        assert_eq!(
            err.to_string(),
            format!("{}:2: kind: unknown fault kind \"melting\"", file.display())
        );
        std::fs::write(&file, "asset,kind\n").expect("write");
        let err = read_labels(&file).expect_err("bad header");
        assert!(matches!(err, LabelError::Header { .. }), "{err}");
    }
}
