//! Web Push's cryptography: the payload encrypted for one browser (RFC 8291, "aes128gcm"
//! content coding of RFC 8188), and the server's signed claim to the push service (VAPID,
//! RFC 8292: an ES256 JWT in `Authorization: vapid t=<jwt>, k=<public key>`).
//!
//! Everything is ring's: a fresh P-256 key per message for ECDH (the sender's key is used once,
//! which is what ring's ephemeral keys are for), AES-128-GCM, ECDSA. HKDF-SHA256 is the `hkdf`
//! crate's. `seal` is split from the key agreement so that RFC 8291's Appendix A pins it byte
//! for byte.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use hkdf::Hkdf;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use sha2::Sha256;

/// The one record's size, as browsers expect it (RFC 8291 §4: 4096 octets).
pub const RECORD_SIZE: u32 = 4096;
/// The header before the ciphertext: salt (16), record size (4), key id length (1), the
/// sender's public key (65).
pub const HEADER_LEN: usize = 16 + 4 + 1 + 65;
/// The most a payload may be: a record holds the payload, its delimiter and the 16-octet tag;
/// push services take 4096 octets of body, so the header comes out of it too (RFC 8291 §4).
pub const PAYLOAD_MAX: usize = RECORD_SIZE as usize - HEADER_LEN - 16 - 1;

/// A browser's subscription keys: its P-256 public key (`p256dh`, 65 octets uncompressed) and
/// its authentication secret (`auth`, 16 octets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UaKeys {
    pub p256dh: [u8; 65],
    pub auth: [u8; 16],
}

impl UaKeys {
    /// The keys as `PushSubscription.toJSON()` gives them: base64url, padded or not; the
    /// point checked to be on the curve (an ECDH with a throwaway key).
    pub fn from_base64url(p256dh: &str, auth: &str) -> Result<UaKeys, String> {
        let keys = UaKeys::decode(p256dh, auth)?;
        let probe = EphemeralPrivateKey::generate(&ECDH_P256, &SystemRandom::new())
            .map_err(|_| "no randomness")?;
        agreement::agree_ephemeral(
            probe,
            &UnparsedPublicKey::new(&ECDH_P256, &keys.p256dh),
            |_| (),
        )
        .map_err(|_| "keys.p256dh: not a point on P-256")?;
        Ok(keys)
    }

    /// The keys decoded, their lengths and form checked but not the curve: for keys checked
    /// when they were stored (ring checks the point again when it is used).
    pub fn decode(p256dh: &str, auth: &str) -> Result<UaKeys, String> {
        let p256dh: [u8; 65] = decode(p256dh)
            .ok()
            .and_then(|k| k.try_into().ok())
            .filter(|k: &[u8; 65]| k[0] == 4)
            .ok_or("keys.p256dh: not an uncompressed P-256 point (65 octets, base64url)")?;
        let auth: [u8; 16] = decode(auth)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or("keys.auth: not 16 octets (base64url)")?;
        Ok(UaKeys { p256dh, auth })
    }
}

/// base64url, with or without padding (browsers and libraries differ).
pub fn decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    B64URL.decode(s.trim_end_matches('='))
}

pub fn encode(b: &[u8]) -> String {
    B64URL.encode(b)
}

/// `payload` encrypted for `ua`: one aes128gcm record under a fresh sender key and salt.
pub fn encrypt(payload: &[u8], ua: &UaKeys) -> Result<Vec<u8>, String> {
    if payload.len() > PAYLOAD_MAX {
        return Err(format!(
            "a payload of {} octets (at most {PAYLOAD_MAX})",
            payload.len()
        ));
    }
    let rng = SystemRandom::new();
    let mut salt = [0u8; 16];
    rng.fill(&mut salt).map_err(|_| "no randomness")?;
    let key = EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| "no randomness")?;
    let as_public: [u8; 65] = key
        .compute_public_key()
        .map_err(|_| "no public key")?
        .as_ref()
        .try_into()
        .map_err(|_| "not a P-256 key")?;
    agreement::agree_ephemeral(
        key,
        &UnparsedPublicKey::new(&ECDH_P256, &ua.p256dh),
        |secret| seal(secret, ua, &as_public, &salt, payload),
    )
    .map_err(|_| "the subscription's key is not a P-256 point".to_string())
}

