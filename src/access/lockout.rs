//! Locking out a client address after repeated authentication failures: `max_failures` within
//! `window` locks the address for `duration`, during which every request gets 429 with
//! `Retry-After`. A success clears the count. Memory is bounded: expired entries are dropped
//! when the table grows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LockoutConfig {
    /// Failures from one address that trigger a lockout; 0 turns lockout off.
    pub max_failures: u32,
    /// The period failures are counted over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long a locked-out address is refused.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            max_failures: 10,
            window: Duration::from_secs(300),
            duration: Duration::from_secs(300),
        }
    }
}

#[derive(Debug)]
struct Entry {
    failures: u32,
    first: Instant,
    locked_until: Option<Instant>,
}

/// Table size above which expired entries are swept.
const SWEEP_AT: usize = 10_000;

#[derive(Debug)]
pub struct Lockout {
    config: LockoutConfig,
    table: Mutex<HashMap<IpAddr, Entry>>,
}

impl Lockout {
    pub fn new(config: LockoutConfig) -> Lockout {
        Lockout {
            config,
            table: Mutex::new(HashMap::new()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long `ip` remains locked out, if it is.
    pub fn locked(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let table = self.table();
        let until = table.get(&ip)?.locked_until?;
        (until > now).then(|| until - now)
    }

    /// Records a failure; true when this one locked the address out.
    pub fn failure(&self, ip: IpAddr) -> bool {
        if self.config.max_failures == 0 {
            return false;
        }
        let now = Instant::now();
        let mut table = self.table();
        if table.len() >= SWEEP_AT {
            let window = self.config.window;
            table.retain(|_, e| e.locked_until.is_some_and(|u| u > now) || now - e.first < window);
        }
        let e = table.entry(ip).or_insert(Entry {
            failures: 0,
            first: now,
            locked_until: None,
        });
        if e.locked_until.is_some_and(|u| u <= now) || now - e.first >= self.config.window {
            *e = Entry {
                failures: 0,
                first: now,
                locked_until: None,
            };
        }
        e.failures += 1;
        if e.failures >= self.config.max_failures && e.locked_until.is_none() {
            e.locked_until = Some(now + self.config.duration);
            return true;
        }
        false
    }

    pub fn success(&self, ip: IpAddr) {
        let mut table = self.table();
        if table.get(&ip).is_some_and(|e| e.locked_until.is_none()) {
            table.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lockout(max: u32) -> Lockout {
        Lockout::new(LockoutConfig {
            max_failures: max,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(120),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn locks_after_max_failures_then_expires() {
        let l = lockout(3);
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let other: IpAddr = "192.0.2.8".parse().expect("ip");
        assert!(!l.failure(ip));
        assert!(!l.failure(ip));
        assert!(l.locked(ip).is_none());
        assert!(l.failure(ip), "the third failure locks");
        assert!(l.locked(ip).is_some_and(|d| d <= Duration::from_secs(120)));
        assert!(l.locked(other).is_none(), "only that address");
        tokio::time::advance(Duration::from_secs(121)).await;
        assert!(l.locked(ip).is_none());
        assert!(!l.failure(ip), "counting starts over");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_and_successes_reset() {
        let l = lockout(2);
        let ip: IpAddr = "2001:db8::1".parse().expect("ip");
        assert!(!l.failure(ip));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!l.failure(ip), "the first failure fell out of the window");
        l.success(ip);
        assert!(!l.failure(ip));
        let off = lockout(0);
        for _ in 0..100 {
            assert!(!off.failure(ip));
        }
    }
}
