//! References to cartridges in a registry.
//!
//! Grammar: `[registry/]namespace/name[@selector]`, where the selector is a version (`v3`,
//! `1.2.0`, `v2.0.0-rc.1`), a tag (`latest`, `stable`) or an exact digest (`blake3:<64 hex>`); no
//! selector means the tag `latest`. The registry prefix is `host[:port]`.
//!
//! Versions and tags share the `@` position, so their grammars are disjoint: a selector that starts
//! with a digit, or with `v` and then a digit, is a version; any other is a tag.
//!
//! Every component becomes part of an object-store key, so the character set is small and
//! path tricks (`..`, `/`, control characters, uppercase that collides on case-insensitive disks)
//! are refused at parse time with a message naming the offending part.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::Digest;

pub const NAMESPACE_MAX_LEN: usize = 64;
pub const NAME_MAX_LEN: usize = 128;
pub const SELECTOR_MAX_LEN: usize = 128;
pub const REGISTRY_MAX_LEN: usize = 253;
pub const DEFAULT_TAG: &str = "latest";

/// A reference failed to parse; `reason` says exactly what is wrong with `input`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?}: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

impl ReferenceError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        Self {
            input: input.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Defines a validated string newtype with `FromStr`, `Display`, `AsRef<str>` and serde as a string.
macro_rules! validated_string {
    ($(#[$doc:meta])* $type:ident, $validate:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $type(String);

        impl $type {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $type {
            type Err = ReferenceError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let validate: fn(&str) -> Result<(), String> = $validate;
                validate(s).map_err(|reason| ReferenceError::new(s, reason))?;
                Ok(Self(s.to_owned()))
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $type {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_string!(
    /// The first path component: a team or owner (`legal`).
    Namespace,
    |s| validate_component("namespace", s, NAMESPACE_MAX_LEN)
);
validated_string!(
    /// The second path component: the cartridge (`contracts`).
    Name,
    |s| validate_component("name", s, NAME_MAX_LEN)
);
validated_string!(
    /// An immutable version (`v3`, `1.2.0`, `v2.0.0-rc.1+build.5`).
    Version,
    validate_version
);
validated_string!(
    /// A movable tag (`latest`, `stable`); always starts with a letter and never looks like a version.
    Tag,
    validate_tag
);
validated_string!(
    /// A registry host with an optional port (`registry.example.com`, `127.0.0.1:8080`, `[::1]:80`).
    Registry,
    validate_registry
);

impl Tag {
    pub fn latest() -> Self {
        Self(DEFAULT_TAG.to_owned())
    }
}

impl Version {
    /// Orders versions as people (and semantic versioning) read them: numbers by value (`v9`
    /// before `v10`, `rc.9` before `rc.10`), a pre-release before its release, the build
    /// ignored but for ties.
    pub fn precedence(&self) -> impl Ord + '_ {
        let rest = self.0.strip_prefix('v').unwrap_or(&self.0);
        let main = rest.split_once('+').map_or(rest, |(main, _)| main);
        let (core, prerelease) = main
            .split_once('-')
            .map_or((main, None), |(c, p)| (c, Some(p)));
        // A release (`true`) after its pre-releases; the whole text last, to break ties.
        (
            version_parts(core),
            prerelease.is_none(),
            prerelease.map(version_parts).unwrap_or_default(),
            &self.0,
        )
    }
}

/// A dot-separated part of a version: numbers by value (their digits' count without leading
/// zeros, then the digits, so any length compares), and before words.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum VersionPart<'a> {
    Number(usize, &'a str),
    Word(&'a str),
}

fn version_parts(text: &str) -> Vec<VersionPart<'_>> {
    text.split('.')
        .map(|part| {
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                let digits = part.trim_start_matches('0');
                VersionPart::Number(digits.len(), digits)
            } else {
                VersionPart::Word(part)
            }
        })
        .collect()
}

/// `namespace/name`: one cartridge's history of versions and tags.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Repository {
    pub namespace: Namespace,
    pub name: Name,
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for Repository {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((namespace, name)) = s.split_once('/') else {
            return Err(ReferenceError::new(s, "expected namespace/name"));
        };
        let wrap = |e: ReferenceError| ReferenceError::new(s, e.reason);
        Ok(Self {
            namespace: namespace.parse().map_err(wrap)?,
            name: name.parse().map_err(wrap)?,
        })
    }
}

/// What a reference picks within a repository.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    Version(Version),
    Tag(Tag),
    Digest(Digest),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Version(version) => version.fmt(f),
            Self::Tag(tag) => tag.fmt(f),
            Self::Digest(digest) => digest.fmt(f),
        }
    }
}

impl FromStr for Selector {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ReferenceError::new(
                s,
                "nothing after '@': expected a version, a tag or a blake3 digest",
            ));
        }
        if s.starts_with("blake3:") {
            return s
                .parse()
                .map(Self::Digest)
                .map_err(|e: crate::digest::DigestError| ReferenceError::new(s, e.reason));
        }
        if looks_like_version(s) {
            s.parse().map(Self::Version)
        } else {
            s.parse().map(Self::Tag)
        }
    }
}

