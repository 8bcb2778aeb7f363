//! The webhook push provider: each notification is an HTTP/1.1 POST of its JSON to the
//! operator's URL, signed so the receiver can tell it came from us and is fresh:
//!
//! ```text
//! X-Im-Timestamp: <Unix seconds>
//! X-Im-Signature: sha256=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>
//! ```
//!
//! A 2xx answer is delivery; 408, 429 and 5xx, a refused or dropped connection and a timeout
//! may pass (retried); any other status is a refusal (dropped). `http://` or `https://`
//! (`http.rs`).

use super::http::{Client, Url};
use super::{Endpoint, Notification, PushError, PushProvider};
use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub struct Webhook {
    url: Url,
    client: Client,
    secret: Vec<u8>,
}

impl Webhook {
    /// `url`: `http[s]://host[:port]/path`; `secret`: the HMAC key (at least 16 bytes).
    pub fn new(url: &str, secret: &[u8], client: Client) -> Result<Webhook, String> {
        let url = Url::parse(url).map_err(|e| format!("push webhook {e}"))?;
        if secret.len() < 16 {
            return Err("push webhook secret: at least 16 bytes".into());
        }
        Ok(Webhook {
            url,
            client,
            secret: secret.to_vec(),
        })
    }

    /// The URL without its query, for logs (a query may carry a token).
    pub fn shown(&self) -> String {
        self.url.shown()
    }
}

/// `hex(HMAC-SHA256(secret, "<ts>.<body>"))`: what a receiver recomputes to check a request.
pub fn signature(secret: &[u8], ts: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[async_trait]
impl PushProvider for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    async fn push(&self, n: &Notification, _to: &Endpoint) -> Result<(), PushError> {
        let body = serde_json::to_vec(n).expect("a notification serialises");
        let now_s = im_shared::unix_ms() / 1000;
        let (ts, sig) = (
            now_s.to_string(),
            format!("sha256={}", signature(&self.secret, now_s, &body)),
        );
        let headers = [
            ("Content-Type", "application/json"),
            ("X-Im-Timestamp", ts.as_str()),
            ("X-Im-Signature", sig.as_str()),
        ];
        match self.client.post(&self.url, &headers, &body).await {
            Err(e) => Err(PushError::Retry(e)),
            Ok(code) => classify(code),
        }
    }
}

/// What a status means for a notification: 2xx delivered; 408, 429 and 5xx may pass; the
/// rest is a refusal.
pub(super) fn classify(code: u16) -> Result<(), PushError> {
    match code {
        200..=299 => Ok(()),
        408 | 429 | 500.. => Err(PushError::Retry(format!("HTTP {code}"))),
        _ => Err(PushError::Permanent(format!("HTTP {code}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::http::tests::{receiver, test_tls};
    use super::*;

    const SECRET: &[u8] = b"a-webhook-secret-of-32-bytes!!!!";

    #[test]
    fn urls_and_secrets_are_checked() {
        let refused = |url: &str, secret: &[u8]| Webhook::new(url, secret, Client::new()).err();
        assert!(refused("ftp://x/", SECRET).is_some());
        assert!(refused("http://h/", b"short").is_some());
        assert!(refused("https://push.example/hook", SECRET).is_none());
        let w = Webhook::new("http://[::1]:8080/h?token=x", SECRET, Client::new()).unwrap();
        assert_eq!(w.shown(), "http://[::1]:8080/h", "no query in logs");
    }

    fn note() -> Notification {
        Notification {
            user: 2,
            conv: "p:1:2".into(),
            from: 1,
            id: 99,
            seq: 4,
            ts: 1_700_000_000_000,
            preview: "hello".into(),
        }
    }

    #[tokio::test]
    async fn a_post_is_signed_and_its_answer_classified() {
        for tls in [false, true] {
            let (url, task) = receiver(vec![204, 503, 429, 400], tls).await;
            let client = Client::with_roots(&[test_tls::ca()]);
            let w = Webhook::new(&url, SECRET, client).unwrap();
            let to = Endpoint::default();
            assert_eq!(w.push(&note(), &to).await, Ok(()));
            assert!(matches!(
                w.push(&note(), &to).await,
                Err(PushError::Retry(_))
            ));
            assert!(matches!(
                w.push(&note(), &to).await,
                Err(PushError::Retry(_))
            ));
            assert!(matches!(
                w.push(&note(), &to).await,
                Err(PushError::Permanent(_))
            ));
            let got = task.await.unwrap();
            // What a receiver checks: the signature over "<timestamp>.<body>".
            let req = &got[0];
            assert!(req.head.starts_with("POST /hook HTTP/1.1\r\n"), "{req:?}");
            assert_eq!(req.header("Content-Type"), Some("application/json"));
            let ts: u64 = req.header("X-Im-Timestamp").unwrap().parse().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
            assert_eq!(
                (v["user"].as_str(), v["preview"].as_str()),
                (Some("2"), Some("hello"))
            );
            assert_eq!(
                req.header("X-Im-Signature").unwrap(),
                format!("sha256={}", signature(SECRET, ts, &req.body))
            );
            assert_ne!(
                signature(b"another secret, 16+", ts, &req.body),
                signature(SECRET, ts, &req.body)
            );
        }
        // Nobody listening: may pass.
        let gone = Webhook::new("http://127.0.0.1:9/hook", SECRET, Client::new()).unwrap();
        assert!(matches!(
            gone.push(&note(), &Endpoint::default()).await,
            Err(PushError::Retry(_))
        ));
    }
}
