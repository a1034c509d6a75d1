//! Bearer tokens: HS256 JWTs whose claims carry scopes such as `legal/*:pull`,
//! `legal/contracts:push` or `*:admin`.
//!
//! Keys live in a keyring with a key id each; tokens name the key that signed them in their
//! header, so a new signing key can be added while tokens signed by the old one stay valid until
//! the old key is removed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cartridge_schemas::reference::{Name, Namespace, Repository};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
    #[error("token signed with unknown key {0:?}")]
    UnknownKey(String),
    #[error("invalid scope {scope:?}: {reason}")]
    BadScope { scope: String, reason: String },
    #[error("keyring {path}: {detail}")]
    Keyring { path: String, detail: String },
}

/// What a scope grants; each level includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Pull,
    Push,
    Admin,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pull => "pull",
            Self::Push => "push",
            Self::Admin => "admin",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// `*`: every namespace.
    All,
    /// `ns/*`: every repository of one namespace.
    Namespace(Namespace),
    /// `ns/name`: one repository.
    Repository(Repository),
}

/// `pattern:action`, e.g. `legal/*:pull`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    pub pattern: Pattern,
    pub action: Action,
}

impl Scope {
    /// Does this scope grant `action` on `namespace` (and `name`, when the request is about one
    /// repository; `None` for namespace-wide requests such as changing its settings)?
    pub fn allows(&self, namespace: &Namespace, name: Option<&Name>, action: Action) -> bool {
        self.action >= action
            && match &self.pattern {
                Pattern::All => true,
                Pattern::Namespace(ns) => ns == namespace,
                Pattern::Repository(repo) => {
                    &repo.namespace == namespace && name == Some(&repo.name)
                }
            }
    }

    /// Does this scope grant anything at all within `namespace`?
    pub fn touches(&self, namespace: &Namespace) -> bool {
        match &self.pattern {
            Pattern::All => true,
            Pattern::Namespace(ns) => ns == namespace,
            Pattern::Repository(repo) => &repo.namespace == namespace,
        }
    }
}

impl FromStr for Scope {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| AuthError::BadScope {
            scope: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (pattern, action) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected pattern:action"))?;
        let action = match action {
            "pull" => Action::Pull,
            "push" => Action::Push,
            "admin" => Action::Admin,
            _ => return Err(bad("the action must be pull, push or admin")),
        };
        let pattern = match pattern.split_once('/') {
            None if pattern == "*" => Pattern::All,
            Some((namespace, "*")) => Pattern::Namespace(
                namespace
                    .parse()
                    .map_err(|e: cartridge_schemas::reference::ReferenceError| bad(&e.reason))?,
            ),
            Some(_) => Pattern::Repository(
                pattern
                    .parse()
                    .map_err(|e: cartridge_schemas::reference::ReferenceError| bad(&e.reason))?,
            ),
            None => return Err(bad("the pattern must be *, namespace/* or namespace/name")),
        };
        Ok(Self { pattern, action })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pattern {
            Pattern::All => write!(f, "*:{}", self.action),
            Pattern::Namespace(ns) => write!(f, "{ns}/*:{}", self.action),
            Pattern::Repository(repo) => write!(f, "{repo}:{}", self.action),
        }
    }
}

/// The claims of a token, as signed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WireClaims {
    sub: String,
    scopes: Vec<String>,
    iat: u64,
    exp: u64,
    /// Not valid before (minted by another issuer; ours set none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

/// A verified token: who, and what they may do.
#[derive(Debug, Clone)]
pub struct Claims {
    pub subject: String,
    pub scopes: Vec<Scope>,
}

impl Claims {
    pub fn allows(&self, namespace: &Namespace, name: Option<&Name>, action: Action) -> bool {
        self.scopes
            .iter()
            .any(|scope| scope.allows(namespace, name, action))
    }
}

/// Signing keys by id; `signing` names the one new tokens are signed with.
#[derive(Clone, Serialize, Deserialize)]
pub struct Keyring {
    signing: String,
    keys: BTreeMap<String, String>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secrets.
        f.debug_struct("Keyring")
            .field("signing", &self.signing)
            .field("key_ids", &self.keys.keys())
            .finish()
    }
}

fn random_secret() -> String {
    (0..4)
        .map(|_| format!("{:032x}", rand::random::<u128>()))
        .collect()
}

/// Key ids carry their creation time (for operators) and a random part (so two keys made in the
/// same second, or by two operators, never share an id).
fn new_key_id() -> String {
    format!("k{}-{:04x}", unix_now(), rand::random::<u16>())
}