/// `[registry/]namespace/name@selector`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    pub registry: Option<Registry>,
    pub repository: Repository,
    pub selector: Selector,
}

impl Reference {
    pub fn namespace(&self) -> &Namespace {
        &self.repository.namespace
    }

    pub fn name(&self) -> &Name {
        &self.repository.name
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(registry) = &self.registry {
            write!(f, "{registry}/")?;
        }
        write!(f, "{}@{}", self.repository, self.selector)
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ReferenceError::new(s, "reference is empty"));
        }
        let wrap = |e: ReferenceError| ReferenceError::new(s, e.reason);
        let (path, selector) = match s.split_once('@') {
            Some((path, selector)) => (path, selector.parse().map_err(wrap)?),
            None => (s, Selector::Tag(Tag::latest())),
        };
        let segments: Vec<&str> = path.split('/').collect();
        let (registry, namespace, name) = match segments[..] {
            [namespace, name] => (None, namespace, name),
            [registry, namespace, name] => (Some(registry), namespace, name),
            [_] => return Err(ReferenceError::new(s, "expected namespace/name")),
            _ => {
                return Err(ReferenceError::new(
                    s,
                    "too many '/': expected [registry/]namespace/name",
                ));
            }
        };
        let repository = Repository {
            namespace: namespace.parse().map_err(wrap)?,
            name: name.parse().map_err(wrap)?,
        };
        // After the repository: `legal/../x` is a path trick before it is a wrong host.
        let registry = registry.map(str::parse).transpose().map_err(wrap)?;
        Ok(Self {
            registry,
            repository,
            selector,
        })
    }
}

impl Serialize for Reference {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reference {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn is_separator(c: char) -> bool {
    matches!(c, '.' | '_' | '-')
}

/// The rules shared by namespaces, names and tags: lowercase alphanumerics separated by single
/// `.`, `_` or `-`, starting and ending with an alphanumeric.
fn validate_component(kind: &str, s: &str, max_len: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{kind} is empty"));
    }
    if s.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("{kind} must be lowercase"));
    }
    if let Some(c) = s
        .chars()
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || is_separator(c)))
    {
        return Err(format!(
            "{kind} contains {c:?}; allowed are a-z, 0-9, '.', '_' and '-'"
        ));
    }
    // After the characters: all ASCII now, bytes are characters.
    if s.len() > max_len {
        return Err(format!("{kind} is longer than {max_len} characters"));
    }
    if s.contains("..") {
        return Err(format!("{kind} must not contain '..'"));
    }
    if s.starts_with(is_separator) {
        return Err(format!("{kind} must start with a letter or digit"));
    }
    if s.ends_with(is_separator) {
        return Err(format!("{kind} must end with a letter or digit"));
    }
    if s.as_bytes()
        .windows(2)
        .any(|w| is_separator(w[0] as char) && is_separator(w[1] as char))
    {
        return Err(format!(
            "{kind} must not have two of '.', '_', '-' in a row"
        ));
    }
    Ok(())
}

