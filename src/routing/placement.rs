//! Choosing a backend for a new session: least loaded, ties broken by rendezvous hashing of the
//! session id, so two replicas that see the same loads (or none, when the store is away) pick
//! the same backend for the same `sid` without talking to each other.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Rendezvous (highest random weight) score of `backend` for `sid`. xxh3 is specified and
/// stable across versions and platforms: replicas running different builds still agree.
pub fn score(sid: &str, backend: &str) -> u64 {
    let seed = xxh3_64_with_seed(backend.as_bytes(), 0x5643_4e47_4154_4531);
    xxh3_64_with_seed(sid.as_bytes(), seed)
}

/// The candidate with the fewest sessions; among equals, the highest rendezvous score.
pub fn least_loaded<'a>(sid: &str, candidates: &[(&'a str, usize)]) -> Option<&'a str> {
    candidates
        .iter()
        .max_by(|(a, la), (b, lb)| lb.cmp(la).then_with(|| score(sid, a).cmp(&score(sid, b))))
        .map(|(name, _)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fewest_sessions_wins() {
        assert_eq!(
            least_loaded("s", &[("a", 3), ("b", 1), ("c", 2)]),
            Some("b")
        );
    }

    #[test]
    fn ties_are_deterministic_and_spread() {
        let backends = [("a", 0), ("b", 0), ("c", 0)];
        let first = least_loaded("sid-1", &backends);
        assert_eq!(first, least_loaded("sid-1", &backends));
        let mut seen = std::collections::HashSet::new();
        for i in 0..64 {
            seen.insert(least_loaded(&format!("sid-{i}"), &backends));
        }
        assert_eq!(
            seen.len(),
            3,
            "64 sessions over 3 idle backends should use all three"
        );
    }

    #[test]
    fn removing_a_backend_only_moves_its_sessions() {
        let all = [("a", 0), ("b", 0), ("c", 0)];
        let without_c = [("a", 0), ("b", 0)];
        for i in 0..200 {
            let sid = format!("s{i}");
            let before = least_loaded(&sid, &all);
            if before != Some("c") {
                assert_eq!(before, least_loaded(&sid, &without_c));
            }
        }
    }

    #[test]
    fn no_candidates() {
        assert_eq!(least_loaded("s", &[]), None);
    }
}