/// RFC 8291 §3.4 and RFC 8188 §2: from the ECDH secret, the content key and nonce, then the
/// header and the one record (the payload, the last-record delimiter 0x02, no padding).
pub fn seal(
    ecdh_secret: &[u8],
    ua: &UaKeys,
    as_public: &[u8; 65],
    salt: &[u8; 16],
    payload: &[u8],
) -> Vec<u8> {
    let (cek, nonce) = content_keys(ecdh_secret, &ua.auth, &ua.p256dh, as_public, salt);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 1 + 16);
    out.extend_from_slice(salt);
    out.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    out.push(65);
    out.extend_from_slice(as_public);
    let mut record = Vec::with_capacity(payload.len() + 1 + 16);
    record.extend_from_slice(payload);
    record.push(2);
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &cek).expect("16-octet key"));
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::empty(),
        &mut record,
    )
    .expect("a record under 4 KiB seals");
    out.extend_from_slice(&record);
    out
}

/// The content-encryption key and nonce (RFC 8291 §3.3, §3.4; RFC 8188 §2.2, §2.3).
fn content_keys(
    ecdh_secret: &[u8],
    auth: &[u8; 16],
    ua_public: &[u8; 65],
    as_public: &[u8; 65],
    salt: &[u8; 16],
) -> ([u8; 16], [u8; 12]) {
    let mut key_info = Vec::with_capacity(14 + 65 + 65);
    key_info.extend_from_slice(b"WebPush: info\0");
    key_info.extend_from_slice(ua_public);
    key_info.extend_from_slice(as_public);
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(auth), ecdh_secret)
        .expand(&key_info, &mut ikm)
        .expect("32 octets");
    let prk = Hkdf::<Sha256>::new(Some(salt), &ikm);
    let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
    prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
        .expect("16 octets");
    prk.expand(b"Content-Encoding: nonce\0", &mut nonce)
        .expect("12 octets");
    (cek, nonce)
}

/// The browser's side of `seal`, given the ECDH secret the browser computes from the header's
/// key: the payload, or why not. Tests use it as a push receiver would.
pub fn open(ecdh_secret: &[u8], ua: &UaKeys, body: &[u8]) -> Result<Vec<u8>, String> {
    let header = body.get(..HEADER_LEN).ok_or("shorter than a header")?;
    let salt: [u8; 16] = header[..16].try_into().expect("16");
    if header[20] != 65 {
        return Err("key id is not a P-256 point".into());
    }
    let as_public: [u8; 65] = header[21..].try_into().expect("65");
    let (cek, nonce) = content_keys(ecdh_secret, &ua.auth, &ua.p256dh, &as_public, &salt);
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &cek).expect("16-octet key"));
    let mut record = body[HEADER_LEN..].to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut record,
        )
        .map_err(|_| "does not decrypt")?;
    match plain.iter().rposition(|&b| b != 0) {
        Some(i) if plain[i] == 2 => Ok(plain[..i].to_vec()),
        _ => Err("no last-record delimiter".into()),
    }
}

/// The application server's VAPID key (RFC 8292): what signs the claims, and the public key
/// browsers subscribe with (`applicationServerKey`).
pub struct Vapid {
    pair: EcdsaKeyPair,
    /// The public key, base64url (`k=` in the header, and `GET /push/vapid`).
    public: String,
    /// Who runs this server (`sub`): a `mailto:` or `https:` URL push services may write to.
    subject: String,
}

impl std::fmt::Debug for Vapid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vapid")
            .field("public", &self.public)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// A VAPID claim's life (RFC 8292 §2: at most 24 hours); one is made per push service and
/// reused until this much less 10 minutes has passed.
pub const CLAIM_TTL_S: u64 = 12 * 3600;

