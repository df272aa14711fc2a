//! Path globs over slash paths (`acme/*/assembly/**/temp*`), used by queries (`path ~ ...`)
//! and by watch and browse filters.
//!
//! A pattern is split on `/` into segments. A segment that is exactly `**` matches zero or more
//! path segments; inside any other segment `*` matches a run of characters and `?` one character,
//! never crossing a `/`. Everything else is literal.
//!
//! Matching never backtracks exponentially: both levels (segments, and characters within a
//! segment) use the iterative wildcard algorithm that remembers only the latest star, which is
//! enough because a star matches any sequence. Worst case is O(pattern × path).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("path glob {pattern:?} is empty")]
    Empty { pattern: String },
    #[error("path glob {pattern:?}: segment {index} is empty (two '/' in a row)")]
    EmptySegment { pattern: String, index: usize },
    #[error(
        "path glob {pattern:?}: segment {index} {segment:?} mixes `**` with other characters; `**` must be a whole segment"
    )]
    MixedDoubleStar {
        pattern: String,
        index: usize,
        segment: String,
    },
}

/// A parsed path glob. Consecutive `**` segments are merged (`a/**/**` equals `a/**`), so equal
/// globs compare equal and `Display` re-renders a pattern that parses back to the same glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathGlob {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: zero or more whole segments.
    AnyDepth,
    /// No wildcard: compared by equality.
    Literal(String),
    /// Contains `*` or `?`; `text` is kept for `Display`.
    Wild { text: String, tokens: Vec<Token> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Star,
    One,
    Char(char),
}

impl PathGlob {
    /// Parses `pattern`; a leading or trailing `/` is ignored.
    pub fn parse(pattern: &str) -> Result<PathGlob, GlobError> {
        let trimmed = pattern.trim_matches('/');
        if trimmed.is_empty() {
            return Err(GlobError::Empty {
                pattern: pattern.to_string(),
            });
        }
        let mut segments = Vec::new();
        for (index, text) in trimmed.split('/').enumerate() {
            let segment = if text.is_empty() {
                return Err(GlobError::EmptySegment {
                    pattern: pattern.to_string(),
                    index,
                });
            } else if text == "**" {
                Segment::AnyDepth
            } else if text.contains("**") {
                return Err(GlobError::MixedDoubleStar {
                    pattern: pattern.to_string(),
                    index,
                    segment: text.to_string(),
                });
            } else if text.contains(['*', '?']) {
                let tokens = text
                    .chars()
                    .map(|c| match c {
                        '*' => Token::Star,
                        '?' => Token::One,
                        c => Token::Char(c),
                    })
                    .collect();
                Segment::Wild {
                    text: text.to_string(),
                    tokens,
                }
            } else {
                Segment::Literal(text.to_string())
            };
            if segment == Segment::AnyDepth && segments.last() == Some(&Segment::AnyDepth) {
                continue;
            }
            segments.push(segment);
        }
        Ok(PathGlob { segments })
    }

