//! Which streams one replica of a fleet reads: rendezvous (highest random weight) hashing over
//! the replica index and the replica count, without a coordination service.
//!
//! Every replica computes, for each stream name, a weight per replica index
//! (`xxh3_64(name, seed = index)`) and owns the streams where its own weight is the highest.
//! All replicas agree without talking to each other, every stream has exactly one owner, and
//! when the count changes from `n` to `n + 1` only the streams the new replica wins move (about
//! `1 / (n + 1)` of them); from `n + 1` back to `n` only the removed replica's streams move.
//!
//! The index usually comes from a Kubernetes StatefulSet, whose pods are named `NAME-0`,
//! `NAME-1`, …: [`Shard::from_pod_name`] reads it (docs/discovery.md shows a manifest).
//!
//! ```
//! use kvs_frames::kvs::Shard;
//!
//! let shard = Shard::from_pod_name("camera-reader-2", 4)?;
//! assert_eq!((shard.index(), shard.count()), (2, 4));
//! let mine: Vec<&str> = ["cam-1", "cam-2", "cam-3"]
//!     .into_iter()
//!     .filter(|name| shard.owns(name))
//!     .collect();
//! # let _ = mine;
//! // Each name has one owner among the 4 replicas.
//! assert!(["cam-1", "cam-2", "cam-3"]
//!     .iter()
//!     .all(|n| (0..4).filter(|&i| Shard::new(i, 4).unwrap().owns(n)).count() == 1));
//! # Ok::<(), kvs_frames::Error>(())
//! ```

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::error::{Error, Result};

/// The largest replica count accepted.
pub const MAX_REPLICAS: u32 = 4096;

/// One replica's share of the streams: its index among `count` replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shard {
    index: u32,
    count: u32,
}

impl Shard {
    /// Replica `index` of `count` (`index < count`, `1 <= count <= 4096`).
    pub fn new(index: u32, count: u32) -> Result<Self> {
        if !(1..=MAX_REPLICAS).contains(&count) {
            return Err(Error::invalid_config(
                "Shard count",
                count,
                &format!("the replica count is 1-{MAX_REPLICAS}"),
            ));
        }
        if index >= count {
            return Err(Error::invalid_config(
                "Shard index",
                index,
                &format!("the replica index is 0-{} with {count} replicas", count - 1),
            ));
        }
        Ok(Shard { index, count })
    }

    /// The replica whose StatefulSet pod is `pod_name` (`NAME-N`: N is the index), of `count`.
    pub fn from_pod_name(pod_name: &str, count: u32) -> Result<Self> {
        let index = pod_name
            .rsplit_once('-')
            .map(|(_, n)| n)
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| {
                Error::invalid_config(
                    "Shard pod name",
                    format!("{pod_name:?}"),
                    "a StatefulSet pod is named NAME-N, N its index",
                )
            })?;
        Shard::new(index, count)
    }

    /// The replica index (0-based).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The replica count.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The index of the replica that owns `stream_name` among `count` replicas (`count` 0 is
    /// taken as 1).
    pub fn owner_of(stream_name: &str, count: u32) -> u32 {
        (0..count.max(1))
            .max_by_key(|&replica| {
                // Ties (vanishingly rare) go to the lower index, on every replica alike.
                (
                    xxh3_64_with_seed(stream_name.as_bytes(), u64::from(replica)),
                    std::cmp::Reverse(replica),
                )
            })
            .unwrap_or(0)
    }

    /// Whether this replica owns `stream_name`.
    pub fn owns(&self, stream_name: &str) -> bool {
        Shard::owner_of(stream_name, self.count) == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "replica {} of {}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn names() -> Vec<String> {
        (0..10_000).map(|i| format!("camera-{i:05}")).collect()
    }

    #[test]
    fn every_stream_has_exactly_one_owner_and_the_load_is_even() {
        let names = names();
        for count in 1..=16u32 {
            let shards: Vec<Shard> = (0..count).map(|i| Shard::new(i, count).unwrap()).collect();
            let mut per_replica = vec![0usize; count as usize];
            for name in &names {
                let owners: Vec<u32> = shards
                    .iter()
                    .filter(|s| s.owns(name))
                    .map(|s| s.index())
                    .collect();
                assert_eq!(owners.len(), 1, "{name} with {count} replicas: {owners:?}");
                per_replica[owners[0] as usize] += 1;
            }
            let mean = names.len() as f64 / f64::from(count);
            for (i, n) in per_replica.iter().enumerate() {
                let off = (*n as f64 - mean).abs() / mean;
                assert!(
                    off < 0.15,
                    "replica {i} of {count} owns {n}, mean {mean:.0}: {per_replica:?}"
                );
            }
        }
    }

    #[test]
    fn a_stream_moves_only_to_an_added_replica_or_from_a_removed_one() {
        let names = names();
        for count in 1..16u32 {
            let mut moved = 0usize;
            for name in &names {
                let before = Shard::owner_of(name, count);
                let after = Shard::owner_of(name, count + 1);
                if before != after {
                    // Growing: only to the new replica. (Shrinking back is the same pair
                    // read the other way: only the removed replica's streams move.)
                    assert_eq!(after, count, "{name}: {before} -> {after} at {count}+1");
                    moved += 1;
                }
            }
            let expected = names.len() as f64 / f64::from(count + 1);
            assert!(
                (moved as f64 - expected).abs() / expected < 0.15,
                "{moved} of {} moved going from {count} to {}, expected about {expected:.0}",
                names.len(),
                count + 1
            );
        }
    }

    #[test]
    fn the_owner_is_stable_across_processes_and_versions() {
        // Fixed values: a change of the hash would move every stream of every fleet at upgrade.
        let owners: Vec<u32> = ["front-door", "lobby", "cam-1", "cam-2", "garage"]
            .iter()
            .map(|n| Shard::owner_of(n, 8))
            .collect();
        assert_eq!(owners, STABLE_OWNERS);
    }

    /// Owners of the names above among 8 replicas (checked against Python's `xxhash` package:
    /// `max(range(8), key=lambda r: xxh3_64_intdigest(name, seed=r))`).
    const STABLE_OWNERS: [u32; 5] = [0, 6, 5, 4, 4];

    #[test]
    fn pod_names_give_the_index_and_bad_values_are_typed_errors() {
        assert_eq!(
            Shard::from_pod_name("camera-reader-11", 12).unwrap(),
            Shard::new(11, 12).unwrap()
        );
        assert_eq!(Shard::from_pod_name("r-0", 1).unwrap().index(), 0);
        for (pod, count) in [
            ("camera-reader", 4),
            ("camera-reader-", 4),
            ("camera-reader-x1", 4),
            ("camera-reader-4", 4),
            ("camera-reader-99999999999", 4),
        ] {
            let err = Shard::from_pod_name(pod, count).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{pod}");
        }
        let err = Shard::new(0, 0).unwrap_err();
        assert!(err.to_string().contains("0"), "{err}");
        let err = Shard::new(3, 3).unwrap_err();
        assert!(err.to_string().contains("0-2"), "{err}");
        assert!(Shard::new(0, MAX_REPLICAS + 1).is_err());
    }
}
