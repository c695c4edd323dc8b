//! The retry budget: retries may add at most `ratio` of the last ten seconds' requests, plus
//! `minPerSecond`, so that a provider outage cannot turn every app call into several.

use std::sync::Mutex;

use tokio::time::Instant;

use crate::config::RetryBudgetConfig;

const WINDOW_SECONDS: usize = 10;

pub struct RetryBudget {
    config: RetryBudgetConfig,
    epoch: Instant,
    slots: Mutex<[Slot; WINDOW_SECONDS]>,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    /// The second (since `epoch`) this slot counts; a stale slot is reset before use.
    second: u64,
    requests: u32,
    retries: u32,
}

impl RetryBudget {
    pub fn new(config: RetryBudgetConfig) -> Self {
        Self {
            config,
            epoch: Instant::now(),
            slots: Mutex::new([Slot::default(); WINDOW_SECONDS]),
        }
    }

    /// Counts one original request (not a retry).
    pub fn record_request(&self) {
        self.with_current_slot(|slot| slot.requests = slot.requests.saturating_add(1));
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self) -> bool {
        let now = self.second_now();
        let Ok(mut slots) = self.slots.lock() else {
            return false;
        };
        let (mut requests, mut retries) = (0u64, 0u64);
        for slot in slots
            .iter()
            .filter(|s| now - s.second < WINDOW_SECONDS as u64)
        {
            requests += u64::from(slot.requests);
            retries += u64::from(slot.retries);
        }
        let allowed = self.config.ratio * requests as f64
            + f64::from(self.config.min_per_second) * WINDOW_SECONDS as f64;
        if (retries as f64) + 1.0 > allowed {
            return false;
        }
        let slot = current_slot(&mut slots, now);
        slot.retries = slot.retries.saturating_add(1);
        true
    }

    fn second_now(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    fn with_current_slot(&self, update: impl FnOnce(&mut Slot)) {
        let now = self.second_now();
        if let Ok(mut slots) = self.slots.lock() {
            update(current_slot(&mut slots, now));
        }
    }
}

fn current_slot(slots: &mut [Slot; WINDOW_SECONDS], second: u64) -> &mut Slot {
    let slot = &mut slots[(second % WINDOW_SECONDS as u64) as usize];
    if slot.second != second {
        *slot = Slot {
            second,
            ..Slot::default()
        };
    }
    slot
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn budget(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(RetryBudgetConfig {
            ratio,
            min_per_second,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_capped_at_a_share_of_requests() {
        let budget = budget(0.2, 0);
        for _ in 0..100 {
            budget.record_request();
        }
        let granted = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_retries_with_little_traffic() {
        let budget = budget(0.2, 1);
        budget.record_request();
        // 0.2 from the one request plus 1/s over the 10 s window.
        let granted = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_as_the_window_moves_on() {
        let budget = budget(0.5, 0);
        for _ in 0..10 {
            budget.record_request();
        }
        assert_eq!((0..10).filter(|_| budget.try_withdraw()).count(), 5);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            !budget.try_withdraw(),
            "no requests in the window, no retries"
        );
        for _ in 0..4 {
            budget.record_request();
        }
        assert_eq!((0..10).filter(|_| budget.try_withdraw()).count(), 2);
    }
}