    /// True if the slash path `path` (no leading `/`) matches the whole pattern.
    pub fn matches(&self, path: &str) -> bool {
        // Text position is a clone of the segment iterator, so no allocation per match.
        let mut rest = path.split('/');
        if path.is_empty() {
            // An empty path has zero segments, not one empty one.
            rest.next();
        }
        let mut p = 0;
        // After a `**`: the pattern index following it and the path position it last resumed at.
        let mut backtrack: Option<(usize, std::str::Split<'_, char>)> = None;
        loop {
            let mut after = rest.clone();
            let next = after.next();
            match (self.segments.get(p), next) {
                (Some(Segment::AnyDepth), _) => {
                    p += 1;
                    backtrack = Some((p, rest.clone()));
                    continue;
                }
                (Some(segment), Some(text)) if segment.matches(text) => {
                    p += 1;
                    rest = after;
                    continue;
                }
                (None, None) => return true,
                _ => {}
            }
            // Mismatch: let the latest `**` swallow one more segment and retry after it.
            let Some((resume_p, resume_at)) = backtrack.as_mut() else {
                return false;
            };
            if resume_at.next().is_none() {
                return false;
            }
            p = *resume_p;
            rest = resume_at.clone();
        }
    }

    /// The segments before the first wildcard, joined with `/` (`acme/berlin` for
    /// `acme/berlin/*/line-*/**`); `None` if the first segment has a wildcard. Every path the glob
    /// matches is this path or lies below it, so a caller can narrow a prefix scan to it.
    pub fn literal_prefix(&self) -> Option<String> {
        let literals: Vec<&str> = self
            .segments
            .iter()
            .map_while(|s| match s {
                Segment::Literal(text) => Some(text.as_str()),
                _ => None,
            })
            .collect();
        if literals.is_empty() {
            None
        } else {
            Some(literals.join("/"))
        }
    }
}

impl Segment {
    fn matches(&self, text: &str) -> bool {
        match self {
            // Callers handle `**` before asking a single segment.
            Segment::AnyDepth => true,
            Segment::Literal(literal) => literal == text,
            Segment::Wild { tokens, .. } => wild_matches(tokens, text),
        }
    }
}

/// `*`/`?` matching within one segment; positions in `text` are byte offsets on char boundaries.
fn wild_matches(tokens: &[Token], text: &str) -> bool {
    let mut p = 0;
    let mut t = 0;
    // After a `*`: the token index following it and the text offset it last resumed at.
    let mut backtrack: Option<(usize, usize)> = None;
    loop {
        let c = text[t..].chars().next();
        match (tokens.get(p), c) {
            (Some(Token::Star), _) => {
                p += 1;
                backtrack = Some((p, t));
                continue;
            }
            (Some(Token::One), Some(c)) => {
                p += 1;
                t += c.len_utf8();
                continue;
            }
            (Some(Token::Char(want)), Some(c)) if *want == c => {
                p += 1;
                t += c.len_utf8();
                continue;
            }
            (None, None) => return true,
            _ => {}
        }
        let Some((resume_p, resume_t)) = backtrack.as_mut() else {
            return false;
        };
        let Some(swallowed) = text[*resume_t..].chars().next() else {
            return false;
        };
        *resume_t += swallowed.len_utf8();
        p = *resume_p;
        t = *resume_t;
    }
}

impl fmt::Display for PathGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            match segment {
                Segment::AnyDepth => f.write_str("**")?,
                Segment::Literal(text) | Segment::Wild { text, .. } => f.write_str(text)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts `pattern` matches exactly the paths listed as `true`.
    fn check(pattern: &str, cases: &[(&str, bool)]) {
        let glob = PathGlob::parse(pattern).expect("valid pattern");
        for (path, expected) in cases {
            assert_eq!(
                glob.matches(path),
                *expected,
                "{pattern:?} against {path:?}"
            );
        }
    }

    #[test]
    fn trailing_double_star_matches_the_prefix_and_everything_below() {
        check(
            "acme/**",
            &[
                ("acme", true),
                ("acme/berlin", true),
                ("acme/berlin/assembly/line-1/press-3/temp", true),
                ("acmex", false),
                ("globex/acme", false),
            ],
        );
    }

    #[test]
    fn double_star_in_the_middle_matches_zero_or_more_segments() {
        check(
            "*/berlin/**/temp*",
            &[
                ("acme/berlin/temp", true),
                ("acme/berlin/assembly/line-1/press-3/temp-1", true),
                ("globex/berlin/x/temperature", true),
                ("acme/paris/assembly/temp", false),
                ("acme/berlin/assembly/press", false),
                ("berlin/temp", false),
            ],
        );
    }

    #[test]
    fn lone_double_star_matches_every_path() {
        check(
            "**",
            &[
                ("", true),
                ("acme", true),
                ("acme/berlin/assembly/line-1/press-3/temp", true),
            ],
        );
    }

    #[test]
    fn star_stays_within_one_segment() {
        check(
            "acme/*/assembly",
            &[
                ("acme/berlin/assembly", true),
                ("acme/berlin/x/assembly", false),
                ("acme/assembly", false),
            ],
        );
        check(
            "line-*",
            &[("line-", true), ("line-12", true), ("line", false)],
        );
    }

    #[test]
    fn question_mark_matches_exactly_one_character() {
        check(
            "acme/line-?",
            &[
                ("acme/line-1", true),
                ("acme/line-é", true),
                ("acme/line-", false),
                ("acme/line-12", false),
            ],
        );
    }

    #[test]
    fn literal_segments_match_exactly() {
        check(
            "acme/berlin",
            &[
                ("acme/berlin", true),
                ("acme/berlin/assembly", false),
                ("acme", false),
                ("acme/berlinx", false),
            ],
        );
    }

    #[test]
    fn leading_and_trailing_slashes_are_ignored() {
        assert_eq!(
            PathGlob::parse("/acme/*/").expect("valid"),
            PathGlob::parse("acme/*").expect("valid")
        );
    }

    #[test]
    fn consecutive_double_stars_are_merged() {
        let glob = PathGlob::parse("acme/**/**/**/temp").expect("valid");
        assert_eq!(glob, PathGlob::parse("acme/**/temp").expect("valid"));
        assert_eq!(glob.to_string(), "acme/**/temp");
    }

    #[test]
    fn display_parses_back_to_the_same_glob() {
        for pattern in ["acme", "/acme/b?rlin/**/t*mp*/", "**", "*/x/**"] {
            let glob = PathGlob::parse(pattern).expect("valid");
            assert_eq!(PathGlob::parse(&glob.to_string()).expect("valid"), glob);
        }
    }