/// How far ahead of this machine's clock a token's issuing clock may run.
const CLOCK_SKEW: u64 = 300;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Keyring {
    /// A keyring with one fresh key.
    pub fn generate() -> Self {
        let id = new_key_id();
        Self {
            keys: BTreeMap::from([(id.clone(), random_secret())]),
            signing: id,
        }
    }

    /// Adds a fresh key and signs with it from now on; older keys still verify.
    pub fn rotate(&mut self) -> String {
        let id = new_key_id();
        self.keys.insert(id.clone(), random_secret());
        self.signing = id.clone();
        id
    }

    /// Drops a key; tokens it signed stop verifying.
    pub fn remove(&mut self, id: &str) -> Result<(), AuthError> {
        if id == self.signing {
            return Err(AuthError::Invalid(format!(
                "{id} is the signing key; rotate first"
            )));
        }
        self.keys
            .remove(id)
            .map(drop)
            .ok_or_else(|| AuthError::UnknownKey(id.to_owned()))
    }

    pub fn from_json(json: &str, origin: &str) -> Result<Self, AuthError> {
        let bad = |detail: String| AuthError::Keyring {
            path: origin.to_owned(),
            detail,
        };
        // A missing, unknown or repeated field is named; otherwise only where and what kind of
        // error: serde's message quotes values, and a keyring encoded twice would print its
        // secrets.
        let keyring: Self = serde_json::from_str(json).map_err(|e| {
            let text = e.to_string();
            let names_a_field = ["missing field", "unknown field", "duplicate field"]
                .iter()
                .any(|kind| text.starts_with(kind));
            bad(if names_a_field {
                text
            } else {
                format!(
                    "not a keyring ({:?} error at line {}, column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                )
            })
        })?;
        if !keyring.keys.contains_key(&keyring.signing) {
            return Err(bad(format!(
                "the signing key {:?} is not in keys",
                keyring.signing
            )));
        }
        if let Some((id, _)) = keyring.keys.iter().find(|(_, secret)| secret.len() < 32) {
            return Err(bad(format!("key {id:?} is shorter than 32 characters")));
        }
        Ok(keyring)
    }

    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let origin = path.display().to_string();
        let json = std::fs::read_to_string(path).map_err(|e| AuthError::Keyring {
            path: origin.clone(),
            detail: e.to_string(),
        })?;
        Self::from_json(&json, &origin)
    }

    /// Writes the keyring readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), AuthError> {
        let origin = path.display().to_string();
        let fail = |e: std::io::Error| AuthError::Keyring {
            path: origin.clone(),
            detail: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let json = serde_json::to_string_pretty(self).map_err(|e| AuthError::Keyring {
            path: origin.clone(),
            detail: e.to_string(),
        })?;
        // A new file of its own (created 0600, never an existing one or a link someone left
        // there), synced, then renamed into place.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let mut file =
            tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new("."))).map_err(fail)?;
        std::io::Write::write_all(&mut file, json.as_bytes()).map_err(fail)?;
        file.as_file().sync_all().map_err(fail)?;
        file.persist(path).map_err(|e| fail(e.error))?;
        Ok(())
    }

    pub fn mint(
        &self,
        subject: &str,
        scopes: &[Scope],
        ttl: Duration,
    ) -> Result<String, AuthError> {
        let now = unix_now();
        let claims = WireClaims {
            sub: subject.to_owned(),
            scopes: scopes.iter().map(ToString::to_string).collect(),
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
            nbf: None,
        };
        self.sign(&claims)
    }

    /// A token of `claims`, signed with the signing key and naming it.
    fn sign(&self, claims: &WireClaims) -> Result<String, AuthError> {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.signing.clone());
        let secret = &self.keys[&self.signing];
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let id = header
            .kid
            .ok_or_else(|| AuthError::Invalid("no key id (kid) in the header".into()))?;
        let secret = self.keys.get(&id).ok_or(AuthError::UnknownKey(id))?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<WireClaims>(
            token,
            &DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        })?;
        // Issued, or valid only, in the future (past a clock's drift): minted with a clock set
        // wrong, or to outlive a key's rotation. (The expiry has no leeway: it is ours.)
        let latest = unix_now().saturating_add(CLOCK_SKEW);
        if data.claims.iat > latest {
            return Err(AuthError::Invalid(
                "the token was issued in the future".into(),
            ));
        }
        if data.claims.nbf.is_some_and(|nbf| nbf > latest) {
            return Err(AuthError::Invalid(
                "the token is not valid yet (its nbf)".into(),
            ));
        }
        let scopes = data
            .claims
            .scopes
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()?;
        Ok(Claims {
            subject: data.claims.sub,
            scopes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(s: &str) -> Scope {
        s.parse().unwrap()
    }

    #[test]
    fn scopes_parse_display_and_match() {
        for text in ["*:admin", "legal/*:pull", "legal/contracts:push"] {
            assert_eq!(scope(text).to_string(), text);
        }
        let legal: Namespace = "legal".parse().unwrap();
        let contracts: Name = "contracts".parse().unwrap();
        let other: Name = "other".parse().unwrap();
        assert!(scope("legal/*:pull").allows(&legal, Some(&contracts), Action::Pull));
        assert!(!scope("legal/*:pull").allows(&legal, Some(&contracts), Action::Push));
        assert!(scope("legal/contracts:push").allows(&legal, Some(&contracts), Action::Pull));
        assert!(!scope("legal/contracts:push").allows(&legal, Some(&other), Action::Pull));
        assert!(!scope("legal/contracts:admin").allows(&legal, None, Action::Admin));
        assert!(scope("*:admin").allows(&"hr".parse().unwrap(), None, Action::Admin));
        assert!(scope("legal/contracts:pull").touches(&legal));

        assert!(
            "legal:pull"
                .parse::<Scope>()
                .unwrap_err()
                .to_string()
                .contains("pattern must be")
        );
        assert!(
            "Legal/*:pull"
                .parse::<Scope>()
                .unwrap_err()
                .to_string()
                .contains("must be lowercase")
        );
        assert!(
            "*:write"
                .parse::<Scope>()
                .unwrap_err()
                .to_string()
                .contains("pull, push or admin")
        );
    }

    #[test]
    fn tokens_verify_across_rotation_and_fail_when_forged() {
        let mut keyring = Keyring::generate();
        let old = keyring
            .mint("alice", &[scope("legal/*:pull")], Duration::from_secs(60))
            .unwrap();
        keyring.rotate();
        let new = keyring
            .mint("bob", &[scope("*:admin")], Duration::from_secs(60))
            .unwrap();
        assert_eq!(keyring.verify(&old).unwrap().subject, "alice");
        assert_eq!(keyring.verify(&new).unwrap().scopes, vec![scope("*:admin")]);

        let other = Keyring::generate();
        let mut forged = other.clone();
        forged.signing = keyring.signing.clone();
        forged.keys = BTreeMap::from([(keyring.signing.clone(), random_secret())]);
        let forged = forged
            .mint("mallory", &[scope("*:admin")], Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            keyring.verify(&forged),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            keyring.verify("not.a.token"),
            Err(AuthError::Invalid(_))
        ));

        let expired = keyring.mint("carol", &[], Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(matches!(keyring.verify(&expired), Err(AuthError::Expired)));
    }

    #[test]
    fn tokens_not_valid_yet_are_refused() {
        let keyring = Keyring::generate();
        let now = unix_now();
        let token = |iat: u64, nbf: Option<u64>| {
            let claims = WireClaims {
                sub: "dave".into(),
                scopes: vec!["*:admin".into()],
                iat,
                exp: now + 3600,
                nbf,
            };
            keyring.sign(&claims).unwrap()
        };
        assert_eq!(keyring.verify(&token(now, None)).unwrap().subject, "dave");
        // A clock a little ahead is no reason to refuse.
        assert!(keyring.verify(&token(now + 60, Some(now + 60))).is_ok());
        let err = keyring
            .verify(&token(now, Some(now + 86_400)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid yet"), "{err}");
        let err = keyring
            .verify(&token(now + 86_400, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("issued in the future"), "{err}");
    }

    #[test]
    fn keyring_round_trips_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let keyring = Keyring::generate();
        keyring.save(&path).unwrap();
        let loaded = Keyring::load(&path).unwrap();
        assert_eq!(loaded.signing, keyring.signing);
        #[cfg(unix)]
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&path).unwrap().permissions()
            ) & 0o777,
            0o600
        );
        assert!(
            Keyring::from_json(r#"{"signing":"a","keys":{"b":"x"}}"#, "test")
                .unwrap_err()
                .to_string()
                .contains("not in keys")
        );
        // A keyring encoded twice (as a secret manager may) is refused without its secrets.
        let twice = serde_json::to_string(&serde_json::to_string(&keyring).unwrap()).unwrap();
        let error = Keyring::from_json(&twice, "test").unwrap_err().to_string();
        assert!(
            error.contains("not a keyring (Data error at line 1"),
            "{error}"
        );
        let secret = keyring.keys.values().next().unwrap();
        assert!(!error.contains(secret.as_str()), "{error}");
        // A misspelt field is named (as missing).
        let error = Keyring::from_json(r#"{"sigining":"a","keys":{}}"#, "test")
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing field `signing`"), "{error}");
    }
}
