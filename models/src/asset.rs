//! ISA-95 asset identity: levels, slash-separated paths and stable UUID v5 ids.

use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

/// ISA-95 level of an asset; follows from the depth of its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Enterprise,
    Site,
    Area,
    Line,
    Machine,
    Sensor,
}

impl Level {
    pub const ALL: [Level; 6] = [
        Level::Enterprise,
        Level::Site,
        Level::Area,
        Level::Line,
        Level::Machine,
        Level::Sensor,
    ];

    /// Level of a path with `depth` segments (1 = enterprise).
    pub fn from_depth(depth: usize) -> Option<Level> {
        Level::ALL.get(depth.checked_sub(1)?).copied()
    }

    pub fn depth(self) -> usize {
        self as usize + 1
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Enterprise => "enterprise",
            Level::Site => "site",
            Level::Area => "area",
            Level::Line => "line",
            Level::Machine => "machine",
            Level::Sensor => "sensor",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.as_str() == s)
    }

    /// The level one below this one, `None` for sensors.
    pub fn child(self) -> Option<Level> {
        Level::from_depth(self.depth() + 1)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("asset path is empty")]
    Empty,
    #[error(
        "asset path {path:?} has {depth} segments; at most 6 (enterprise/site/area/line/machine/sensor)"
    )]
    TooDeep { path: String, depth: usize },
    #[error(
        "asset path {path:?}: segment {index} {segment:?} is not a slug ([a-z0-9][a-z0-9_-]*, at most 64 chars)"
    )]
    BadSegment {
        path: String,
        index: usize,
        segment: String,
    },
}

/// Validated path `enterprise/site/area/line/machine/sensor` (1 to 6 slug segments).
/// Cheap to clone: the text is shared.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AssetPath(Arc<str>);

pub const MAX_SEGMENT_LEN: usize = 64;

pub fn is_slug(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_SEGMENT_LEN
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Longest prefix of a client's text an error quotes (longer text is cut and its length
/// named), so a huge input never makes a huge error.
pub const MAX_QUOTE: usize = 96;

/// `s`, or its first `MAX_QUOTE` bytes (at a char boundary) and how long it was.
pub fn quote_prefix(s: &str) -> String {
    if s.len() <= MAX_QUOTE {
        return s.to_string();
    }
    let mut end = MAX_QUOTE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

impl AssetPath {
    pub fn parse(s: &str) -> Result<AssetPath, PathError> {
        let s = s.trim_matches('/');
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        let mut depth = 0;
        for (index, segment) in s.split('/').enumerate() {
            depth += 1;
            if !is_slug(segment) {
                return Err(PathError::BadSegment {
                    path: quote_prefix(s),
                    index,
                    segment: quote_prefix(segment),
                });
            }
        }
        if depth > 6 {
            return Err(PathError::TooDeep {
                path: quote_prefix(s),
                depth,
            });
        }
        Ok(AssetPath(Arc::from(s)))
    }

    /// Path of a child named `segment` (validated).
    pub fn child(&self, segment: &str) -> Result<AssetPath, PathError> {
        AssetPath::parse(&format!("{}/{}", self.0, segment))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn depth(&self) -> usize {
        self.0.bytes().filter(|b| *b == b'/').count() + 1
    }

    pub fn level(&self) -> Level {
        Level::from_depth(self.depth()).expect("a parsed path has 1..=6 segments")
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Last segment: the asset's own name.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    pub fn parent(&self) -> Option<AssetPath> {
        self.0
            .rfind('/')
            .map(|i| AssetPath(Arc::from(&self.0[..i])))
    }

    /// True if `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &AssetPath) -> bool {
        self.0.len() >= other.0.len()
            && self.0.starts_with(&*other.0)
            && (self.0.len() == other.0.len() || self.0.as_bytes()[other.0.len()] == b'/')
    }

    pub fn id(&self) -> AssetId {
        AssetId::of(self)
    }
}

impl fmt::Display for AssetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AssetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// Fixed namespace of every ferrotwin asset id. Never change it: ids are on disk and on
/// the replication wire, and a site twin and its enterprise mirror must agree.
pub const ASSET_NAMESPACE: Uuid = Uuid::from_u128(0x6f0c_2a47_1d5e_4b8f_9a3c_e1f2_7d40_b915);

/// UUID v5 of the asset path under [`ASSET_NAMESPACE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AssetId(pub Uuid);

impl AssetId {
    pub fn of(path: &AssetPath) -> AssetId {
        AssetId(Uuid::new_v5(&ASSET_NAMESPACE, path.as_str().as_bytes()))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub fn from_bytes(b: [u8; 16]) -> AssetId {
        AssetId(Uuid::from_bytes(b))
    }
}

impl fmt::Display for AssetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_follows_from_depth() {
        let p = AssetPath::parse("acme/berlin/assembly/line-1/press-3/temp").expect("valid");
        assert_eq!(p.level(), Level::Sensor);
        assert_eq!(p.name(), "temp");
        let parent = p.parent().expect("has parent");
        assert_eq!(parent.as_str(), "acme/berlin/assembly/line-1/press-3");
        assert_eq!(parent.level(), Level::Machine);
        assert!(p.starts_with(&parent));
        assert!(!parent.starts_with(&p));
        let other = AssetPath::parse("acme/berlin/assembly/line-10").expect("valid");
        assert!(
            !other.starts_with(&AssetPath::parse("acme/berlin/assembly/line-1").expect("valid"))
        );
    }

    #[test]
    fn rejects_bad_segments_and_depth() {
        assert!(matches!(
            AssetPath::parse("acme/Berlin"),
            Err(PathError::BadSegment { index: 1, .. })
        ));
        assert!(matches!(AssetPath::parse(""), Err(PathError::Empty)));
        assert!(matches!(
            AssetPath::parse("a/b/c/d/e/f/g"),
            Err(PathError::TooDeep { depth: 7, .. })
        ));
        assert!(AssetPath::parse("a//b").is_err());
    }

    #[test]
    fn a_huge_bad_path_makes_a_short_error() {
        let huge = "X".repeat(3 << 20);
        let e = AssetPath::parse(&huge).expect_err("not a slug").to_string();
        assert!(e.len() < 400, "{} bytes", e.len());
        assert!(e.contains("3145728 bytes"), "{e}");
        let deep = vec!["a"; 10_000].join("/");
        let e = AssetPath::parse(&deep).expect_err("too deep").to_string();
        assert!(e.len() < 400 && e.contains("10000 segments"), "{e}");
    }

    #[test]
    fn ids_are_stable_v5_of_the_path() {
        let p = AssetPath::parse("acme/berlin").expect("valid");
        assert_eq!(
            p.id(),
            AssetPath::parse("/acme/berlin/").expect("valid").id()
        );
        assert_eq!(p.id().0.get_version_num(), 5);
        assert_ne!(p.id(), AssetPath::parse("acme/paris").expect("valid").id());
    }
}