impl Vapid {
    /// The key pair as web-push tools print it: base64url of the uncompressed public point
    /// (65 octets) and of the private scalar (32 octets).
    pub fn new(public: &str, private: &str, subject: &str) -> Result<Vapid, String> {
        if !(subject.starts_with("mailto:") || subject.starts_with("https://")) {
            return Err(format!(
                "web push subject {subject:?}: a mailto: or https:// URL (RFC 8292 §2.1)"
            ));
        }
        let (pubkey, privkey) = (
            decode(public).map_err(|_| "web push public key: not base64url")?,
            decode(private).map_err(|_| "web push private key: not base64url")?,
        );
        let pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &privkey,
            &pubkey,
            &SystemRandom::new(),
        )
        .map_err(|_| {
            "web push keys: not a P-256 key pair (public 65 octets, private 32, matching)"
        })?;
        Ok(Vapid {
            pair,
            public: encode(&pubkey),
            subject: subject.to_string(),
        })
    }

    /// A new key pair, as `(public, private)` base64url (`im web-push-keys`).
    pub fn generate() -> Result<(String, String), String> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| "no randomness")?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng)
            .map_err(|_| "ring's own key does not parse")?;
        // ring's P-256 PKCS#8 document: the private scalar is the ECPrivateKey's OCTET STRING
        // (04 20 ‖ 32 octets) after the algorithm identifiers; checked by parsing it back.
        let at = doc
            .as_ref()
            .windows(5)
            .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
            .ok_or("no private key in ring's PKCS#8 document")?
            + 5;
        let private = encode(&doc.as_ref()[at..at + 32]);
        let public = encode(pair.public_key().as_ref());
        Vapid::new(&public, &private, "mailto:check@localhost")?;
        Ok((public, private))
    }

    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// `Authorization` for a push service at `audience` (`https://host[:port]`), valid until
    /// `exp` (Unix seconds).
    pub fn authorization(&self, audience: &str, exp: u64) -> Result<String, String> {
        let header = encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({"aud": audience, "exp": exp, "sub": self.subject});
        let signing_input = format!("{header}.{}", encode(claims.to_string().as_bytes()));
        let sig = self
            .pair
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| "signing failed")?;
        Ok(format!(
            "vapid t={signing_input}.{}, k={}",
            encode(sig.as_ref()),
            self.public
        ))
    }
}

/// The receiving side: a browser's subscription, and a push service's check of the VAPID
/// claim. Tests use it as their push service; so can anyone writing a stand-in for one.
pub mod receiver {
    use super::*;
    use ring::signature::{UnparsedPublicKey as VerifyKey, ECDSA_P256_SHA256_FIXED};

    /// A browser's side of one subscription: ring's keys are ephemeral, so it opens one
    /// message.
    pub struct Browser {
        key: EphemeralPrivateKey,
        pub keys: UaKeys,
    }

    impl Browser {
        #[allow(clippy::new_without_default)]
        pub fn new() -> Browser {
            let rng = SystemRandom::new();
            let key = EphemeralPrivateKey::generate(&ECDH_P256, &rng).expect("randomness");
            let p256dh = key
                .compute_public_key()
                .expect("a public key")
                .as_ref()
                .try_into()
                .expect("65 octets");
            let mut auth = [0u8; 16];
            rng.fill(&mut auth).expect("randomness");
            Browser {
                key,
                keys: UaKeys { p256dh, auth },
            }
        }

        /// `{"endpoint", "keys": {"p256dh", "auth"}}`, as `PushSubscription.toJSON()`.
        pub fn subscription(&self, endpoint: &str) -> serde_json::Value {
            serde_json::json!({
                "endpoint": endpoint,
                "keys": {"p256dh": encode(&self.keys.p256dh), "auth": encode(&self.keys.auth)},
            })
        }

        /// The payload of a push body.
        pub fn open(self, body: &[u8]) -> Result<Vec<u8>, String> {
            let as_public = body.get(21..HEADER_LEN).ok_or("short")?.to_vec();
            let keys = self.keys;
            agreement::agree_ephemeral(
                self.key,
                &UnparsedPublicKey::new(&ECDH_P256, &as_public),
                |secret| open(secret, &keys, body),
            )
            .map_err(|_| "bad sender key".to_string())?
        }
    }

