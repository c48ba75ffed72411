//! Stream names: `{user}_{n}` per owner, the KVS form, validation, uniqueness and a per-owner
//! limit.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, ErrorKind, Result};

/// The default number of streams one owner may hold at once.
pub const MAX_STREAMS_PER_USER: usize = 10;

/// The longest KVS stream name.
pub const MAX_STREAM_NAME_LEN: usize = 256;

/// Checks a KVS stream name: 1–256 characters of `[a-zA-Z0-9_.-]`.
///
/// # Errors
///
/// [`InvalidConfig`](ErrorKind::InvalidConfig) for option `stream_name`, with the rule broken.
pub fn validate_stream_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_STREAM_NAME_LEN {
        return Err(Error::invalid_config(
            "stream_name",
            format!("{name:?}"),
            "must be 1-256 characters of [a-zA-Z0-9_.-]",
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(Error::invalid_config(
            "stream_name",
            format!("{name:?}"),
            &format!("{bad:?} is not allowed: use only [a-zA-Z0-9_.-]"),
        ));
    }
    Ok(())
}

/// A user name reduced to its ASCII letters and digits (`"Jöhn Doe-2"` → `"JhnDoe2"`).
#[must_use]
pub fn sanitize_user(user: &str) -> String {
    user.chars().filter(char::is_ascii_alphanumeric).collect()
}

/// The KVS form of a name: every `_` becomes `-` (`alice_1` → `alice-1`).
#[must_use]
pub fn to_kvs_name(name: &str) -> String {
    name.replace('_', "-")
}

/// Hands out stream names to owners (users, tenants) and keeps them unique.
///
/// Generated names are `{user}_{n}` with the user name sanitised to ASCII letters and digits and
/// `n` the smallest free number from 1; [`to_kvs_name`] gives the form used as the KVS stream
/// name (`alice_1` → `alice-1`). Custom names are validated (`[a-zA-Z0-9_.-]{1,256}`). Names
/// are unique in their KVS form, so `alice_1` and `alice-1` are the same stream. Each owner
/// may hold at most `max_per_owner` names at once ([`MAX_STREAMS_PER_USER`] by default);
/// [`release`](StreamNamer::release) frees a name when its producer is removed.
///
/// ```
/// use kvs_frames::producer::{StreamNamer, to_kvs_name};
///
/// let mut namer = StreamNamer::new();
/// let a = namer.allocate("Alice Smith!")?;
/// assert_eq!(a, "AliceSmith_1");
/// assert_eq!(to_kvs_name(&a), "AliceSmith-1");
/// assert_eq!(namer.allocate("Alice Smith!")?, "AliceSmith_2");
/// namer.claim("bob", "garage.cam")?;
/// assert!(namer.claim("carol", "garage.cam").is_err()); // taken
/// namer.release("AliceSmith_1");
/// assert_eq!(namer.allocate("alice smith")?, "alicesmith_1");
/// # Ok::<(), kvs_frames::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct StreamNamer {
    max_per_owner: usize,
    /// KVS form → (owner key, name as handed out).
    active: BTreeMap<String, (String, String)>,
    /// Owner key → names held.
    by_owner: BTreeMap<String, BTreeSet<String>>,
}

impl Default for StreamNamer {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamNamer {
    /// A namer with the limit [`MAX_STREAMS_PER_USER`].
    #[must_use]
    pub fn new() -> Self {
        Self::with_limit(MAX_STREAMS_PER_USER)
    }

    /// A namer allowing `max_per_owner` names per owner at once.
    #[must_use]
    pub fn with_limit(max_per_owner: usize) -> Self {
        StreamNamer {
            max_per_owner,
            active: BTreeMap::new(),
            by_owner: BTreeMap::new(),
        }
    }

    /// The per-owner limit.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.max_per_owner
    }

    fn owner_key(owner: &str) -> Result<String> {
        let key = sanitize_user(owner);
        if key.is_empty() {
            return Err(Error::invalid_config(
                "user",
                format!("{owner:?}"),
                "has no ASCII letter or digit to build a stream name from",
            ));
        }
        Ok(key)
    }

