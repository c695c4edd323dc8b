//! A token bucket refilled continuously: a per-minute limit becomes a capacity of one
//! minute's worth and a refill of limit/60 per second, the shape providers' own limiters have.

use std::time::Duration;

use tokio::time::Instant;

use crate::wait;

#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    per_second: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    pub fn per_minute(limit: f64, now: Instant) -> Self {
        let capacity = limit.max(1.0);
        Self {
            capacity,
            per_second: capacity / 60.0,
            level: capacity,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
    }

    /// How long until `cost` may be taken (zero: now), at most [`wait::MAX_WAIT`]. A cost
    /// above the capacity waits for a full bucket and then drives it negative, so one huge
    /// request is slow, not impossible.
    pub fn wait(&mut self, cost: f64, now: Instant) -> Duration {
        self.refill(now);
        let needed = cost.min(self.capacity);
        if self.level >= needed {
            Duration::ZERO
        } else {
            wait::from_secs_f64((needed - self.level) / self.per_second).unwrap_or(wait::MAX_WAIT)
        }
    }

    pub fn take(&mut self, cost: f64) {
        self.level -= cost;
    }

    /// Unused reservation coming back; never above the capacity.
    pub fn give_back(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level + amount).min(self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_continuously_to_capacity() {
        let start = Instant::now();
        let mut b = Bucket::per_minute(60.0, start);
        assert_eq!(b.wait(60.0, start), Duration::ZERO);
        b.take(60.0);
        assert_eq!(b.wait(1.0, start), Duration::from_secs(1));
        assert_eq!(b.wait(1.0, start + Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(
            b.wait(60.0, start + Duration::from_secs(3600)),
            Duration::ZERO
        );
        b.take(60.0);
        assert_eq!(
            b.wait(1.0, start + Duration::from_secs(3600)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn an_oversized_cost_waits_for_a_full_bucket_then_goes_into_debt() {
        let start = Instant::now();
        let mut b = Bucket::per_minute(600.0, start);
        b.take(300.0);
        assert_eq!(b.wait(1000.0, start), Duration::from_secs(30));
        let later = start + Duration::from_secs(30);
        assert_eq!(b.wait(1000.0, later), Duration::ZERO);
        b.take(1000.0);
        assert_eq!(b.wait(1.0, later), Duration::from_secs_f64(401.0 / 10.0));
    }

    #[test]
    fn a_debt_beyond_any_wait_is_capped_not_a_panic() {
        let start = Instant::now();
        let mut b = Bucket::per_minute(100.0, start);
        b.take(1.8e19);
        assert_eq!(b.wait(1.0, start), wait::MAX_WAIT);
        b.give_back(f64::MAX, start);
        assert_eq!(b.wait(1.0, start), Duration::ZERO);
    }

    #[test]
    fn give_back_is_capped() {
        let start = Instant::now();
        let mut b = Bucket::per_minute(10.0, start);
        b.take(4.0);
        b.give_back(100.0, start);
        b.take(10.0);
        assert_eq!(b.wait(1.0, start), Duration::from_secs(6));
    }
}
