//! A server's admission control: connection caps (in all and per peer uid), the peer filter, and the counters
//! of what was refused or survived.

use std::sync::Arc;

use super::socket::PeerCred;
use crate::error::Error;

/// Connection caps of a server: at most `total` connections at once, and at most `per_uid` of one peer uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, all peers together.
    pub total: usize,
    /// Connections open at once from one peer uid (peers whose credentials cannot be read count as one uid).
    pub per_uid: usize,
}

impl ConnLimits {
    /// No caps.
    pub const UNLIMITED: ConnLimits = ConnLimits { total: usize::MAX, per_uid: usize::MAX };
}

/// Which peers a server serves: when either list is set, a peer whose uid or gid is listed; otherwise every peer.
/// One filter for every request, whoever answers it (the application or the native fast path).
#[derive(Debug, Default, Clone)]
pub struct PeerFilter {
    /// Allowed uids.
    pub uids: Option<Vec<u32>>,
    /// Allowed gids.
    pub gids: Option<Vec<u32>>,
}

impl PeerFilter {
    /// Whether `peer` may be served (`None`, credentials unknown, only when there is no filter).
    pub fn allows(&self, peer: Option<PeerCred>) -> bool {
        if self.uids.is_none() && self.gids.is_none() {
            return true;
        }
        match peer {
            Some(p) => {
                self.uids.as_ref().is_some_and(|u| u.contains(&p.uid))
                    || self.gids.as_ref().is_some_and(|g| g.contains(&p.gid))
            }
            None => false,
        }
    }
}

/// What a server refused or survived, counted since it started (see [`Admission::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Connections accepted and admitted.
    pub admitted: u64,
    /// Connections open now.
    pub open: u64,
    /// Connections closed at once because `total` were open.
    pub over_total: u64,
    /// Connections closed at once because their uid had `per_uid` open.
    pub over_uid: u64,
    /// Peers refused by the filter (one error response each, then closed).
    pub refused: u64,
    /// Failed `accept()` calls (survived).
    pub accept_errors: u64,
    /// The last `accept()` error's text.
    pub last_accept_error: Option<String>,
}

/// A server's admission control: connection caps, the peer filter and the counters of what it refused.
#[derive(Debug)]
pub struct Admission {
    limits: ConnLimits,
    filter: PeerFilter,
    /// Open connections: in all, and per uid (`u32::MAX + 1` stands for "credentials unknown").
    open: std::sync::Mutex<(usize, std::collections::HashMap<u64, usize>)>,
    admitted: std::sync::atomic::AtomicU64,
    over_total: std::sync::atomic::AtomicU64,
    over_uid: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
    accept_errors: std::sync::atomic::AtomicU64,
    last_accept_error: std::sync::Mutex<Option<String>>,
}

impl Admission {
    /// Admission with `limits` (each at least 1) and `filter`.
    pub fn new(limits: ConnLimits, filter: PeerFilter) -> Admission {
        Admission {
            limits: ConnLimits { total: limits.total.max(1), per_uid: limits.per_uid.max(1) },
            filter,
            open: std::sync::Mutex::default(),
            admitted: Default::default(),
            over_total: Default::default(),
            over_uid: Default::default(),
            refused: Default::default(),
            accept_errors: Default::default(),
            last_accept_error: Default::default(),
        }
    }

    /// The peer filter.
    pub fn filter(&self) -> &PeerFilter {
        &self.filter
    }

    /// Takes a place for a connection of `uid`, or counts the refusal and returns `None` (over a cap).
    pub fn admit(self: &Arc<Self>, uid: Option<u32>) -> Option<ConnSlot> {
        use std::sync::atomic::Ordering::Relaxed;
        let who = uid.map_or(u64::from(u32::MAX) + 1, u64::from);
        let Ok(mut open) = self.open.lock() else { return None };
        if open.0 >= self.limits.total {
            self.over_total.fetch_add(1, Relaxed);
            return None;
        }
        let n = open.1.entry(who).or_insert(0);
        if *n >= self.limits.per_uid {
            self.over_uid.fetch_add(1, Relaxed);
            return None;
        }
        *n += 1;
        open.0 += 1;
        self.admitted.fetch_add(1, Relaxed);
        Some(ConnSlot { admission: self.clone(), who })
    }

    fn release(&self, who: u64) {
        if let Ok(mut open) = self.open.lock() {
            open.0 = open.0.saturating_sub(1);
            if let Some(n) = open.1.get_mut(&who) {
                *n -= 1;
                if *n == 0 {
                    open.1.remove(&who);
                }
            }
        }
    }

    /// Counts a peer the filter refused.
    pub fn note_refused(&self) {
        self.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a failed `accept()` and keeps its text.
    pub(super) fn note_accept_error(&self, e: &Error) {
        self.accept_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut last) = self.last_accept_error.lock() {
            *last = Some(e.message.clone());
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> AdmissionStats {
        use std::sync::atomic::Ordering::Relaxed;
        AdmissionStats {
            admitted: self.admitted.load(Relaxed),
            open: self.open.lock().map(|o| o.0 as u64).unwrap_or(0),
            over_total: self.over_total.load(Relaxed),
            over_uid: self.over_uid.load(Relaxed),
            refused: self.refused.load(Relaxed),
            accept_errors: self.accept_errors.load(Relaxed),
            last_accept_error: self.last_accept_error.lock().ok().and_then(|l| l.clone()),
        }
    }
}

/// A connection's place under the caps of an [`Admission`]; given back when dropped (with its connection).
#[derive(Debug)]
pub struct ConnSlot {
    admission: Arc<Admission>,
    who: u64,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.admission.release(self.who);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_caps_total_and_per_uid_and_gives_places_back() {
        let a = Arc::new(Admission::new(ConnLimits { total: 3, per_uid: 2 }, PeerFilter::default()));
        let s1 = a.admit(Some(1)).unwrap();
        let _s2 = a.admit(Some(1)).unwrap();
        assert!(a.admit(Some(1)).is_none(), "per-uid cap");
        let _s3 = a.admit(Some(2)).unwrap();
        assert!(a.admit(Some(3)).is_none(), "total cap");
        let st = a.stats();
        assert_eq!((st.admitted, st.open, st.over_uid, st.over_total), (3, 3, 1, 1));
        drop(s1);
        assert_eq!(a.stats().open, 2);
        assert!(a.admit(Some(1)).is_some(), "a place given back is free again");
    }

    #[test]
    fn peer_filter_is_one_rule_for_uids_and_gids() {
        let p = |uid, gid| Some(PeerCred { pid: 1, uid, gid });
        assert!(PeerFilter::default().allows(None));
        let f = PeerFilter { uids: Some(vec![0]), gids: Some(vec![107]) };
        assert!(f.allows(p(0, 5)) && f.allows(p(9, 107)));
        assert!(!f.allows(p(1, 1)) && !f.allows(None));
    }
}