    /// What a push service checks of `Authorization: vapid t=<jwt>, k=<key>`: the JWT's ES256
    /// signature under `k`, its audience, and an expiry within 24 hours. The claims and `k`.
    pub fn check_vapid(
        authorization: &str,
        audience: &str,
    ) -> Result<(serde_json::Value, String), String> {
        let rest = authorization
            .strip_prefix("vapid t=")
            .ok_or("not the vapid scheme")?;
        let (jwt, k) = rest.split_once(", k=").ok_or("no k=")?;
        let parts: Vec<&str> = jwt.split('.').collect();
        let [h, c, sig] = parts[..] else {
            return Err("not a JWT".into());
        };
        let json = |p: &str| -> Result<serde_json::Value, String> {
            serde_json::from_slice(&decode(p).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())
        };
        if json(h)?["alg"] != "ES256" {
            return Err("not ES256".into());
        }
        VerifyKey::new(
            &ECDSA_P256_SHA256_FIXED,
            decode(k).map_err(|e| e.to_string())?,
        )
        .verify(
            format!("{h}.{c}").as_bytes(),
            &decode(sig).map_err(|e| e.to_string())?,
        )
        .map_err(|_| "the signature does not verify under k")?;
        let claims = json(c)?;
        if claims["aud"] != audience {
            return Err(format!("aud {}, not {audience}", claims["aud"]));
        }
        let now = im_shared::unix_ms() / 1000;
        let exp = claims["exp"].as_u64().ok_or("no exp")?;
        if exp <= now || exp > now + 24 * 3600 {
            return Err(format!("exp {exp} is not within a day of {now}"));
        }
        Ok((claims, k.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::receiver::Browser;
    use super::*;

    fn b(s: &str) -> Vec<u8> {
        decode(s).unwrap()
    }

    // RFC 8291, Appendix A.
    const PLAINTEXT: &str = "When I grow up, I want to be a watermelon";
    const UA_PUBLIC: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AS_PUBLIC: &str =
        "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";
    const SALT: &str = "DGv6ra1nlYgDCS1FRnbzlw";
    const ECDH_SECRET: &str = "kyrL1jIIOHEzg3sM2ZWRHDRB62YACZhhSlknJ672kSs";
    const BODY: &str = "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN";

    #[test]
    fn seal_gives_rfc_8291_appendix_a_byte_for_byte() {
        let ua = UaKeys::from_base64url(UA_PUBLIC, AUTH).unwrap();
        let as_public: [u8; 65] = b(AS_PUBLIC).try_into().unwrap();
        let salt: [u8; 16] = b(SALT).try_into().unwrap();
        let body = seal(
            &b(ECDH_SECRET),
            &ua,
            &as_public,
            &salt,
            PLAINTEXT.as_bytes(),
        );
        assert_eq!(encode(&body), BODY);
        assert_eq!(
            open(&b(ECDH_SECRET), &ua, &body).unwrap(),
            PLAINTEXT.as_bytes()
        );
        let mut tampered = body.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(open(&b(ECDH_SECRET), &ua, &tampered).is_err());
    }

    #[test]
    fn a_payload_encrypted_for_a_browser_opens_with_its_key_only() {
        let (a, other) = (Browser::new(), Browser::new());
        let body = encrypt(b"{\"preview\":\"hi\"}", &a.keys).unwrap();
        assert_eq!(body.len(), HEADER_LEN + 16 + 1 + 16);
        assert_eq!(&body[16..21], &[0, 0, 16, 0, 65]);
        assert!(other.open(&body).is_err());
        assert_eq!(a.open(&body).unwrap(), b"{\"preview\":\"hi\"}");
        assert!(encrypt(&[b'x'; PAYLOAD_MAX + 1], &Browser::new().keys).is_err());
        assert!(encrypt(&[b'x'; PAYLOAD_MAX], &Browser::new().keys).is_ok());
    }

    #[test]
    fn subscription_keys_are_checked() {
        let good = Browser::new().keys;
        let (p, a) = (encode(&good.p256dh), encode(&good.auth));
        assert_eq!(UaKeys::from_base64url(&p, &a).unwrap(), good);
        assert_eq!(
            UaKeys::from_base64url(&format!("{p}="), &format!("{a}==")).unwrap(),
            good,
            "padding is accepted"
        );
        let mut off_curve = good.p256dh;
        off_curve[64] ^= 1;
        for (p256dh, auth) in [
            (encode(&off_curve), a.clone()),
            (encode(&good.p256dh[..33]), a.clone()),
            (p.clone(), encode(&good.auth[..8])),
            ("not base64!".into(), a.clone()),
        ] {
            assert!(UaKeys::from_base64url(&p256dh, &auth).is_err(), "{p256dh}");
        }
    }

    pub(crate) fn check_vapid(authorization: &str, audience: &str) -> serde_json::Value {
        let (claims, _k) = receiver::check_vapid(authorization, audience).unwrap();
        claims
    }

    #[test]
    fn vapid_claims_verify_and_bad_keys_are_refused() {
        let (public, private) = Vapid::generate().unwrap();
        assert_eq!(b(&public).len(), 65);
        assert_eq!(b(&private).len(), 32);
        let v = Vapid::new(&public, &private, "mailto:ops@example.com").unwrap();
        let exp = im_shared::unix_ms() / 1000 + CLAIM_TTL_S;
        let auth = v.authorization("https://push.example", exp).unwrap();
        let claims = check_vapid(&auth, "https://push.example");
        assert_eq!(claims["sub"], "mailto:ops@example.com");
        assert!(
            !format!("{v:?}").contains(&private),
            "no private key in logs"
        );
        let (other_public, _) = Vapid::generate().unwrap();
        assert!(Vapid::new(&other_public, &private, "mailto:a@b").is_err());
        assert!(Vapid::new(&public, &private, "ops@example.com").is_err());
        assert!(Vapid::new(&public, "short", "mailto:a@b").is_err());
    }
}
