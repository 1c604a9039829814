//! Exponential backoff with full jitter for retrying calls to remote services.
//!
//! The delay before retry `attempt` (0 = the first retry) is drawn uniformly
//! from `[0, min(cap, base * 2^attempt)]`. Full jitter spreads retries of many
//! clients that failed together, so they don't hammer the server in lockstep.

use std::time::Duration;

/// Exponential backoff policy with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Upper bound of the delay before the first retry (attempt 0).
    pub base: Duration,
    /// Upper bound that no jittered delay ever exceeds, however many attempts.
    pub cap: Duration,
}

impl Backoff {
    /// Builds a policy that starts at `base` and never waits longer than `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap }
    }

    /// The un-jittered bound for `attempt`: `min(cap, base * 2^attempt)`.
    ///
    /// Saturates instead of overflowing, so any `attempt` (even `u32::MAX`)
    /// yields `cap` once the doubling outgrows it.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        if self.base.is_zero() {
            return Duration::ZERO;
        }
        2u32.checked_pow(attempt)
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(self.cap, |grown| grown.min(self.cap))
    }

    /// A jittered delay for `attempt`, uniform in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl rand::Rng) -> Duration {
        // Nanoseconds beyond u64 (about 584 years) are clamped; the result
        // still lies within [0, ceiling].
        let bound = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=bound))
    }

    /// A jittered delay that never undercuts a server-provided backoff.
    ///
    /// Returns `max(server_hint, delay(attempt))`, capped at
    /// `max(cap, server_hint)`: a server that says "wait N seconds" (HTTP
    /// `Retry-After`, WhatsApp's rate-overlimit backoff) is obeyed even when
    /// N exceeds our own `cap`, because retrying earlier is guaranteed to fail.
    pub fn delay_honouring(
        &self,
        attempt: u32,
        server_hint: Option<Duration>,
        rng: &mut impl rand::Rng,
    ) -> Duration {
        let jittered = self.delay(attempt, rng);
        match server_hint {
            None => jittered,
            Some(hint) => jittered.max(hint).min(self.cap.max(hint)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// How many random draws each jitter test makes; enough to hit both
    /// ends of the range with a fixed seed while staying instant.
    const DRAWS: u32 = 2_000;

    fn seeded_rng() -> StdRng {
        StdRng::seed_from_u64(0x5EED)
    }

    #[test]
    fn ceiling_doubles_from_base_until_it_reaches_the_cap() {
        // Arrange
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

        // Act
        let ceilings: Vec<Duration> = (0..7).map(|attempt| backoff.ceiling(attempt)).collect();

        // Assert
        let expected: Vec<Duration> = [1, 2, 4, 8, 16, 30, 30]
            .into_iter()
            .map(Duration::from_secs)
            .collect();
        assert_eq!(ceilings, expected);
    }

    #[test]
    fn jittered_delay_always_lies_between_zero_and_the_ceiling() {
        // Arrange
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let mut rng = seeded_rng();

        for attempt in 0..8 {
            let ceiling = backoff.ceiling(attempt);
            for _ in 0..DRAWS / 8 {
                // Act
                let delay = backoff.delay(attempt, &mut rng);

                // Assert
                assert!(
                    delay <= ceiling,
                    "attempt {attempt}: {delay:?} > {ceiling:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_is_full_so_delays_spread_across_the_whole_range() {
        // Arrange
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let mut rng = seeded_rng();

        // Act
        let delays: Vec<Duration> = (0..DRAWS).map(|_| backoff.delay(0, &mut rng)).collect();

        // Assert
        let min = delays.iter().min().copied().unwrap_or_default();
        let max = delays.iter().max().copied().unwrap_or_default();
        assert!(min < Duration::from_millis(50), "smallest delay {min:?}");
        assert!(max > Duration::from_millis(950), "largest delay {max:?}");
    }

    #[test]
    fn a_huge_attempt_number_saturates_at_the_cap_without_overflowing() {
        // Arrange
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let mut rng = seeded_rng();

        // Act
        let ceilings = [31, 32, 64, 1_000, u32::MAX].map(|attempt| backoff.ceiling(attempt));
        let delay = backoff.delay(u32::MAX, &mut rng);

        // Assert
        assert!(ceilings.iter().all(|c| *c == Duration::from_secs(2)));
        assert!(delay <= Duration::from_secs(2));
    }

    #[test]
    fn a_cap_of_duration_max_does_not_overflow_either() {
        // Arrange
        let backoff = Backoff::new(Duration::from_secs(1), Duration::MAX);
        let mut rng = seeded_rng();

        // Act
        let ceiling = backoff.ceiling(u32::MAX);
        let delay = backoff.delay(u32::MAX, &mut rng);

        // Assert
        assert_eq!(ceiling, Duration::MAX);
        assert!(delay <= ceiling);
    }

    #[test]
    fn a_zero_base_never_waits() {
        // Arrange
        let backoff = Backoff::new(Duration::ZERO, Duration::from_secs(2));
        let mut rng = seeded_rng();

        // Act
        let delays = [0, 5, u32::MAX].map(|attempt| backoff.delay(attempt, &mut rng));

        // Assert
        assert!(delays.iter().all(Duration::is_zero));
    }

    #[test]
    fn a_server_hint_above_the_cap_is_honoured_exactly() {
        // Arrange
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let hint = Duration::from_secs(30);
        let mut rng = seeded_rng();

        for attempt in 0..10 {
            // Act
            let delay = backoff.delay_honouring(attempt, Some(hint), &mut rng);

            // Assert
            assert_eq!(delay, hint);
        }
    }

    #[test]
    fn a_server_hint_below_the_ceiling_is_a_floor_for_the_jittered_delay() {
        // Arrange
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(2));
        let hint = Duration::from_millis(500);
        let mut rng = seeded_rng();

        for _ in 0..DRAWS {
            // Act
            let delay = backoff.delay_honouring(1, Some(hint), &mut rng);

            // Assert
            assert!(delay >= hint && delay <= backoff.ceiling(1), "{delay:?}");
        }
    }

    #[test]
    fn without_a_server_hint_the_plain_jittered_delay_is_used() {
        // Arrange
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));

        // Act
        let honoured = backoff.delay_honouring(3, None, &mut seeded_rng());
        let plain = backoff.delay(3, &mut seeded_rng());

        // Assert
        assert_eq!(honoured, plain);
    }
}