fn looks_like_version(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_digit() => true,
        Some('v') => chars.next().is_some_and(|c| c.is_ascii_digit()),
        _ => false,
    }
}

fn validate_tag(s: &str) -> Result<(), String> {
    validate_component("tag", s, SELECTOR_MAX_LEN)?;
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(
            "tag must start with a letter (selectors starting with a digit are versions)".into(),
        );
    }
    if looks_like_version(s) {
        return Err("tag must not look like a version ('v' followed by a digit)".into());
    }
    Ok(())
}

fn validate_version(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("version is empty".into());
    }
    if s.len() > SELECTOR_MAX_LEN {
        return Err(format!(
            "version is longer than {SELECTOR_MAX_LEN} characters"
        ));
    }
    if s.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("version must be lowercase".into());
    }
    let shape = "version must be numbers separated by '.' (like v3 or 1.2.0), optionally followed by \
                 -prerelease and +build of a-z, 0-9, '.' and '-'";
    let rest = s.strip_prefix('v').unwrap_or(s);
    let (main, build) = match rest.split_once('+') {
        Some((main, build)) => (main, Some(build)),
        None => (rest, None),
    };
    let (core, prerelease) = match main.split_once('-') {
        Some((core, prerelease)) => (core, Some(prerelease)),
        None => (main, None),
    };
    if !core
        .split('.')
        .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(shape.into());
    }
    // Looser than semver's identifiers (an empty one passes, as `1-.`): names stored under an
    // older rule must stay readable, or garbage collection stops on them.
    let suffix_ok = |suffix: &str| {
        !suffix.is_empty()
            && suffix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && !suffix.contains("..")
    };
    if !prerelease.into_iter().chain(build).all(suffix_ok) {
        return Err(shape.into());
    }
    Ok(())
}

