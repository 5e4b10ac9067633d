//! Whether a component's view of the API server is current: it has been answered moments
//! ago, and since when without a break. Decisions that read meaning into something *not*
//! seen through the API (a peer that never acknowledged, a key never approved) are taken
//! only while the view is current, and their timeouts count from when it last became so.

use std::time::{Duration, SystemTime};

/// How long after its last answer the API view still counts as current.
pub const CURRENT_FOR: Duration = Duration::from_secs(5);

/// The record of the API's answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiView {
    /// When the current unbroken run of answers began.
    since: Option<SystemTime>,
    /// The last answer.
    last: Option<SystemTime>,
}

impl ApiView {
    /// The API answered a request at `now`.
    pub fn answered(&mut self, now: SystemTime) {
        if self.current(now).is_none() {
            self.since = Some(now);
        }
        self.last = Some(now);
    }

    /// A request failed or timed out: the view is not current until the next answer.
    pub fn failed(&mut self) {
        self.since = None;
        self.last = None;
    }

    /// Since when the view has been current without a break, if it is current at `now`.
    /// A clock that went backwards counts as no time passed.
    pub fn current(&self, now: SystemTime) -> Option<SystemTime> {
        let last = self.last?;
        let age = now.duration_since(last).unwrap_or(Duration::ZERO);
        (age <= CURRENT_FOR).then_some(self.since?)
    }

    /// Whether the last answer is older than `every` (or there was none): time to ask again
    /// before deciding on the view.
    pub fn stale(&self, now: SystemTime, every: Duration) -> bool {
        self.last
            .is_none_or(|last| now.duration_since(last).is_ok_and(|d| d >= every))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn the_view_is_current_from_the_first_answer_of_an_unbroken_run() {
        let mut v = ApiView::default();
        assert_eq!(v.current(at(10)), None, "never answered");
        assert!(v.stale(at(10), Duration::from_secs(2)));
        v.answered(at(10));
        v.answered(at(14));
        assert_eq!(v.current(at(15)), Some(at(10)));
        assert!(!v.stale(at(15), Duration::from_secs(2)));
        // Silence longer than CURRENT_FOR breaks the run; the next answer starts another.
        assert_eq!(v.current(at(20)), None);
        v.answered(at(30));
        assert_eq!(v.current(at(31)), Some(at(30)));
        // A failure breaks it at once.
        v.failed();
        assert_eq!(v.current(at(31)), None);
        v.answered(at(32));
        assert_eq!(v.current(at(32)), Some(at(32)));
        // A clock that went backwards.
        assert_eq!(v.current(at(1)), Some(at(32)));
    }
}