    fn check_limit(&self, key: &str, owner: &str) -> Result<()> {
        let held = self.by_owner.get(key).map_or(0, BTreeSet::len);
        if held >= self.max_per_owner {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                format!(
                    "user {owner:?} already has {held} streams (limit {})",
                    self.max_per_owner
                ),
            ));
        }
        Ok(())
    }

    /// Reserves the next free `{user}_{n}` for `owner`.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](ErrorKind::InvalidConfig) when the user name has no ASCII letter or
    /// digit; [`LimitExceeded`](ErrorKind::LimitExceeded) when the owner holds the maximum.
    pub fn allocate(&mut self, owner: &str) -> Result<String> {
        let key = Self::owner_key(owner)?;
        self.check_limit(&key, owner)?;
        // `{user}_{n}` must fit in 256 characters with room for the number.
        let mut base: String = key.clone();
        base.truncate(MAX_STREAM_NAME_LEN - 12);
        let name = (1u64..)
            .map(|n| format!("{base}_{n}"))
            .find(|name| !self.active.contains_key(&to_kvs_name(name)))
            .ok_or_else(|| Error::new(ErrorKind::Internal, "stream numbers exhausted"))?;
        self.insert(key, name.clone());
        Ok(name)
    }

    /// Reserves a custom `name` for `owner`.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](ErrorKind::InvalidConfig) for an invalid name or owner,
    /// [`AlreadyExists`](ErrorKind::AlreadyExists) when the name (in its KVS form) is taken,
    /// [`LimitExceeded`](ErrorKind::LimitExceeded) when the owner holds the maximum.
    pub fn claim(&mut self, owner: &str, name: &str) -> Result<String> {
        validate_stream_name(name)?;
        let key = Self::owner_key(owner)?;
        if let Some((_, existing)) = self.active.get(&to_kvs_name(name)) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("stream name {name:?} is taken (by {existing:?})"),
            ));
        }
        self.check_limit(&key, owner)?;
        self.insert(key, name.to_owned());
        Ok(name.to_owned())
    }

    fn insert(&mut self, key: String, name: String) {
        self.by_owner
            .entry(key.clone())
            .or_default()
            .insert(name.clone());
        self.active.insert(to_kvs_name(&name), (key, name));
    }

    /// Frees `name` (in either form). Returns whether it was held.
    pub fn release(&mut self, name: &str) -> bool {
        let Some((key, original)) = self.active.remove(&to_kvs_name(name)) else {
            return false;
        };
        if let Some(set) = self.by_owner.get_mut(&key) {
            set.remove(&original);
            if set.is_empty() {
                self.by_owner.remove(&key);
            }
        }
        true
    }

    /// Whether `name` (in either form) is held.
    #[must_use]
    pub fn is_taken(&self, name: &str) -> bool {
        self.active.contains_key(&to_kvs_name(name))
    }

    /// The names `owner` holds, sorted.
    #[must_use]
    pub fn names_of(&self, owner: &str) -> Vec<String> {
        self.by_owner
            .get(&sanitize_user(owner))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rules() {
        for ok in ["a", "cam-1", "Front_Door.2", &"x".repeat(256)] {
            validate_stream_name(ok).unwrap();
        }
        for bad in ["", "a b", "cam/1", "caméra", "a:b", &"x".repeat(257)] {
            let err = validate_stream_name(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig);
            assert_eq!(err.invalid_option(), Some("stream_name"));
        }
    }

    #[test]
    fn sanitize_and_kvs_form() {
        assert_eq!(sanitize_user("Jöhn Doe-2 <x@y>"), "JhnDoe2xy");
        assert_eq!(to_kvs_name("a_b_c.d-e"), "a-b-c.d-e");
    }

    #[test]
    fn numbering_reuses_freed_numbers() {
        let mut n = StreamNamer::new();
        assert_eq!(n.allocate("bob").unwrap(), "bob_1");
        assert_eq!(n.allocate("bob").unwrap(), "bob_2");
        assert_eq!(n.allocate("bob").unwrap(), "bob_3");
        assert!(n.release("bob-2")); // KVS form works too
        assert!(!n.release("bob_2"));
        assert_eq!(n.allocate("bob").unwrap(), "bob_2");
        assert_eq!(n.names_of("bob"), ["bob_1", "bob_2", "bob_3"]);
    }

    #[test]
    fn uniqueness_in_kvs_form() {
        let mut n = StreamNamer::new();
        n.claim("alice", "alice-1").unwrap();
        // `alice_1` is the same KVS stream as `alice-1`: allocation skips it.
        assert_eq!(n.allocate("alice").unwrap(), "alice_2");
        let err = n.claim("bob", "alice_2").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert!(n.is_taken("alice-2"));
    }

    #[test]
    fn per_owner_limit() {
        let mut n = StreamNamer::with_limit(2);
        n.allocate("u").unwrap();
        n.claim("u", "custom").unwrap();
        assert_eq!(
            n.allocate("u").unwrap_err().kind(),
            ErrorKind::LimitExceeded
        );
        assert_eq!(
            n.claim("u", "other").unwrap_err().kind(),
            ErrorKind::LimitExceeded
        );
        // Other owners are not affected; owners are compared after sanitising.
        n.allocate("v").unwrap();
        assert_eq!(
            n.allocate("u!").unwrap_err().kind(),
            ErrorKind::LimitExceeded
        );
        n.release("custom");
        n.allocate("u").unwrap();
        assert_eq!(StreamNamer::new().limit(), MAX_STREAMS_PER_USER);
    }

    #[test]
    fn invalid_owner_and_long_names() {
        let mut n = StreamNamer::new();
        assert_eq!(
            n.allocate("!!!").unwrap_err().invalid_option(),
            Some("user")
        );
        let long = "x".repeat(400);
        let name = n.allocate(&long).unwrap();
        validate_stream_name(&name).unwrap();
        assert!(name.ends_with("_1"));
    }
}
