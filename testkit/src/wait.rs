//! Waiting for asynchronous things (teardown, a guest's output), bounded by a
//! count or a deadline. Tests wait with these; they never assert on a duration.
use std::time::{Duration, Instant};

/// `tries` polls, `every` apart.
#[derive(Clone, Copy, Debug)]
pub struct Poll {
    pub tries: u32,
    pub every: Duration,
}

impl Poll {
    pub const fn new(tries: u32, every: Duration) -> Poll {
        Poll { tries, every }
    }

    /// Whether `done` held within the tries.
    pub fn until(self, mut done: impl FnMut() -> bool) -> bool {
        for n in 0..self.tries.max(1) {
            if done() {
                return true;
            }
            if n + 1 < self.tries {
                std::thread::sleep(self.every);
            }
        }
        false
    }

    /// Polls `left` until it finds nothing; returns what it found last
    /// (empty once settled).
    pub fn settle<T>(self, mut left: impl FnMut() -> Vec<T>) -> Vec<T> {
        let mut last = Vec::new();
        self.until(|| {
            last = left();
            last.is_empty()
        });
        last
    }
}

/// Whether `done` held before `limit` ran out, polling `every`.
pub fn within(limit: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_is_bounded_by_its_tries() {
        let mut calls = 0;
        assert!(!Poll::new(3, Duration::ZERO).until(|| {
            calls += 1;
            false
        }));
        assert_eq!(calls, 3);
        assert!(Poll::new(3, Duration::ZERO).until(|| true));
    }

    #[test]
    fn settle_returns_what_is_left() {
        let mut n = 3;
        let left = Poll::new(10, Duration::ZERO).settle(|| {
            n -= 1;
            (0..n).collect()
        });
        assert!(left.is_empty());
        assert_eq!(Poll::new(2, Duration::ZERO).settle(|| vec![1]), vec![1]);
    }
}