    #[test]
    fn pathological_patterns_match_in_polynomial_time() {
        // With naive recursion these take ~C(60, 30) steps and never finish.
        let pattern = "**/a/".repeat(30) + "b";
        let path = vec!["a"; 60].join("/");
        let glob = PathGlob::parse(&pattern).expect("valid");
        assert!(!glob.matches(&path));
        assert!(glob.matches(&format!("{path}/b")));

        let segment = "*a".repeat(40) + "*b";
        let glob = PathGlob::parse(&segment).expect("valid");
        assert!(!glob.matches(&"a".repeat(4000)));
        assert!(glob.matches(&("a".repeat(4000) + "b")));
    }

    /// Obviously-correct exponential matcher, for comparing on small inputs.
    fn naive(pattern: &[&str], path: &[&str]) -> bool {
        fn chars(p: &[char], t: &[char]) -> bool {
            match p.split_first() {
                None => t.is_empty(),
                Some(('*', rest)) => (0..=t.len()).any(|i| chars(rest, &t[i..])),
                Some(('?', rest)) => !t.is_empty() && chars(rest, &t[1..]),
                Some((c, rest)) => t.first() == Some(c) && chars(rest, &t[1..]),
            }
        }
        match pattern.split_first() {
            None => path.is_empty(),
            Some((&"**", rest)) => (0..=path.len()).any(|i| naive(rest, &path[i..])),
            Some((seg, rest)) => path.split_first().is_some_and(|(first, tail)| {
                let p: Vec<char> = seg.chars().collect();
                let t: Vec<char> = first.chars().collect();
                chars(&p, &t) && naive(rest, tail)
            }),
        }
    }

    #[test]
    fn agrees_with_a_naive_matcher_on_small_inputs() {
        let pattern_segments = ["a", "b", "*", "a*", "*b", "?", "a?b*", "**"];
        let path_segments = ["a", "b", "ab", "aab", "ba"];
        let mut patterns: Vec<Vec<&str>> = vec![vec![]];
        let mut paths: Vec<Vec<&str>> = vec![vec![]];
        for _ in 0..3 {
            let longer: Vec<Vec<&str>> = patterns
                .iter()
                .flat_map(|p| {
                    pattern_segments
                        .iter()
                        .map(move |s| [p.clone(), vec![*s]].concat())
                })
                .collect();
            patterns.extend(longer);
            let longer: Vec<Vec<&str>> = paths
                .iter()
                .flat_map(|p| {
                    path_segments
                        .iter()
                        .map(move |s| [p.clone(), vec![*s]].concat())
                })
                .collect();
            paths.extend(longer);
        }
        patterns.dedup();
        paths.dedup();
        for pattern in patterns.iter().filter(|p| !p.is_empty()) {
            let glob = PathGlob::parse(&pattern.join("/")).expect("valid");
            for path in paths.iter().filter(|p| !p.is_empty()) {
                assert_eq!(
                    glob.matches(&path.join("/")),
                    naive(pattern, path),
                    "{pattern:?} against {path:?}"
                );
            }
        }
    }

    #[test]
    fn rejects_empty_patterns() {
        for pattern in ["", "/", "//"] {
            assert!(matches!(
                PathGlob::parse(pattern),
                Err(GlobError::Empty { .. })
            ));
        }
    }

    #[test]
    fn rejects_empty_segments_naming_their_index() {
        let err = PathGlob::parse("acme//temp").expect_err("empty segment");
        assert_eq!(
            err,
            GlobError::EmptySegment {
                pattern: "acme//temp".into(),
                index: 1
            }
        );
        assert_eq!(
            err.to_string(),
            "path glob \"acme//temp\": segment 1 is empty (two '/' in a row)"
        );
    }

    #[test]
    fn rejects_double_star_mixed_with_other_characters() {
        for (pattern, index, segment) in [("acme/temp**", 1, "temp**"), ("***", 0, "***")] {
            assert_eq!(
                PathGlob::parse(pattern),
                Err(GlobError::MixedDoubleStar {
                    pattern: pattern.into(),
                    index,
                    segment: segment.into()
                })
            );
        }
    }

    #[test]
    fn literal_prefix_stops_at_the_first_wildcard() {
        let prefix = |p: &str| PathGlob::parse(p).expect("valid").literal_prefix();
        assert_eq!(
            prefix("acme/berlin/*/line-*/**").as_deref(),
            Some("acme/berlin")
        );
        assert_eq!(prefix("acme/berlin").as_deref(), Some("acme/berlin"));
        assert_eq!(prefix("acme/**/temp").as_deref(), Some("acme"));
        assert_eq!(prefix("ac?e/berlin"), None);
        assert_eq!(prefix("**/temp"), None);
    }
}