fn validate_registry(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("registry host is empty".into());
    }
    if s.len() > REGISTRY_MAX_LEN {
        return Err(format!(
            "registry host is longer than {REGISTRY_MAX_LEN} characters"
        ));
    }
    if s.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("registry host must be lowercase".into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (address, after) = rest
            .split_once(']')
            .ok_or("registry host has '[' without a closing ']'")?;
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("registry host has an invalid IPv6 address".into());
        }
        match after {
            "" => (None, None),
            _ => (
                None,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or("registry host: expected ':port' after ']'")?,
                ),
            ),
        }
    } else {
        match s.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(s), None),
        }
    };
    if let Some(host) = host {
        for label in host.split('.') {
            if label.is_empty() {
                return Err("registry host has an empty label".into());
            }
            if let Some(c) = label
                .chars()
                .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            {
                return Err(format!(
                    "registry host contains {c:?}; allowed are a-z, 0-9, '.', '-' and ':port'"
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err("registry host labels must not start or end with '-'".into());
            }
        }
    }
    // As container image references read it: a first segment of three that is no host (no '.',
    // no port, not localhost) is a typo, not a registry to send a token to.
    if let (Some(host), None) = (host, port)
        && !host.contains('.')
        && host != "localhost"
    {
        return Err(format!(
            "{host:?} is not a registry host (one has a '.' or a ':port', or is localhost)"
        ));
    }
    if let Some(port) = port {
        // Leading zeros or a sign would give one port several spellings, breaking display/parse
        // identity (and `parse` takes a '+').
        if port.starts_with('0')
            || !port.bytes().all(|b| b.is_ascii_digit())
            || !matches!(port.parse::<u16>(), Ok(1..))
        {
            return Err(format!(
                "registry port {port:?} is not a number from 1 to 65535"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn error(input: &str) -> String {
        input.parse::<Reference>().unwrap_err().to_string()
    }

    #[test]
    fn versions_order_as_read() {
        let mut versions: Vec<Version> = [
            "v10",
            "v1.10.0",
            "v9",
            "v1.2.0",
            "v1.2.0-rc.10",
            "v1.2.0-rc.9",
            "1.2.0+b2",
        ]
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
        versions.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
        let order: Vec<&str> = versions.iter().map(Version::as_str).collect();
        // Numbers of any length compare by value.
        let long = |digits: &str| -> Version { format!("v1-rc.{digits}").parse().unwrap() };
        let (shorter, longer) = (long(&"9".repeat(41)), long(&format!("1{}", "0".repeat(41))));
        assert!(shorter.precedence() < longer.precedence());
        assert_eq!(
            order,
            [
                "v1.2.0-rc.9",
                "v1.2.0-rc.10",
                "1.2.0+b2",
                "v1.2.0",
                "v1.10.0",
                "v9",
                "v10"
            ]
        );
    }

    #[test]
    fn parses_every_form() {
        let r: Reference = "legal/contracts".parse().unwrap();
        assert_eq!(r.registry, None);
        assert_eq!(r.namespace().as_str(), "legal");
        assert_eq!(r.name().as_str(), "contracts");
        assert_eq!(r.selector, Selector::Tag(Tag::latest()));
        assert_eq!(r.to_string(), "legal/contracts@latest");

        let r: Reference = "legal/contracts@v3".parse().unwrap();
        assert_eq!(r.selector, Selector::Version("v3".parse().unwrap()));

        let r: Reference = "legal/contracts@stable".parse().unwrap();
        assert_eq!(r.selector, Selector::Tag("stable".parse().unwrap()));

        let digest = Digest::of(b"manifest");
        let r: Reference = format!("legal/contracts@{digest}").parse().unwrap();
        assert_eq!(r.selector, Selector::Digest(digest));

        let r: Reference = "localhost:5000/legal/contracts@1.2.0-rc.1+b7"
            .parse()
            .unwrap();
        assert_eq!(r.registry.as_ref().unwrap().as_str(), "localhost:5000");
        assert_eq!(
            r.selector,
            Selector::Version("1.2.0-rc.1+b7".parse().unwrap())
        );
        assert_eq!(
            r.to_string(),
            "localhost:5000/legal/contracts@1.2.0-rc.1+b7"
        );

        let r: Reference = "[::1]:8080/a/b@v1".parse().unwrap();
        assert_eq!(r.registry.unwrap().as_str(), "[::1]:8080");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(error("Legal/x"), "\"Legal/x\": namespace must be lowercase");
        assert_eq!(error("legal"), "\"legal\": expected namespace/name");
        assert_eq!(error(""), "\"\": reference is empty");
        assert_eq!(
            error("a/b/c/d"),
            "\"a/b/c/d\": too many '/': expected [registry/]namespace/name"
        );
        assert!(error("legal/../x").contains("namespace must not contain '..'"));
        assert!(error("legal/..").contains("name must not contain '..'"));
        assert!(error("legal/con tracts").contains("name contains ' '"));
        assert!(error("legal/con\u{7}").contains(r"name contains '\u{7}'"));
        assert!(error("legal/.hidden").contains("name must start with a letter or digit"));
        assert!(error("legal/x-").contains("name must end with a letter or digit"));
        assert!(error("legal/x@").contains("nothing after '@'"));
        assert!(error("legal/x@V3").contains("must be lowercase"));
        assert!(error("legal/x@v3x").contains("version must be numbers"));
        assert!(error("legal/x@blake3:abc").contains("64 hex"));
        assert!(error("Host:5000/a/b").contains("registry host must be lowercase"));
        assert!(error("host:99999/a/b").contains("not a number from 1 to 65535"));
        assert!(error("host:+80/a/b").contains("not a number from 1 to 65535"));
        // A typo's extra segment is no registry host to send a token to.
        assert!(error("legal/contracts/extra").contains("\"legal\" is not a registry host"));
        let local: Reference = "localhost/a/b".parse().unwrap();
        assert_eq!(local.registry.unwrap().as_str(), "localhost");
        assert!(error(&format!("{}/x", "a".repeat(65))).contains("namespace is longer than 64"));
        assert!(error("a/b@x@y").contains("tag contains '@'"));
        // The character is the problem, however long its bytes make the name.
        assert!(error(&format!("{}/x", "é".repeat(40))).contains("namespace contains 'é'"));
        assert!(error("[:]:80/a/b").contains("invalid IPv6 address"));
        assert!(error("[::1:/a/b").contains("without a closing"));
        for version in ["1-", "1+", "1-a..b"] {
            assert!(
                error(&format!("a/b@{version}")).contains("version must be numbers"),
                "{version}"
            );
        }
        let r: Reference = "a/b@1.2.3-rc.1+build.5".parse().unwrap();
        assert_eq!(r.to_string(), "a/b@1.2.3-rc.1+build.5");
    }

    #[test]
    fn component_parse_names_the_kind() {
        assert_eq!(
            "Legal".parse::<Namespace>().unwrap_err().to_string(),
            "\"Legal\": namespace must be lowercase"
        );
        assert!(
            "a/b"
                .parse::<Name>()
                .unwrap_err()
                .to_string()
                .contains("name contains '/'")
        );
        assert!(
            "1abc"
                .parse::<Tag>()
                .unwrap_err()
                .to_string()
                .contains("tag must start with a letter")
        );
        assert!(
            "v2".parse::<Tag>()
                .unwrap_err()
                .to_string()
                .contains("must not look like a version")
        );
        assert!("latest".parse::<Version>().is_err());
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,3}"
    }

    fn selector() -> impl Strategy<Value = Selector> {
        prop_oneof![
            "v?[0-9]{1,4}(\\.[0-9]{1,4}){0,2}(-[a-z0-9]{1,6}(\\.[a-z0-9]{1,4})?)?(\\+[a-z0-9]{1,6})?"
                .prop_map(|s| Selector::Version(s.parse().unwrap())),
            "[a-uw-z][a-z0-9]{0,8}([._-][a-z0-9]{1,8}){0,2}".prop_map(|s| Selector::Tag(s.parse().unwrap())),
            any::<[u8; 32]>().prop_map(|b| Selector::Digest(Digest::from_bytes(b))),
        ]
    }

    fn registry() -> impl Strategy<Value = Option<Registry>> {
        proptest::option::of(
            "[a-z][a-z0-9-]{0,8}[a-z0-9]((\\.[a-z]{2,5}){1,2}(:[1-9][0-9]{0,3})?|:[1-9][0-9]{0,3})"
                .prop_map(|s| s.parse().unwrap()),
        )
    }

    fn reference() -> impl Strategy<Value = Reference> {
        (registry(), component(), component(), selector()).prop_map(
            |(registry, namespace, name, selector)| Reference {
                registry,
                repository: Repository {
                    namespace: namespace.parse().unwrap(),
                    name: name.parse().unwrap(),
                },
                selector,
            },
        )
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(r in reference()) {
            let text = r.to_string();
            prop_assert_eq!(text.parse::<Reference>().unwrap(), r);
        }

        #[test]
        fn serde_round_trip(r in reference()) {
            let json = serde_json::to_string(&r).unwrap();
            prop_assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
        }

        #[test]
        fn arbitrary_input_never_panics_and_reparses(s in "\\PC{0,40}|[a-zA-Z0-9./@:_-]{0,40}") {
            if let Ok(r) = s.parse::<Reference>() {
                prop_assert_eq!(r.to_string().parse::<Reference>().unwrap(), r);
            }
        }
    }
}
