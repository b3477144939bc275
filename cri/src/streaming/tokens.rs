//! Single-use request tokens (kubelet's `streaming.requestCache`): Exec, Attach and
//! PortForward store their request under a random token and return a URL naming it; the
//! first connection to that URL takes the request. Tokens expire after `ttl`, and at most
//! `max` are in flight, so a caller that asks for URLs and never uses them cannot grow the
//! cache without bound.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("too many streaming requests in flight ({0}); retry later")]
    Full(usize),
    #[error("no randomness for a token: {0}")]
    Random(String),
}

pub struct TokenCache<T> {
    ttl: Duration,
    max: usize,
    entries: Mutex<HashMap<String, (Instant, T)>>,
}

impl<T> TokenCache<T> {
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Stores `req` and returns its token: 32 random bytes, URL-safe base64 (unguessable,
    /// since the token is the only authorisation the URL carries).
    pub fn insert(&self, req: T) -> Result<String, TokenError> {
        let mut raw = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(|e| TokenError::Random(e.to_string()))?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let now = Instant::now();
        let mut m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, (exp, _)| *exp > now);
        if m.len() >= self.max {
            return Err(TokenError::Full(self.max));
        }
        m.insert(token.clone(), (now + self.ttl, req));
        Ok(token)
    }

    /// Takes the request of a live token; a used, expired or unknown token gives `None`.
    pub fn take(&self, token: &str) -> Option<T> {
        let mut m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (exp, req) = m.remove(token)?;
        (exp > Instant::now()).then_some(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use() {
        let c = TokenCache::new(Duration::from_secs(60), 10);
        let t = c.insert(7).unwrap();
        assert_eq!(t.len(), 43);
        assert_eq!(c.take(&t), Some(7));
        assert_eq!(c.take(&t), None);
        assert_eq!(c.take("nope"), None);
    }

    #[test]
    fn expiry() {
        let c = TokenCache::new(Duration::from_millis(10), 10);
        let t = c.insert(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(c.take(&t), None);
    }

    #[test]
    fn bounded_and_expired_entries_free_room() {
        let c = TokenCache::new(Duration::from_millis(30), 3);
        for i in 0..3 {
            c.insert(i).unwrap();
        }
        assert_eq!(c.insert(9), Err(TokenError::Full(3)));
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.insert(9).is_ok(), "expired tokens are purged");
    }
}
