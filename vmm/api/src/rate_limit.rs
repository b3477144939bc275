//! Token-bucket rate limits for devices a guest could use to flood the host: a disk's I/O, a
//! NIC's frames each way, the entropy device (Firecracker's shape: a bandwidth bucket in bytes
//! and an operations bucket, each a size and the time to refill it from empty).

use serde::{Deserialize, Serialize};

/// One bucket: `size` tokens, refilled evenly over `refill_time_ms`; `one_time_burst` extra
/// tokens are spent first and never come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: u64,
    pub refill_time_ms: u64,
}

impl TokenBucketConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.size == 0 || self.refill_time_ms == 0 {
            return Err("a token bucket needs a size and a refill time above 0".into());
        }
        Ok(())
    }
}

/// A device's limits: bytes (`bandwidth`) and requests or frames (`ops`); either may be absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (name, b) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            if let Some(b) = b {
                b.validate().map_err(|e| format!("{name}: {e}"))?;
            }
        }
        Ok(())
    }
}

/// `configure_entropy`: the virtio-rng device every VM has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}
